"""Bad input stops before any heavy work: one clear line, exit code 2, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

ENGINES = ["peft", "stream"]


def _assert_failed_cleanly(code: int, err: str, tmp_path: Path, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("mergejob: error:")]
    assert len(starts) == 1, err
    # One error line; any detail after it is an indented list of the problems found.
    assert all(line.startswith("  ") for line in lines[starts[0] + 1 :]), err
    for needle in needles:
        assert needle in err, f"{needle!r} not named in: {err}"
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*mergejob-partial")), "temporary folder left behind"


@pytest.fixture
def base(models: Any) -> Path:
    import torch

    return models.base(dtype=torch.bfloat16)


@pytest.fixture
def adapter(models: Any, base: Path) -> Path:
    return models.adapter(base, target_modules=["q_proj", "v_proj"], seed=11)


@pytest.mark.parametrize("engine", ENGINES)
def test_missing_base_path(tmp_path: Path, adapter: Path, run_cli: Any, engine: str) -> None:
    missing = tmp_path / "no-such-base"
    code, _, err = run_cli(
        "--base_model_name_or_path", missing, "--peft_model_paths", adapter,
        "--output_dir", tmp_path / "out", "--engine", engine,
    )  # fmt: skip
    _assert_failed_cleanly(code, err, tmp_path, str(missing), "base model")


@pytest.mark.parametrize("engine", ENGINES)
def test_missing_adapter_path(tmp_path: Path, base: Path, run_cli: Any, engine: str) -> None:
    missing = tmp_path / "no-such-adapter"
    code, _, err = run_cli(
        "--base_model_name_or_path", base, "--peft_model_paths", missing,
        "--output_dir", tmp_path / "out", "--engine", engine,
    )  # fmt: skip
    _assert_failed_cleanly(code, err, tmp_path, str(missing), "adapter")


@pytest.mark.parametrize("engine", ENGINES)
def test_adapter_made_for_another_shape(
    models: Any, tmp_path: Path, base: Path, run_cli: Any, engine: str
) -> None:
    import torch

    other = models.base(dtype=torch.bfloat16, hidden_size=32, intermediate_size=64, seed=5)
    foreign = models.adapter(other, target_modules=["q_proj", "v_proj"], seed=3)
    code, _, err = run_cli(
        "--base_model_name_or_path", base, "--peft_model_paths", foreign,
        "--output_dir", tmp_path / "out", "--engine", engine,
    )  # fmt: skip
    _assert_failed_cleanly(code, err, tmp_path, str(foreign), "q_proj")


@pytest.mark.parametrize("engine", ENGINES)
def test_adapter_config_not_json(
    tmp_path: Path, base: Path, adapter: Path, run_cli: Any, engine: str
) -> None:
    broken = tmp_path / "broken-adapter"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").write_text("{ this is not json")
    code, _, err = run_cli(
        "--base_model_name_or_path", base, "--peft_model_paths", broken,
        "--output_dir", tmp_path / "out", "--engine", engine,
    )  # fmt: skip
    _assert_failed_cleanly(code, err, tmp_path, str(broken / "adapter_config.json"), "JSON")


def test_unknown_dtype(tmp_path: Path, base: Path, adapter: Path, run_cli: Any) -> None:
    code, _, err = run_cli(
        "--base_model_name_or_path", base, "--peft_model_paths", adapter,
        "--output_dir", tmp_path / "out", "--dtype", "float8",
    )  # fmt: skip
    assert code == 2
    assert "--dtype" in err and "float8" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_non_empty_output_dir(
    tmp_path: Path, base: Path, adapter: Path, run_cli: Any, engine: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(
        "--base_model_name_or_path", base, "--peft_model_paths", adapter,
        "--output_dir", out, "--engine", engine,
    )  # fmt: skip
    assert code == 2
    assert str(out) in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".*mergejob-partial"))


def test_push_to_hub_requires_a_repo_id_output(
    tmp_path: Path, base: Path, adapter: Path, run_cli: Any
) -> None:
    code, _, err = run_cli(
        "--base_model_name_or_path", base, "--peft_model_paths", adapter,
        "--output_dir", "not a repo id!", "--push_to_hub",
    )  # fmt: skip
    assert code == 2
    assert "--output_dir" in err or "repo" in err
