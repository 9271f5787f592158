"""test_xnode: bridges across nodes (bridge/xnode.h), 2 and 3 nodes on this machine.

    python3 test_xnode.py <build>/rlb <build>/tests/xnode_trainer

Every node is its own `rlb launch` with its own socket directory and loopback address
(127.0.0.1, 127.0.0.2, ...); the trainer script is xnode_trainer (FSDP shards of the tiny
model over all nodes' ranks). Covered:
- 2 nodes x 2 FSDP2 ranks and 3 nodes x 1 FSDP1 rank, TP 2 workers on each node, 20
  versions; after each commit local rank 0 of every node compares every worker buffer of its
  node with the naive reference (xnode_trainer --check); the FSDP2 job again with chunks of
  4 KiB through 3 chunks of staging (ops cut at chunk boundaries, slots reused while the
  rest is in flight);
- the same two jobs with LoRA adapters on every target (xnode_trainer --lora: a frozen base,
  factors new in every version, checked against W + s * B * A), and one with whole tensors
  spread over the ranks, each node's ranks declaring only their own adapters: after version 1
  each node receives exactly the factor bytes the other node's ranks hold; and a remote
  trainer killed mid-sync with a restart, followed by correct weights;
- kill -9 of a remote trainer rank before it publishes and just after (mid-sync): the version
  aborts on every node (each other rank reads "aborted"), and with --max-restarts 1 the job
  recovers and finishes all 20 versions, without restarts it exits with the error;
- kill -9 of a node's bridge and of a node's launcher while the other node's ranks wait in a
  sync: every launcher exits with a line naming the failure within RLB_PEER_TIMEOUT_MS + 2 s
  of the kill (plus the launchers' own shutdown grace);
- after every run: no process of the job left (each carries RLB_TEST_JOB=<run id> in its
  environment), no socket directory of its launchers (/tmp/rlb-launch-<launcher pid>-*), no
  /dev/shm entry of its processes (shm_own.py): other jobs of the machine may come and go.
Job and XnodeCase also serve test_xnode_netns.py, where each node is a network namespace.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shm_own import Family, own_entries  # noqa: E402
from test_launch import free_port, launch_dirs  # noqa: E402  (free_port: the static store's pair)

RLB = TRAINER = None
PEER_TIMEOUT_MS = 2000
GRACE_S = 3.0  # the launcher's SIGTERM grace before it kills a child


def procs_with(text, where="cmdline"):
    """Pids whose command line (or environment: where="environ") contains text."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/%s" % (pid, where), "rb") as f:
                if text.encode() in f.read():
                    out.append(int(pid))
        except (OSError, ValueError):
            pass
    return out


def argv_of(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


class Loopback:
    """Every node on this machine's loopback, node n at 127.0.0.(n+1)."""

    env = {}

    def addr(self, n):
        return "127.0.0.%d" % (n + 1)

    def wrap(self, n):
        """The command that runs node n's launcher (prefixed to it)."""
        return []


class Job:
    """One launcher per node of test.net, started at once. With c10d the launchers are given
    no node rank: node 0 is the one that binds the endpoint (at net.addr(0)), the others are
    ranked by arrival."""

    def __init__(self, test, nnodes, nproc, args, restarts=0, env=None, c10d=False):
        net = test.net
        self.port = free_port()
        self.run_id = "xnode-%d-%d" % (os.getpid(), self.port)
        self.marker = "RLB_TEST_JOB=%s" % self.run_id
        self.nproc = nproc
        env = dict(os.environ, RLB_THREADS="1", RLB_PEER_TIMEOUT_MS=str(PEER_TIMEOUT_MS),
                   RLB_TEST_JOB=self.run_id, **net.env, **(env or {}))
        self.procs = []
        for n in range(nnodes):
            if c10d:
                rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint",
                        "%s:%d" % (net.addr(0), self.port)]
            else:
                rdzv = ["--node-rank", str(n), "--master-addr", net.addr(0),
                        "--master-port", str(self.port)]
            cmd = net.wrap(n) + [
                RLB, "launch", "--nnodes", str(nnodes), *rdzv, "--local-addr", net.addr(n),
                "--nproc-per-node", str(nproc), "--rollout-tp", "2",
                "--max-restarts", str(restarts), "--rdzv-id", self.run_id, "--no-python",
                TRAINER] + args
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True, env=env,
                                               cwd=test.tmp.name))
        self.out = [""] * nnodes

    def node_of(self, i):
        """The node rank launcher i got, from its trainers' prefixes."""
        m = re.search(r"(?m)^\[trainer (\d+)\]", self.out[i])
        return int(m.group(1)) // self.nproc if m else None

    def wait(self, timeout):
        codes = []
        for i, p in enumerate(self.procs):
            try:
                out, _ = p.communicate(timeout=timeout)
                self.out[i] += out  # after what read_until took
            except subprocess.TimeoutExpired:
                p.kill()
                self.out[i] += p.communicate()[0]
                raise AssertionError("node %d did not finish in %d s:\n%s" %
                                     (i, timeout, self.out[i][-3000:]))
            codes.append(p.returncode)
        return codes

    def read_until(self, node, pattern, timeout):
        """Reads node's output until a line matches pattern; returns the time it came."""
        p = self.procs[node]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = p.stdout.readline()
            if not line:
                break
            self.out[node] += line
            if re.search(pattern, line):
                return time.monotonic()
        raise AssertionError("node %d never printed /%s/:\n%s" % (node, pattern,
                                                                 self.out[node][-3000:]))


