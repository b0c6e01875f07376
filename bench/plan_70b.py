"""What a Llama-3-70B merge needs, from `mergejob plan`'s own figures (no weights: sparse files).

Builds, in a temporary folder, a checkpoint with Meta-Llama-3-70B-Instruct's layout (its
config, 30 shards of about 4.9 GB in bfloat16, holes instead of data) and a rank-32 LoRA with
the targets of the motivating Gradient-1048k adapter (q/k/v/o/gate/up/down), then runs
``mergejob plan --json`` on it, which reads headers only. Prints a Markdown table for the
README: output, disk with and without the delete options, memory and time per engine.

    .venv/bin/python bench/plan_70b.py [--workers 1] [--index-count 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HIDDEN, LAYERS, INTER, HEADS, KV_HEADS, VOCAB = 8192, 80, 28672, 64, 8, 128256
HEAD_DIM = HIDDEN // HEADS
SHARDS = 30
RANK = 32


def _layer_tensors(i: int) -> list[tuple[str, list[int]]]:
    p = f"model.layers.{i}"
    kv = KV_HEADS * HEAD_DIM
    return [
        (f"{p}.input_layernorm.weight", [HIDDEN]),
        (f"{p}.self_attn.q_proj.weight", [HIDDEN, HIDDEN]),
        (f"{p}.self_attn.k_proj.weight", [kv, HIDDEN]),
        (f"{p}.self_attn.v_proj.weight", [kv, HIDDEN]),
        (f"{p}.self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
        (f"{p}.post_attention_layernorm.weight", [HIDDEN]),
        (f"{p}.mlp.gate_proj.weight", [INTER, HIDDEN]),
        (f"{p}.mlp.up_proj.weight", [INTER, HIDDEN]),
        (f"{p}.mlp.down_proj.weight", [HIDDEN, INTER]),
    ]


def _write_sparse(path: Path, tensors: list[tuple[str, list[int]]], dtype: str, size: int) -> None:
    header: dict[str, object] = {}
    offset = 0
    for name, shape in tensors:
        n = math.prod(shape) * size
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)  # a hole: no data written


def make_base(folder: Path) -> None:
    folder.mkdir(parents=True)
    tensors = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for i in range(LAYERS):
        tensors += _layer_tensors(i)
    tensors += [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]
    per = math.ceil(len(tensors) / SHARDS)
    weight_map = {}
    total = 0
    for s in range(SHARDS):
        part = tensors[s * per : (s + 1) * per]
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        _write_sparse(folder / name, part, "BF16", 2)
        for t, shape in part:
            weight_map[t] = name
            total += math.prod(shape) * 2
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "hidden_act": "silu",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))


def make_adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    kv = KV_HEADS * HEAD_DIM
    dims = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, kv), "v_proj": (HIDDEN, kv),
            "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTER),
            "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}  # fmt: skip
    tensors = []
    for i in range(LAYERS):
        for module, (fan_in, fan_out) in dims.items():
            where = (
                "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            )
            p = f"base_model.model.model.layers.{i}.{where}.{module}"
            tensors += [
                (f"{p}.lora_A.weight", [RANK, fan_in]),
                (f"{p}.lora_B.weight", [fan_out, RANK]),
            ]
    _write_sparse(folder / "adapter_model.safetensors", tensors, "BF16", 2)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "target_modules": list(dims),
        "base_model_name_or_path": "meta-llama/Meta-Llama-3-70B-Instruct", "task_type": "CAUSAL_LM",
    }))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--index-count", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_base(root / "base")
        make_adapter(root / "adapter")
        cmd = [
            sys.executable, "-m", "mergejob.cli", "plan", "--json",
            "--base", str(root / "base"), "--adapters", str(root / "adapter"),
            "--output_dir", str(root / "out"), "--workers", str(args.workers),
            "--index-count", str(args.index_count),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if not done.stdout.strip():
            print(done.stderr, file=sys.stderr)
            return 1
        report = json.loads(done.stdout)
    from mergejob.fetch import DEFAULT_AHEAD

    # The window the engine keeps with both delete options, as `mergejob plan` computes it
    # for a Hub base (plan/report.py _estimate): base shards fetched ahead plus the one in
    # flight, output shards waiting for the upload (two) plus the one being written.
    report["window_if_hub_base"] = (DEFAULT_AHEAD + 1) * report["largest_input_shard_bytes"] + (
        2 + args.workers
    ) * report["largest_shard_bytes"]
    print(json.dumps({k: report[k] for k in (
        "window_if_hub_base",
        "output_bytes", "shards", "largest_shard_bytes", "largest_input_shard_bytes",
        "index_downloads", "disk", "memory", "seconds", "problems")}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
