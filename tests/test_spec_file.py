"""The spec file: YAML/JSON, its JSON Schema, layered overrides, and bad specs (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergejob.errors import SpecError
from mergejob.spec import (
    build_spec,
    env_labels,
    env_overrides,
    load_spec_file,
    parse_assignment,
    set_path,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_and_json_files_give_the_same_spec(tmp_path: Path) -> None:
    data = {
        "base": {"path": "org/base", "revision": "v1"},
        "adapters": ["org/a@main", {"path": "./b", "weight": 0.5}],
        "output": {"dir": "out", "dtype": "bfloat16", "max_shard_size": "2GB"},
        "engine": {"name": "stream", "workers": 2},
        "config": {"overrides": {"rope_theta": 1e6}, "config_from": "org/other"},
    }
    from_yaml = build_spec(load_spec_file(write(tmp_path / "s.yaml", yaml.safe_dump(data))))
    from_json = build_spec(load_spec_file(write(tmp_path / "s.json", json.dumps(data))))
    assert from_yaml == from_json
    assert from_yaml.adapters[0].revision == "main"
    assert from_yaml.config.config_from is not None
    assert from_yaml.config.config_from.path == "org/other"


def test_a_recipe_section_is_not_part_of_the_spec(tmp_path: Path) -> None:
    text = "base: b\nadapters: [a]\noutput: {dir: o}\nrecipe: {format: 1, outputs: {}}\n"
    assert "recipe" not in load_spec_file(write(tmp_path / "mergejob.yaml", text))


def test_invalid_yaml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "spec.yaml", "base: [unclosed\nadapters: x\n")
    with pytest.raises(SpecError, match=r"spec\.yaml: not valid YAML/JSON"):
        load_spec_file(path)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"ouptut": {"dir": "o"}}, "unknown key 'ouptut'; did you mean 'output'?"),
        ({"output": {"dir": "o", "dtyp": "bfloat16"}}, "output.dtyp: unknown key 'dtyp'; did you mean 'dtype'?"),
        ({"output": {"dir": "o"}, "engine": {"worker": 2}}, "did you mean 'workers'?"),
        ({"output": {"dir": "o"}, "config": {"override": {}}}, "did you mean 'overrides'?"),
    ],
)  # fmt: skip
def test_an_unknown_key_is_an_error_with_the_nearest_key(data: dict, expected: str) -> None:
    with pytest.raises(SpecError) as err:
        build_spec({"base": "b", "adapters": ["a"], **data}, origin="spec.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("spec.yaml: ")


def test_a_wrong_type_names_the_field() -> None:
    spec = {"base": "b", "adapters": ["a"], "output": {"dir": "o"}, "engine": {"workers": "many"}}
    with pytest.raises(SpecError, match=r"engine\.workers: Input should be a valid integer"):
        build_spec(spec)


def test_a_missing_required_field_is_named() -> None:
    with pytest.raises(SpecError, match=r"spec: adapters: is required"):
        build_spec({"base": "b", "output": {"dir": "o"}})


def test_a_negative_weight_is_refused_where_the_engine_cannot_apply_it() -> None:
    data = {
        "base": "b",
        "adapters": ["a", {"path": "c", "weight": -1.0}],
        "output": {"dir": "o"},
    }
    assert build_spec(data).adapters[1].weight == -1.0  # stream: subtracting an adapter is fine
    with pytest.raises(SpecError, match=r"adapters\[1\]\.weight: -1: the peft engine merges"):
        build_spec({**data, "engine": {"name": "peft"}})
    with pytest.raises(SpecError, match=r"adapters\.0\.weight: must be a finite, non-zero"):
        build_spec({"base": "b", "adapters": [{"path": "a", "weight": 0}], "output": {"dir": "o"}})


def test_layers_override_single_fields_in_order() -> None:
    spec = build_spec(
        {"base": "b", "adapters": ["a"], "output": {"dir": "o", "dtype": "float16"}},
        {"output.dtype": "bfloat16", "config.overrides.rope_theta": 1.0},
        {"config.overrides.max_position_embeddings": 8, "engine.workers": "3"},
    )
    assert spec.output.dtype == "bfloat16"
    assert spec.output.dir == "o"
    assert spec.engine.workers == 3
    assert spec.config.overrides == {"rope_theta": 1.0, "max_position_embeddings": 8}


def test_a_dotted_override_key_stays_one_key() -> None:
    data: dict = {"config": {"overrides": {"rope_theta": 1.0}}}
    set_path(data, "config.overrides.rope_scaling.factor", 8.0)
    assert data["config"]["overrides"] == {"rope_theta": 1.0, "rope_scaling.factor": 8.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rope_theta=3580165449.0", ("rope_theta", 3580165449.0)),
        ("max_position_embeddings=1048576", ("max_position_embeddings", 1048576)),
        ("use_cache=false", ("use_cache", False)),
        ('rope_scaling={"rope_type": "linear", "factor": 2.0}', ("rope_scaling", {"rope_type": "linear", "factor": 2.0})),
        ("rope_scaling=null", ("rope_scaling", None)),
        ("hidden_act=gelu", ("hidden_act", "gelu")),
    ],
)  # fmt: skip
def test_set_config_values_are_json_typed(text: str, expected: tuple) -> None:
    assert parse_assignment(text) == expected


def test_set_config_without_equals_is_an_error() -> None:
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        parse_assignment("rope_theta")


def test_environment_overrides_and_their_labels() -> None:
    environ = {
        "MERGEJOB_BASE": "org/base@v2",
        "MERGEJOB_ADAPTERS": "org/a, org/b@main",
        "MERGEJOB_DTYPE": "float8",
        "MERGEJOB_CONFIG_OVERRIDES": '{"rope_theta": 5e5}',
        "MERGEJOB_WORKERS": "",
    }
    layer = env_overrides(environ)
    assert layer == {
        "base.path": "org/base@v2",
        "adapters": ["org/a", "org/b@main"],
        "output.dtype": "float8",
        "config.overrides.rope_theta": 5e5,
    }
    with pytest.raises(SpecError) as err:
        build_spec({"output": {"dir": "o"}}, layer, labels=env_labels(layer))
    assert "MERGEJOB_DTYPE: output.dtype: Input should be" in str(err.value)


def test_a_bad_overrides_variable_is_named() -> None:
    with pytest.raises(SpecError, match="MERGEJOB_CONFIG_OVERRIDES: not a JSON object"):
        env_overrides({"MERGEJOB_CONFIG_OVERRIDES": "rope_theta=1"})
    with pytest.raises(SpecError, match="MERGEJOB_CONFIG_OVERRIDES: must be a JSON object"):
        env_overrides({"MERGEJOB_CONFIG_OVERRIDES": "[1]"})


def test_schema_command_prints_the_spec_json_schema(run_cli) -> None:
    code, out, _ = run_cli("schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "mergejob spec"
    assert {"base", "adapters", "output", "engine", "config", "publish"} <= set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False
    config = schema["$defs"]["ConfigSpec"]
    assert {"overrides", "config_from", "allow_unknown_keys"} <= set(config["properties"])


def test_the_schema_accepts_the_readme_example() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- spec-example -->", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    spec = build_spec(yaml.safe_load(block))
    assert spec.config.overrides["rope_theta"] == 3580165449.0
