"""Benchmark of a mixture-of-experts merge (issue 17): wall time and peak RSS of the stream
engine and the peft engine on a Qwen3-MoE-shaped base of about 1B parameters with many
experts, each run as a whole process.

    .venv/bin/python bench/bench_moe.py make --dir /tmp/mergejob-bench-moe
    .venv/bin/python bench/bench_moe.py run --dir /tmp/mergejob-bench-moe

``make`` writes the base in bf16 shards of about 500 MB, one tensor per expert as on the Hub
(``mlp.experts.N.gate_proj/up_proj/down_proj.weight``; random weights written tensor by
tensor with safetensors, no model is built), and an adapter mixing ``target_modules``
(q_proj, v_proj) and ``target_parameters`` (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``) in PEFT 0.21's layout: A ``(r * experts, in)``, B
``(out, r * experts)``, the gate_up wrapper nested inside the down one (``experts.base_layer``).
``run`` measures ``mergejob merge --engine stream`` and ``--engine peft`` (peak RSS of the
process tree sampled every 20 ms, as ``bench_stream.py``), checks the stream engine's peak
against the largest shard + 1.5 GB, and writes JSON under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import ROOT, machine, measure, warm, write_sharded

SHAPE = {
    "hidden_size": 1024,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 3072,
    "moe_intermediate_size": 384,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "vocab_size": 32000,
}
RANK = 16
SHARD_BYTES = 500 * 10**6


def tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the base on disk, in checkpoint order."""
    h, layers = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    heads, kv, hd = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], SHAPE["head_dim"]
    inter, experts = SHAPE["moe_intermediate_size"], SHAPE["num_experts"]
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (SHAPE["vocab_size"], h))
    ]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (heads * hd, h)),
            (f"{p}.self_attn.k_proj.weight", (kv * hd, h)),
            (f"{p}.self_attn.v_proj.weight", (kv * hd, h)),
            (f"{p}.self_attn.o_proj.weight", (h, heads * hd)),
            (f"{p}.self_attn.q_norm.weight", (hd,)),
            (f"{p}.self_attn.k_norm.weight", (hd,)),
            (f"{p}.mlp.gate.weight", (experts, h)),
        ]
        for e in range(experts):
            shapes += [
                (f"{p}.mlp.experts.{e}.gate_proj.weight", (inter, h)),
                (f"{p}.mlp.experts.{e}.up_proj.weight", (inter, h)),
                (f"{p}.mlp.experts.{e}.down_proj.weight", (h, inter)),
            ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (SHAPE["vocab_size"], h))]
    return shapes


def make_base(dest: Path) -> None:
    import torch
    from transformers import Qwen3MoeConfig

    dest.mkdir(parents=True, exist_ok=True)
    config = Qwen3MoeConfig(tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **SHAPE)
    config.architectures = ["Qwen3MoeForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(str(dest))
    write_sharded(dest, tensor_shapes(), torch.bfloat16, SHARD_BYTES)


def make_adapter(dest: Path, base: Path) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    ).save_pretrained(str(dest))
    generator = torch.Generator().manual_seed(1)
    h, inter = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"]
    re_ = RANK * SHAPE["num_experts"]
    shapes = dict(tensor_shapes())
    tensors = {}

    def pair(key: str, out_f: int, in_f: int, rank: int) -> None:
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=generator) * 0.02
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator) * 0.02

    for i in range(SHAPE["num_hidden_layers"]):
        p = f"base_model.model.model.layers.{i}"
        for proj in ("q_proj", "v_proj"):
            out_f, in_f = shapes[f"model.layers.{i}.self_attn.{proj}.weight"]
            pair(f"{p}.self_attn.{proj}", out_f, in_f, RANK)
        pair(f"{p}.mlp.experts.base_layer", 2 * inter, h, re_)  # gate_up_proj (inner)
        pair(f"{p}.mlp.experts", h, inter, re_)  # down_proj (outer)
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})


def cmd_make(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    make_base(root / "base")
    make_adapter(root / "experts-r16", root / "base")
    print(f"wrote {root}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    base, adapter = root / "base", root / "experts-r16"
    largest = max(p.stat().st_size for p in base.glob("*.safetensors"))
    env = {**os.environ, "MERGEJOB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    results: dict[str, Any] = {"machine": machine(), "shape": SHAPE, "rank": RANK}
    results["largest_shard_gb"] = largest / 1e9
    for engine in args.engines:
        out = Path(args.out) / engine
        shutil.rmtree(out, ignore_errors=True)
        warm(base)
        command = [sys.executable, "-m", "mergejob.cli", "merge", "--base", str(base)]
        command += ["--adapters", str(adapter), "--output_dir", str(out), "--engine", engine]
        command += ["--max-shard-size", "500MB"]
        results[engine] = measure(command, env)
        print(engine, json.dumps(results[engine]))
        shutil.rmtree(out, ignore_errors=True)
    if "stream" in results:
        bound = largest / 1e9 + 1.5
        results["stream_within_bound"] = results["stream"]["peak_rss_gb"] <= bound
        print(f"stream peak {results['stream']['peak_rss_gb']:.2f} GB, bound {bound:.2f} GB")
    dest = ROOT / "bench" / "results" / "moe.json"
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make")
    make.add_argument("--dir", required=True)
    run = sub.add_parser("run")
    run.add_argument("--dir", required=True)
    run.add_argument("--out", default="/tmp/mergejob-bench-moe-out")
    run.add_argument("--engines", nargs="+", default=["stream", "peft"])
    args = parser.parse_args(argv)
    return cmd_make(args) if args.command == "make" else cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
