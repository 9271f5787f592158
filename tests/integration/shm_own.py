"""The /dev/shm entries a test's own processes could have made (as tests/integration/
shm_own.h): rlbridge's "rlb-<pid>-<n>" names and CUDA's "cuda.shm.<n>.<pid>.<n>" of the given pids
and this process, so a "nothing left behind" check does not race other tests."""

import os
import re

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
