"""One shared job parser for merge, plan and run: seed flags, --config, flags over the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def job(models) -> dict[str, Path]:
    base = models.base()
    return {"base": base, "a": models.adapter(base)}


@pytest.mark.parametrize("command", ["merge", "plan", "run"])
def test_every_job_command_takes_the_seed_flags_and_config(command: str) -> None:
    from mergejob.cli import build_parser
    from mergejob.cli.args import flag_overrides

    args = build_parser().parse_args(
        [command, "--config", "spec.yaml", "--base_model_name_or_path", "org/base",
         "--peft_model_paths", "a", "b@v1", "--output_dir", "out", "--dtype", "float16",
         "--set-config", "rope_theta=1e6", "--config-from", "org/long"]
    )  # fmt: skip
    assert args.config == "spec.yaml"
    assert flag_overrides(args) == {
        "base.path": "org/base",
        "adapters": ["a", "b@v1"],
        "output.dir": "out",
        "output.dtype": "float16",
        "config.config_from": "org/long",
        "config.overrides.rope_theta": 1e6,
    }


def test_flags_override_single_fields_of_the_spec_file(job, run_cli, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(job["base"]),
                "adapters": [str(job["a"])],
                "output": {"dir": str(tmp_path / "out"), "dtype": "bfloat16"},
                "config": {"overrides": {"rope_theta": 1e6}},
            }
        )
    )
    code, out, err = run_cli("plan", "--config", spec, "--dtype", "float32", "--json",
                             "--set-config", "max_position_embeddings=4096")  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    assert plan["output_dtype"] == "float32"
    assert plan["config"]["rope_theta"] == 1e6  # from the file
    assert plan["config"]["max_position_embeddings"] == 4096  # from the flag


def test_a_flag_error_names_the_flag(job, run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("merge", "--base", job["base"], "--adapters", job["a"],
                           "--output_dir", tmp_path / "o", "--set-config", "rope_theta")  # fmt: skip
    assert code == 2
    assert "--set-config rope_theta: expected KEY=VALUE" in err
    code, _, err = run_cli("merge", "--base", job["base"], "--adapters", job["a"],
                           "--output_dir", tmp_path / "o", "--max-shard-size", "lots")  # fmt: skip
    assert code == 2
    assert "--max-shard-size: output.max_shard_size: 'lots' is not a size" in err


def test_log_options_work_after_the_command(job, run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("plan", "--base", job["base"], "--adapters", job["a"],
                             "--log-format", "json", "-v")  # fmt: skip
    assert code == 0, err
    assert "problems: none" in out


def test_run_dry_run_prints_the_plan(job, run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("run", "--dry-run", "--base", job["base"], "--adapters", job["a"],
                             "--output_dir", tmp_path / "out")  # fmt: skip
    assert code == 0, err
    assert "changes: 4 of" in out
    assert not (tmp_path / "out").exists()
