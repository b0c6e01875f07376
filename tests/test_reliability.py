"""Failures end with the right exit code and one line: bad input (2) is never called worth a
retry, a full disk (1) is; OS errors nobody foresaw are one line too. And the smaller
promises: PEFT's reading of ``target_modules: null``, a warning for an adapter given twice,
``--weights``, the library progress bars off in a pod, the card the same however the paths
were typed, and no local path published to the Hub."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergejob.recipe import RECIPE_FILE


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MERGEJOB_") and name != "MERGEJOB_DISABLE_PROGRESS_BARS":
            monkeypatch.delenv(name)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)


@pytest.fixture(scope="module")
def job(models: Any) -> dict[str, Path]:
    base = models.base()
    return {
        "base": base,
        "a": models.adapter(base),
        "b": models.adapter(base, target_modules=["o_proj"], seed=4),
    }


def one_error_line(err: str) -> str:
    """The one ``mergejob: error:`` line of ``err`` (asserting there is exactly one and no
    traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mergejob: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """``tmpfs(size)``: a small tmpfs mounted in tmp_path (root only), unmounted after."""
    points: list[Path] = []

    def make(size: str) -> Path:
        point = tmp_path / f"tmpfs{len(points)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        points.append(point)
        return point

    try:
        yield make
    finally:
        for point in points:
            subprocess.run(["umount", str(point)], check=False)


# ---------------------------------------------------------------------------------------
# OS errors: the right exit code, one line


@pytest.mark.parametrize("engine", ["stream", "peft"])
def test_a_full_disk_is_worth_a_retry_in_one_line(
    job: dict[str, Path], tmpfs: Any, run_cli: Any, engine: str
) -> None:
    small = tmpfs("64k")
    code, _, err = run_cli(
        "merge", "--base", job["base"], "--adapters", job["a"],
        "--output_dir", small / "out", "--engine", engine,
    )  # fmt: skip
    assert code == 1, err
    line = one_error_line(err)
    assert "ENOSPC" in line and "retry" in line


def test_a_file_size_limit_is_bad_input_in_one_line(job: dict[str, Path], tmp_path: Path) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))

    done = subprocess.run(
        [
            sys.executable, "-m", "mergejob.cli", "merge", "--base", str(job["base"]),
            "--adapters", str(job["a"]), "--output_dir", str(tmp_path / "out"),
        ],
        capture_output=True, text=True, preexec_fn=limit, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert "EFBIG" in line and "ulimit" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("error", "code", "needle"),
    [
        (OSError(errno.EIO, "Input/output error", "/data/x"), 1, "/data/x: input/output error"),
        (OSError(errno.EACCES, "Permission denied", "/out"), 2, "/out: permission denied"),
        (RuntimeError("I/O error: No space left on device (os error 28)"), 1, "ENOSPC"),
    ],
    ids=["eio", "eacces", "rust-enospc"],
)
def test_an_os_error_nobody_foresaw_is_one_line_with_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, run_cli: Any, error: Exception, code: int, needle: str
) -> None:
    import mergejob.cli.job

    def fail(args: Any) -> int:
        raise error

    monkeypatch.setattr(mergejob.cli.job, "cmd_schema", fail)
    got, _, err = run_cli("schema")
    assert got == code, err
    assert needle in one_error_line(err)


# ---------------------------------------------------------------------------------------
# Adapters: what PEFT does, said truthfully


def _with_config(source: Path, dest: Path, **changes: Any) -> Path:
    shutil.copytree(source, dest)
    path = dest / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return dest


def test_target_modules_null_merges_as_peft_loads_it(
    job: dict[str, Path], tmp_path: Path, run_cli: Any
) -> None:
    from safetensors.torch import load_file

    adapter = _with_config(job["a"], tmp_path / "null-targets", target_modules=None)
    outputs = {}
    for engine in ("stream", "peft"):
        out = tmp_path / engine
        code, _, err = run_cli(
            "merge", "--base", job["base"], "--adapters", adapter, "--output_dir", out,
            "--engine", engine, "--dtype", "float32",
        )  # fmt: skip
        assert code == 0, err
        outputs[engine] = {
            name: tensor
            for shard in sorted(out.glob("*.safetensors"))
            for name, tensor in load_file(str(shard)).items()
        }
    stream, peft = outputs["stream"], outputs["peft"]
    assert stream.keys() == peft.keys()
    assert all(bool((stream[n] == peft[n]).all()) for n in stream)