class XnodeCase(unittest.TestCase):
    """The checks of a cross-node test; net says where the nodes are."""

    net = Loopback()

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dirs = launch_dirs()  # a stale one whose pid a launcher of ours reuses is not ours
        self.family = Family().start()
        self.shm = own_entries()

    def tearDown(self):
        self.family.stop()
        self.tmp.cleanup()

    def assertClean(self, job):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            left = procs_with(job.marker + "\0", "environ")
            dirs = launch_dirs([p.pid for p in job.procs]) - self.dirs
            shm = own_entries(self.family.pids()) - self.shm
            if not left and not dirs and not shm:
                return
            time.sleep(0.1)
        self.fail("left behind: processes %s, directories %s, /dev/shm %s" %
                  ([(p, argv_of(p)) for p in left], dirs, shm))

    def synced_all(self, job, nnodes, nproc, versions):
        self.assertEqual(sorted(job.node_of(i) for i in range(nnodes)), list(range(nnodes)),
                         "\n".join(o[-1000:] for o in job.out))
        for i in range(nnodes):
            n, out = job.node_of(i), job.out[i]
            for r in range(n * nproc, (n + 1) * nproc):
                for v in (1, versions):
                    self.assertIn("[trainer %d] synced %d " % (r, v), out, out[-3000:])
                self.assertIn("[trainer %d] done" % r, out)
            self.assertNotIn("MISMATCH", out)
            if "check unavailable" in out:
                raise unittest.SkipTest("this machine does not let a process read another's "
                                        "memory (/proc/PID/mem): " + out[-500:])

    def kill_and_time(self, what):
        """Node 0's rank waits in version 6 while node 1's `what` is killed."""
        job = Job(self, 2, 1, ["--versions", "20", "--die", "1:6:stall"], restarts=0)
        job.read_until(0, r"\[trainer 0\] synced 5 ", 60)
        time.sleep(0.3)  # node 0's rank is in version 6 now, node 1's stalls before it
        victim = job.procs[1].pid
        if what == "bridge":
            victim = [p for p in procs_with(job.run_id)
                      if argv_of(p)[1:2] == ["bridge"] and "--node-rank" in argv_of(p) and
                      argv_of(p)[argv_of(p).index("--node-rank") + 1] == "1"]
            self.assertEqual(len(victim), 1, victim)
            victim = victim[0]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        codes = job.wait(30)
        elapsed = time.monotonic() - t0
        print("kill -9 of node 1's %s: every launcher out in %.2f s" % (what, elapsed),
              file=sys.stderr)
        self.assertNotEqual(codes[0], 0)
        self.assertLess(elapsed, PEER_TIMEOUT_MS / 1000 + 2 + 2 * GRACE_S, job.out[0][-2000:])
        self.assertRegex(job.out[0], r"node 1|stopping", job.out[0][-2000:])
        self.assertNotIn("[trainer 0] synced 6 ", job.out[0])
        self.assertClean(job)


