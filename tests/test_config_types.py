"""Config overrides are type-checked, and the final config must build its model (on the meta
device) before a merge starts: a config transformers cannot load is never written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mergejob.errors import SpecError
from mergejob.model_config import plan_output_config


@pytest.fixture(scope="module")
def base(models) -> Path:
    return models.base()


@pytest.fixture(scope="module")
def base_config(base: Path) -> dict:
    return json.loads((base / "config.json").read_text())


def plan(config: dict, overrides: dict[str, Any], *, allow_unknown: bool = False) -> dict:
    return plan_output_config(config, config_from=None, config_from_name=None,
                              overrides=overrides, allow_unknown=allow_unknown,
                              vocab_size=None)  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("rope_theta", "3,580,165,449", "a number"),  # what --set-config makes of 3,580,165,449
        ("rope_theta", "fast", "a number"),
        ("max_position_embeddings", "big", "an integer"),
        ("max_position_embeddings", 4096.5, "an integer"),
        ("use_cache", 1, "true or false"),
        ("attention_dropout", True, "a number"),
        ("hidden_act", 3, "a string"),
        ("rope_parameters.factor", "x", "a number"),
        ("rope_parameters", {"rope_type": "linear", "factor": "x"}, "a number"),
        ("rope_scaling", {"type": "linear", "factor": "4"}, "a number"),
        ("rope_parameters", [1, 2], "a mapping"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_key_value_and_type(
    base_config: dict, key: str, value: Any, expected: str
) -> None:
    with pytest.raises(SpecError) as err:
        plan(base_config, {key: value})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"config.overrides.{key}")
    assert repr(value if not isinstance(value, dict) else value["factor"]) in message
    assert f"takes {expected}" in message


def test_a_number_written_with_thousands_separators_gets_a_hint(base_config: dict) -> None:
    with pytest.raises(SpecError, match=r"e\.g\. rope_theta=3580165449"):
        plan(base_config, {"rope_theta": "3,580,165,449"})


def test_a_whole_number_for_a_float_key_is_written_as_a_float(base_config: dict) -> None:
    final = plan(base_config, {"rms_norm_eps": 1, "rope_theta": 500000})
    assert final["rms_norm_eps"] == 1.0 and isinstance(final["rms_norm_eps"], float)
    theta = final["rope_parameters"]["rope_theta"]
    assert theta == 500000.0 and isinstance(theta, float)


def test_values_of_the_right_type_pass(base_config: dict) -> None:
    final = plan(base_config, {"rope_theta": 3580165449.0, "max_position_embeddings": 1048576,
                               "use_cache": False, "attention_dropout": 0, "pad_token_id": None,
                               "rope_parameters.factor": 1.0})  # fmt: skip
    assert final["max_position_embeddings"] == 1048576


def test_an_unknown_key_allowed_is_checked_against_the_base_value(base_config: dict) -> None:
    config = dict(base_config, my_scale=2.0)
    assert plan(config, {"my_scale": 3}, allow_unknown=True)["my_scale"] == 3
    with pytest.raises(SpecError, match=r"config\.overrides\.my_scale: 'big'.*takes a number"):
        plan(config, {"my_scale": "big"}, allow_unknown=True)
    # A key nobody knows a type for is taken as given.
    assert plan(config, {"my_new": "x"}, allow_unknown=True)["my_new"] == "x"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hidden_act", "no_such_activation"),  # a string, as the class expects; no model has it
        ("rope_theta", None),  # RopeParameters allows null; the rotary embedding does not
    ],
)
def test_a_config_whose_model_cannot_be_built_is_refused(
    base_config: dict, key: str, value: Any
) -> None:
    with pytest.raises(SpecError) as err:
        plan(base_config, {key: value})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"config.overrides.{key}: ")
    assert "cannot build the model" in message


def test_a_bad_config_from_cli_and_environment_exits_2_before_the_merge(
    base: Path, models, run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = models.adapter(base)
    out = tmp_path / "out"
    code, _, err = run_cli("merge", "--base", base, "--adapters", adapter, "--output_dir", out,
                           "--set-config", "rope_theta=3,580,165,449")  # fmt: skip
    assert code == 2, err
    assert "config.overrides.rope_theta: '3,580,165,449'" in err
    assert "Traceback" not in err
    assert not out.exists()

    monkeypatch.setenv("MERGEJOB_CONFIG_OVERRIDES", '{"rope_theta": "fast"}')
    code, _, err = run_cli("run", "--base", base, "--adapters", adapter, "--output_dir", out)
    assert code == 2, err
    assert "config.overrides.rope_theta: 'fast'" in err
    assert not out.exists()
    monkeypatch.delenv("MERGEJOB_CONFIG_OVERRIDES")
    code, stdout, err = run_cli("plan", "--base", base, "--adapters", adapter,
                                "--set-config", "rope_theta=fast")  # fmt: skip
    assert code == 2, stdout + err
    assert "config.overrides.rope_theta: 'fast'" in stdout
