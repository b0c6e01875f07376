"""Config overrides and config_from: where the keys land, what transformers reads, and the
checks that stop a merge before it starts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import mergejob
from mergejob.errors import SpecError
from mergejob.model_config import (
    apply_overrides,
    check_config_from,
    merged_config,
    plan_output_config,
)

LONG_CONTEXT = {"rope_theta": 3580165449.0, "max_position_embeddings": 1048576}


@pytest.fixture(scope="module")
def job(models) -> dict[str, Path]:
    base = models.base()
    return {"base": base, "a": models.adapter(base)}


@pytest.fixture(scope="module")
def base_config(job) -> dict:
    return json.loads((job["base"] / "config.json").read_text())


def merge(job, out: Path, **config: object) -> Path:
    spec = mergejob.MergeSpec.model_validate(
        {"base": str(job["base"]), "adapters": [str(job["a"])], "output": {"dir": str(out)},
         "config": config}
    )  # fmt: skip
    return mergejob.merge(spec).output_dir


def test_rope_theta_lands_where_transformers_5_reads_it(base_config: dict) -> None:
    assert "rope_parameters" in base_config  # transformers 5 layout
    config = apply_overrides(base_config, LONG_CONTEXT)
    assert config["rope_parameters"] == {"rope_theta": 3580165449.0, "rope_type": "default"}
    assert "rope_theta" not in config  # a top-level copy would be ignored by transformers 5
    assert config["max_position_embeddings"] == 1048576


def test_the_seed_long_context_case_loads_and_takes_effect(job, tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = merge(job, tmp_path / "out", overrides=dict(LONG_CONTEXT))
    loaded = AutoConfig.from_pretrained(out)
    assert loaded.rope_parameters["rope_theta"] == 3580165449.0
    assert loaded.max_position_embeddings == 1048576
    model = AutoModelForCausalLM.from_pretrained(out)
    head_dim = loaded.head_dim
    expected = 1.0 / (
        3580165449.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    )
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)


def test_without_overrides_the_engines_config_is_kept_byte_for_byte(job, tmp_path: Path) -> None:
    plain = merge(job, tmp_path / "plain")
    changed = merge(job, tmp_path / "changed", overrides={"use_cache": False})
    a = json.loads((plain / "config.json").read_text())
    b = json.loads((changed / "config.json").read_text())
    assert b.pop("use_cache") is False
    a.pop("use_cache")
    assert a == b


def test_config_from_takes_the_other_config_and_keeps_what_the_merge_decides(
    job, tmp_path: Path
) -> None:
    from transformers import AutoConfig

    other = tmp_path / "finetuned"
    other.mkdir()
    config = json.loads((job["base"] / "config.json").read_text())
    config.update(
        rope_parameters={"rope_type": "default", "rope_theta": 3580165449.0},
        max_position_embeddings=1048576,
        dtype="float32",
        _name_or_path="gradientai/long",
    )
    (other / "config.json").write_text(json.dumps(config))
    out = merge(job, tmp_path / "out", config_from=str(other))
    written = json.loads((out / "config.json").read_text())
    assert written["max_position_embeddings"] == 1048576
    assert written["dtype"] == "bfloat16"  # the merge's, not the other model's
    assert "_name_or_path" not in written
    assert AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == 3580165449.0


def test_config_from_in_the_transformers_4_layout_still_loads(base_config: dict) -> None:
    from transformers import LlamaConfig

    old = {k: v for k, v in base_config.items() if k != "rope_parameters"}
    old.update(rope_theta=3580165449.0, rope_scaling=None, torch_dtype="bfloat16")
    final = plan_output_config(
        base_config,
        config_from=old,
        config_from_name="old",
        overrides={"max_position_embeddings": 1048576},
        allow_unknown=False,
        vocab_size=None,
    )
    assert "torch_dtype" not in final
    assert LlamaConfig.from_dict(final).rope_parameters["rope_theta"] == 3580165449.0


def test_config_from_with_other_shapes_lists_every_difference(base_config: dict) -> None:
    other = dict(base_config, num_hidden_layers=80, intermediate_size=28672, vocab_size=128256)
    with pytest.raises(SpecError) as err:
        check_config_from(base_config, other, other_name="org/llama-70b")
    message = str(err.value)
    assert "config.config_from org/llama-70b: describes another architecture or shape" in message
    assert "num_hidden_layers 80 (the merged model has 2)" in message
    assert "intermediate_size 28672 (the merged model has 128)" in message
    assert "vocab_size 128256 (the merged model has 96)" in message


def test_config_from_must_match_a_resized_vocabulary(base_config: dict) -> None:
    check_config_from(
        base_config, dict(base_config, vocab_size=100), other_name="x", vocab_size=100
    )
    with pytest.raises(SpecError, match=r"vocab_size 96 \(the merged model has 100\)"):
        check_config_from(base_config, base_config, other_name="x", vocab_size=100)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("hidden_size", "cannot be overridden: it must match the weights"),
        ("num_hidden_layers", "cannot be overridden"),
        ("vocab_size", "cannot be overridden"),
        ("tie_word_embeddings", "the merge unties embeddings itself"),
        ("dtype", "use output.dtype"),
    ],
)
def test_overrides_may_not_change_what_the_weights_fix(
    base_config: dict, key: str, message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        plan_output_config(base_config, config_from=None, config_from_name=None,
                           overrides={key: 1}, allow_unknown=False, vocab_size=None)  # fmt: skip


def test_an_unknown_override_key_is_an_error_unless_allowed(base_config: dict) -> None:
    with pytest.raises(SpecError) as err:
        plan_output_config(base_config, config_from=None, config_from_name=None,
                           overrides={"max_position_embedding": 8}, allow_unknown=False,
                           vocab_size=None)  # fmt: skip
    assert "did you mean 'max_position_embeddings'?" in str(err.value)
    assert "config.allow_unknown_keys: true" in str(err.value)
    final = plan_output_config(base_config, config_from=None, config_from_name=None,
                               overrides={"my_custom_key": 8}, allow_unknown=True,
                               vocab_size=None)  # fmt: skip
    assert final["my_custom_key"] == 8


def test_known_keys_include_class_fields_absent_from_the_file(base_config: dict) -> None:
    config = {k: v for k, v in base_config.items() if k != "attention_dropout"}
    final = plan_output_config(config, config_from=None, config_from_name=None,
                               overrides={"attention_dropout": 0.1}, allow_unknown=False,
                               vocab_size=None)  # fmt: skip
    assert final["attention_dropout"] == 0.1


def test_rope_scaling_in_the_old_spelling_becomes_rope_parameters(base_config: dict) -> None:
    scaling = {"type": "linear", "factor": 4.0}
    final = plan_output_config(base_config, config_from=None, config_from_name=None,
                               overrides={"rope_scaling": scaling}, allow_unknown=False,
                               vocab_size=None)  # fmt: skip
    assert final["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert "rope_scaling" not in final


def test_a_dotted_key_sets_a_nested_value(base_config: dict) -> None:
    final = apply_overrides(base_config, {"rope_parameters.rope_theta": 2.0})
    assert final["rope_parameters"]["rope_theta"] == 2.0
    assert base_config["rope_parameters"]["rope_theta"] == 10000.0  # the input is not changed


def test_an_alias_lands_on_the_real_key_and_a_shape_change_is_caught() -> None:
    from transformers import GPT2Config

    gpt2 = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96).to_dict()
    final = apply_overrides(gpt2, {"max_position_embeddings": 2048})
    assert final["n_positions"] == 2048
    with pytest.raises(SpecError, match=r"transformer\.wpe\.weight \[2048, 64\]"):
        plan_output_config(gpt2, config_from=None, config_from_name=None,
                           overrides={"max_position_embeddings": 2048}, allow_unknown=False,
                           vocab_size=None)  # fmt: skip


def test_multimodal_text_keys_go_into_text_config() -> None:
    config = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": {"model_type": "llama", "max_position_embeddings": 4096,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
    }  # fmt: skip
    final = merged_config(config, config_from=None, overrides={"rope_theta": 5e5})
    assert final["text_config"]["rope_parameters"]["rope_theta"] == 5e5
    assert "rope_theta" not in final
    assert copy.deepcopy(final) == final


def test_set_config_on_the_command_line(job, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        "merge", "--base", job["base"], "--adapters", job["a"], "--output_dir", out,
        "--set-config", "rope_theta=3580165449.0",
        "--set-config", "max_position_embeddings=1048576",
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 3580165449.0
    assert config["max_position_embeddings"] == 1048576
    code, _, err = run_cli(
        "merge", "--base", job["base"], "--adapters", job["a"], "--output_dir", tmp_path / "x",
        "--set-config", "hidden_size=3",
    )  # fmt: skip
    assert code == 2
    assert "--set-config" not in err or "hidden_size" in err
    assert not (tmp_path / "x").exists()
