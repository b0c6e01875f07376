"""How good are ``mergejob plan``'s estimates? Peak memory and time, estimated vs measured.

    .venv/bin/python bench/bench_plan_estimate.py rates
    .venv/bin/python bench/bench_plan_estimate.py check --dir /tmp/mergejob-bench --runs 2

``rates`` measures the throughput constants of :class:`mergejob.plan.report.Throughput` and the
resident size of a merge process before its buffers (``BASE_RSS``) on this machine.

``check`` uses the 1B benchmark fixture of ``bench/bench_stream.py`` (a TinyLlama-1.1B-shaped
fp16 base and three LoRA adapters; made if missing), and for each job runs ``mergejob plan
--json`` (the estimate) and ``mergejob merge`` under a sampler of the peak RSS of its whole
process tree (the measurement), and reports both with their ratio. The acceptance bound is
an estimate within 25 % of the measured peak RSS of the stream engine.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _bench_stream() -> Any:
    spec = importlib.util.spec_from_file_location("bench_stream", ROOT / "bench/bench_stream.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JOBS = {
    "stream-w1-attn": (["attn-r8"], ["--engine", "stream", "--workers", "1"]),
    "stream-w1-all3": (["attn-r8", "all-r16-rslora", "mlp-r32"], ["--workers", "1"]),
    "stream-w2-all3": (["attn-r8", "all-r16-rslora", "mlp-r32"], ["--workers", "2"]),
    "stream-w1-dora": (["mlp-r32-dora"], ["--workers", "1"]),
    "peft-attn": (["attn-r8"], ["--engine", "peft"]),
}


def make_dora(source: Path, dest: Path) -> None:
    """A DoRA version of a LoRA adapter: the same factors plus magnitude vectors."""
    import torch
    from safetensors.torch import load_file, save_file

    if (dest / "adapter_model.safetensors").is_file():
        return
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dest / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(source / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(9)
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        rows = tensors[key].shape[0]
        magnitude = 0.9 + 0.1 * torch.rand(rows, generator=generator)
        tensors[key.replace(".lora_B.weight", ".lora_magnitude_vector")] = magnitude
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})


def _measure(bench: Any, command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS bytes of the process tree, load average at the start)."""
    measured = bench.measure(command, env)
    if isinstance(measured, dict):
        return measured["wall_s"], measured["peak_rss_gb"] * 1e9, measured.get("load", -1.0)
    wall, peak = measured
    return wall, peak, os.getloadavg()[0]


