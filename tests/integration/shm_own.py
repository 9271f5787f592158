"""The /dev/shm entries a test's own processes could have made (as tests/integration/
shm_own.h): rlbridge's "rlb-<pid>-<n>" names and CUDA's "cuda.shm.<n>.<pid>.<n>" of the given pids
and this process, so a "nothing left behind" check does not race other tests. The pids of
processes that are gone by the time of the check come from a Family, which notes every
process below this one while the test runs."""

import glob
import os
import re
import threading

_CUDA_SHM = re.compile(r"cuda\.shm\.\d+\.(\d+)\.\d+$")
_RLB_SHM = re.compile(r"rlb-(\d+)-[0-9a-f]+$")


def own_entries(pids=()):
    """The set of /dev/shm names this process or pids could have made."""
    mine = {os.getpid(), *pids}
    out = set()
    for name in os.listdir("/dev/shm"):
        m = _CUDA_SHM.match(name) or _RLB_SHM.match(name)
        if m and int(m.group(1)) in mine:
            out.add(name)
    return out


def descendants(pid):
    """Pids below pid (from /proc)."""
    parent = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(stat.split("/")[2])] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p:
                out.append(c)
                todo.append(c)
    return out


class Family:
    """Every pid seen below this process from start() to stop(), looked at every `period`
    seconds by a thread: a process that lives shorter than that may be missed (a check that
    could fail then does not), none of another test's is counted."""

    def __init__(self, period=0.1):
        self._pids = set()
        self._lock = threading.Lock()
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            self._note()
            self._stop.wait(self._period)

    def _note(self):
        below = descendants(os.getpid())
        with self._lock:
            self._pids.update(below)

    def pids(self):
        """The pids seen so far (a copy)."""
        self._note()
        with self._lock:
            return set(self._pids)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()
