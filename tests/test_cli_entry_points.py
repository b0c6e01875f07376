"""The ways in: ``mergejob`` light commands start without torch, ``hf mergejob`` runs the
same CLI as a Hugging Face CLI extension, and the command with no arguments is bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mergejob.recipe import RECIPE_FILE

# What a light command must not import: each costs seconds, and none is needed to parse
# flags, print a schema or build Kubernetes objects.
HEAVY_MODULES = ("torch", "transformers", "peft", "accelerate", "safetensors.torch")
BIN = Path(sys.executable).parent


def imported_modules(importtime: str) -> set[str]:
    """The module names of ``python -X importtime`` output (``import time: self | cum | name``)."""
    names = set()
    for line in importtime.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                names.add(name)
    return names


def heavy(names: set[str]) -> list[str]:
    return sorted(
        name for name in names for h in HEAVY_MODULES if name == h or name.startswith(f"{h}.")
    )


def run_mergejob(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGEJOB_")}
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mergejob.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "command",
    [
        ["--help"],
        ["schema"],
        [
            "render",
            "--base_model_name_or_path",
            "{base}",
            "--peft_model_paths",
            "{adapter}",
            "--output_dir",
            "/cache/merged",
            "--workers",
            "2",
            "--cache-pvc",
            "shared",
        ],
    ],
    ids=["help", "schema", "render"],
)
def test_light_commands_import_no_torch(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    args = [a.format(base=tmp_path / "base", adapter=tmp_path / "adapter") for a in command]
    done = run_mergejob(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    names = imported_modules(done.stderr)
    assert "mergejob.cli" in names  # the parse above read real -X importtime lines
    assert heavy(names) == []
    if command[0] == "render":
        assert "completionMode: Indexed" in done.stdout  # --workers: pods here, not processes
    if command[0] == "schema":
        assert json.loads(done.stdout)["title"] == "mergejob spec"


def test_the_parse_of_importtime_sees_torch_when_it_is_imported(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import peft"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"torch", "transformers", "peft"} <= set(heavy(imported_modules(done.stderr)))


def test_no_command_prints_the_usage_and_exits_2(run_cli) -> None:
    code, out, _ = run_cli()
    assert code == 2
    assert out.startswith("usage: mergejob ")


def test_the_python_api_names_load_on_first_use() -> None:
    import mergejob
    from mergejob.errors import MergeJobError
    from mergejob.pipeline import merge
    from mergejob.spec import MergeSpec

    assert mergejob.merge is merge
    assert mergejob.MergeSpec is MergeSpec and mergejob.MergeJobError is MergeJobError
    assert set(mergejob.__all__) <= set(dir(mergejob))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = mergejob.nope


# ---------------------------------------------------------------------------------------
# run --config recipe --index: the recipe's inputs are checked, as a plain run checks them


def test_an_index_of_a_rerun_checks_the_recipes_inputs(models, run_cli, tmp_path: Path) -> None:
    base = models.base()
    adapter = tmp_path / "adapter"
    shutil.copytree(models.adapter(base), adapter)
    first = tmp_path / "first"
    code, _, err = run_cli("merge", "--base", base, "--adapters", adapter, "--output_dir", first)
    assert code == 0, err
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # same size, other bytes
    weights.write_bytes(bytes(data))

    for split in (["--index", "0", "--index-count", "1"], ["--finalize"]):
        again = tmp_path / "again"
        code, out, err = run_cli(
            "run", "--config", first / RECIPE_FILE, "--output_dir", again, *split
        )
        assert code == 2, out + err
        assert f"{adapter}/adapter_model.safetensors: sha256" in err
        assert "differs from the recipe's" in err
        assert not again.exists()


# ---------------------------------------------------------------------------------------
# hf mergejob: the Hugging Face CLI runs the hf-mergejob script as an extension


@pytest.fixture
def hf(tmp_path: Path):
    """Run the venv's real ``hf`` with ``hf-mergejob`` registered as ``hf extensions
    install OWNER/hf-mergejob`` records one: a manifest under the extensions root of a
    temporary HOME, naming the installed script."""
    hf_bin, script = BIN / "hf", BIN / "hf-mergejob"
    assert hf_bin.is_file(), f"{hf_bin}: huggingface_hub's CLI is not installed"
    assert script.is_file(), f"{script}: missing; reinstall the package (pip install -e .)"
    home = tmp_path / "home"
    extension = home / ".local" / "share" / "hf" / "extensions" / "hf-mergejob"
    extension.mkdir(parents=True)
    manifest = {
        "owner": "mergejob",
        "repo": "hf-mergejob",
        "repo_id": "mergejob/hf-mergejob",
        "short_name": "mergejob",
        "executable_path": str(script),
        "type": "python",
        "installed_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        "description": "Bake PEFT adapters into a base model",
        "commit_sha": None,
    }
    (extension / "manifest.json").write_text(json.dumps(manifest))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",  # no GitHub look-up for a newer extension
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MERGEJOB_DISABLE_PROGRESS_BARS": "1",
    }

    def run(*args: object, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(hf_bin), *map(str, args)],
            cwd=tmp_path,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run


def test_hf_lists_mergejob_among_its_extensions(hf) -> None:
    done = hf("--help")
    assert done.returncode == 0, done.stderr
    assert "mergejob" in done.stdout.split("Extension commands", 1)[1]


def test_hf_mergejob_help_names_the_hf_command(hf) -> None:
    done = hf("mergejob", "--help", PYTHONPROFILEIMPORTTIME="1")  # hf's and the script's
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: hf mergejob ")
    names = imported_modules(done.stderr)
    assert {"huggingface_hub.cli.hf", "mergejob.cli"} <= names
    assert heavy(names) == []
    done = hf("mergejob", "plan", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: hf mergejob plan ")
    assert "--peft_model_paths" in done.stdout


def test_hf_mergejob_plans_a_job_with_the_seed_flags(models, hf, tmp_path: Path) -> None:
    base = models.base()
    adapter = models.adapter(base)
    out = tmp_path / "merged"
    job = ["--base_model_name_or_path", base, "--peft_model_paths", adapter, "--output_dir", out]
    done = hf("mergejob", "plan", *job, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    plan = json.loads(done.stdout)
    assert plan["ok"] is True and plan["tensors_changed"] > 0
    assert not out.exists()  # a plan writes nothing


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            [
                "plan",
                "--base_model_name_or_path",
                "{missing}",
                "--peft_model_paths",
                "{missing}",
                "--output_dir",
                "out",
            ],
            2,
            "no such folder",
        ),
        (["plan", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
        ([], 2, "usage: hf mergejob "),
    ],
    ids=["bad-input", "bad-flag", "no-command"],
)
def test_hf_mergejob_keeps_the_exit_codes(
    hf, tmp_path: Path, args: Sequence[str], code: int, message: str
) -> None:
    done = hf("mergejob", *[a.format(missing=tmp_path / "missing") for a in args])
    assert done.returncode == code, done.stdout + done.stderr
    assert message in done.stdout + done.stderr
