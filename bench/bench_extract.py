"""Benchmark of `mergejob extract` against `mergekit-extract-lora`: wall time, peak RSS, and
each module's error at the same rank, on the TinyLlama-1.1B-shaped fixture of
``bench_stream.py`` with a fine-tune made from it (and a 2.1B model of the same width).

    .venv/bin/python bench/bench_extract.py make --dir /tmp/mergejob-bench
    MERGEKIT_VENV=/tmp/mk .venv/bin/python bench/bench_extract.py run --dir /tmp/mergejob-bench

``make`` writes the fp16 bases of ``bench_stream.py make`` and, for each, a fine-tune: every
2-D weight (embeddings and lm_head too) gets a rank-16 update with a decaying spectrum plus a
small full-rank noise (a trained delta is not exactly low-rank), rounded to fp16, written
shard by shard in the base's layout. ``run`` measures each tool as a whole process (peak RSS
of the process tree sampled every 20 ms, as ``bench_stream.py`` does) at ``--max-rank 32``
with LoRA embeddings (``--embed-lora``; both tools), then compares every module's relative
error ‖ΔW - B A‖ / ‖ΔW‖ of both adapters against ΔW read from the checkpoints. mergekit runs
from its own virtual environment (``MERGEKIT_VENV``, see ``../shared/notes/peers.md``); without
one it is skipped, and said so. Each of mergejob's runs is compared with mergekit module by
module: lower, or the same to fp32 (within one fp32 ulp of mergekit's error, the tolerance of
``tests/test_extract_mergekit.py``), and the largest excess in fp32 ulps. mergekit stores the
factors in the model's dtype; ``mergejob-fp16`` (``--dtype float16``) and
``mergejob-exact-fp16`` (and ``--exact-svd``) compare like with like, the default
(``mergejob``: float32 factors, ``svd: auto``) is what the requirement is about.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stream import MODELS, machine, make_base, measure, warm

UPDATE_RANK = 16
NOISE = 2e-4  # full-rank noise, next to weights of about 0.02


def make_finetune(base: Path, dest: Path, seed: int = 7) -> None:
    """Shard by shard: W + U diag(s) Vᵀ (rank 16, s decaying) + noise, rounded to fp16."""
    import torch
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.tensor([0.5 * 0.8**i for i in range(UPDATE_RANK)])
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name, tensor in tensors.items():
            if tensor.dim() != 2:
                continue
            rows, cols = tensor.shape
            u = torch.linalg.qr(torch.randn(rows, UPDATE_RANK, generator=generator)).Q
            v = torch.linalg.qr(torch.randn(cols, UPDATE_RANK, generator=generator)).Q
            update = (u * spectrum) @ v.T
            noise = torch.randn(rows, cols, generator=generator) * NOISE
            tensors[name] = (tensor.float() + update + noise).to(tensor.dtype)
        save_file(tensors, str(dest / shard.name), metadata={"format": "pt"})
    for extra in ("model.safetensors.index.json", "config.json"):
        shutil.copyfile(base / extra, dest / extra)


def cmd_make(args: argparse.Namespace) -> int:
    work = Path(args.dir)
    for model, layers in MODELS.items():
        if model not in args.models:
            continue
        base = work / model / "base"
        if not (base / "model.safetensors.index.json").is_file():
            print(f"making {base} ({layers} layers)", flush=True)
            make_base(base, layers, args.shard_bytes)
        tuned = work / model / "tuned"
        if not (tuned / "config.json").is_file():
            print(f"making {tuned}", flush=True)
            make_finetune(base, tuned)
    return 0


# ---------------------------------------------------------------------------------------
# Errors of an adapter against the true ΔW


def module_errors(base: Path, tuned: Path, adapter: Path) -> dict[str, float]:
    """module -> ‖ΔW - B A‖ / ‖ΔW‖ for every LoRA module of ``adapter`` (mergejob's or
    mergekit's layout, read by :func:`mergejob.verify.load_adapter`: lora_A/B,
    lora_embedding_A/B, PEFT's per-module scale); ΔW read a tensor at a time, in fp64."""
    from safetensors import safe_open

    from mergejob.verify import load_adapter, pattern_value

    config = json.loads((adapter / "adapter_config.json").read_text())
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    errors = {}
    for module, factors in load_adapter(adapter).modules.items():
        if factors.lora_a is None or factors.lora_b is None:
            continue
        rank = int(factors.lora_a.shape[0])
        r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        assert r == rank, (module, r, rank)
        product = (factors.lora_b.double() @ factors.lora_a.double()) * factors.scale
        if factors.embedding:
            product = product.T
        name = f"{module}.weight"
        with safe_open(str(base / index[name]), "pt") as handle:
            w_base = handle.get_tensor(name).double()
        with safe_open(str(tuned / index[name]), "pt") as handle:
            w_tuned = handle.get_tensor(name).double()
        delta = w_tuned - w_base
        errors[module] = float((delta - product).norm() / delta.norm())
    return errors


def ulp32(value: float) -> float:
    """The spacing of fp32 numbers at ``value``: what an fp32 error can resolve."""
    return 2.0 ** (math.floor(math.log2(value)) - 23) if value > 0 else 2.0**-149


# ---------------------------------------------------------------------------------------
# Running both tools


def cmd_run(args: argparse.Namespace) -> int:
    work = Path(args.dir)
    python = sys.executable
    env = {**os.environ, "MERGEJOB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    venv = os.environ.get("MERGEKIT_VENV")
    mergekit = Path(venv) / "bin" / "mergekit-extract-lora" if venv else None
    if mergekit is None or not mergekit.is_file():
        print("mergekit: skipped (set MERGEKIT_VENV to a venv with mergekit 0.1.5)", flush=True)
        mergekit = None
    results: dict[str, Any] = {}
    for model in args.models:
        base, tuned = work / model / "base", work / model / "tuned"
        names = ("mergejob", "mergejob-fp16", "mergejob-exact-fp16", "mergekit")
        outs = {name: work / model / f"out-{name}" for name in names}
        common = ["--max-rank", str(args.rank), "--embed-lora"]
        for pattern in args.include or []:  # the same modules for both tools
            common += ["--include", pattern]
        extract = [
            python,
            "-m",
            "mergejob.cli",
            "extract",
            "--base",
            str(base),
            "--finetuned",
            str(tuned),
        ]
        configs: dict[str, list[str]] = {
            "mergejob": [*extract, "--output_dir", str(outs["mergejob"]), *common],
            "mergejob-fp16": [
                *extract, "--output_dir", str(outs["mergejob-fp16"]), *common, "--dtype", "float16",
            ],
            "mergejob-exact-fp16": [
                *extract, "--output_dir", str(outs["mergejob-exact-fp16"]), *common,
                "--dtype", "float16", "--exact-svd",
            ],
        }  # fmt: skip
        if mergekit is not None and model in args.mergekit_models:
            configs["mergekit"] = [
                str(mergekit), "--model", str(tuned), "--base-model", str(base),
                "--out-path", str(outs["mergekit"]), "--no-lazy-unpickle",
                *[c.replace("--include", "--include-regex") for c in common],
            ]  # fmt: skip
        chosen = [c for c in args.configs if c in configs]
        warm(work / model)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
        for run in range(args.runs):
            for name in chosen:
                out = outs[name]
                for leftover in (out, out.parent / f".{out.name}.mergejob-partial"):
                    shutil.rmtree(leftover, ignore_errors=True)
                measured = measure(configs[name], env)
                runs[name].append(measured)
                print(
                    f"{model} {name} run {run + 1}: {measured['wall_s']:.1f}s wall, "
                    f"{measured['cpu_s']:.1f}s cpu, {measured['peak_rss_gb']:.2f} GB, "
                    f"load {measured['load']:.1f}",
                    flush=True,
                )
        errors = {name: module_errors(base, tuned, outs[name]) for name in names if name in chosen}
        comparison: dict[str, Any] = {}
        for mine in ("mergejob", "mergejob-fp16", "mergejob-exact-fp16"):
            if "mergekit" not in errors or mine not in errors:
                continue
            ours, theirs = errors[mine], errors["mergekit"]
            shared = sorted(set(ours) & set(theirs))
            diffs = [ours[m] - theirs[m] for m in shared]
            # "Same" = within one fp32 ulp of mergekit's error (tests/test_extract_mergekit.py).
            excess_ulps = [(ours[m] - theirs[m]) / ulp32(theirs[m]) for m in shared]
            comparison[mine] = {
                "modules_compared": len(shared),
                "modules_only_mergejob": sorted(set(ours) - set(theirs)),
                "modules_only_mergekit": sorted(set(theirs) - set(ours)),
                "mergejob_lower": sum(1 for d in diffs if d < 0),
                "mergejob_lower_or_same": sum(1 for e in excess_ulps if e <= 1),
                "max_excess": max(diffs, default=0.0),
                "max_excess_fp32_ulps": max(excess_ulps, default=0.0),
                "mean_error_mergejob": statistics.mean(ours[m] for m in shared),
                "mean_error_mergekit": statistics.mean(theirs[m] for m in shared),
            }
            print(f"{model} {mine} vs mergekit (rank {args.rank}): {comparison[mine]}", flush=True)
        total = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        results[model] = {
            "model": {"base_gb": total / 1e9},
            "median": {
                name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                for name, rs in runs.items()
                if rs
            },
            "runs": runs,
            "errors": {
                name: {
                    "max": max(e.values()),
                    "mean": statistics.mean(e.values()),
                    "modules": len(e),
                }
                for name, e in errors.items()
            },
            "comparison": comparison,
        }
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results}, indent=2))
    document = {"machine": machine(), "command": " ".join(sys.argv), "results": results}
    if mergekit is not None:
        import subprocess

        version = subprocess.run(
            [str(Path(str(venv)) / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        document["machine"]["mergekit"] = version
    print(json.dumps(document, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write the bases and their fine-tunes")
    make.add_argument("--dir", required=True)
    make.add_argument("--shard-bytes", type=int, default=800_000_000)
    make.add_argument("--models", nargs="+", default=list(MODELS))
    make.set_defaults(func=cmd_make)
    run = sub.add_parser("run", help="measure both tools")
    run.add_argument("--dir", required=True)
    run.add_argument("--models", nargs="+", default=list(MODELS))
    run.add_argument("--mergekit-models", nargs="+", default=list(MODELS))
    run.add_argument(
        "--configs",
        nargs="+",
        default=["mergejob", "mergejob-fp16", "mergejob-exact-fp16", "mergekit"],
    )
    run.add_argument("--rank", type=int, default=32)
    run.add_argument("--runs", type=int, default=1)
    run.add_argument(
        "--include", action="append", metavar="REGEX", help="only these modules (both tools)"
    )
    run.add_argument("--json", help="also write the results here")
    run.set_defaults(func=cmd_run)
    args = parser.parse_args()
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