class XnodeTest(XnodeCase):
    def test_fsdp2_two_nodes(self):
        job = Job(self, 2, 2, ["--layout", "fsdp2", "--versions", "20", "--check"])
        self.assertEqual(job.wait(90), [0, 0], "\n".join(o[-2000:] for o in job.out))
        self.synced_all(job, 2, 2, 20)
        self.assertClean(job)

    def test_fsdp2_small_chunks(self):
        job = Job(self, 2, 2, ["--layout", "fsdp2", "--versions", "20", "--check"],
                  env={"RLB_XNODE_CHUNK_BYTES": "4096", "RLB_XNODE_STAGING_BYTES": "12288"})
        self.assertEqual(job.wait(90), [0, 0], "\n".join(o[-2000:] for o in job.out))
        self.synced_all(job, 2, 2, 20)
        self.assertClean(job)

    def test_fsdp1_three_nodes(self):
        job = Job(self, 3, 1, ["--layout", "fsdp1", "--versions", "20", "--check"])
        self.assertEqual(job.wait(90), [0, 0, 0], "\n".join(o[-2000:] for o in job.out))
        self.synced_all(job, 3, 1, 20)
        self.assertClean(job)

    def lora_bytes_case(self, layout, ranks):
        """LoRA adapters on every target (DESIGN §10): the factors cross nodes like the base
        (stage ops and the merges' base copies read other nodes' bytes), and after the first
        version only they do: each node's bridge then receives exactly the factor bytes the
        other node's ranks hold (xnode_trainer computes them from the shards it registered),
        with every worker buffer checked in every version."""
        versions = 4
        job = Job(self, 2, ranks, ["--layout", layout, "--versions", str(versions), "--lora",
                                   "--check"])
        self.assertEqual(job.wait(90), [0, 0], "\n".join(o[-2000:] for o in job.out))
        self.synced_all(job, 2, ranks, versions)
        for out in job.out:
            got = {int(v): (int(r), int(b), int(f)) for v, r, b, f in re.findall(
                r"xnode bytes (\d+): received (\d+), remote base (\d+), remote factors (\d+)",
                out)}
            self.assertEqual(sorted(got), list(range(1, versions + 1)), out[-3000:])
            received, base, factors = got[1]
            print("version 1: received %d bytes (the other node holds %d of base, %d of "
                  "factors)" % (received, base, factors), file=sys.stderr)
            self.assertGreaterEqual(received, base)
            for v in range(2, versions + 1):
                self.assertEqual(got[v][0] - got[v - 1][0], factors,
                                 "version %d: %s" % (v, out[-3000:]))
            print("versions 2..%d: received %d bytes each" % (versions, factors),
                  file=sys.stderr)
        self.assertClean(job)

    def test_lora_fsdp2_two_nodes(self):
        self.lora_bytes_case("fsdp2", 2)

    def test_lora_split_two_nodes(self):
        """Whole tensors spread over the ranks, each declaring only the adapters whose factors
        it registers: each node's bridge knows some adapters, and every node must plan with
        all of them (they travel in the registrations)."""
        self.lora_bytes_case("split", 1)

    def test_lora_fsdp1_three_nodes(self):
        job = Job(self, 3, 1, ["--layout", "fsdp1", "--versions", "4", "--lora", "--check"])
        self.assertEqual(job.wait(90), [0, 0, 0], "\n".join(o[-2000:] for o in job.out))
        self.synced_all(job, 3, 1, 4)
        self.assertClean(job)

    def test_lora_remote_trainer_killed_recovers(self):
        """With LoRA adapters, rank 1 (node 1) is killed just after it published 3, mid-sync:
        the attempt aborts, and the versions after the restart, whose exchanges skip what a
        node's staging holds, still give every worker the right weights (--check)."""
        job = Job(self, 2, 1, ["--versions", "6", "--lora", "--check", "--die", "1:3:during",
                               "--republish", "5"], restarts=1)
        self.assertEqual(job.wait(90), [0, 0], "\n".join(o[-2000:] for o in job.out))
        self.assertIn("restarting the trainer group", job.out[0])
        self.synced_all(job, 2, 1, 6)
        self.assertClean(job)

    def test_remote_trainer_killed_recovers(self):
        """Rank 1 (node 1) is killed just after it published 5: version 5 aborts on node 0
        too (its rank reads the reason, unless its launcher stopped it first for the
        restart), the group restarts on both nodes from the committed version and finishes
        all 20 versions."""
        job = Job(self, 2, 1, ["--versions", "20", "--check", "--die", "1:5:during",
                               "--republish", "5"], restarts=2)
        self.assertEqual(job.wait(90), [0, 0], "\n".join(o[-2000:] for o in job.out))
        self.assertIn("restarting the trainer group", job.out[0])
        self.assertNotRegex(job.out[0], r"\[trainer 0\] synced 5 .*\n(.*\n)*.*\[trainer 0\] "
                            r"aborted 5")
        self.synced_all(job, 2, 1, 20)
        self.assertClean(job)

    def test_remote_trainer_dead_before_publish(self):
        """Rank 1 dies before it publishes 7, no restarts: node 0's rank never sees 7
        committed; both launchers exit non-zero naming the failure."""
        job = Job(self, 2, 1, ["--versions", "20", "--die", "1:7:before"])
        codes = job.wait(60)
        self.assertNotEqual(codes, [0, 0])
        self.assertNotIn("[trainer 0] synced 7 ", job.out[0])
        self.assertRegex(job.out[0], r"stopping|aborted 7", job.out[0][-2000:])
        self.assertClean(job)

    def test_remote_trainer_killed_mid_sync(self):
        """Rank 1 is killed just after publishing 7 (mid-sync), no restarts: no rank of
        version 7 is told synced on one node and aborted on another; the job exits 1."""
        job = Job(self, 2, 1, ["--versions", "20", "--check", "--die", "1:7:during"])
        codes = job.wait(60)
        self.assertNotEqual(codes, [0, 0])
        self.assertNotIn("[trainer 0] synced 8 ", job.out[0])
        synced7 = "[trainer 0] synced 7 " in job.out[0]
        self.assertTrue(synced7 or re.search(r"\[trainer 0\] aborted 7", job.out[0]) or
                        "stopping" in job.out[0], job.out[0][-2000:])
        self.assertClean(job)

    def test_bridge_killed(self):
        self.kill_and_time("bridge")

    def test_launcher_killed(self):
        self.kill_and_time("launcher")


if __name__ == "__main__":
    RLB, TRAINER = sys.argv[1], sys.argv[2]
    del sys.argv[1:3]
    unittest.main(verbosity=2)
