#!/usr/bin/env python3
"""ncu_step_summary.py: where one decode step's GPU time goes, from `ncu --csv` output.

Reads the CSV that `ncu --csv --profile-from-start off --metrics
gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum` prints for the kernels of
one step (rlb-bench-engine with RLB_BENCH_PROFILE=B:D, see scripts/gpu-check.sh ncu-step)
and prints, per kernel name (template arguments kept, parameters dropped): launches, total
and mean time, share of the step, and DRAM bytes moved per second. Kernels ran serialized
under ncu, so the total is a little above the graph's step time.

usage: ncu_step_summary.py REPORT.csv [COPY_GBS]
"""
import csv
import sys
from collections import defaultdict

# ncu's unit names, older and newer spellings (CUDA 13's ncu writes "ns" and "B"); a metric
# in any other unit stops the summary rather than be misread
UNIT = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0,
        "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0,
        "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9,
        "B": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def kernel_key(name):
    """The kernel's name without its parameter list: 'f<T>(int, ...)' -> 'f<T>'."""
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return name[:i]
    return name


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    copy_gbs = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    rows = []
    with open(sys.argv[1], newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu's own log lines are not CSV
    launches = defaultdict(dict)
    for row in csv.DictReader(lines):
        try:
            value = float(row["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        unit = row.get("Metric Unit", "")
        if unit not in UNIT:
            sys.exit(f"ncu_step_summary: metric {row.get('Metric Name')} in unknown unit "
                     f"{unit!r}")
        scale = UNIT[unit]
        launches[row["ID"]]["name"] = kernel_key(row["Kernel Name"])
        launches[row["ID"]][row["Metric Name"]] = value * scale
    if not launches:
        sys.exit("ncu_step_summary: no kernel rows in " + sys.argv[1])
    per = defaultdict(lambda: [0, 0.0, 0.0])
    for k in launches.values():
        p = per[k["name"]]
        p[0] += 1
        p[1] += k.get("gpu__time_duration.sum", 0.0)
        p[2] += k.get("dram__bytes_read.sum", 0.0) + k.get("dram__bytes_write.sum", 0.0)
    total = sum(p[1] for p in per.values())
    print(f"{len(launches)} launches, {total * 1e6:.1f} us in all (serialized)")
    print(f"{'share':>6} {'total us':>9} {'n':>4} {'mean us':>8} {'DRAM GB/s':>9}  kernel")
    for name, (n, t, b) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        rate = b / t / 1e9 if t else 0.0
        frac = f" ({rate / copy_gbs:.2f})" if copy_gbs else ""
        print(f"{100 * t / total:5.1f}% {t * 1e6:9.1f} {n:4d} {t / n * 1e6:8.1f} "
              f"{rate:9.0f}{frac}  {name[:110]}")


if __name__ == "__main__":
    main()
