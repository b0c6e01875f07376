"""An extraction as a job spec: the `extract:` section, `mergejob run`, `plan`, `render`,
`submit`, and the merge-only parts refused (not ignored).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
        ({"engine": {"workers": 4, "device": "cuda"}}, "engine.workers: 4 processes are for the CPU; with engine.device cuda each GPU gets one thread"),
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
    # Split over indices (tests/test_extract_indexed.py): the index arguments still checked.
    code, _, err = run_cli("run", "--config", spec, "--index-count", 2)
    assert code == 2 and "give this worker's index too" in err


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


def test_render_ships_the_extract_spec(
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


# ---------------------------------------------------------------------------------------
# The environment layer (MERGEJOB_* variables of the extract: section)

EXTRACT_VARIABLES = {
    "MERGEJOB_MAX_RANK": "3",
    "MERGEJOB_MIN_ENERGY": "0.999",
    "MERGEJOB_SV_EPSILON": "1e-7",
    "MERGEJOB_DISTRIBUTE_SCALE": "false",
    "MERGEJOB_EXCLUDE": "down_proj, layers\\.1\\.self_attn\\.o_proj",
    "MERGEJOB_EMBEDDINGS": "lora",
    "MERGEJOB_SKIP_UNDECOMPOSABLE": "true",
    "MERGEJOB_SVD": "exact",
    "MERGEJOB_EXTRACT_DTYPE": "bfloat16",
}


def child_environment(**variables: object) -> dict[str, str]:
    """This process's environment without any spec variable, plus ``variables``."""
    from mergejob.settings import CONFIG_ENV, SPEC_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in SPEC_VARIABLES and k != CONFIG_ENV}
    env.update({k: str(v) for k, v in variables.items()})
    return env


