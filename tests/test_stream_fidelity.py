"""The stream engine against PEFT as the oracle, on generated models and adapters.

The oracle is PEFT itself: ``PeftModel.from_pretrained`` + ``merge_and_unload``, adapter by
adapter. Two forms of it are used:

- **PEFT in fp32, rounded once**: the base loaded in float32, every adapter merged by PEFT
  in fp32, the result rounded once to the output dtype. The stream engine computes the same
  expressions in the same order in fp32 (``W += (B @ A) * scale`` per adapter, transposed
  where PEFT transposes; DoRA with PEFT's formula on the current weight; saved tensors loaded
  over the base as PEFT loads them) and rounds once, so it must agree **bit for bit**, with
  one adapter or several.
- **PEFT's sequential merge in the output dtype** (what the peft engine and the seed do): the
  model is rounded to bf16/fp16 after every adapter, and for embedding layers PEFT also
  rounds each delta to the weight's dtype before adding it. Tolerance argument, per value:
  let ``M_k`` be the larger magnitude of the value before and after adapter k (read from
  PEFT's own fp32 merge of the first k adapters) and ``ulp(M)`` one step of the output dtype
  at M. Adapter k's rounding of the sum is at most ulp(M_k)/2 off, its rounding of an
  embedding delta (``|delta| <= 2 M_k``) at most ulp(M_k); a later DoRA adapter rescales
  earlier errors by its factor ``magnitude / norm`` (about 1); the stream engine's one
  rounding is at most ulp(M_n)/2 off. So ``|stream - peft| <= 2 * sum_k ulp(M_k)``: within
  one rounding step per adapter, each counted at the magnitude the value had at that
  adapter (near a cancellation, ``W + delta ~ 0``, that is many steps of the tiny result,
  which is why steps are not counted at the result). With one adapter on linear layers PEFT
  rounds exactly once and the results are equal.

Tied embeddings: PEFT 0.21 merges an lm_head (or embed_tokens) LoRA of a tied model into the
one shared matrix, which also changes the input embeddings. mergejob's answer (DESIGN.md) is
to untie: embed_tokens stays the base's, lm_head = base + delta, both written, and
``tie_word_embeddings`` false. So for tied cases the oracle is PEFT run on the untied model
(``mergejob.engines.peft.untie_embeddings`` before loading the adapters).

Tensors no adapter touches must be byte-equal to the base.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mergejob
from mergejob.plan.work import build_plan
from tests.support.oracle import peft_merge
from tests.support.tensors import bitwise_equal, load_folder, steps_apart, ulp

BASES: dict[str, dict[str, Any]] = {
    "llama_bf16": {"family": "llama", "dtype": torch.bfloat16},
    "llama_fp16": {"family": "llama", "dtype": torch.float16, "seed": 3},
    "tied_bf16": {"family": "llama", "dtype": torch.bfloat16, "tie_word_embeddings": True},
    "qwen2_bf16": {"family": "qwen2", "dtype": torch.bfloat16, "seed": 4},
    "qwen2_fp16": {"family": "qwen2", "dtype": torch.float16, "seed": 5},
    "gpt2_bf16": {"family": "gpt2", "dtype": torch.bfloat16, "seed": 6},
}
ADAPTERS: dict[str, dict[str, Any]] = {
    "attn": {"seed": 11},  # the family's attention projections (c_attn for GPT-2)
    "all_linear": {"target_modules": "all-linear", "r": 8, "lora_alpha": 16, "seed": 12},
    "rslora": {
        "target_modules": ["q_proj", "k_proj", "o_proj", "c_attn", "c_fc"],
        "use_rslora": True,
        "r": 8,
        "lora_alpha": 32,
        "seed": 13,
    },
    "patterns": {
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
        "alpha_pattern": {"v_proj": 32, r"layers\.0\.mlp\.down_proj": 3},
        "seed": 14,
    },
    "layers": {
        "target_modules": ["q_proj", "up_proj", "c_attn", "c_fc"],
        "layers_to_transform": [1],
        "seed": 15,
    },
    "dora": {
        "target_modules": ["q_proj", "v_proj", "up_proj", "c_attn", "c_proj", "c_fc"],
        "use_dora": True,
        "seed": 16,
    },
    "embed": {"target_modules": ["embed_tokens", "q_proj"], "seed": 17},
    "lm_head": {"target_modules": ["q_proj", "lm_head"], "seed": 18},
    "resized": {
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["embed_tokens", "lm_head"],
        "resize_vocab_to": 104,
        "with_tokenizer": True,
        "seed": 19,
    },
    "resized_tied": {
        "target_modules": ["q_proj"],
        "modules_to_save": ["embed_tokens"],
        "resize_vocab_to": 112,
        "with_tokenizer": True,
        "seed": 20,
    },
}

CASES: list[tuple[str, list[str]]] = [
    # one adapter: every kind
    ("llama_bf16", ["attn"]),
    ("llama_bf16", ["all_linear"]),
    ("llama_fp16", ["rslora"]),
    ("llama_bf16", ["patterns"]),
    ("llama_bf16", ["layers"]),
    ("llama_bf16", ["dora"]),
    ("llama_fp16", ["embed"]),
    ("llama_bf16", ["resized"]),
    ("tied_bf16", ["lm_head"]),
    ("tied_bf16", ["embed"]),
    ("tied_bf16", ["resized_tied"]),
    ("qwen2_bf16", ["all_linear"]),
    ("qwen2_fp16", ["dora"]),
    ("gpt2_bf16", ["attn"]),
    ("gpt2_bf16", ["dora"]),
    # several adapters, in order
    ("llama_bf16", ["attn", "all_linear"]),
    ("llama_fp16", ["attn", "rslora", "dora"]),
    ("tied_bf16", ["attn", "lm_head", "embed", "resized_tied"]),
    ("qwen2_bf16", ["patterns", "dora", "all_linear"]),
    ("gpt2_bf16", ["rslora", "dora"]),
]


def _id(case: tuple[str, list[str]]) -> str:
    return f"{case[0]}-{'+'.join(case[1])}"


def _make(models: Any, base_name: str, adapter_names: list[str]) -> tuple[Path, list[Path]]:
    base = models.base(**BASES[base_name])
    family = BASES[base_name]["family"]
    adapters = []
    for name in adapter_names:
        kwargs = dict(ADAPTERS[name])
        if family == "gpt2" and "target_modules" in kwargs:
            kwargs["target_modules"] = [
                t for t in kwargs["target_modules"] if t.startswith("c_")
            ] or kwargs["target_modules"]
        if family == "qwen2" and name == "patterns":
            kwargs["rank_pattern"] = {"model.layers.1.self_attn.q_proj": 2, "down_proj": 6}
        adapters.append(models.adapter(base, **kwargs))
    return base, adapters


def _stream_merge(base: Path, adapters: list[Path], out: Path, **output: Any) -> Any:
    spec = mergejob.MergeSpec.model_validate(
        {
            "base": str(base),
            "adapters": [str(a) for a in adapters],
            "output": {"dir": str(out), "max_shard_size": "40KB", **output},
        }
    )
    return mergejob.merge(spec)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_stream_matches_peft(case: tuple[str, list[str]], models: Any, tmp_path: Path) -> None:
    base, adapters = _make(models, *case)
    result = _stream_merge(base, adapters, tmp_path / "out")
    merged = load_folder(result.output_dir)
    config = json.loads((result.output_dir / "config.json").read_text())
    base_tensors = load_folder(base)
    dtype = next(iter(base_tensors.values())).dtype

    # 1. Bit for bit equal to PEFT computed in fp32 and rounded once.
    oracle32, oracle_config = peft_merge(base, adapters, torch.float32)
    assert set(merged) <= set(oracle32), set(merged) - set(oracle32)
    for name, tensor in merged.items():
        expected = oracle32[name].to(dtype)
        assert bitwise_equal(tensor, expected), (
            f"{name}: {int(steps_apart(tensor, expected).max())} steps from PEFT fp32"
        )

    # 2. Within one rounding step per adapter of PEFT's sequential merge in the output dtype.
    sequential, _ = peft_merge(base, adapters, dtype)
    plan = build_plan(base, [(a, 1.0) for a in adapters])
    stages = [{n: t.float() for n, t in base_tensors.items()}]
    for k in range(1, len(adapters)):
        stages.append(peft_merge(base, adapters[:k], torch.float32)[0])
    stages.append(oracle32)
    for name, tensor in merged.items():
        allowed = torch.zeros(tensor.shape)
        for before, after in itertools.pairwise(stages):
            value = after[name].float()
            if value.shape != tensor.shape:
                continue  # replaced later by a resized tensor: earlier roundings are gone
            previous = before.get(name)
            if previous is None or previous.shape != value.shape:
                previous = value
            allowed += ulp(torch.maximum(previous.abs(), value.abs()), dtype)
        error = (tensor.float() - sequential[name].float()).abs()
        assert bool((error <= 2 * allowed).all()), (name, float((error / allowed).max()))
    embedding_lora = any(
        op.transposed and op.kind != "replace" and t.name == plan.embeddings.input
        for t in plan.tensors
        for op in t.ops
    )
    if len(adapters) == 1 and not embedding_lora:
        assert all(bitwise_equal(t, sequential[n]) for n, t in merged.items())

    # 3. What no adapter touches is the base, byte for byte.
    unchanged = [t.name for t in plan.tensors if not t.changed and t.name in base_tensors]
    assert unchanged
    for name in unchanged:
        assert bitwise_equal(merged[name], base_tensors[name]), name

    # 4. Embeddings: untied when changed on a tied model, vocab_size follows a resize.
    assert config["tie_word_embeddings"] == oracle_config.tie_word_embeddings
    if plan.untied:
        assert config["tie_word_embeddings"] is False
        assert plan.embeddings.input in merged and plan.embeddings.output in merged
    assert config["vocab_size"] == oracle_config.vocab_size
    assert result.engine.engine == "stream"


def test_resized_vocab_takes_the_adapters_tokenizer(models: Any, tmp_path: Path) -> None:
    base, adapters = _make(models, "llama_bf16", ["resized"])
    result = _stream_merge(base, adapters, tmp_path / "out")
    vocab = json.loads((result.output_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 104
    assert (result.output_dir / "tokenizer.json").read_bytes() == (
        adapters[0] / "tokenizer.json"
    ).read_bytes()


def test_explicit_output_dtype_rounds_once(models: Any, tmp_path: Path) -> None:
    """A bf16 base merged to float16: every tensor converted, changed ones rounded once."""
    base, adapters = _make(models, "llama_bf16", ["attn"])
    result = _stream_merge(base, adapters, tmp_path / "out", dtype="float16")
    merged = load_folder(result.output_dir)
    oracle32, _ = peft_merge(base, adapters, torch.float32)
    for name, tensor in merged.items():
        assert bitwise_equal(tensor, oracle32[name].to(torch.float16)), name
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["dtype"] == "float16"


def test_adapter_weight_scales_the_delta(models: Any, tmp_path: Path) -> None:
    """weight w: W' = round(W + w * scale * (B @ A)), per adapter, in order."""
    base, adapters = _make(models, "llama_bf16", ["attn", "rslora"])
    spec = mergejob.MergeSpec.model_validate(
        {
            "base": str(base),
            "adapters": [{"path": str(adapters[0]), "weight": 0.5}, str(adapters[1])],
            "output": {"dir": str(tmp_path / "out")},
        }
    )
    merged = load_folder(mergejob.merge(spec).output_dir)
    base_tensors = load_folder(base)
    plan = build_plan(base, [(adapters[0], 0.5), (adapters[1], 1.0)])
    checked = 0
    for tensor in plan.tensors:
        if not tensor.changed:
            continue
        w32 = base_tensors[tensor.name].float()
        for op in tensor.ops:
            factors = load_folder(Path(op.a.path).parent)  # type: ignore[union-attr]
            a, b = factors[op.a.name].float(), factors[op.b.name].float()  # type: ignore[union-attr]
            adapter_weight = 0.5 if op.adapter == 0 else 1.0
            lora = next(lo for lo in plan.adapters[op.adapter].loras if lo.a.name == op.a.name)  # type: ignore[union-attr]
            assert op.coef == adapter_weight * lora.scale
            w32 += (b @ a) * op.coef
        assert bitwise_equal(merged[tensor.name], w32.to(torch.bfloat16)), tensor.name
        checked += 1
    assert checked > 0