def test_target_modules_null_on_a_model_type_peft_has_no_defaults_for_is_refused(
    job: dict[str, Path], tmp_path: Path
) -> None:
    from mergejob.adapters import read_adapter
    from mergejob.errors import IncompatibleAdapterError

    adapter = _with_config(job["a"], tmp_path / "null-targets", target_modules=None)
    with pytest.raises(IncompatibleAdapterError, match="PEFT cannot load this adapter either"):
        read_adapter(adapter, model_type="no-such-architecture")
    assert read_adapter(adapter, model_type="llama").loras


def test_a_rank_mismatch_names_r_when_no_rank_pattern_is_set(
    job: dict[str, Path], tmp_path: Path, models: Any
) -> None:
    from mergejob.adapters import read_adapter
    from mergejob.errors import IncompatibleAdapterError

    plain = _with_config(job["a"], tmp_path / "plain", r=8)
    with pytest.raises(IncompatibleAdapterError) as caught:
        read_adapter(plain)
    assert "rank 8 from the config's r" in str(caught.value)
    assert "rank_pattern" not in str(caught.value)

    patterned = models.adapter(job["base"], rank_pattern={"q_proj": 2}, seed=9)
    wrong = _with_config(patterned, tmp_path / "patterned", rank_pattern={"q_proj": 3})
    with pytest.raises(IncompatibleAdapterError, match="rank_pattern 'q_proj'"):
        read_adapter(wrong)


def test_the_same_adapter_twice_is_merged_with_a_warning(
    job: dict[str, Path], tmp_path: Path, run_cli: Any
) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(job["a"])
    code, _, err = run_cli(
        "plan", "--base", job["base"], "--adapters", job["a"], alias,
        "--output_dir", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, err
    assert "adapters[0] and adapters[1] are the same adapter" in err
    code, _, err = run_cli(
        "plan", "--base", job["base"], "--adapters", job["a"], job["b"],
        "--output_dir", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, err
    assert "same adapter" not in err


# ---------------------------------------------------------------------------------------
# --weights


def test_merge_weights_flag_gives_the_spec_weights(
    job: dict[str, Path], tmp_path: Path, run_cli: Any
) -> None:
    by_flag, by_spec = tmp_path / "flag", tmp_path / "spec"
    code, _, err = run_cli(
        "merge", "--base", job["base"], "--adapters", job["a"], job["b"],
        "--weights", "0.5", "-1", "--output_dir", by_flag,
    )  # fmt: skip
    assert code == 0, err
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(job["base"]),
                "adapters": [
                    {"path": str(job["a"]), "weight": 0.5},
                    {"path": str(job["b"]), "weight": -1},
                ],
                "output": {"dir": str(by_spec)},
            }
        )
    )
    code, _, err = run_cli("merge", "--config", spec)
    assert code == 0, err
    weights = sorted(p.name for p in by_flag.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in by_spec.glob("*.safetensors"))
    for name in weights:
        assert (by_flag / name).read_bytes() == (by_spec / name).read_bytes(), name
    # The spec file's adapters take the flag's weights too.
    again = tmp_path / "again"
    code, _, err = run_cli(
        "merge", "--config", spec, "--weights", "0.5", "-1", "--output_dir", again
    )
    assert code == 0, err
    assert (again / weights[0]).read_bytes() == (by_spec / weights[0]).read_bytes()


# ---------------------------------------------------------------------------------------
# Secrets


