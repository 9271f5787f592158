"""test_launch: `rlb launch` as a user runs it, one or several nodes on this machine.

    python3 test_launch.py <build>/rlb

Every node is its own launcher with its own socket directory and address on loopback
(127.0.0.1, 127.0.0.2, ...). Covered:
- environment parity: a script prints its environment; every variable torchrun's
  documentation lists (ENV below, also README's table) has torchrun's value, for 1 node and
  for 2 nodes (static backend) and 3 nodes (c10d, ranks by arrival);
- output prefixed per process, torchrun's option spellings, -m and --no-python;
- --max-restarts 1 with a trainer that exits 1 once: the group restarts, the bridge stays
  up, the run finishes; without restarts the worst exit status comes back;
- kill -9 of the launcher: no process left, socket directory gone; SIGINT: 130, same;
- bad input: nodes disagreeing on --nnodes or --nproc-per-node, a master port in use, a
  master address that is not node 0's, a run id of another job, a missing script, a node
  that never arrives: one line naming the node and the value, every launcher stopped;
- a trainer failing on node 1 stops node 0 too.
Left behind is checked on what this test's own launchers made: their socket directories
(named by the launcher's pid) and the /dev/shm entries of their processes (shm_own.py), so
other jobs of the machine may come and go meanwhile.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shm_own import Family, descendants, own_entries  # noqa: E402

RLB = None
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")

# torchrun's documentation (torch.distributed.run, "Environment Variables"; the agent's
# worker environment): name -> value for node g of n, local rank l of p, restart r of m.
ENV = {
    "LOCAL_RANK": lambda g, n, l, p, r, m, run: str(l),
    "RANK": lambda g, n, l, p, r, m, run: str(g * p + l),
    "GROUP_RANK": lambda g, n, l, p, r, m, run: str(g),
    "ROLE_RANK": lambda g, n, l, p, r, m, run: str(g * p + l),
    "ROLE_NAME": lambda g, n, l, p, r, m, run: "default",
    "LOCAL_WORLD_SIZE": lambda g, n, l, p, r, m, run: str(p),
    "WORLD_SIZE": lambda g, n, l, p, r, m, run: str(n * p),
    "GROUP_WORLD_SIZE": lambda g, n, l, p, r, m, run: str(n),
    "ROLE_WORLD_SIZE": lambda g, n, l, p, r, m, run: str(n * p),
    "MASTER_ADDR": None,  # checked per test: the master address (static) or node 0's
    "MASTER_PORT": None,
    "TORCHELASTIC_RESTART_COUNT": lambda g, n, l, p, r, m, run: str(r),
    "TORCHELASTIC_MAX_RESTARTS": lambda g, n, l, p, r, m, run: str(m),
    "TORCHELASTIC_RUN_ID": lambda g, n, l, p, r, m, run: run,
    "TORCHELASTIC_USE_AGENT_STORE": lambda g, n, l, p, r, m, run: "False",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": lambda g, n, l, p, r, m, run: "1",
    "OMP_NUM_THREADS": lambda g, n, l, p, r, m, run: "1" if p > 1 else None,
}

PRINT_ENV = """import json, os, sys
print("ENV " + json.dumps(dict(os.environ)))
sys.stdout.flush()
"""

# Prints the environment of this trainer's bridge: the `rlb bridge` process whose socket is
# in RLB_SOCKET_DIR, found through /proc.
BRIDGE_ENV = r"""
import os
sock = os.path.join(os.environ["RLB_SOCKET_DIR"], "bridge")
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
        if b"bridge" not in argv or sock.encode() not in argv:
            continue
        with open("/proc/%s/environ" % pid, "rb") as f:
            env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    except OSError:
        continue
    print("BRIDGE_ENV UCX_NET_DEVICES=%s NCCL_SOCKET_IFNAME=%s" % (
        env.get(b"UCX_NET_DEVICES", b"-").decode(), env.get(b"NCCL_SOCKET_IFNAME", b"-").decode()))
