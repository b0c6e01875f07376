"""The model card (README.md) of every output, read back with huggingface_hub's ModelCard."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard

import mergejob
from mergejob.card import BASE_MODEL_RELATION, card_spec, hub_id
from mergejob.sources import ResolvedSource
from mergejob.spec import SourceSpec

BASE_CARD = """---
license: llama3.1
language:
- en
- de
pipeline_tag: text-generation
tags:
- facebook
- meta
base_model: someone/else
---
# The base
"""


@pytest.fixture(scope="module")
def inputs(models: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = models.base()
    carded = tmp_path_factory.mktemp("card") / "base-with-card"
    shutil.copytree(base, carded)
    (carded / "README.md").write_text(BASE_CARD)
    return {
        "base": base,
        "carded": carded,
        "a": models.adapter(base, target_modules=["q_proj", "v_proj"]),
        "dora": models.adapter(
            base, target_modules=["o_proj"], use_dora=True, seed=5, rank_pattern={"o_proj": 2}
        ),
    }


def merge(base: Path, adapters: list[Any], out: Path, **spec: Any) -> Path:
    data = {"base": str(base), "adapters": adapters, "output": {"dir": str(out)}, **spec}
    return mergejob.merge(mergejob.MergeSpec.model_validate(data)).output_dir


def test_every_output_has_a_card_that_modelcard_loads(inputs, tmp_path: Path) -> None:
    out = merge(
        inputs["base"],
        [{"path": str(inputs["a"]), "weight": 0.5}, str(inputs["dora"])],
        tmp_path / "out",
        config={"overrides": {"rope_theta": 500000.0}},
    )
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert "base_model" not in data  # a local base has no Hub id to name
    assert data["library_name"] == "transformers"
    assert data["tags"] == ["mergejob", "lora", "merge", "dora"]
    text = card.text
    # Local inputs by folder name: the card never holds a local path.
    assert f"`{inputs['a'].name}`" in text and f"`{inputs['dora'].name}`" in text
    assert str(inputs["a"].parent) not in text
    assert "| 0.5 | LoRA | 4 | 8 | q_proj, v_proj |" in text
    assert "| 1 | DoRA | 4 (per module: o_proj=2) | 8 | o_proj |" in text
    assert "`rope_theta` = `500000.0`" in text
    assert "- output dtype: bfloat16" in text and "- engine: stream (device cpu)" in text
    assert "```yaml\nbase:\n" in text and str(out) not in text


def test_the_base_card_license_language_and_tags_are_carried_over(inputs, tmp_path: Path) -> None:
    out = merge(inputs["carded"], [str(inputs["a"])], tmp_path / "out")
    data = ModelCard.load(out / "README.md").data
    assert data.license == "llama3.1"
    assert data.language == ["en", "de"]
    assert data.pipeline_tag == "text-generation"
    assert data.tags == ["mergejob", "lora", "merge", "facebook", "meta"]
    assert data.to_dict().get("base_model") is None  # the base's own base is not ours


def test_two_merges_of_the_same_inputs_write_the_same_card(inputs, tmp_path: Path) -> None:
    adapters = [str(inputs["a"]), str(inputs["dora"])]
    one = merge(inputs["base"], adapters, tmp_path / "one")
    two = merge(inputs["base"], adapters, tmp_path / "two", engine={"workers": 2})
    assert (one / "README.md").read_bytes() == (two / "README.md").read_bytes()


def test_the_peft_engine_writes_a_card_too(inputs, tmp_path: Path) -> None:
    out = merge(inputs["base"], [str(inputs["a"])], tmp_path / "out", engine={"name": "peft"})
    card = ModelCard.load(out / "README.md")
    assert "- engine: peft" in card.text


def test_a_base_from_the_hub_cache_is_named_by_its_repo_id(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B" / "snapshots" / commit
    source = ResolvedSource(spec=SourceSpec(path=str(snapshot)), local_dir=snapshot)
    assert hub_id(source) == ("meta-llama/Llama-3.1-8B", commit)
    plain = ResolvedSource(spec=SourceSpec(path=str(tmp_path)), local_dir=tmp_path)
    assert hub_id(plain) == (None, None)
    downloaded = ResolvedSource(
        spec=SourceSpec(path="org/base"), local_dir=tmp_path, repo_id="org/base", commit=commit
    )
    assert hub_id(downloaded) == ("org/base", commit)
    assert BASE_MODEL_RELATION == "finetune"


def test_the_card_spec_says_what_the_model_is_not_where_it_went() -> None:
    spec = {
        "base": {"path": "org/base"},
        "output": {"dir": "/tmp/x", "dtype": "bfloat16", "overwrite": True},
        "engine": {"name": "stream", "workers": 4},
        "publish": {"repo_id": "org/merged"},
    }
    assert card_spec(spec) == {
        "base": {"path": "org/base"},
        "output": {"dtype": "bfloat16"},
        "engine": {"name": "stream"},
    }
