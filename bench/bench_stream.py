"""Benchmark of the stream engine: wall time and peak RSS against a pure shard copy and the
peft engine, each run as a whole process.

    .venv/bin/python bench/bench_stream.py make --dir /tmp/mergejob-bench
    .venv/bin/python bench/bench_stream.py run --dir /tmp/mergejob-bench --runs 3

``make`` writes a TinyLlama-1.1B-shaped fp16 base in 3 shards (random weights, written
tensor by tensor with safetensors, no model is built) and three LoRA adapters (attention
r8; all-linear r16 rsLoRA; MLP r32), plus a larger model of the same width with twice the
layers and the same shard size. ``run`` measures, for each model:

- ``copy``: read every shard with safetensors and write it again (the floor: disk speed);
- ``stream-w1`` / ``stream-w2``: ``mergejob merge --engine stream --workers 1|2``;
- ``peft``: ``mergejob merge --engine peft`` (transformers + PEFT merge_and_unload).

Peak RSS is sampled from the whole process tree (workers included) every 20 ms; each
configuration runs ``--runs`` times (after one untimed warm-up read of the inputs) and the
median is reported. Outputs are deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
ADAPTERS = {
    "attn-r8": {"r": 8, "lora_alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "all-r16-rslora": {
        "r": 16,
        "lora_alpha": 32,
        "use_rslora": True,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "mlp-r32": {"r": 32, "lora_alpha": 32, "targets": ["gate_proj", "up_proj", "down_proj"]},
}
MODELS = {"tinyllama-1.1b": 22, "llama-2.1b": 44}


# ---------------------------------------------------------------------------------------
# Fixtures


def linear_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def make_base(dest: Path, layers: int, shard_bytes: int) -> None:
    import torch
    from transformers import LlamaConfig

    dest.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        num_hidden_layers=layers,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **SHAPE,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float16"
    config.save_pretrained(str(dest))
    write_sharded(dest, linear_shapes(layers), torch.float16, shard_bytes)


def write_sharded(
    dest: Path, shapes: list[tuple[str, tuple[int, ...]]], dtype: Any, shard_bytes: int
) -> None:
    """Random weights (0.02 * N(0, 1), norms 1) of ``shapes`` in ``dtype``, packed in order
    into shards of at most ``shard_bytes``, with the safetensors index."""
    import torch
    from safetensors.torch import save_file

    size_of = torch.empty((), dtype=dtype).element_size()
    generator = torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in shapes:
        size = size_of * int(torch.Size(shape).numel())
        if groups[-1] and filled + size > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append((name, shape))
        filled += size
    weight_map = {}
    total = 0
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=dtype)
            else:
                t = torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02
                tensors[name] = t.to(dtype)
            weight_map[name] = file
            total += tensors[name].numel() * size_of
        save_file(tensors, str(dest / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_adapter(dest: Path, base: Path, layers: int, spec: dict[str, Any], seed: int) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=spec["r"],
        lora_alpha=spec["lora_alpha"],
        use_rslora=spec.get("use_rslora", False),
        target_modules=spec["targets"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    )
    config.save_pretrained(str(dest))
    generator = torch.Generator().manual_seed(seed)
    shapes = dict(linear_shapes(layers))
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in spec["targets"]:
            continue
        out_f, in_f = shape
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(spec["r"], in_f, generator=generator) * 0.02
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, spec["r"], generator=generator) * 0.02
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})


def cmd_make(args: argparse.Namespace) -> int:
    work = Path(args.dir)
    for model, layers in MODELS.items():
        base = work / model / "base"
        if not (base / "model.safetensors.index.json").is_file():
            print(f"making {base} ({layers} layers)", flush=True)
            make_base(base, layers, args.shard_bytes)
        for seed, (name, spec) in enumerate(ADAPTERS.items(), start=1):
            adapter = work / model / name
            if not (adapter / "adapter_model.safetensors").is_file():
                make_adapter(adapter, base, layers, spec, seed)
    return 0


# ---------------------------------------------------------------------------------------
# The pure copy


def cmd_copy(args: argparse.Namespace) -> int:
    """Read every shard with safetensors and write it again (index and config copied)."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(args.src), Path(args.dst)
    dst.mkdir(parents=True)
    for shard in sorted(src.glob("*.safetensors")):
        save_file(load_file(str(shard)), str(dst / shard.name), metadata={"format": "pt"})
    for extra in ("model.safetensors.index.json", "config.json"):
        shutil.copyfile(src / extra, dst / extra)
    return 0


