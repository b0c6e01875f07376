"""An extraction as a job spec: the `extract:` section, `mergejob run`, `plan`, `render`,
`submit`, and the merge-only parts refused (not ignored).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mergejob.errors import SpecError
from mergejob.spec import build_spec

CLI = Callable[..., tuple[int, str, str]]


def write_spec(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def extract_spec(base: object, tuned: object, out: object, **extract: Any) -> dict[str, Any]:
    return {
        "base": str(base),
        "extract": {"finetuned": str(tuned), **extract},
        "output": {"dir": str(out)},
    }


@pytest.fixture(scope="module")
def pair(models: Any) -> tuple[Path, Path]:
    base = models.base(dtype=torch.float32)
    return base, models.finetune(base, rank=4)


# ---------------------------------------------------------------------------------------
# The spec


def test_an_extract_section_makes_the_spec_an_extraction_with_defaults() -> None:
    spec = build_spec(extract_spec("b", "org/tuned@v2", "o"))
    assert spec.task == "extract" and spec.adapters == []
    assert spec.extract is not None
    assert spec.extract.finetuned.path == "org/tuned" and spec.extract.finetuned.revision == "v2"
    assert (spec.extract.max_rank, spec.extract.embeddings, spec.extract.svd) == (
        32,
        "full",
        "auto",
    )
    assert build_spec({"base": "b", "adapters": ["a"], "output": {"dir": "o"}}).task == "merge"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"adapters": ["a"]}, "adapters: not part of an extraction"),
        ({"output": {"dir": "o", "dtype": "float16"}}, "output.dtype: not part of an extraction (an extract: section); remove it (use extract.dtype)"),
        ({"engine": {"name": "peft"}}, "engine.name: not part of an extraction"),
        ({"engine": {"workers": 4}}, "engine.workers: not part of an extraction"),
        ({"config": {"overrides": {"rope_theta": 1.0}}}, "config.overrides: not part of an extraction"),
        ({"extract": {"finetuned": "t", "max_rnk": 8}}, "extract.max_rnk: unknown key 'max_rnk'; did you mean 'max_rank'?"),
        ({"extract": {"finetuned": "t", "min_energy": 1.5}}, "extract.min_energy: Input should be less than or equal to 1"),
        ({"extract": {"finetuned": "t", "include": ["("]}}, "extract.include: '(' is not a regular expression"),
        ({"extract": {"max_rank": 8}}, "extract.finetuned: is required"),
    ],
)  # fmt: skip
def test_what_an_extraction_does_not_read_is_refused_naming_the_field(
    extra: dict[str, Any], expected: str
) -> None:
    data = {**extract_spec("b", "t", "o"), **extra}
    with pytest.raises(SpecError) as err:
        build_spec(data, origin="spec.yaml")
    assert expected in str(err.value)


def test_the_schema_shows_the_extract_section(run_cli: CLI) -> None:
    code, out, _ = run_cli("schema")
    assert code == 0
    schema = json.loads(out)
    extract = schema["$defs"]["ExtractSpec"]
    assert {"finetuned", "max_rank", "min_energy", "embeddings", "svd"} <= set(
        extract["properties"]
    )
    assert extract["additionalProperties"] is False
    assert "adapters" not in schema.get("required", [])


# ---------------------------------------------------------------------------------------
# The commands


def test_run_runs_an_extract_spec_and_merge_refuses_it(
    pair: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned = pair
    spec = write_spec(tmp_path / "spec.yaml", extract_spec(base, tuned, tmp_path / "out"))
    code, _, err = run_cli("merge", "--config", spec)
    assert code == 2 and "has an extract: section; run it with mergejob extract" in err
    code, out, err = run_cli("run", "--config", spec)
    assert code == 0, err
    assert "extracted 8 LoRA module(s)" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    code, _, err = run_cli("run", "--config", spec, "--index-count", 2, "--index", 0)
    assert code == 2 and "an extraction runs in one pod" in err


def test_extract_takes_a_spec_file_and_flags_override_it(
    pair: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned = pair
    spec = write_spec(tmp_path / "spec.yaml", extract_spec(base, tuned, tmp_path / "x", max_rank=2))
    out = tmp_path / "out"
    code, _, err = run_cli("extract", "--config", spec, "--max-rank", 3, "--output_dir", out)
    assert code == 0, err
    recipe = yaml.safe_load((out / "mergejob.yaml").read_text())
    assert recipe["extract"]["max_rank"] == 3
    assert recipe["extract"]["finetuned"]["path"] == str(tuned)
    assert "adapters" not in recipe and recipe["recipe"]["engine"]["name"] == "extract"
    roles = [i["role"] for i in recipe["recipe"]["inputs"]]
    assert roles == ["base", "finetuned"]
    assert all(i["files"] for i in recipe["recipe"]["inputs"])  # sha256 of every input file


def test_extract_without_the_finetuned_model_names_the_flag(run_cli: CLI, tmp_path: Path) -> None:
    code, _, err = run_cli("extract", "--base", "b", "--output_dir", tmp_path / "o")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "mergejob: error: --finetuned_model_name_or_path: required (or give --config SPEC)"
    )


def test_plan_of_an_extraction_shows_modules_ranks_memory_disk_and_time(
    pair: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned = pair
    spec = write_spec(tmp_path / "spec.yaml", extract_spec(base, tuned, tmp_path / "o", max_rank=8))
    code, out, err = run_cli("plan", "--config", spec)
    assert code == 0, err
    assert "2 x model.layers.N.self_attn.q_proj lora [64, 64]: rank <= 8 (full SVD)" in out
    assert "whole if changed" in out  # the norms, embeddings and lm_head
    for line in ("adapter: at most", "memory:", "disk:", "time: ~", "problems: none"):
        assert line in out
    code, out, _ = run_cli("extract", "--config", spec, "--dry-run", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["task"] == "extract" and report["ok"] and report["memory_bytes"] > 0
    assert not (tmp_path / "o").exists()  # a plan writes nothing
    bad = write_spec(tmp_path / "bad.yaml", extract_spec(base, tuned, tmp_path / "o", max_rank=40))
    code, out, _ = run_cli("plan", "--config", bad)
    assert code == 2 and "larger than the smaller dimension" in out


def test_render_ships_the_extract_spec_and_refuses_a_split(
    pair: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned = pair
    spec = write_spec(tmp_path / "spec.yaml", extract_spec(base, tuned, "/cache/adapter"))
    code, out, err = run_cli("render", "--config", spec)
    assert code == 0, err
    config_map = next(d for d in yaml.safe_load_all(out) if d["kind"] == "ConfigMap")
    shipped = yaml.safe_load(config_map["data"]["config.yaml"])
    assert shipped["extract"] == {"finetuned": {"path": str(tuned)}}
    assert "adapters" not in shipped
    code, _, err = run_cli("render", "--config", spec, "--workers", 2, "--cache-pvc", "c")
    assert code == 2 and "an extraction (a spec with an extract: section) runs in one pod" in err
