"""Benchmark of a merge split over indices: ``mergejob submit --local --workers 1`` (one
process, the ordinary path) against ``--workers 2`` (two processes with
``JOB_COMPLETION_INDEX`` 0 and 1, each merging its byte-balanced share; index 0 finalises),
on the TinyLlama-1.1B-shaped fixture of bench_stream.py.

    .venv/bin/python bench/bench_stream.py make --dir /tmp/mergejob-bench
    .venv/bin/python bench/bench_workers.py --dir /tmp/mergejob-bench --out /tmp/mergejob-bench-workers

Each configuration runs ``--runs`` times, round-robin (so load from elsewhere hits each
alike); wall and CPU seconds and peak RSS of the whole process tree, and the 1-minute load
average when it started, come from bench_stream.measure. The outputs' shard digests must
agree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import ADAPTERS, machine, measure, shard_digests, warm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_workers.py")
    parser.add_argument("--dir", required=True, help="bench_stream.py make's folder")
    parser.add_argument("--out", required=True, help="scratch folder for the outputs")
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--max-shard-size", default="800MB")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    work = Path(args.dir) / args.model
    base = work / "base"
    adapters = [str(work / name) for name in ADAPTERS]
    out = Path(args.out) / "out"
    env = {**os.environ, "MERGEJOB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mergejob.cli", "submit", "--local", "--base", str(base)]
    command += ["--adapters", *adapters, "--output_dir", str(out)]
    command += ["--max-shard-size", args.max_shard_size]
    warm(work)
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.workers}
    digests: dict[int, dict[str, str]] = {}
    for run in range(args.runs):
        for n in args.workers:
            shutil.rmtree(out, ignore_errors=True)
            measured = measure([*command, "--workers", str(n)], env)
            digests.setdefault(n, shard_digests(out))
            shutil.rmtree(out, ignore_errors=True)
            runs[n].append(measured)
            print(
                f"workers {n} run {run + 1}: {measured['wall_s']:.1f}s wall, "
                f"{measured['cpu_s']:.1f}s cpu, {measured['peak_rss_gb']:.2f} GB, "
                f"load {measured['load']:.1f}",
                flush=True,
            )
    median = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    first = args.workers[0]
    result: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "median": median,
        "speedup": {
            n: median[first]["wall_s"] / median[n]["wall_s"] for n in args.workers if n != first
        },
        "outputs_identical": len({json.dumps(d) for d in digests.values()}) == 1,
        "runs": runs,
    }
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