"""

FAIL_ONCE = """import os, sys, time
marker = sys.argv[1]
print("attempt", os.environ["TORCHELASTIC_RESTART_COUNT"], "rank", os.environ["RANK"])
sys.stdout.flush()
if os.environ["RANK"] == "1" and not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit(1)
time.sleep(0.5)
"""

SLEEP = """import os, sys, time
print("up", os.getpid())
sys.stdout.flush()
time.sleep(120)
"""

EXIT_CODE = """import os, sys, time
if os.environ["RANK"] == sys.argv[1]:
    sys.exit(int(sys.argv[2]))
time.sleep(120)
"""


def free_port():
    """A port p with p and p+1 free on loopback (the static store uses master port + 1)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 65000:
            try:
                with socket.socket() as s2:
                    s2.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                pass
    raise RuntimeError("no free port pair")


def launch_dirs(pids=None):
    """The launchers' socket directories (/tmp/rlb-launch-<launcher pid>-XXXXXX): those of
    pids, or all."""
    if pids is None:
        return set(glob.glob("/tmp/rlb-launch-*"))
    return {d for p in pids for d in glob.glob("/tmp/rlb-launch-%d-*" % p)}


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def envs_of(out):
    return [json.loads(line.split("ENV ", 1)[1]) for line in out.splitlines() if "ENV {" in line]


class LaunchTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.env = dict(os.environ, RLB_THREADS="1")
        self.env.pop("OMP_NUM_THREADS", None)
        self.launchers = []  # pids of the launchers this test started
        self.dirs = launch_dirs()  # a stale one whose pid a launcher of ours reuses is not ours
        self.family = Family().start()
        self.shm = own_entries()

    def tearDown(self):
        self.family.stop()
        self.tmp.cleanup()

    def script(self, name, text):
        path = os.path.join(self.tmp.name, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def run_launch(self, args, timeout=90):
        p = self.start(args)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def start(self, args):
        p = subprocess.Popen([RLB, "launch", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=self.env)
        self.launchers.append(p.pid)
        return p

    def own_dirs(self):
        return launch_dirs(self.launchers) - self.dirs

    def assertClean(self):
        deadline = time.monotonic() + 5
        while self.own_dirs() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.own_dirs(), set())
        self.assertLessEqual(own_entries(self.family.pids()), self.shm)

    def check_env(self, env, g, n, l, p, r, m, run, master):
        for k, f in ENV.items():
            want = f(g, n, l, p, r, m, run) if f else None
            if k == "MASTER_ADDR":
                want = master[0]
            elif k == "MASTER_PORT":
                want = master[1]
            if want is None:
                self.assertNotIn(k, env, k)
            elif want != "*":
                self.assertEqual(env.get(k), want, f"{k} of node {g} local rank {l}")

    def test_readme_lists_every_variable(self):
        with open(README) as f:
            text = f.read()
        for k in ENV:
            self.assertTrue(re.search(r"\|\s*`%s`" % k, text), f"README's launch table lacks {k}")
        for opt in ["--nnodes", "--nproc-per-node", "--node-rank", "--master-addr",
                    "--master-port", "--rdzv-endpoint", "--rdzv-id", "--rdzv-backend",
                    "--rdzv-conf", "--standalone", "--max-restarts", "--monitor-interval",
                    "--start-method", "--log-dir", "--redirects", "--tee", "--role",
                    "--no-python", "`-m`", "--run-path", "--local-ranks-filter", "--local-addr",
                    "--logs-specs"]:
            self.assertTrue(opt in text, f"README's launch table lacks {opt}")

    def test_env_one_node(self):
        port = free_port()
        s = self.script("env.py", PRINT_ENV)
        p = self.run_launch(["--nproc_per_node=2", "--master-port", str(port),
                             "--rollout-replicas", "1", s])
        self.assertEqual(p.returncode, 0, p.stderr)
        envs = envs_of(p.stdout)
        self.assertEqual(len(envs), 2, p.stdout)
        for e in envs:
            l = int(e["LOCAL_RANK"])
            self.check_env(e, 0, 1, l, 2, 0, 0, "none", ("127.0.0.1", str(port)))
            self.assertTrue(os.path.isabs(e["RLB_SOCKET_DIR"]))
        self.assertRegex(p.stdout, r"(?m)^\[trainer [01]\] ENV ")
        self.assertRegex(p.stderr, r"(?m)^\[bridge\] ")
        self.assertRegex(p.stderr, r"(?m)^\[worker 0\.0\] ")
        self.assertClean()

    def test_env_two_nodes_static(self):
        port = free_port()
        s = self.script("env.py", PRINT_ENV)
        common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                  "--master-port", str(port), "--rdzv-id", "job7", "--max-restarts", "3",
                  "--rollout-replicas", "0"]
        n1 = self.start(common + ["--node-rank", "1", s])
        time.sleep(0.3)  # node 1 first: it waits for node 0's store
        n0 = self.start(common + ["--node_rank=0", s])
        outs = [n.communicate(timeout=60) for n in (n0, n1)]
        for g, (n, (out, err)) in enumerate(zip((n0, n1), outs)):
            self.assertEqual(n.returncode, 0, err)
            envs = envs_of(out)
            self.assertEqual(sorted(int(e["RANK"]) for e in envs), [2 * g, 2 * g + 1])
            for e in envs:
                self.check_env(e, g, 2, int(e["LOCAL_RANK"]), 2, 0, 3, "job7",
                               ("127.0.0.1", str(port)))
        self.assertClean()

    def test_env_three_nodes_c10d(self):
        port = free_port()
        s = self.script("env.py", PRINT_ENV)
        nodes = []
        for i in range(3):
            nodes.append(self.start(["--nnodes", "3", "--nproc-per-node", "1",
                                     "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                     f"127.0.0.1:{port}", "--rdzv-id", "c10djob",
                                     "--rollout-replicas", "0", s]))
        ranks, masters = [], set()
        for n in nodes:
            out, err = n.communicate(timeout=60)
            self.assertEqual(n.returncode, 0, err)
            (e,) = envs_of(out)
            g = int(e["GROUP_RANK"])
            ranks.append(g)
            self.check_env(e, g, 3, 0, 1, 0, 0, "c10djob", ("127.0.0.1", "*"))
            masters.add(e["MASTER_PORT"])
        self.assertEqual(sorted(ranks), [0, 1, 2])
        self.assertEqual(len(masters), 1)  # one MASTER_PORT, chosen by node 0
        self.assertNotEqual(masters, {str(port)})
        self.assertClean()

    def test_module_and_no_python(self):
        port = free_port()
        self.script("envmod.py", PRINT_ENV)
        self.env["PYTHONPATH"] = self.tmp.name
        p = self.run_launch(["--master-port", str(port), "--rollout-replicas", "0", "-m",
                             "envmod"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(len(envs_of(p.stdout)), 1)
        p = self.run_launch(["--master-port", str(port), "--rollout-replicas", "0",
                             "--no-python", "sh", "-c", "echo rank $RANK of $WORLD_SIZE"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("[trainer 0] rank 0 of 1", p.stdout)

    def test_max_restarts(self):
        port = free_port()
        s = self.script("fail_once.py", FAIL_ONCE)
        marker = os.path.join(self.tmp.name, "failed")
        p = self.run_launch(["--nproc-per-node", "2", "--master-port", str(port),
                             "--max-restarts", "1", "--rollout-replicas", "1", s, marker])
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("restarting the trainer group (restart 1 of 1)", p.stderr)
        self.assertRegex(p.stdout, r"\[trainer 0\] attempt 1 rank 0")
        self.assertRegex(p.stdout, r"\[trainer 1\] attempt 1 rank 1")
        # the bridge stayed up through the restart: it started listening once
        self.assertEqual(p.stderr.count("INFO bridge: listening on"), 1, p.stderr)
        self.assertClean()

    def test_worst_exit_status(self):
        port = free_port()
        s = self.script("exit.py", EXIT_CODE)
        t0 = time.monotonic()
        p = self.run_launch(["--nproc-per-node", "3", "--master-port", str(port),
                             "--rollout-replicas", "0", s, "2", "3"])
        self.assertEqual(p.returncode, 3, p.stderr)
        self.assertLess(time.monotonic() - t0, 30)  # the others were stopped, not awaited
        self.assertIn("[trainer 2] (pid", p.stderr)
        self.assertClean()

    def start_sleepers(self, port, replicas):
        """A launcher of 2 sleeping trainers and its rollout, once both trainers are up."""
        s = self.script("sleep.py", SLEEP)
        n = self.start(["--nproc-per-node", "2", "--master-port", str(port),
                        "--rollout-replicas", str(replicas), s])
        up = 0
        deadline = time.monotonic() + 60
        while up < 2 and time.monotonic() < deadline:
            up += "] up " in n.stdout.readline()
        self.assertEqual(up, 2)
        return n

    def test_kill9_launcher_leaves_nothing(self):
        port = free_port()
        n = self.start_sleepers(port, 2)
        kids = descendants(n.pid)
        self.assertGreaterEqual(len(kids), 6)  # watchdog, bridge, 2 workers, 2 trainers
        self.assertEqual(len(self.own_dirs()), 1)
        n.kill()
        n.wait()
        n.stdout.close()
        n.stderr.close()
        deadline = time.monotonic() + 8
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([k for k in kids if alive(k)], [])
        self.assertClean()

    def test_sigint(self):
        port = free_port()
        n = self.start_sleepers(port, 1)
        kids = descendants(n.pid)
        t0 = time.monotonic()
        n.send_signal(signal.SIGINT)
        out, err = n.communicate(timeout=20)
        self.assertEqual(n.returncode, 130, err)
        self.assertLess(time.monotonic() - t0, 8)
        self.assertIn("interrupted", err)
        self.assertEqual([k for k in kids if alive(k)], [])
        self.assertClean()

    def two_nodes(self, args0, args1, script, timeout=30):
        port = free_port()
        common = ["--master-addr", "127.0.0.1", "--master-port", str(port),
                  "--rollout-replicas", "0", "--rdzv-conf", "join_timeout=3"]
        n0 = self.start(common + ["--node-rank", "0"] + args0 + script)
        n1 = self.start(common + ["--node-rank", "1"] + args1 + script)
        res = [n.communicate(timeout=timeout) for n in (n0, n1)]
        return [(n.returncode, out, err) for n, (out, err) in zip((n0, n1), res)]

    def test_nodes_disagree(self):
        s = [self.script("env.py", PRINT_ENV)]
        for a0, a1, want in [
                (["--nnodes", "2"], ["--nnodes", "3"], "node 1 says --nnodes 3, node 0 says 2"),
                (["--nnodes", "2", "--nproc-per-node", "2"], ["--nnodes", "2"],
                 "node 1 says --nproc-per-node 1, node 0 says 2")]:
            for rc, out, err in self.two_nodes(a0, a1, s):
                self.assertEqual(rc, 1, err)
                self.assertIn(want, err)
                self.assertEqual(envs_of(out), [])
        self.assertClean()

    def test_missing_script(self):
        s = self.script("env.py", PRINT_ENV)
        (rc0, out0, err0), (rc1, _, err1) = self.two_nodes(
            ["--nnodes", "2", s], ["--nnodes", "2", os.path.join(self.tmp.name, "nope.py")], [])
        self.assertEqual((rc0, rc1), (1, 1))
        for err in (err0, err1):
            self.assertIn("node 1: script '%s' does not exist" %
                          os.path.join(self.tmp.name, "nope.py"), err)
        self.assertEqual(envs_of(out0), [])

    def test_node_never_arrives(self):
        port = free_port()
        s = self.script("env.py", PRINT_ENV)
        t0 = time.monotonic()
        p = self.run_launch(["--nnodes", "2", "--node-rank", "0", "--master-port", str(port),
                             "--rdzv-conf", "join_timeout=2", "--rdzv-id", "lonely",
                             "--rollout-replicas", "0", s])
        self.assertEqual(p.returncode, 1)
        self.assertLess(time.monotonic() - t0, 10)
        self.assertIn("node 1 of 2 never joined the rendezvous", p.stderr)
        self.assertIn("'lonely'", p.stderr)

    def test_port_in_use_and_wrong_run_id(self):
        s = self.script("env.py", PRINT_ENV)
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            p = self.run_launch(["--master-port", str(port), "--rollout-replicas", "0", s])
            self.assertEqual(p.returncode, 1)
            self.assertIn(f"node 0: --master-port {port} on 127.0.0.1 is in use", p.stderr)
        port = free_port()
        job_a = self.start(["--nnodes", "2", "--node-rank", "0", "--master-port", str(port),
                            "--rdzv-id", "job-a", "--rdzv-conf", "join_timeout=6",
                            "--rollout-replicas", "0", s])
        time.sleep(0.5)
        p = self.run_launch(["--nnodes", "2", "--node-rank", "1", "--master-port", str(port),
                             "--rdzv-id", "job-b", "--rollout-replicas", "0", s])
        self.assertEqual(p.returncode, 1)
        self.assertIn("serves run id 'job-a', not 'job-b'", p.stderr)
        job_a.communicate(timeout=20)
        self.assertEqual(job_a.returncode, 1)

    def test_master_addr_not_this_node(self):
        s = self.script("env.py", PRINT_ENV)
        p = self.run_launch(["--nnodes", "2", "--node-rank", "0", "--master-addr", "192.0.2.1",
                             "--master-port", str(free_port()), "--rollout-replicas", "0", s])
        self.assertEqual(p.returncode, 1)
        self.assertIn("node 0: --master-addr 192.0.2.1 is not an address of this node",
                      p.stderr)

    def test_local_addr(self):
        # a node whose --local-addr is not its own: every node fails, naming node and value
        s = [self.script("env.py", PRINT_ENV)]
        for rc, out, err in self.two_nodes(["--nnodes", "2"],
                                           ["--nnodes", "2", "--local-addr", "192.0.2.1"], s):
            self.assertEqual(rc, 1, err)
            self.assertIn("node 1: --local-addr 192.0.2.1 is not an address of this machine",
                          err)
            self.assertEqual(envs_of(out), [])
        # loopback addresses for several nodes: right only when they share this machine
        for rc, out, err in self.two_nodes(["--nnodes", "2", "--local-addr", "127.0.0.1"],
                                           ["--nnodes", "2", "--local-addr", "127.0.0.2"], s):
            self.assertEqual(rc, 0, err)
            self.assertIn("it is a loopback interface, which other machines cannot reach", err)
        # one of its own: the bridge gets its interface for the transports
        self.env.pop("UCX_NET_DEVICES", None)
        self.env.pop("NCCL_SOCKET_IFNAME", None)
        # (127.0.0.1 is lo's own address; 127.0.0.2 is on lo's network, as test_xnode's nodes)
        s = self.script("bridge_env.py", BRIDGE_ENV)
        for addr in ("127.0.0.1", "127.0.0.2"):
            p = self.run_launch(["--master-port", str(free_port()), "--rollout-replicas", "1",
                                 "--local-addr", addr, s])
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("--local-addr %s is on interface lo" % addr, p.stderr)
            self.assertNotIn("loopback interface", p.stderr)  # one node: nothing to warn of
            self.assertRegex(p.stdout, r"BRIDGE_ENV UCX_NET_DEVICES=lo NCCL_SOCKET_IFNAME=lo\b")
        self.assertClean()

    def test_remote_failure_stops_all(self):
        s = self.script("exit.py", EXIT_CODE)
        t0 = time.monotonic()
        (rc0, _, err0), (rc1, _, err1) = self.two_nodes(["--nnodes", "2"], ["--nnodes", "2"],
                                                        [s, "1", "4"])
        self.assertEqual(rc1, 4, err1)
        self.assertEqual(rc0, 1, err0)
        self.assertIn("stopping: node 1: trainer group failed (status 4)", err0)
        self.assertLess(time.monotonic() - t0, 25)
        self.assertClean()


if __name__ == "__main__":
    RLB = sys.argv.pop(1)
    unittest.main(verbosity=2)
