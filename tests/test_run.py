"""``mergejob run``: the pod entrypoint (ConfigMap file + MERGEJOB_* + flags), exit codes,
the Hub token, logging, and one merge through every entry point giving the same bytes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

import mergejob
from mergejob.cli import build_parser
from mergejob.cli.job import spec_for_run
from mergejob.errors import TokenError
from mergejob.recipe import RECIPE_FILE
from mergejob.settings import hub_token


@pytest.fixture(scope="module")
def job(models) -> dict[str, Path]:
    base = models.base()
    return {
        "base": base,
        "a": models.adapter(base),
        "b": models.adapter(base, target_modules=["gate_proj", "up_proj", "down_proj"], seed=2),
    }


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MERGEJOB_") and name != "MERGEJOB_DISABLE_PROGRESS_BARS":
            monkeypatch.delenv(name)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)


def configmap(folder: Path, spec: dict) -> Path:
    """A folder laid out like a mounted ConfigMap: config.yaml -> ..data/config.yaml."""
    stamped = folder / "..2026_01_01_00_00_00.000000001"
    stamped.mkdir(parents=True)
    (stamped / "config.yaml").write_text(yaml.safe_dump(spec))
    (folder / "..data").symlink_to(stamped.name)
    (folder / "config.yaml").symlink_to("..data/config.yaml")
    return folder / "config.yaml"


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != RECIPE_FILE}


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def test_flags_run_and_python_give_byte_identical_outputs(
    job, run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags_out, run_out, api_out = tmp_path / "flags", tmp_path / "run", tmp_path / "api"
    code, out, err = run_cli(
        "merge",
        "--base_model_name_or_path", job["base"],
        "--peft_model_paths", job["a"], job["b"],
        "--output_dir", flags_out,
        "--set-config", "rope_theta=500000.0",
    )  # fmt: skip
    assert code == 0, err
    assert "merged model written" in out

    # The pod: the spec in a ConfigMap, MERGEJOB_* overriding single fields of it.
    path = configmap(
        tmp_path / "etc-mergejob",
        {
            "base": str(job["base"]),
            "adapters": [str(job["a"]), str(job["b"])],
            "output": {"dir": str(tmp_path / "elsewhere"), "dtype": "float16"},
            "config": {"overrides": {"rope_theta": 1.0}},
        },
    )
    monkeypatch.setenv("MERGEJOB_CONFIG", str(path))
    monkeypatch.setenv("MERGEJOB_OUTPUT_DIR", str(run_out))
    monkeypatch.setenv("MERGEJOB_DTYPE", "auto")
    monkeypatch.setenv("MERGEJOB_CONFIG_OVERRIDES", '{"rope_theta": 500000.0}')
    code, _, err = run_cli("run")
    assert code == 0, err

    spec = mergejob.MergeSpec.model_validate(
        {
            "base": str(job["base"]),
            "adapters": [str(job["a"]), str(job["b"])],
            "output": {"dir": str(api_out)},
            "config": {"overrides": {"rope_theta": 500000.0}},
        }
    )
    mergejob.merge(spec)

    reference = model_files(flags_out)
    assert "model.safetensors.index.json" in reference or "model.safetensors" in reference
    assert model_files(run_out) == reference
    assert model_files(api_out) == reference
    assert json.loads(reference["config.json"])["rope_parameters"]["rope_theta"] == 500000.0


def test_precedence_is_flags_then_environment_then_file(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": "file-base",
                "adapters": ["file-adapter"],
                "output": {"dir": "file-out", "dtype": "float16", "max_shard_size": "1GB"},
                "engine": {"workers": 1},
            }
        )
    )
    environ = {
        "MERGEJOB_CONFIG": str(path),
        "MERGEJOB_DTYPE": "bfloat16",
        "MERGEJOB_WORKERS": "2",
        "MERGEJOB_OUTPUT_DIR": "env-out",
    }
    args = build_parser().parse_args(["run", "--workers", "3"])
    spec = spec_for_run(args, environ)
    assert spec.base.path == "file-base"
    assert spec.output.max_shard_size == "1GB"  # file
    assert spec.output.dtype == "bfloat16"  # environment over file
    assert spec.output.dir == "env-out"
    assert spec.engine.workers == 3  # flag over environment


def test_run_without_a_spec_file_says_where_it_looked(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("run")
    assert code == 2
    assert "/etc/mergejob/config.yaml: spec file not found" in err
    code, _, err = run_cli("run", "--config", tmp_path / "missing.yaml")
    assert code == 2
    assert "missing.yaml: spec file not found" in err


def test_run_from_the_environment_alone(job, run_cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MERGEJOB_BASE", str(job["base"]))
    monkeypatch.setenv("MERGEJOB_ADAPTERS", str(job["a"]))
    monkeypatch.setenv("MERGEJOB_OUTPUT_DIR", str(tmp_path / "out"))
    code, _, err = run_cli("run", "--dry-run")
    assert code == 0, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Bad specs: exit 2, a message naming the problem, nothing written


def run_spec(run_cli, tmp_path: Path, text: str) -> tuple[int, str]:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    code, _, err = run_cli("run", "--config", path)
    return code, err


def good_spec(job, out: Path, **extra: object) -> dict:
    spec: dict = {
        "base": str(job["base"]),
        "adapters": [str(job["a"])],
        "output": {"dir": str(out)},
    }
    spec.update(extra)
    return spec


def test_bad_spec_invalid_yaml(run_cli, tmp_path: Path) -> None:
    code, err = run_spec(run_cli, tmp_path, "base: [oops\n")
    assert code == 2
    assert "spec.yaml: not valid YAML/JSON" in err


def test_bad_spec_unknown_key(job, run_cli, tmp_path: Path) -> None:
    spec = good_spec(job, tmp_path / "out")
    spec["output"]["overwrit"] = True
    code, err = run_spec(run_cli, tmp_path, yaml.safe_dump(spec))
    assert code == 2
    assert "output.overwrit: unknown key 'overwrit'; did you mean 'overwrite'?" in err
    assert_nothing_written(tmp_path / "out")


def test_bad_spec_wrong_type(job, run_cli, tmp_path: Path) -> None:
    spec = good_spec(job, tmp_path / "out", engine={"workers": [1, 2]})
    code, err = run_spec(run_cli, tmp_path, yaml.safe_dump(spec))
    assert code == 2
    assert "engine.workers: Input should be a valid integer" in err
    assert_nothing_written(tmp_path / "out")


def test_bad_spec_missing_required_field(run_cli, tmp_path: Path) -> None:
    code, err = run_spec(run_cli, tmp_path, "base: b\noutput: {dir: o}\n")
    assert code == 2
    # The spec file and the field it lacks (not a flag: the job came from the file).
    assert "spec.yaml: adapters: is required" in err


def test_bad_spec_negative_weight_with_the_peft_engine(job, run_cli, tmp_path: Path) -> None:
    spec = good_spec(job, tmp_path / "out", engine={"name": "peft"})
    spec["adapters"] = [{"path": str(job["a"]), "weight": -0.5}]
    code, err = run_spec(run_cli, tmp_path, yaml.safe_dump(spec))
    assert code == 2
    assert "adapters[0].weight: -0.5: the peft engine merges every adapter at weight 1.0" in err
    assert_nothing_written(tmp_path / "out")


def test_bad_spec_config_from_another_architecture(job, run_cli, tmp_path: Path) -> None:
    other = tmp_path / "other-model"
    other.mkdir()
    config = json.loads((job["base"] / "config.json").read_text())
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=128)
    (other / "config.json").write_text(json.dumps(config))
    spec = good_spec(job, tmp_path / "out", config={"config_from": str(other)})
    code, err = run_spec(run_cli, tmp_path, yaml.safe_dump(spec))
    assert code == 2
    assert "config.config_from" in err
    assert "describes another architecture or shape" in err
    assert "architectures ['Qwen2ForCausalLM']" in err
    assert "hidden_size 128 (the merged model has 64)" in err
    assert_nothing_written(tmp_path / "out")


def test_bad_spec_unknown_override_key(job, run_cli, tmp_path: Path) -> None:
    spec = good_spec(job, tmp_path / "out", config={"overrides": {"rope_thetta": 1e6}})
    code, err = run_spec(run_cli, tmp_path, yaml.safe_dump(spec))
    assert code == 2
    assert "config.overrides.rope_thetta: LlamaConfig has no key 'rope_thetta'" in err
    assert "did you mean 'rope_theta'?" in err
    assert_nothing_written(tmp_path / "out")


def test_bad_spec_unreadable_token_path(job, run_cli, tmp_path: Path, monkeypatch) -> None:
    spec = good_spec(job, tmp_path / "out")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "secret" / "token"))
    code, err = run_spec(run_cli, tmp_path, yaml.safe_dump(spec))
    assert code == 2
    assert "HF_TOKEN_PATH=" in err
    assert "is the Secret holding the Hub token mounted?" in err
    assert_nothing_written(tmp_path / "out")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path))
    code, err = run_spec(run_cli, tmp_path, yaml.safe_dump(spec))
    assert code == 2
    assert "is a folder" in err


# ---------------------------------------------------------------------------------------
# The token, exit codes, logging


def test_the_token_comes_from_hf_token_or_the_secret_file(tmp_path: Path, monkeypatch) -> None:
    assert hub_token() is None
    secret = tmp_path / "token"
    secret.write_text("hf_from_the_secret\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(secret))
    assert hub_token() == "hf_from_the_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_env")
    assert hub_token() == "hf_from_the_env"
    monkeypatch.delenv("HF_TOKEN")
    secret.write_text("  \n")
    with pytest.raises(TokenError, match="the token file is empty"):
        hub_token()


def test_the_token_never_appears_in_logs_or_the_recipe(
    job, run_cli, tmp_path: Path, monkeypatch, capsys
) -> None:
    token = "hf_SECRETsecretSECRET0123456789"
    secret = tmp_path / "token"
    secret.write_text(token)
    monkeypatch.setenv("HF_TOKEN_PATH", str(secret))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        "-v", "merge", "--base", job["base"], "--adapters", job["a"], "--output_dir", out
    )
    assert code == 0, stderr
    # What a library might log with the token in it goes through the same filter.
    logging.getLogger("mergejob.test").warning("a library printed the token: %s", token)
    late = capsys.readouterr().err
    assert "a library printed the token: ***" in late
    assert token not in stdout + stderr + late
    assert token not in (out / RECIPE_FILE).read_text()


def test_token_is_redacted_from_log_lines(tmp_path: Path, monkeypatch, capsys) -> None:
    from mergejob.logs import hide_secrets, setup_logging

    token = "hf_REDACTMEredactme42"
    monkeypatch.setenv("HF_TOKEN", token)
    setup_logging()
    hide_secrets()
    log = logging.getLogger("mergejob.some.module")
    log.warning("request with Authorization: Bearer %s", token)
    try:
        raise RuntimeError(f"failed for {token}")
    except RuntimeError:
        log.exception("unexpected")
    err = capsys.readouterr().err
    assert token not in err
    assert "Bearer ***" in err
    assert "failed for ***" in err


def test_an_unexpected_failure_exits_1_and_bad_input_exits_2(
    job, run_cli, tmp_path: Path, monkeypatch
) -> None:
    import mergejob.pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(mergejob.pipeline, "merge", broken)
    code, _, err = run_cli(
        "run", "--base", job["base"], "--adapters", job["a"], "--output_dir", tmp_path / "o"
    )
    assert code == 1
    assert "worth a retry" in err
    code, _, _ = run_cli("run", "--base", job["base"], "--adapters", tmp_path / "nope",
                         "--output_dir", tmp_path / "o", "--dtype", "int8")  # fmt: skip
    assert code == 2


def test_json_logs_give_every_phase_a_start_and_an_end(job, run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli(
        "run", "--log-format", "json",
        "--base", job["base"], "--adapters", job["a"], "--output_dir", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    phases = {(e["phase"], e["event"]) for e in events if "phase" in e}
    for name in ("resolve", "plan", "merge", "write"):
        assert (name, "start") in phases
        assert (name, "done") in phases
    done = [e for e in events if e.get("event") == "done"]
    assert all(isinstance(e["seconds"], float | int) for e in done)
