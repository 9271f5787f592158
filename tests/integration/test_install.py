"""test_install: rlbridge installed and used as a library, away from its source and build
trees (tests/integration/install.cmake gives the arguments).

- `cmake --install` into a temporary prefix, which is then moved elsewhere: everything used
  below comes from the moved prefix, so nothing may point back at the install path, the
  build tree or the sources. The prefix holds bin/rlb and bin/rlb-toy-trainer, rlb.h,
  librlb.so.<release> with soname librlb.so.<ABI>, rlbridge.pc and the CMake package;
  `rlb demo` and `rlb doctor` run from it.
- examples/toy_trainer.c built out of tree twice, with `pkg-config --cflags --libs rlbridge`
  and with the CMake project tests/integration/consumer (find_package(rlbridge),
  rlbridge::rlb; rlbridge::rlb_static too), each trained against `rlb bridge` and two `rlb
  worker` of the prefix: the reward rises (the trainer's --check).
- A fresh virtual environment, `pip install --no-deps --no-build-isolation client/python`,
  then a client generates against that bridge with no PYTHONPATH and no RLBRIDGE_LIB: the
  package finds librlb next to the `rlb` on PATH. `python -m rlbridge doctor` names it.
- The package refuses a librlb of another ABI (RLBRIDGE_LIB) with an error naming both
  versions, and says where it looked when it finds no librlb.
"""

import argparse
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

ARGS = None
STEPS = "50"  # as `rlb demo`: enough for --check to see the reward rise


def run(cmd, **kw):
    """Runs cmd, failing with its output when it exits non-zero; returns its stdout."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 240), **kw)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def user_env(prefix=None, **extra):
    """The environment of a user of the prefix: its bin/ first on PATH, nothing that names
    the build tree (the test itself may run with RLBRIDGE_LIB or PYTHONPATH set)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RLBRIDGE_LIB", "PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD")}
    # The machine's own library path stays (where the system's packages are not in the
    # default places); only entries inside the build tree go.
    keep = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
            if d and not os.path.abspath(d).startswith(os.path.abspath(ARGS.build))]
    if keep:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(keep)
    if prefix:
        env["PATH"] = os.path.join(prefix, "bin") + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def python_env(prefix=None, **extra):
    """user_env for the virtual environment's python, which loads librlb: in an ASan build
    the sanitizer's runtime must be loaded before it."""
    if ARGS.preload:
        extra.update(LD_PRELOAD=ARGS.preload, ASAN_OPTIONS="detect_leaks=0")
    return user_env(prefix, **extra)


class InstallTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="rlb-test-install-")
        staged = os.path.join(cls.tmp, "staged")
        run([ARGS.cmake, "--install", ARGS.build, "--prefix", staged])
        cls.prefix = os.path.join(cls.tmp, "prefix")
        os.rename(staged, cls.prefix)
        cls.rlb = os.path.join(cls.prefix, "bin", "rlb")
        cls.procs = []
        try:
            cls.build_trainers()
            cls.start_cluster()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for p in reversed(cls.procs):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def build_trainers(cls):
        toy = os.path.join(ARGS.source, "examples", "toy_trainer.c")
        lib = os.path.join(cls.prefix, "lib")
        env = user_env(PKG_CONFIG_PATH=os.path.join(lib, "pkgconfig"))
        flags = run(["pkg-config", "--cflags", "--libs", "rlbridge"], env=env).split()
        cls.toy_pc = os.path.join(cls.tmp, "toy_pc")
        run([ARGS.cc, *ARGS.cflags.split(), "-o", cls.toy_pc, toy, *flags, "-lm",
             f"-Wl,-rpath,{lib}"], env=env)
        src = os.path.join(ARGS.source, "tests", "integration", "consumer")
        out = os.path.join(cls.tmp, "consumer")
        run([ARGS.cmake, "-S", src, "-B", out, f"-DCMAKE_PREFIX_PATH={cls.prefix}",
             f"-DTOY_SOURCE={toy}", f"-DRLB_WANT_VERSION={ARGS.version}",
             f"-DCMAKE_C_FLAGS={ARGS.cflags}", f"-DCMAKE_C_COMPILER={ARGS.cc}"], env=env)
        run([ARGS.cmake, "--build", out], env=env)
        cls.toy_cmake = os.path.join(out, "toy_trainer")
        cls.toy_static = os.path.join(out, "toy_trainer_static")

    @classmethod
    def start_cluster(cls):
        """`rlb bridge --tiny` and two `rlb worker --tiny` from the prefix; returns once the
        bridge logged both replicas up."""
        cls.sock = os.path.join(cls.tmp, "bridge")
        log = os.path.join(cls.tmp, "bridge.log")
        env = user_env(cls.prefix, RLB_LOG="info")
        with open(log, "w") as f:
            cls.procs.append(subprocess.Popen([cls.rlb, "bridge", "--socket", cls.sock,
                                               "--tiny", "--threads", "1"], env=env,
                                              stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while not os.path.exists(cls.sock) and time.monotonic() < deadline:
            time.sleep(0.01)
        for r in range(2):
            cls.procs.append(subprocess.Popen(
                [cls.rlb, "worker", "--bridge", cls.sock, "--replica", str(r), "--replicas",
                 "2", "--tiny", "--threads", "1"], env=user_env(cls.prefix, RLB_LOG="warn")))
        while time.monotonic() < deadline:
            with open(log) as f:
                if f.read().count(" up (") >= 2:  # "replica N up (T TP ranks)"
                    return
            time.sleep(0.05)
        with open(log) as f:
            raise AssertionError("the workers did not come up:\n" + f.read())

    def train(self, trainer, steps=STEPS, check=True):
        cmd = [trainer, "--socket", self.sock, "--steps", steps, "--quiet"]
        out = run(cmd + ["--check"] if check else cmd, env=user_env(self.prefix))
        self.assertIn("reward:", out)

    def test_prefix_holds_the_library(self):
        p = self.prefix
        for f in ["bin/rlb", "bin/rlb-toy-trainer", "include/rlb/rlb.h", "lib/librlb.so",
                  f"lib/librlb.so.{ARGS.abi}", f"lib/librlb.so.{ARGS.version}",
                  "lib/pkgconfig/rlbridge.pc", "lib/cmake/rlbridge/rlbridgeConfig.cmake",
                  "lib/cmake/rlbridge/rlbridgeConfigVersion.cmake"]:
            self.assertTrue(os.path.exists(os.path.join(p, f)), f)
        self.assertEqual(os.listdir(os.path.join(p, "include", "rlb")), ["rlb.h"])
        dyn = run(["readelf", "-d", os.path.join(p, "lib", f"librlb.so.{ARGS.version}")])
        self.assertIn(f"Library soname: [librlb.so.{ARGS.abi}]", dyn)
        # The programs find librlb.so in the prefix, wherever it is, and nothing else of ours.
        for exe in ["rlb", "rlb-toy-trainer"]:
            dyn = run(["readelf", "-d", os.path.join(p, "bin", exe)])
            self.assertNotIn(ARGS.build, dyn)
            self.assertNotIn(ARGS.source, dyn)
        self.assertIn("[$ORIGIN/../lib]", run(["readelf", "-d",
                                                os.path.join(p, "bin", "rlb-toy-trainer")]))

    def test_rlb_runs_from_the_prefix(self):
        env = user_env(self.prefix)
        out = run([self.rlb, "demo", "--steps", "3"], env=env, cwd=self.tmp)
        self.assertIn("nothing left in /dev/shm", out)
        sockdir = os.path.join(self.tmp, "sockets")  # the machine's own is not ours to judge
        os.makedirs(sockdir, mode=0o700, exist_ok=True)
        out = run([self.rlb, "doctor"], env=user_env(self.prefix, RLB_SOCKET_DIR=sockdir),
                  cwd=self.tmp)
        self.assertIn("all is well", out)

    def test_trainer_built_with_pkg_config(self):
        self.train(self.toy_pc)

    def test_trainer_built_with_find_package(self):
        self.train(self.toy_cmake)
        if os.path.exists(self.toy_static):
            self.assertNotIn("librlb", run(["readelf", "-d", self.toy_static]))
            self.train(self.toy_static, steps="2", check=False)

    def test_pip_install_into_a_venv(self):
        venv = os.path.join(self.tmp, "venv")
        try:
            run([sys.executable, "-m", "venv", venv], env=user_env())
        except AssertionError as e:
            raise AssertionError("python3 -m venv failed (Debian: apt-get install "
                                 f"python3-venv): {e}") from None
        py = os.path.join(venv, "bin", "python")
        run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
             os.path.join(ARGS.source, "client", "python")], env=user_env())
        lib = os.path.realpath(os.path.join(self.prefix, "lib", f"librlb.so.{ARGS.abi}"))
        doctor = run([py, "-m", "rlbridge", "doctor", "--socket", self.sock],
                     env=python_env(self.prefix), cwd=self.tmp)
        # The package and the library are released together (pyproject.toml, CMakeLists.txt).
        self.assertIn(f"rlbridge package {ARGS.version}, ABI version {ARGS.abi}", doctor)
        self.assertIn(f"librlb {ARGS.version}, ABI version {ARGS.abi}: {lib} (next to "
                      f"{self.rlb})", doctor)
        self.assertIn("2 replicas up", doctor)
        # Weights to generate from: one step of the prefix's own toy trainer.
        self.train(os.path.join(self.prefix, "bin", "rlb-toy-trainer"), steps="1",
                   check=False)
        client = (
            "import rlbridge, rlbridge._lib as l\n"
            "assert rlbridge.__file__.startswith(%r), rlbridge.__file__\n"
            "assert l.path == %r, l.path\n"
            "with rlbridge.Client(socket=%r) as c:\n"
            "    v = c.weight_version\n"
            "    outs = c.generate([[1, 2, 3], [4, 5]], rlbridge.SamplingParams(\n"
            "        n=2, max_tokens=6, seed=1, logprobs=0))\n"
            "assert v > 0 and len(outs) == 2, (v, outs)\n"
            "for o in outs:\n"
            "    assert len(o.outputs) == 2\n"
            "    for s in o.outputs:\n"
            "        assert len(s.token_ids) == 6 and len(s.logprobs) == 6, s\n"
            "        assert s.weight_version == v, (s, v)\n"
            "print('generated', sum(len(s.token_ids) for o in outs for s in o.outputs))\n"
        ) % (venv, lib, self.sock)
        out = run([py, "-c", client], env=python_env(self.prefix), cwd=self.tmp)
        self.assertIn("generated 24", out)

        # A librlb of another ABI is refused with both versions named.
        p = subprocess.run([py, "-c", "import rlbridge"], capture_output=True, text=True,
                           env=python_env(self.prefix, RLBRIDGE_LIB=ARGS.abi_other),
                           cwd=self.tmp, timeout=60)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("LibraryError", p.stderr)
        self.assertIn(f"is librlb of ABI version {ARGS.abi_other_version}, and this package "
                      f"speaks ABI version {ARGS.abi}", p.stderr)
        # No librlb anywhere (unless this machine has one installed for its loader): one
        # sentence of where it looked.
        if ctypes.util.find_library("rlb") is None:
            p = subprocess.run([py, "-c", "import rlbridge"], capture_output=True, text=True,
                               env=python_env(None, PATH=os.path.dirname(py)), cwd=self.tmp,
                               timeout=60)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn(f"cannot load librlb.so.{ARGS.abi}; looked at next to rlb on PATH "
                          f"(there is none), in {venv}/lib", p.stderr)


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    for opt in ["--build", "--source", "--cmake", "--cc", "--version", "--abi", "--abi-other",
                "--abi-other-version"]:
        ap.add_argument(opt, required=True)
    ap.add_argument("--cflags", default="")
    ap.add_argument("--preload", default="")
    ARGS, rest = ap.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
