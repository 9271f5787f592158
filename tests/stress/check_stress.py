"""Runs `rlb stress ARGS --json` and checks its JSON line: exit status 0, no violation of
any invariant, every fault kind injected at least MIN_PER_KIND times (at least one bridge
kill), work done (versions committed, requests answered, probes matched).

usage: check_stress.py RLB [rlb stress options]
"""
import json
import subprocess
import sys

MIN_PER_KIND = 2          # faults of each kind in a 60 s run (rates: stress_sched.c)
MIN_BRIDGE_KILLS = 1      # kill_bridge is the rarest kind


def main():
    rlb, args = sys.argv[1], sys.argv[2:]
    proc = subprocess.run([rlb, "stress", *args, "--json"], capture_output=True, text=True,
                          timeout=280)
    sys.stderr.write(proc.stderr)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        print("no JSON line; stdout:\n" + proc.stdout)
        return 1
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
    if report["versions"]["committed"] < 20:
        failures.append(f"only {report['versions']['committed']} versions committed")
    if report["requests"]["done"] < 100:
        failures.append(f"only {report['requests']['done']} requests done")
    if report["probes"]["match"] < 20:
        failures.append(f"only {report['probes']['match']} probes matched the reference")
    for f in failures:
        print("FAIL: " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