def cmd_check(args: argparse.Namespace) -> int:
    bench = _bench_stream()
    work = Path(args.dir)
    model = "tinyllama-1.1b"
    bench.cmd_make(argparse.Namespace(dir=str(work), shard_bytes=800_000_000))
    base = work / model / "base"
    make_dora(work / model / "mlp-r32", work / model / "mlp-r32-dora")
    python = sys.executable
    env = {**os.environ, "MERGEJOB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    out = work / model / "out-estimate"
    rows = []
    bench.warm(work / model)
    for name, (adapters, flags) in JOBS.items():
        if args.jobs and name not in args.jobs:
            continue
        job = ["--base", str(base), "--adapters", *[str(work / model / a) for a in adapters],
               "--output_dir", str(out), "--max-shard-size", "800MB", *flags]  # fmt: skip
        plan = json.loads(
            subprocess.run(
                [python, "-m", "mergejob.cli", "plan", "--json", *job],
                env=env, check=True, capture_output=True, text=True,
            ).stdout
        )  # fmt: skip
        engine = "peft" if "peft" in flags else "stream"
        estimate = next(m for m in plan["memory"] if m["engine"] == engine)["host_bytes"]
        walls, peaks, loads = [], [], []
        for _ in range(args.runs):
            shutil.rmtree(out, ignore_errors=True)
            wall, peak, load = _measure(bench, [python, "-m", "mergejob.cli", "merge", *job], env)
            shutil.rmtree(out, ignore_errors=True)
            walls.append(wall)
            peaks.append(peak)
            loads.append(load)
        peak = statistics.median(peaks)
        row = {
            "job": name,
            "estimated_rss_gb": round(estimate / 1e9, 3),
            "measured_peak_rss_gb": round(peak / 1e9, 3),
            "ratio": round(estimate / peak, 3),
            "within_25pct": abs(estimate / peak - 1) <= 0.25,
            "estimated_s": round(plan["seconds"][engine], 1),
            "measured_s": round(statistics.median(walls), 1),
            "load_average": round(max(loads), 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": bench.machine(), "model": model, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(r["within_25pct"] for r in rows if r["job"].startswith("stream")) else 1


# ---------------------------------------------------------------------------------------
# Throughput constants


def cmd_rates(args: argparse.Namespace) -> int:
    import torch

    work = Path(tempfile.mkdtemp(prefix="mergejob-rates-"))
    size = args.mb * 2**20
    try:
        data = os.urandom(size)
        path = work / "blob"
        started = time.monotonic()
        with open(path, "wb") as handle:
            handle.write(data)
            os.fsync(handle.fileno())
        write_bps = size / (time.monotonic() - started)
        started = time.monotonic()
        with open(path, "rb") as handle:
            while handle.read(64 * 2**20):
                pass
        read_bps = size / (time.monotonic() - started)
        started = time.monotonic()
        hashlib.sha256(data).hexdigest()
        hash_bps = size / (time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b = torch.randn(4096, 16)
    a = torch.randn(16, 4096)
    started = time.monotonic()
    for _ in range(20):
        (b @ a).mul_(0.5)
    flops = 20 * 2 * 16 * 4096 * 4096 / (time.monotonic() - started)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    started = time.monotonic()
    for _ in range(10):
        w32 = w.float()
        w32.add_(1.0)
        w32.to(torch.bfloat16)
    convert_bps = 10 * w.numel() * 2 / (time.monotonic() - started)
    rates = {
        "read_bps": read_bps,
        "write_bps": write_bps,
        "hash_bps": hash_bps,
        "cpu_flops": flops,
        "convert_bps": convert_bps,
        "base_rss": _base_rss(),
    }
    print(json.dumps({k: f"{v:.3g}" for k, v in rates.items()}, indent=2))
    return 0


def _base_rss() -> float:
    """Peak RSS of a merge of a tiny model: the process before any sizeable buffer."""
    bench = _bench_stream()
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from pathlib import Path; import tempfile; from tests.support.models import make_base, "
        "make_adapter; t = Path(tempfile.mkdtemp()); b = make_base(t / 'b'); "
        "make_adapter(b, t / 'a'); print(t)"
    )
    python = sys.executable
    env = {**os.environ, "MERGEJOB_DISABLE_PROGRESS_BARS": "1"}
    tmp = Path(subprocess.run([python, "-c", code], check=True, capture_output=True,
                              text=True, env=env).stdout.strip().splitlines()[-1])  # fmt: skip
    try:
        command = [python, "-m", "mergejob.cli", "merge", "--base", str(tmp / "b"),
                   "--adapters", str(tmp / "a"), "--output_dir", str(tmp / "o")]  # fmt: skip
        return _measure(bench, command, env)[1]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_plan_estimate.py")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="estimate vs measured peak RSS on the 1B fixture")
    check.add_argument("--dir", default="/tmp/mergejob-bench")
    check.add_argument("--runs", type=int, default=2)
    check.add_argument("--jobs", nargs="*", help=f"a subset of {', '.join(JOBS)}")
    check.add_argument("--json", help="also write the results here")
    rates = sub.add_parser("rates", help="measure the throughput constants here")
    rates.add_argument("--mb", type=int, default=512)
    args = parser.parse_args(argv)
    return {"check": cmd_check, "rates": cmd_rates}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
