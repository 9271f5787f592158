"""test_xnode_netns: bridges across nodes with each node in its own network namespace.

    python3 test_xnode_netns.py <build>/rlb <build>/tests/xnode_trainer

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2: where `ip netns add` cannot run it
exits 77 (skipped) with one line saying why. The network, made once for the run: node n's
launcher runs under `ip netns exec rlb-test-<pid>-n<n>`, whose veth0 has 10.77.0.(n+1)/24;
the other end of each veth is a port of bridge br0 in namespace rlb-test-<pid>-sw, so
nothing is added to the machine's own network (whose firewall may drop bridged traffic)
and names cannot clash with a parallel run's. UCX is held to tcp on veth0 (UCX_TLS,
UCX_NET_DEVICES): left to itself it would take shared memory between namespaces of one
machine. The namespaces are deleted at the end, also after a failure or SIGTERM (which
stops the jobs in flight first), and a run deletes those of earlier runs whose process is
gone (killed by a timeout). Covered, with the checks of test_xnode.py (the workers' bytes
against the naive reference after every version, nothing left behind):
- 2 nodes x 2 FSDP2 ranks (static rendezvous at node 0's veth address), TP 2 workers, 5
  versions; every node's veth0 received at least a share of the model per version, so the
  weights crossed the veths;
- 3 nodes x 1 FSDP1 rank with c10d: only node 0 has the endpoint's address, the others
  cannot bind it and join it;
- kill -9 of node 1's launcher while node 0's rank waits in a sync: node 1's watchdog
  writes the abort into the store across the veth, every launcher exits in time.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_xnode as xn  # noqa: E402

IP = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)),
                                None)  # root's PATH has sbin, a user's may not
PREFIX = "rlb-test-%d" % os.getpid()
VERSIONS = 5
# What a version moves at least into each node's veth0: the tiny model is about 130k
# parameters in f32, half of them held by the other node's ranks (about 260 KiB); the
# store's own traffic is a few KiB a version.
MIN_RX_PER_VERSION = 64 * 1024


class Unavailable(Exception):
    """This machine cannot make the network (the reason is the message)."""


def ip(*args):
    """Runs ip with args; returns its stdout, raises Unavailable with its stderr line."""
    p = subprocess.run([IP, *args], capture_output=True, text=True)
    if p.returncode:
        raise Unavailable("ip %s: %s" % (" ".join(args), (p.stderr or p.stdout).strip()))
    return p.stdout


class Netns:
    """The namespaces of this run (module docstring); node n at 10.77.0.(n+1)."""

    env = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "veth0"}

    def __init__(self, nnodes):
        self.nnodes = nnodes
        self.made = []  # namespaces created, deleted by down()

    def ns(self, n):
        return "%s-n%d" % (PREFIX, n)

    def addr(self, n):
        return "10.77.0.%d" % (n + 1)

    def wrap(self, n):
        return [IP, "netns", "exec", self.ns(n)]

    def add(self, name):
        ip("netns", "add", name)
        self.made.append(name)

    def up(self):
        sw = PREFIX + "-sw"
        self.add(sw)
        ip("-n", sw, "link", "add", "br0", "type", "bridge")
        ip("-n", sw, "link", "set", "br0", "up")
        for n in range(self.nnodes):
            self.add(self.ns(n))
            ip("-n", sw, "link", "add", "p%d" % n, "type", "veth", "peer", "name", "veth0",
               "netns", self.ns(n))
            ip("-n", sw, "link", "set", "p%d" % n, "master", "br0", "up")
            ip("-n", self.ns(n), "addr", "add", self.addr(n) + "/24", "dev", "veth0")
            ip("-n", self.ns(n), "link", "set", "veth0", "up")
            ip("-n", self.ns(n), "link", "set", "lo", "up")  # a node reaches its own address

    def down(self):
        """Deletes the namespaces (their veths and the bridge go with them)."""
        for name in reversed(self.made):
            subprocess.run([IP, "netns", "del", name], capture_output=True)
        self.made = []

    def rx_bytes(self, n):
        """Bytes node n's veth0 has received."""
        (link,) = json.loads(ip("-n", self.ns(n), "-j", "-s", "link", "show", "dev", "veth0"))
        return link["stats64"]["rx"]["bytes"]


def sweep_stale():
    """Deletes the namespaces of earlier runs whose process is gone."""
    for line in ip("netns", "list").splitlines():
        m = re.match(r"(rlb-test-(\d+)-\S+)", line)
        if m and not os.path.exists("/proc/%s" % m.group(2)):
            subprocess.run([IP, "netns", "del", m.group(1)], capture_output=True)


class NetnsTest(xn.XnodeCase):
    net = None  # set by main

    def rx(self):
        return [self.net.rx_bytes(n) for n in range(self.net.nnodes)]

    def test_fsdp2_two_nodes(self):
        before = self.rx()
        job = xn.Job(self, 2, 2, ["--layout", "fsdp2", "--versions", str(VERSIONS), "--check"])
        self.assertEqual(job.wait(90), [0, 0], "\n".join(o[-2000:] for o in job.out))
        self.synced_all(job, 2, 2, VERSIONS)
        got = [b - a for a, b in zip(before, self.rx())][:2]
        for n, b in enumerate(got):
            self.assertGreaterEqual(b, VERSIONS * MIN_RX_PER_VERSION,
                                    "node %d's veth0 received %d bytes" % (n, b))
        self.assertClean(job)

    def test_fsdp1_three_nodes_c10d(self):
        job = xn.Job(self, 3, 1, ["--layout", "fsdp1", "--versions", str(VERSIONS), "--check"],
                     c10d=True)
        self.assertEqual(job.wait(90), [0, 0, 0], "\n".join(o[-2000:] for o in job.out))
        self.synced_all(job, 3, 1, VERSIONS)
        self.assertEqual(job.node_of(0), 0)  # the endpoint's node
        self.assertClean(job)

    def test_launcher_killed(self):
        self.kill_and_time("launcher")


def stop_jobs():
    """SIGTERM to the launchers of this run's jobs still running (a run cut short), then waits
    for every process of them to go: each launcher stops its own trainers, workers and
    bridge and removes its socket directory."""
    mine = "RLB_TEST_JOB=xnode-%d-" % os.getpid()
    for pid in xn.procs_with(mine, "environ"):
        if xn.argv_of(pid)[1:2] == ["launch"]:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + 4 * xn.GRACE_S
    while xn.procs_with(mine, "environ") and time.monotonic() < deadline:
        time.sleep(0.1)


def on_sigterm(sig, frame):
    """Ends the run through main's `finally` (unittest records SystemExit as a test's error
    and goes on; KeyboardInterrupt it lets through)."""
    raise KeyboardInterrupt("SIGTERM")


def main():
    xn.RLB, xn.TRAINER = sys.argv[1], sys.argv[2]
    del sys.argv[1:3]
    net = Netns(3)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if not IP:
            raise Unavailable("iproute2's ip is not installed")
        sweep_stale()
        net.up()
    except Unavailable as e:
        net.down()
        print("skipped: network namespaces are not available here (%s)" % e)
        return 77
    try:
        NetnsTest.net = net
        result = unittest.main(verbosity=2, exit=False).result
        return 0 if result.wasSuccessful() else 1
    finally:
        stop_jobs()
        net.down()


if __name__ == "__main__":
    sys.exit(main())
