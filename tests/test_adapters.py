"""Reading adapters into factors: PEFT's matching, scales, refusals, and every tensor
accounted for."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergejob.adapters import AdapterFactors, is_targeted, pattern_key, read_adapter
from mergejob.errors import IncompatibleAdapterError, UnsupportedAdapterError

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.12.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.0.mlp.experts.3.down_proj",
    "transformer.h.2.attn.c_attn",
    "model.embed_tokens",
    "lm_head",
    "vision.blocks.1.attn.q_proj",
]
TARGETING: list[dict[str, Any]] = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*layers\.1\..*(q_proj|down_proj)"},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "c_attn"], "layers_to_transform": [2], "layers_pattern": ["h"]},
    {"target_modules": ["q_proj", "lm_head"], "exclude_modules": ["vision.blocks.1.attn.q_proj"]},
    {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["embed_tokens"]},
    {"target_modules": ["down_proj"], "exclude_modules": r".*experts.*"},
]


@pytest.mark.parametrize("config", TARGETING, ids=[str(i) for i in range(len(TARGETING))])
def test_targeting_matches_peft(config: dict[str, Any]) -> None:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = LoraConfig(**config)
    for module in MODULES:
        assert is_targeted(config, module) == bool(
            check_target_module_exists(peft_config, module)
        ), module


def test_pattern_keys_match_peft() -> None:
    from peft.utils.other import get_pattern_key

    patterns = [
        "q_proj",
        r"layers\.1\.self_attn\.q_proj",
        "down_proj",
        "model.layers.12.self_attn.v_proj",
    ]
    for module in MODULES:
        assert pattern_key(patterns, module) == get_pattern_key(patterns, module)


@pytest.fixture(scope="module")
def base(models: Any) -> Path:
    return models.base(family="llama", dtype=torch.bfloat16, seed=30)


def _all_keys(adapter: Path) -> set[str]:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        return set(handle.keys())


def _accounted(factors: AdapterFactors) -> set[str]:
    keys = {k for lora in factors.loras for k in lora.keys}
    keys |= {f.ref.name for f in factors.full}
    keys |= {t.key for t in factors.ignored}
    return keys


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": "all-linear"},
        {"target_modules": ["q_proj", "v_proj"], "use_dora": True},
        {"target_modules": ["embed_tokens", "lm_head", "q_proj"]},
        {"modules_to_save": ["embed_tokens", "lm_head"], "resize_vocab_to": 104},
    ],
    ids=["all_linear", "dora", "embeddings", "resized"],
)
def test_every_adapter_tensor_is_used_or_ignored_with_a_reason(
    kwargs: dict[str, Any], base: Path, models: Any
) -> None:
    adapter = models.adapter(base, seed=31, **kwargs)
    factors = read_adapter(adapter)
    assert _accounted(factors) == _all_keys(adapter)
    assert all(t.reason for t in factors.ignored)


def test_embedding_adapters_are_read_as_peft_loads_them(base: Path, models: Any) -> None:
    adapter = models.adapter(
        base, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"],
        resize_vocab_to=104, seed=32,
    )  # fmt: skip
    factors = read_adapter(adapter)
    roles = {f.target: f.role for f in factors.full}
    assert roles == {
        "model.embed_tokens.weight": "modules_to_save",
        "lm_head.weight": "modules_to_save",
    }
    reasons = {t.key.rsplit(".", 2)[-2]: t.reason for t in factors.ignored}
    assert "merge_and_unload replaces" in reasons["original_module"]
    assert "PEFT does not load it" in reasons["modules_to_save"]

    lora_embed = models.adapter(base, target_modules=["embed_tokens", "lm_head"], seed=33)
    factors = read_adapter(lora_embed)
    kinds = {lora.module: lora.embedding for lora in factors.loras}
    assert kinds == {"model.embed_tokens": True, "lm_head": False}
    assert {f.role for f in factors.full} == {"base_layer"}


def test_scales_follow_rslora_and_the_patterns(base: Path, models: Any) -> None:
    adapter = models.adapter(
        base,
        target_modules=["q_proj", "v_proj"],
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 4},
        seed=34,
    )
    scales = {lora.module: (lora.r, lora.alpha, lora.scale) for lora in read_adapter(adapter).loras}
    assert scales["model.layers.0.self_attn.q_proj"] == (8, 16, 16 / math.sqrt(8))
    assert scales["model.layers.1.self_attn.q_proj"] == (2, 16, 16 / math.sqrt(2))
    assert scales["model.layers.0.self_attn.v_proj"] == (8, 4, 4 / math.sqrt(8))


def _edited(adapter: Path, dest: Path, **changes: Any) -> Path:
    shutil.copytree(adapter, dest)
    path = dest / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"peft_type": "LOHA"}, "PEFT method LOHA"),
        ({"peft_type": "IA3"}, "PEFT method IA3"),
        ({"bias": "lora_only"}, "bias training"),
        ({"use_qalora": True}, "QA-LoRA"),
        ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base weights"),
        ({"some_future_variant": {"x": 1}}, "some_future_variant"),
    ],
)
def test_configs_it_cannot_express_are_named(
    changes: dict[str, Any], named: str, base: Path, models: Any, tmp_path: Path
) -> None:
    adapter = _edited(models.adapter(base, seed=35), tmp_path / "edited", **changes)
    with pytest.raises(UnsupportedAdapterError) as error:
        read_adapter(adapter)
    assert named in str(error.value)
    assert "--engine peft" in str(error.value)


def test_inconsistent_adapter_files_are_listed(base: Path, models: Any, tmp_path: Path) -> None:
    adapter = models.adapter(base, target_modules=["q_proj", "v_proj"], seed=36)
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    path = broken / "adapter_model.safetensors"
    tensors = load_file(str(path))
    b_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    del tensors[b_key]
    tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] = torch.zeros(32, 4)
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"] = torch.ones(
        32
    )
    save_file(tensors, str(path))
    with pytest.raises(IncompatibleAdapterError) as error:
        read_adapter(broken)
    message = str(error.value)
    assert "model.layers.0.self_attn.q_proj: LoRA factor B is missing" in message
    assert "k_proj: has LoRA factors but is outside target_modules" in message
    assert "DoRA magnitude in an adapter without use_dora" in message


def test_layers_to_transform_outside_the_saved_layers_is_refused(
    base: Path, models: Any, tmp_path: Path
) -> None:
    adapter = models.adapter(base, target_modules=["q_proj"], layers_to_transform=[1], seed=37)
    assert {lora.module for lora in read_adapter(adapter).loras} == {
        "model.layers.1.self_attn.q_proj"
    }
    moved = _edited(adapter, tmp_path / "moved", layers_to_transform=[0])
    with pytest.raises(
        IncompatibleAdapterError, match="outside target_modules/layers_to_transform"
    ):
        read_adapter(moved)


def test_weights_are_refused_where_they_mean_nothing(base: Path, models: Any) -> None:
    dora = models.adapter(base, target_modules=["q_proj"], use_dora=True, seed=38)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        read_adapter(dora, weight=0.5)
    saved = models.adapter(base, modules_to_save=["lm_head"], seed=39)
    with pytest.raises(UnsupportedAdapterError, match="replaces whole tensors"):
        read_adapter(saved, weight=0.5)
    plain = models.adapter(base, seed=40)
    assert read_adapter(plain, weight=0.5).weight == 0.5