def test_a_token_path_that_is_the_token_is_never_echoed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mergejob import settings
    from mergejob.errors import TokenError

    token = "hf_ThisIsTheTokenItself0123456789"
    monkeypatch.setenv("HF_TOKEN_PATH", token)
    with pytest.raises(TokenError) as caught:
        settings.hub_token()
    assert token not in str(caught.value)
    assert "HF_TOKEN_PATH is set but names no file" in str(caught.value)
    assert token not in settings.token_source()
    assert token in settings.known_secrets()  # so the log filter hides it, and render refuses it

    monkeypatch.setenv("HF_TOKEN_PATH", "/var/run/secrets/hf/token")
    with pytest.raises(TokenError, match="/var/run/secrets/hf/token: no such file"):
        settings.hub_token()


def test_render_refuses_an_env_or_label_value_holding_the_token(
    job: dict[str, Path], monkeypatch: pytest.MonkeyPatch, run_cli: Any, tmp_path: Path
) -> None:
    token = "hf_RenderTokenValue0123456789abcd"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(token_file))
    common = ("render", "--base", job["base"], "--adapters", job["a"], "--output_dir", "/out")
    for flag, value in (("--env", f"ANY_NAME={token}"), ("--label", f"owner={token}")):
        code, out, err = run_cli(*common, flag, value)
        assert code == 2, err
        assert flag in one_error_line(err) and token not in out + err
    code, out, err = run_cli(*common, "--env", "ANY_NAME=harmless", "--label", "owner=me")
    assert code == 0, err
    assert token not in out


# ---------------------------------------------------------------------------------------
# Progress bars, the card, publishing


def test_library_progress_bars_are_off_when_ours_are(
    monkeypatch: pytest.MonkeyPatch, run_cli: Any
) -> None:
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as tf_logging

    hub_utils.enable_progress_bars()
    tf_logging.enable_progress_bar()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setenv("MERGEJOB_DISABLE_PROGRESS_BARS", "1")
    try:
        code, _, _ = run_cli("schema")
        assert code == 0
        assert hub_utils.are_progress_bars_disabled()
        assert not tf_logging.is_progress_bar_enabled()
    finally:
        hub_utils.disable_progress_bars()
        tf_logging.disable_progress_bar()


def test_a_rerun_from_the_recipe_writes_the_same_card_however_paths_were_typed(
    job: dict[str, Path], tmp_path: Path, run_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = tmp_path / "inputs"
    shutil.copytree(job["base"], inputs / "base")
    shutil.copytree(job["a"], inputs / "adapter")
    monkeypatch.chdir(inputs)
    code, _, err = run_cli(
        "merge", "--base", "base", "--adapters", "./adapter/", "--output_dir", "../first"
    )
    assert code == 0, err
    first = tmp_path / "first"
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("run", "--config", first / RECIPE_FILE, "--output_dir", "again")
    assert code == 0, err
    again = tmp_path / "again"
    assert (again / "README.md").read_bytes() == (first / "README.md").read_bytes()
    card = (first / "README.md").read_text()
    assert str(tmp_path) not in card
    assert "`base`" in card and "`adapter`" in card


def test_a_published_output_holds_no_local_path(
    hub_env: Any, job: dict[str, Path], tmp_path: Path, run_cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from huggingface_hub import snapshot_download

    monkeypatch.setenv("HF_TOKEN", hub_env.alice_token)
    local = tmp_path / "local-copy"
    code, _, err = run_cli(
        "merge", "--base", job["base"], "--adapters", job["a"],
        "--push_to_hub", "--output_dir", "alice/merged", "--local-dir", local,
    )  # fmt: skip
    assert code == 0, err
    snapshot = Path(snapshot_download("alice/merged", token=hub_env.alice_token))
    private = [str(job["base"].parent), str(tmp_path)]
    for name in ("README.md", RECIPE_FILE):
        text = (snapshot / name).read_text()
        assert not [p for p in private if p in text], f"{name} publishes a local path"
    recipe = yaml.safe_load((snapshot / RECIPE_FILE).read_text())
    assert recipe["base"]["path"] == job["base"].name
    assert [r["local_dir"] for r in recipe["recipe"]["inputs"]] == [
        job["base"].name,
        job["a"].name,
    ]
