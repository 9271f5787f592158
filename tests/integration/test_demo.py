"""test_demo: `rlb demo` and `rlb doctor` as a user runs them.

    python3 test_demo.py <build>/rlb

- `rlb demo`: one line per step (version, sync ms and GB/s, tokens/s, reward) for 50
  steps, the reward of the last steps clearly above the first (read from the step lines,
  not from the trainer's own verdict), exit 0, nothing left in /dev/shm or /tmp;
- `rlb demo` interrupted by SIGINT mid-training: exit 130 within a few seconds, every child
  process gone, nothing left behind;
- `rlb doctor`: all well on a clean machine; a socket directory open to others fails
  (exit 1, with the chmod fix); a stale socket and a stale segment are warned about and
  removed by --fix.
"""

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from shm_own import own_entries

RLB = None
STEP = re.compile(r"^step +(\d+) +version +(\d+) +sync +([\d.]+) ms +([\d.]+) GB/s +"
                  r"gen +(\d+) tok/s +reward +([\d.]+)$")


def demo_dirs():
    return set(glob.glob("/tmp/rlb-demo-*"))


def children_of(pid):
    """Pids whose parent is pid (from /proc)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


class DemoTest(unittest.TestCase):
    def setUp(self):
        self.shm = own_entries()
        self.dirs = demo_dirs()

    def assertClean(self):
        self.assertLessEqual(own_entries(), self.shm)
        self.assertLessEqual(demo_dirs(), self.dirs)  # other runs' may come and go

    def test_demo_reward_rises(self):
        t0 = time.monotonic()
        p = subprocess.run([RLB, "demo"], capture_output=True, text=True, timeout=240)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        steps = [STEP.match(line) for line in p.stdout.splitlines()]
        steps = [m for m in steps if m]
        self.assertEqual(len(steps), 50, p.stdout)
        versions = [int(m.group(2)) for m in steps]
        self.assertEqual(versions, sorted(set(versions)))  # one new version per step at least
        rewards = [float(m.group(6)) for m in steps]
        first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
        self.assertGreater(last, first + 0.1, f"reward {first:.3f} -> {last:.3f}")
        for m in steps:
            self.assertGreater(float(m.group(3)), 0)  # sync ms
            self.assertGreater(int(m.group(5)), 0)    # tokens/s
        self.assertIn("nothing left in /dev/shm", p.stdout)
        print(f"\ndemo: reward {first:.3f} -> {last:.3f} in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
        self.assertClean()

    def test_demo_interrupted(self):
        p = subprocess.Popen([RLB, "demo", "--steps", "100000"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        line = ""
        while not line.startswith("step") and time.monotonic() < deadline:
            line = p.stdout.readline()
        self.assertTrue(line.startswith("step"), "the demo never started training")
        kids = children_of(p.pid)
        self.assertEqual(len(kids), 4)  # bridge, 2 workers, trainer
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=15)
        self.assertEqual(p.returncode, 130, err)
        self.assertLess(time.monotonic() - t0, 8)
        self.assertIn("interrupted", err)
        for k in kids:
            self.assertFalse(os.path.exists(f"/proc/{k}"), f"child {k} still there")
        self.assertClean()


class DoctorTest(unittest.TestCase):
    def doctor(self, sockdir, *args):
        env = dict(os.environ, RLB_SOCKET_DIR=sockdir)
        return subprocess.run([RLB, "doctor", *args], capture_output=True, text=True,
                              env=env, timeout=60)

    def test_clean(self):
        with tempfile.TemporaryDirectory() as d:
            os.chmod(d, 0o700)
            p = self.doctor(d)
            self.assertEqual(p.returncode, 0, p.stdout)
            self.assertIn("[ ok ] /dev/shm", p.stdout)
            self.assertIn("all is well", p.stdout)
            self.assertIn("RLB_SOCKET_DIR", p.stdout)

    def test_open_directory_fails(self):
        with tempfile.TemporaryDirectory() as d:
            os.chmod(d, 0o755)
            p = self.doctor(d)
            self.assertEqual(p.returncode, 1, p.stdout)
            self.assertIn("[FAIL] socket directory", p.stdout)
            self.assertIn(f"fix: chmod 700 {d}", p.stdout)

    def test_stale_state_fixed(self):
        with tempfile.TemporaryDirectory() as d:
            os.chmod(d, 0o700)
            stale = os.path.join(d, "bridge")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.bind(stale)
            s.close()  # bound, never listening: what a killed bridge leaves
            dead = subprocess.Popen(["true"])
            dead.wait()  # what a process killed with -9 leaves looks like this
            rnd = int.from_bytes(os.urandom(8), "little")
            seg = f"/dev/shm/rlb-{dead.pid}-{rnd:016x}"  # the shm_open fallback's name
            open(seg, "wb").close()
            live = f"/dev/shm/rlb-{os.getpid()}-{rnd:016x}"  # one in flight: not stale
            open(live, "wb").close()
            cuda = f"/dev/shm/cuda.shm.0.{dead.pid}.1"
            open(cuda, "wb").close()
            try:
                p = self.doctor(d)
                self.assertEqual(p.returncode, 0, p.stdout)
                self.assertIn(f"[warn] stale socket {stale}", p.stdout)
                self.assertIn(f"[warn] stale segment {seg}", p.stdout)
                self.assertNotIn(live, p.stdout)
                self.assertIn(f"[warn] {cuda} belongs to process {dead.pid}", p.stdout)
                p = self.doctor(d, "--fix")
                self.assertIn(f"removed stale socket {stale}", p.stdout)
                self.assertIn(f"removed stale segment {seg}", p.stdout)
                self.assertIn(f"removed {cuda} of dead process {dead.pid}", p.stdout)
                self.assertFalse(os.path.exists(stale))
                self.assertFalse(os.path.exists(seg))
                self.assertFalse(os.path.exists(cuda))
                self.assertTrue(os.path.exists(live))  # --fix leaves a live one's alone
            finally:
                for path in (stale, seg, live, cuda):
                    if os.path.exists(path):
                        os.unlink(path)

    def test_bad_usage(self):
        self.assertEqual(subprocess.run([RLB, "doctor", "--nope"], capture_output=True)
                         .returncode, 2)
        self.assertEqual(subprocess.run([RLB, "demo", "--steps", "0"], capture_output=True)
                         .returncode, 2)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: test_demo.py <path to rlb>")
    RLB = sys.argv.pop(1)
    unittest.main()