# ---------------------------------------------------------------------------------------
# Measuring


def measure(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``command``: wall seconds, CPU seconds and peak RSS of its whole process tree."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(process.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode()[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": peak / 1e9, "load": load}
    for phase, seconds in re.findall(r"phase (\w+) done in ([\d.]+)s", stderr.decode()):
        result[f"phase_{phase}_s"] = float(seconds)
    return result


def warm(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(64 * 2**20):
                    pass


def shard_digests(folder: Path) -> dict[str, str]:
    import hashlib

    digests = {}
    for path in sorted(folder.glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(16 * 2**20):
                digest.update(block)
        digests[path.name] = digest.hexdigest()
    return digests


def cmd_run(args: argparse.Namespace) -> int:
    """Round-robin over the configurations, so that load from elsewhere hits each alike."""
    work = Path(args.dir)
    python = sys.executable
    env = {**os.environ, "MERGEJOB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    results: dict[str, Any] = {}
    for model in args.models:
        base = work / model / "base"
        adapters = [str(work / model / name) for name in ADAPTERS]
        out = work / model / "out"
        merge = [python, "-m", "mergejob.cli", "merge", "--base", str(base), "--adapters"]
        merge += adapters
        merge += ["--output-dir", str(out), "--max-shard-size", args.max_shard_size]
        configs = {
            "copy": [python, __file__, "copy", str(base), str(out)],
            "stream-w1": [*merge, "--engine", "stream", "--workers", "1"],
            "stream-w2": [*merge, "--engine", "stream", "--workers", "2"],
            "peft": [*merge, "--engine", "peft"],
        }
        chosen = [c for c in args.configs if c in configs]
        warm(work / model)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
        digests: dict[str, dict[str, str]] = {}
        partial = out.parent / f".{out.name}.mergejob-partial"
        for run in range(args.runs):
            for name in chosen:
                for leftover in (out, partial):
                    shutil.rmtree(leftover, ignore_errors=True)
                try:
                    measured = measure(configs[name], env)
                except RuntimeError as exc:
                    print(f"{model} {name} run {run + 1}: FAILED {exc}", flush=True)
                    continue
                if run == 0 and name.startswith("stream"):
                    digests[name] = shard_digests(out)
                for leftover in (out, partial):
                    shutil.rmtree(leftover, ignore_errors=True)
                runs[name].append(measured)
                print(
                    f"{model} {name} run {run + 1}: {measured['wall_s']:.1f}s wall, "
                    f"{measured['cpu_s']:.1f}s cpu, {measured['peak_rss_gb']:.2f} GB, "
                    f"load {measured['load']:.1f}",
                    flush=True,
                )
        largest = max(p.stat().st_size for p in base.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        results[model] = {
            "model": {"largest_shard_gb": largest / 1e9, "total_gb": total / 1e9},
            "median": {
                name: {
                    key: statistics.median(r[key] for r in rs)
                    for key in sorted({k for r in rs for k in r})
                    if all(key in r for r in rs)
                }
                for name, rs in runs.items()
                if rs
            },
            "runs": runs,
            "stream_outputs_identical": len({json.dumps(d) for d in digests.values()}) <= 1,
        }
        if args.json:  # after each model, so a later failure loses nothing
            Path(args.json).write_text(json.dumps({"results": results}, indent=2))
    document = {"machine": machine(), "command": " ".join(sys.argv), "results": results}
    print(json.dumps(document, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2))
    return 0


def machine() -> dict[str, Any]:
    import peft
    import safetensors
    import torch
    import transformers

    cpu = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_stream.py")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="write the fixtures")
    make.add_argument("--dir", required=True)
    make.add_argument("--shard-bytes", type=int, default=800_000_000)
    copy = sub.add_parser("copy", help="(internal) the pure shard copy")
    copy.add_argument("src")
    copy.add_argument("dst")
    run = sub.add_parser("run", help="measure")
    run.add_argument("--dir", required=True)
    run.add_argument("--runs", type=int, default=3)
    run.add_argument("--models", nargs="+", default=list(MODELS))
    run.add_argument("--configs", nargs="+", default=["copy", "stream-w1", "stream-w2", "peft"])
    run.add_argument("--max-shard-size", default="800MB")
    run.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    return {"make": cmd_make, "copy": cmd_copy, "run": cmd_run}[args.command](args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
