"""Mixture-of-experts bases (issue 17): LoRA on the fused expert parameters
(``target_parameters``), merged by both engines and checked against PEFT itself.

transformers 5 fuses a MoE layer's experts at run time into 3-D parameters
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) while the checkpoint keeps one
tensor per expert (``block_sparse_moe.experts.N.w1/w2/w3.weight`` for Mixtral,
``mlp.experts.N.gate_proj/up_proj/down_proj.weight`` for the Qwen and OLMoE families). PEFT
0.21 puts a LoRA on such a parameter with ``target_parameters``; ``merge_and_unload`` merges
it and ``save_pretrained`` writes the experts back one tensor each. That saved folder is the
oracle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import mergejob
from tests.support.models import EXPERT_PARAMETERS
from tests.support.oracle import peft_merge_saved
from tests.support.tensors import bitwise_equal, load_folder

FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]
# Qwen2-MoE's shared expert is a plain MLP of Linear layers: targeted as modules.
EXPERT_MODULES = {"qwen2_moe": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}


def _base(models: Any, family: str) -> Path:
    return models.base(family=family, dtype=torch.bfloat16, max_shard_size="60KB", seed=7)


def _experts_adapter(models: Any, base: Path, family: str) -> Path:
    """Attention (and shared-expert) modules plus the fused expert parameters."""
    return models.adapter(
        base,
        target_modules=EXPERT_MODULES.get(family, ["q_proj", "v_proj"]),
        target_parameters=EXPERT_PARAMETERS,
        seed=21,
    )


def _plain_adapter(models: Any, base: Path) -> Path:
    return models.adapter(base, target_modules=["k_proj", "o_proj"], r=8, seed=22)


def _merge(base: Path, adapters: list[Path], out: Path, engine: str) -> Path:
    spec = mergejob.MergeSpec.model_validate(
        {
            "base": str(base),
            "adapters": [str(a) for a in adapters],
            "output": {"dir": str(out), "max_shard_size": "60KB"},
            "engine": {"name": engine},
        }
    )
    return mergejob.merge(spec).output_dir


def _expert_tensors(tensors: dict[str, Any]) -> list[str]:
    return [n for n in tensors if ".experts." in n and "shared" not in n]


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_engine_merges_expert_lora_bit_identical_to_peft(
    family: str, models: Any, tmp_path: Path
) -> None:
    base = _base(models, family)
    adapters = [_experts_adapter(models, base, family), _plain_adapter(models, base)]
    out = _merge(base, adapters, tmp_path / "out", "peft")
    expected = peft_merge_saved(base, adapters, torch.bfloat16, tmp_path / "oracle")
    got = load_folder(out)
    before = load_folder(base)
    assert set(got) == set(expected) == set(before)
    experts = _expert_tensors(before)
    assert experts and all(not bitwise_equal(got[n], before[n]) for n in experts)
    for name, tensor in got.items():
        assert bitwise_equal(tensor, expected[name]), f"{name} differs from PEFT's merge"
