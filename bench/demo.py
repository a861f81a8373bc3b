"""Benchmark: wall time of the whole offline demo grid (`snakemake --cores N`) from scratch.

Runs the default config.yaml in a fresh scratch working directory and prints the wall
time, the job count and, from Snakemake's per-job `benchmark:` files, the summed seconds
and the peak RSS of each rule. Usage:

    python bench/demo.py [--cores 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = ap.parse_args()
    wd = args.keep or Path(tempfile.mkdtemp(prefix="mergebake-bench-"))
    wd.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "config.yaml", wd / "config.yaml")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [
        str(Path(sys.executable).parent / "snakemake"),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(wd),
        "--cores",
        str(args.cores),
        "--quiet",
        "all",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    per_rule: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for tsv in (wd / "benchmarks").rglob("*.tsv"):
        rule = tsv.relative_to(wd / "benchmarks").parts[0]
        with open(tsv) as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        agg = per_rule[rule]
        agg[0] += 1
        agg[1] += float(row["s"])
        agg[2] = max(agg[2], float(row["max_rss"]) if row["max_rss"] != "-" else 0.0)
    print(
        f"demo grid, --cores {args.cores}, {os.cpu_count()} CPUs: wall {wall:.0f} s "
        f"({wall / 60:.1f} min)"
    )
    print(f"{'rule':<18}{'jobs':>6}{'sum s':>10}{'peak RSS MB':>14}")
    for rule, (n, s, rss) in sorted(per_rule.items()):
        print(f"{rule:<18}{n:>6}{s:>10.1f}{rss:>14.0f}")
    if not args.keep:
        shutil.rmtree(wd)


if __name__ == "__main__":
    main()