def test_run_extracts_from_the_environment_alone(
    pair: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    """The pod with no ConfigMap: MERGEJOB_BASE + MERGEJOB_FINETUNED make `mergejob run` an
    extraction, every extract: variable lands in its field (the same adapter, byte for byte,
    and the same recorded settings as `mergejob extract` with the matching flags)."""
    base, tuned = pair
    out = tmp_path / "from-env"
    env = child_environment(
        MERGEJOB_BASE=base,
        MERGEJOB_FINETUNED=tuned,
        MERGEJOB_OUTPUT_DIR=out,
        **EXTRACT_VARIABLES,
    )
    assert not Path("/etc/mergejob/config.yaml").exists()  # no ConfigMap: env only
    done = subprocess.run(
        [sys.executable, "-m", "mergejob.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "extracted 5 LoRA module(s) (rank 3..3" in done.stdout  # q, v, o of 0; q, v of 1
    flags = tmp_path / "from-flags"
    code, _, err = run_cli(
        "extract", "--base", base, "--finetuned", tuned, "--output_dir", flags,
        "--max-rank", 3, "--min-energy", 0.999, "--sv-epsilon", 1e-7, "--no-distribute-scale",
        "--exclude", "down_proj", "--exclude", "layers\\.1\\.self_attn\\.o_proj",
        "--embeddings", "lora", "--skip-undecomposable", "--svd", "exact", "--dtype", "bfloat16",
    )  # fmt: skip
    assert code == 0, err
    # adapter_config.json too: its target_modules are sorted, whatever the hash seed of
    # the process that wrote it (the subprocess and this one differ).
    for name in ("adapter_model.safetensors", "extraction.json", "adapter_config.json"):
        assert (out / name).read_bytes() == (flags / name).read_bytes(), name
    recorded = yaml.safe_load((out / "mergejob.yaml").read_text())["extract"]
    assert recorded == yaml.safe_load((flags / "mergejob.yaml").read_text())["extract"]
    assert recorded["max_rank"] == 3 and recorded["dtype"] == "bfloat16"
    assert recorded["exclude"] == ["down_proj", "layers\\.1\\.self_attn\\.o_proj"]
    assert recorded["distribute_scale"] is False and recorded["svd"] == "exact"


def test_extract_layers_are_file_then_environment_then_flags(tmp_path: Path) -> None:
    from mergejob.cli import build_parser
    from mergejob.cli.job import spec_for_run

    path = write_spec(
        tmp_path / "spec.yaml",
        {
            "base": "file-base",
            "extract": {
                "finetuned": "org/file-tuned@v1",
                "max_rank": 2,
                "svd": "exact",
                "include": ["q_proj"],
            },
            "output": {"dir": "file-out"},
            "engine": {"device": "cuda"},
        },
    )
    environ = {
        "MERGEJOB_CONFIG": str(path),
        "MERGEJOB_MAX_RANK": "5",
        "MERGEJOB_FINETUNED_REVISION": "v9",
        "MERGEJOB_OUTPUT_DIR": "env-out",
        "MERGEJOB_DEVICE": "cuda:1",
    }
    args = build_parser().parse_args(["run", "--device", "cpu"])
    spec = spec_for_run(args, environ)
    assert spec.task == "extract" and spec.extract is not None
    assert spec.extract.svd == "exact" and spec.extract.include == ["q_proj"]  # file
    assert spec.extract.max_rank == 5  # environment over file
    # The file's one-string source split, its revision replaced by the variable's.
    assert (spec.extract.finetuned.path, spec.extract.finetuned.revision) == (
        "org/file-tuned",
        "v9",
    )
    assert spec.output.dir == "env-out"  # environment over file
    assert spec.engine.device == "cpu"  # flag over environment
    args = build_parser().parse_args(["run", "--output_dir", "flag-out"])
    spec = spec_for_run(args, {**environ, "MERGEJOB_FINETUNED": "org/env-tuned"})
    assert spec.extract is not None and spec.output.dir == "flag-out"
    assert spec.extract.finetuned.path == "org/env-tuned"
    assert spec.extract.finetuned.revision == "v9"  # the variables, not the file's v1
    # A new path replaces the file's one-string source whole (its @v1 included).
    spec = spec_for_run(
        build_parser().parse_args(["run"]),
        {"MERGEJOB_CONFIG": str(path), "MERGEJOB_FINETUNED": "org/env-tuned"},
    )
    assert spec.extract is not None and spec.extract.finetuned.revision is None
    # The same holds for the base given as one string (a flag over it, here).
    path.write_text(path.read_text().replace("base: file-base", "base: org/base@v1"))
    spec = spec_for_run(build_parser().parse_args(["run", "--base", "org/other"]), environ)
    assert (spec.base.path, spec.base.revision) == ("org/other", None)
    spec = spec_for_run(
        build_parser().parse_args(["run"]), {**environ, "MERGEJOB_BASE_REVISION": "v2"}
    )
    assert (spec.base.path, spec.base.revision) == ("org/base", "v2")


def test_include_and_exclude_variables_are_lists_of_regexes() -> None:
    from mergejob.spec import env_overrides

    assert env_overrides({"MERGEJOB_INCLUDE": "q_proj,v_proj  layers\\.[0-9]{1,2}\\."}) == {
        "extract.include": ["q_proj", "v_proj", "layers\\.[0-9]{1,2}\\."]
    }
    assert env_overrides({"MERGEJOB_EXCLUDE": '["a, b", "c"]'}) == {
        "extract.exclude": ["a, b", "c"]
    }


BAD_VARIABLES = [
    ({"MERGEJOB_MAX_RANK": "many"}, "MERGEJOB_MAX_RANK: extract.max_rank: Input should be a valid integer"),
    ({"MERGEJOB_MAX_RANK": "0"}, "MERGEJOB_MAX_RANK: extract.max_rank: Input should be greater than or equal to 1"),
    ({"MERGEJOB_MIN_ENERGY": "1.5"}, "MERGEJOB_MIN_ENERGY: extract.min_energy: Input should be less than or equal to 1"),
    ({"MERGEJOB_SV_EPSILON": "-1"}, "MERGEJOB_SV_EPSILON: extract.sv_epsilon: Input should be greater than or equal to 0"),
    ({"MERGEJOB_DISTRIBUTE_SCALE": "perhaps"}, "MERGEJOB_DISTRIBUTE_SCALE: extract.distribute_scale: Input should be a valid boolean"),
    ({"MERGEJOB_EMBEDDINGS": "half"}, "MERGEJOB_EMBEDDINGS: extract.embeddings: Input should be 'full' or 'lora'"),
    ({"MERGEJOB_SVD": "fast"}, "MERGEJOB_SVD: extract.svd: Input should be 'auto', 'exact' or 'randomized'"),
    ({"MERGEJOB_EXTRACT_DTYPE": "float8"}, "MERGEJOB_EXTRACT_DTYPE: extract.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ({"MERGEJOB_SKIP_UNDECOMPOSABLE": "maybe"}, "MERGEJOB_SKIP_UNDECOMPOSABLE: extract.skip_undecomposable: Input should be a valid boolean"),
    ({"MERGEJOB_INCLUDE": "q_proj ("}, "MERGEJOB_INCLUDE: extract.include: '(' is not a regular expression"),
    ({"MERGEJOB_EXCLUDE": "[1]"}, "MERGEJOB_EXCLUDE: must be a JSON array of strings"),
    ({"MERGEJOB_EXCLUDE": "[oops"}, "MERGEJOB_EXCLUDE: not a JSON array"),
    ({"MERGEJOB_DTYPE": "float16"}, "MERGEJOB_DTYPE: output.dtype is not part of an extraction (an extract: section); unset it (the factors' dtype is MERGEJOB_EXTRACT_DTYPE)"),
    ({"MERGEJOB_ENGINE": "peft"}, "MERGEJOB_ENGINE: engine.name: not part of an extraction"),
    ({"MERGEJOB_ADAPTERS": "./a"}, "MERGEJOB_ADAPTERS and MERGEJOB_FINETUNED: both set; a job merges adapters (MERGEJOB_ADAPTERS) or extracts one from a fine-tuned model (MERGEJOB_FINETUNED), not both: unset one"),
    ({"MERGEJOB_FINETUNED": "", "MERGEJOB_MAX_RANK": "8"}, "/etc/mergejob/config.yaml: spec file not found; mount the ConfigMap there, set MERGEJOB_CONFIG or pass --config, or give MERGEJOB_BASE and MERGEJOB_ADAPTERS (a merge) or MERGEJOB_FINETUNED (an extraction)"),
]  # fmt: skip


@pytest.mark.parametrize(("variables", "expected"), BAD_VARIABLES)
def test_a_bad_extract_variable_exits_2_naming_it(
    variables: dict[str, str],
    expected: str,
    run_cli: CLI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, tuned = tmp_path / "base", tmp_path / "tuned"  # never read: the spec is refused first
    out = tmp_path / "out"
    for name, value in {
        "MERGEJOB_BASE": base,
        "MERGEJOB_FINETUNED": tuned,
        "MERGEJOB_OUTPUT_DIR": out,
        "MERGEJOB_CONFIG": "",
        **variables,
    }.items():
        monkeypatch.setenv(name, str(value))
    code, _, err = run_cli("run")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"mergejob: error: {expected}"), err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_extract_variables_on_a_spec_file_of_the_other_task_are_refused(
    run_cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merge = write_spec(
        tmp_path / "merge.yaml", {"base": "b", "adapters": ["a"], "output": {"dir": "o"}}
    )
    extraction = write_spec(tmp_path / "extract.yaml", extract_spec("b", "t", tmp_path / "o"))
    monkeypatch.setenv("MERGEJOB_FINETUNED", "t")
    code, _, err = run_cli("run", "--config", merge)
    assert code == 2
    assert (
        f"MERGEJOB_FINETUNED: makes the job an extraction, but {merge} lists adapters: to merge"
        in err
    )
    monkeypatch.delenv("MERGEJOB_FINETUNED")
    monkeypatch.setenv("MERGEJOB_SVD", "exact")
    code, _, err = run_cli("run", "--config", merge)
    assert code == 2
    assert "MERGEJOB_SVD: an extraction setting, but the job names no fine-tuned model" in err
    monkeypatch.delenv("MERGEJOB_SVD")
    monkeypatch.setenv("MERGEJOB_ADAPTERS", "a")
    code, _, err = run_cli("run", "--config", extraction)
    assert code == 2
    assert f"MERGEJOB_ADAPTERS: a merge's adapters, but {extraction} describes an extraction" in err
