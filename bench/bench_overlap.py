"""Benchmark: publishing while the merge runs, against merging then uploading.

    .venv/bin/python bench/bench_overlap.py make --dir /tmp/overlap --heavy-rank 1024
    .venv/bin/python bench/bench_overlap.py run --dir /tmp/overlap --runs 3

``make`` writes a TinyLlama-width fp16 base (24 layers, about 2.4 GB, in 100 MB shards) and
the three LoRA adapters of ``bench_stream.py``. ``run`` measures, each as a whole process:

- ``merge``: ``mergejob merge`` into a folder (stream engine, 100 MB output shards);
- ``upload``: uploading that folder with huggingface_hub's ``upload_folder`` (what ``hf upload``
  does after a merge) to a Hub test server in a process of its own, whose bandwidth is capped
  (one budget shared by all connections) so that the upload alone takes about as long as the
  merge alone (the rate is calibrated first: an untimed merge, then uploads at a rate
  adjusted until the two are within 10%);
- ``overlap``: ``mergejob merge --push_to_hub`` against a fresh server at the same rate: shards
  go up while the next ones merge;
- ``sequential``: merge, then upload (the sum of the first two, as the seed did it).

Each run starts a fresh server (its object store would otherwise deduplicate the shards), with
its objects in /dev/shm when there is one (the Hub's disk is not this machine's). With
``make --heavy-rank R`` an all-linear adapter of rank R is added: more arithmetic per output
byte, so that merge and upload match at a rate the upload reaches by its throttle, as over a
network, rather than by this machine's CPU.

Reported: medians over ``--runs``, and ``overlap / max(merge, upload)`` (target <= 1.2;
merge-then-upload is about 2.0 by construction).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
LAYERS = 24
TOKEN = "hf_bench_overlap_token"
REPO = "bench/merged"


# ---------------------------------------------------------------------------------------
# Fixtures


def cmd_make(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(BENCH))
    import bench_stream

    work = Path(args.dir)
    base = work / "base"
    if not (base / "model.safetensors.index.json").is_file():
        print(f"making {base} ({args.layers} layers)", flush=True)
        bench_stream.make_base(base, args.layers, args.shard_bytes)
    adapters = dict(bench_stream.ADAPTERS)
    if args.heavy_rank:
        # A high-rank adapter on every linear layer: more arithmetic per output byte, so the
        # merge is as long as an upload at a rate well below what this machine can move
        # (the upload is then limited by the throttle, as by a network, not by the CPU).
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        spec = {"r": args.heavy_rank, "lora_alpha": args.heavy_rank, "targets": targets}
        adapters[f"all-r{args.heavy_rank}"] = spec
    for seed, (name, spec) in enumerate(adapters.items(), start=1):
        adapter = work / name
        if not (adapter / "adapter_model.safetensors").is_file():
            bench_stream.make_adapter(adapter, base, args.layers, spec, seed)
    return 0


# ---------------------------------------------------------------------------------------
# The server, with one bandwidth budget shared by every connection


def cmd_serve(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.support.hubserver import server

    class SharedThrottle:
        """The server's per-request throttle, made one budget for all requests."""

        lock = threading.Lock()
        next_free = 0.0

        def __init__(self, bytes_per_second: float | None) -> None:
            self.rate = bytes_per_second

        def chunk_size(self) -> int:
            return (
                1024 * 1024 if not self.rate else int(max(4096, min(1024 * 1024, self.rate / 50)))
            )

        def account(self, n: int) -> None:
            if not self.rate:
                return
            with SharedThrottle.lock:
                now = time.monotonic()
                start = max(SharedThrottle.next_free, now)
                SharedThrottle.next_free = start + n / self.rate
                wait = SharedThrottle.next_free - now
            if wait > 0:
                time.sleep(wait)

    server._Throttle = SharedThrottle  # type: ignore[misc,assignment]
    hub = server.HubTestServer(args.data)
    hub.add_user("bench", token=TOKEN)
    hub.bytes_per_second = args.rate or None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with hub:
        print(hub.url, flush=True)
        stop.wait()
    return 0


