"""python3 -m rlbridge doctor [--socket PATH]: which librlb this package loaded (its file,
where it was found, its release and ABI version) and, with --socket, whether the bridge
there lets this library in (its weight version and the replicas that serve). Exit status 0
when all is well, 1 otherwise. A library of another ABI is refused when the package is
imported, before this runs: the import error names both versions.
"""

import argparse
import sys

from . import Client, RlbError, _lib


def _package_version():
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:
        return "unknown"
    try:
        return version("rlbridge")
    except PackageNotFoundError:
        return "not installed (run from the source tree)"


def doctor(socket):
    print(f"rlbridge package {_package_version()}, ABI version {_lib.ABI_VERSION}")
    print(f"librlb {_lib.lib.rlb_version().decode()}, ABI version "
          f"{_lib.lib.rlb_abi_version()}: {_lib.path} ({_lib.found_where})")
    if socket is None:
        return 0
    try:
        with Client(socket=socket, observer=True) as c:
            stats = c.bridge_stats()
    except RlbError as e:
        print(f"bridge at {socket}: {e}")
        return 1
    print(f"bridge at {socket}: weight version {int(stats.get('weight_version', 0))}, "
          f"{int(stats.get('replicas_up', 0))} replicas up")
    return 0


def main(argv):
    ap = argparse.ArgumentParser(prog="python3 -m rlbridge")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("doctor", help="the librlb this package loaded, and the bridge")
    d.add_argument("--socket", help="also connect to the bridge at this socket path or name")
    args = ap.parse_args(argv)
    return doctor(args.socket)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
