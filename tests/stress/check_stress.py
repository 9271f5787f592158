"""Runs `rlb stress OPTIONS --json` once per case, one after another, and checks each JSON
line: exit status 0, no violation of any invariant, every fault kind injected at least
MIN_PER_KIND times (at least one bridge kill), work done in proportion to the run's length
(versions committed, requests answered, probes matched).

usage: check_stress.py RLB CASE [CASE ...]
  CASE: the rlb stress options of one run, as one argument ("--duration 35 --seed 7")
"""
import json
import shlex
import subprocess
import sys

MIN_PER_KIND = 2          # faults of each kind in a run (pick seeds whose schedule has them)
MIN_BRIDGE_KILLS = 1      # kill_bridge is the rarest kind
PER_MINUTE = {"committed": 20, "done": 100, "match": 20}  # work done, at least, per minute


def duration_s(args):
    return int(args[args.index("--duration") + 1]) if "--duration" in args else 60


def check(rlb, args):
    """Runs one case; returns the list of its failures."""
    proc = subprocess.run([rlb, "stress", *args, "--json"], capture_output=True, text=True,
                          timeout=280)
    sys.stderr.write(proc.stderr)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        return ["no JSON line; stdout:\n" + proc.stdout]
    report = json.loads(lines[-1])
    print(json.dumps(report, indent=1))
    failures = []
    if proc.returncode != 0:
        failures.append(f"exit status {proc.returncode}")
    if report["violations_total"] != 0 or not report["ok"]:
        bad = {k: v for k, v in report["violations"].items() if v}
        failures.append(f"violations: {bad}")
    for kind, n in report["faults"].items():
        want = MIN_BRIDGE_KILLS if kind == "kill_bridge" else MIN_PER_KIND
        if n < want:
            failures.append(f"{kind}: {n} injected, want >= {want}")
    minutes = duration_s(args) / 60
    done = {"committed": report["versions"]["committed"],
            "done": report["requests"]["done"], "match": report["probes"]["match"]}
    for what, n in done.items():
        want = int(PER_MINUTE[what] * minutes)
        if n < want:
            failures.append(f"{what}: {n}, want >= {want}")
    return failures


def main():
    rlb, cases = sys.argv[1], sys.argv[2:]
    failed = 0
    for case in cases:
        print(f"rlb stress {case}", flush=True)
        failures = check(rlb, shlex.split(case))
        for f in failures:
            print(f"FAIL ({case}): {f}")
        failed |= bool(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