class Server:
    """A bench server process on a fresh data folder."""

    def __init__(self, work: Path, rate: float) -> None:
        # The Hub's storage is not this machine's disk: keep the server's objects in memory
        # where /dev/shm exists, so its writes do not compete with the merge's.
        shm = Path("/dev/shm")
        data = shm / "mergejob-bench-hub" if shm.is_dir() else work / "hub-data"
        shutil.rmtree(data, ignore_errors=True)
        self.data = data
        command = [sys.executable, __file__, "serve", "--data", str(data), "--rate", str(rate)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError("the bench server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.data, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Uploading a finished folder, alone: huggingface_hub's own upload_folder, as `hf upload` does
# it after a merge (no mergejob import, so the baseline pays no torch import).


def cmd_upload(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    api.upload_folder(repo_id=REPO, folder_path=args.folder, commit_message="upload")
    return 0


# ---------------------------------------------------------------------------------------
# Measuring


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return wall, result.stderr


def upload_seconds(work: Path, rate: float, upload: list[str], env: dict[str, str]) -> float:
    server = Server(work, rate)
    try:
        return timed(upload, {**env, "HF_ENDPOINT": server.url})[0]
    finally:
        server.stop()


def phase_seconds(log: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"phase (\w+) done in ([\d.]+)s", log)}


def cmd_run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(BENCH))
    import bench_stream

    work = Path(args.dir)
    base = work / "base"
    adapters = [str(p.parent) for p in sorted(work.glob("*/adapter_config.json"))]
    out = work / "out"
    home = work / "hf-home"
    python = sys.executable
    env = {
        **os.environ,
        "MERGEJOB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home),
        "HF_TOKEN": TOKEN,
    }
    env.pop("HF_HUB_OFFLINE", None)
    job = ["--base", str(base), "--adapters", *adapters, "--max-shard-size", args.max_shard_size]
    merge = [python, "-m", "mergejob.cli", "merge", *job, "--output-dir", str(out)]
    upload = [python, __file__, "upload", str(out)]
    overlap = [python, "-m", "mergejob.cli", "merge", *job, "--output_dir", REPO, "--push_to_hub"]

    bench_stream.warm(work)
    shutil.rmtree(out, ignore_errors=True)
    calibration, _ = timed(merge, env)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    rate = args.rate or size / calibration
    print(f"calibration merge {calibration:.1f}s; {size / 1e9:.2f} GB of shards", flush=True)
    for _ in range(0 if args.rate else 3):
        seconds = upload_seconds(work, rate, upload, env)
        print(f"calibration upload at {rate / 1e6:.1f} MB/s: {seconds:.1f}s", flush=True)
        if abs(seconds - calibration) <= 0.1 * calibration:
            break
        rate *= seconds / calibration

    rows: list[dict[str, Any]] = []
    for run in range(args.runs):
        row: dict[str, Any] = {}
        shutil.rmtree(out, ignore_errors=True)
        row["merge"], log = timed(merge, env)
        row["merge_phases"] = phase_seconds(log)
        row["upload"] = upload_seconds(work, rate, upload, env)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(home / "mergejob", ignore_errors=True)
        server = Server(work, rate)
        try:
            row["overlap"], log = timed(overlap, {**env, "HF_ENDPOINT": server.url})
            row["overlap_phases"] = phase_seconds(log)
        finally:
            server.stop()
        row["sequential"] = row["merge"] + row["upload"]
        row["ratio"] = row["overlap"] / max(row["merge"], row["upload"])
        rows.append(row)
        print(
            f"run {run + 1}: merge {row['merge']:.1f}s, upload {row['upload']:.1f}s, "
            f"overlap {row['overlap']:.1f}s, merge-then-upload {row['sequential']:.1f}s, "
            f"overlap/max {row['ratio']:.2f}",
            flush=True,
        )
    summary = {
        key: round(statistics.median(r[key] for r in rows), 2)
        for key in ("merge", "upload", "overlap", "sequential", "ratio")
    }
    report = {
        "machine": machine(),
        "output_gb": round(size / 1e9, 3),
        "upload_rate_mb_s": round(rate / 1e6, 2),
        "max_shard_size": args.max_shard_size,
        "median": summary,
        "runs": rows,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def machine() -> dict[str, Any]:
    import huggingface_hub

    sys.path.insert(0, str(BENCH))
    import bench_stream

    info = bench_stream.machine()
    info["huggingface_hub"] = huggingface_hub.__version__
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_overlap.py")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write the fixtures")
    make.add_argument("--dir", required=True)
    make.add_argument("--shard-bytes", type=int, default=100_000_000)
    make.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (88 MB each)")
    make.add_argument(
        "--heavy-rank", type=int, default=0, help="add an all-linear adapter of this rank"
    )
    serve = sub.add_parser("serve", help="(internal) a throttled Hub test server")
    serve.add_argument("--data", required=True)
    serve.add_argument("--rate", type=float, default=0.0)
    upload = sub.add_parser("upload", help="(internal) publish a finished folder")
    upload.add_argument("folder")
    run = sub.add_parser("run", help="measure")
    run.add_argument("--dir", required=True)
    run.add_argument("--runs", type=int, default=3)
    run.add_argument("--max-shard-size", default="100MB")
    run.add_argument("--rate", type=float, default=0.0, help="bytes/s (default: calibrated)")
    run.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    handlers = {"make": cmd_make, "serve": cmd_serve, "upload": cmd_upload, "run": cmd_run}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
