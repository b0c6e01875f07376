"""The stream engine's plan: decided from headers and configs, a pure function of its inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergejob.errors import IncompatibleAdapterError
from mergejob.plan.work import build_plan
from tests.support.oracle import peft_merge
from tests.support.tensors import bitwise_equal, load_folder


@pytest.fixture(scope="module")
def tied(models: Any) -> Path:
    return models.base(family="llama", dtype=torch.bfloat16, tie_word_embeddings=True, seed=50)


@pytest.fixture(scope="module")
def untied(models: Any) -> Path:
    return models.base(family="llama", dtype=torch.bfloat16, seed=51)


def test_a_tied_model_is_untied_only_when_an_adapter_changes_its_embeddings(
    tied: Path, models: Any
) -> None:
    attn = models.adapter(tied, target_modules=["q_proj"], seed=52)
    plan = build_plan(tied, [(attn, 1.0)])
    assert not plan.untied and "lm_head.weight" not in {t.name for t in plan.tensors}
    assert plan.embeddings.tied and plan.embeddings.output == "lm_head.weight"

    head = models.adapter(tied, target_modules=["lm_head"], seed=53)
    plan = build_plan(tied, [(head, 1.0)])
    assert plan.config_updates == {"tie_word_embeddings": False}
    names = [t.name for t in plan.tensors]
    assert names.index("lm_head.weight") == names.index("model.embed_tokens.weight") + 1
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    lm_head = next(t for t in plan.tensors if t.name == "lm_head.weight")
    assert embed.byte_copy  # the input embeddings stay the base's, byte for byte
    assert [op.kind for op in lm_head.ops] == ["replace", "lora"]  # PEFT's base_layer, + delta


def test_resizing_one_embedding_without_the_other_is_refused(
    untied: Path, models: Any, tmp_path: Path
) -> None:
    adapter = models.adapter(
        untied, modules_to_save=["embed_tokens", "lm_head"], resize_vocab_to=104, seed=54
    )
    plan = build_plan(untied, [(adapter, 1.0)])
    assert plan.config_updates == {"vocab_size": 104}
    half = tmp_path / "half"
    shutil.copytree(adapter, half)
    tensors = load_file(str(half / "adapter_model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if "lm_head" not in k}
    save_file(tensors, str(half / "adapter_model.safetensors"))
    config = json.loads((half / "adapter_config.json").read_text())
    config["modules_to_save"] = ["embed_tokens"]
    (half / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleAdapterError, match="new rows would be undefined"):
        build_plan(untied, [(half, 1.0)])


def test_plan_id_follows_content_not_paths(untied: Path, models: Any, tmp_path: Path) -> None:
    adapter = models.adapter(untied, seed=55)
    plan = build_plan(untied, [(adapter, 1.0)], max_shard_size=30_000)
    again = build_plan(untied, [(adapter, 1.0)], max_shard_size=30_000)
    assert plan.plan_id == again.plan_id
    # Another machine with the same files elsewhere (shared storage keeps mtimes): same id.
    moved_base = shutil.copytree(
        untied, tmp_path / "elsewhere" / "base", copy_function=shutil.copy2
    )
    moved_adapter = shutil.copytree(
        adapter, tmp_path / "elsewhere" / "a", copy_function=shutil.copy2
    )
    moved = build_plan(moved_base, [(moved_adapter, 1.0)], max_shard_size=30_000)
    assert moved.plan_id == plan.plan_id
    assert build_plan(untied, [(adapter, 0.5)], max_shard_size=30_000).plan_id != plan.plan_id
    assert build_plan(untied, [(adapter, 1.0)], max_shard_size=60_000).plan_id != plan.plan_id
    json.dumps(plan.summary())


def test_output_shards_hold_every_tensor_once_within_the_size(untied: Path, models: Any) -> None:
    adapter = models.adapter(untied, seed=56)
    plan = build_plan(untied, [(adapter, 1.0)], max_shard_size=25_000)
    names = [t.name for t in plan.tensors]
    assert len(names) == len(set(names)) == len(load_folder(untied))
    for shard in plan.shards:
        assert shard.nbytes <= 25_000 or len(shard.tensors) == 1
    assert plan.output_bytes == sum(plan.shard_sizes())


def test_a_checkpoint_without_the_base_model_prefix_still_maps(models: Any, tmp_path: Path) -> None:
    """Old GPT-2 checkpoints name tensors ``h.0.attn...`` while PEFT names ``transformer.h.0``."""
    base = models.base(family="gpt2", dtype=torch.bfloat16, seed=57)
    adapter = models.adapter(base, target_modules=["c_attn"], seed=58)
    bare = shutil.copytree(base, tmp_path / "bare")
    for path in bare.glob("*.safetensors"):
        tensors = load_file(str(path))
        save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, str(path))
    index = json.loads((bare / "model.safetensors.index.json").read_text())
    index["weight_map"] = {
        k.removeprefix("transformer."): v for k, v in index["weight_map"].items()
    }
    (bare / "model.safetensors.index.json").write_text(json.dumps(index))
    plan = build_plan(bare, [(adapter, 1.0)])
    changed = sorted(t.name for t in plan.tensors if t.changed)
    assert changed == ["h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"]
    assert all(op.transposed for t in plan.tensors for op in t.ops)


def test_a_wrong_fan_in_fan_out_flag_is_corrected_as_peft_does(models: Any, tmp_path: Path) -> None:
    """PEFT sets fan_in_fan_out from the module type (Conv1D: True) whatever the config says;
    the plan reads it from the shapes, and for square weights from the adapter's other ones."""
    import mergejob

    base = models.base(family="gpt2", dtype=torch.bfloat16, seed=59)
    adapter = models.adapter(base, target_modules=["c_attn", "c_proj"], seed=60)
    wrong = shutil.copytree(adapter, tmp_path / "wrong")
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    plan = build_plan(base, [(wrong, 1.0)])
    assert any("fan_in_fan_out is False" in w for w in plan.warnings)
    assert all(op.transposed for t in plan.tensors for op in t.ops)  # c_proj is square
    spec = mergejob.MergeSpec.model_validate(
        {"base": str(base), "adapters": [str(wrong)], "output": {"dir": str(tmp_path / "out")}}
    )
    merged = load_folder(mergejob.merge(spec).output_dir)
    oracle, _ = peft_merge(base, [wrong], torch.float32)
    for name, tensor in merged.items():
        assert bitwise_equal(tensor, oracle[name].to(torch.bfloat16)), name
