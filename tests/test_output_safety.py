"""The output folder never destroys an input, and a rerun after a crash at any late step
finishes the job instead of refusing it or redoing the publish.

- an output folder that is, contains or lies inside an input is refused (exit 2) by every
  entry point, whatever the flags, with the inputs untouched (issue 14, item 1);
- a rerun on a finished output says "nothing to do" only when the recipe and the files agree
  and describe this very job, for the stream and the peft engine (item 9);
- a kill between the two renames of ``--overwrite`` loses nothing (item 10);
- a rerun after a kill right after the Hub commit commits nothing (item 11).

The kills are real (``MERGEJOB_TEST_KILL_AT``: the process SIGKILLs itself at that point);
tests/test_kill_points.py runs the whole matrix of them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import HfApi

from mergejob import settings
from tests.support.hubserver.fixtures import SeededHubServer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARD = "40KB"


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (symlinks followed)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def mergejob(*args: object, kill_at: str | None = None, **env: str) -> tuple[int, str]:
    """``mergejob ARGS`` in a subprocess (killed by itself at ``kill_at``); (code, log)."""
    environ = {**os.environ, "MERGEJOB_DISABLE_PROGRESS_BARS": "1", **env}
    environ.pop(settings.KILL_AT_ENV, None)
    if kill_at:
        environ[settings.KILL_AT_ENV] = kill_at
    done = subprocess.run(
        [sys.executable, "-m", "mergejob.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def inputs(models: Any, tmp_path: Path) -> Path:
    """``in/base`` and ``in/a`` (an adapter of it): copies, so that a deletion would show."""
    base = models.base()
    root = tmp_path / "in"
    shutil.copytree(base, root / "base")
    shutil.copytree(models.adapter(base), root / "a")
    return root


def merge_flags(root: Path, out: Path | str, *extra: object) -> list[object]:
    return [
        "--base_model_name_or_path", root / "base", "--peft_model_paths", root / "a",
        "--output_dir", out, "--max-shard-size", SHARD, *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------
# Item 1: an output folder apart from every input


OVERLAPS = {
    # name: (output folder relative to tmp_path, the input the message names)
    "the folder holding both inputs": ("in", "base model"),
    "the base": ("in/base", "base model"),
    "the adapter": ("in/a", "adapter"),
    "a folder inside the base": ("in/base/merged", "base model"),
    "the base through ..": ("in/a/../base", "base model"),
    "the base through a symlink": ("link", "base model"),
}


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
@pytest.mark.parametrize("name", list(OVERLAPS))
def test_an_output_folder_that_overlaps_an_input_is_refused_and_the_inputs_stay(
    inputs: Path, tmp_path: Path, run_cli: Any, name: str, overwrite: bool
) -> None:
    (tmp_path / "link").symlink_to(inputs / "base", target_is_directory=True)
    relative, named = OVERLAPS[name]
    before = digests(inputs)
    flags = merge_flags(inputs, tmp_path / relative, *(["--overwrite"] if overwrite else []))
    code, out, err = run_cli("merge", *flags)
    assert code == 2, out + err
    assert f"lies inside the {named}" in err or f"the {named}" in err, err
    assert "apart from every input" in err and "--overwrite to replace" not in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert digests(inputs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "link"]


@pytest.mark.parametrize("command", ["run", "index", "plan"])
def test_every_entry_point_refuses_an_output_that_holds_an_input(
    inputs: Path, run_cli: Any, command: str
) -> None:
    before = digests(inputs)
    flags = merge_flags(inputs, inputs, "--overwrite")
    if command == "index":
        args = ["run", *flags, "--index", "0", "--index-count", "1"]
    elif command == "plan":
        args = ["plan", "--base", inputs / "base", "--adapters", inputs / "a",
                "--output_dir", inputs]  # fmt: skip
    else:
        args = [command, *flags]
    code, out, err = run_cli(*args)
    assert code == 2, out + err
    assert "contains the base model" in out + err
    assert digests(inputs) == before


def test_config_from_and_the_offload_folder_are_inputs_too(
    inputs: Path, tmp_path: Path, run_cli: Any
) -> None:
    shutil.copytree(inputs / "base", tmp_path / "config")
    code, _, err = run_cli(
        "merge", *merge_flags(inputs, tmp_path / "config", "--overwrite"),
        "--config-from", tmp_path / "config",
    )  # fmt: skip
    assert code == 2 and "is config_from" in err, err
    assert (tmp_path / "config" / "config.json").is_file()
    offload = tmp_path / "work" / "offload"
    offload.mkdir(parents=True)
    (offload / "keep").write_text("x")
    code, _, err = run_cli(
        "merge", *merge_flags(inputs, tmp_path / "work", "--overwrite"),
        "--engine", "peft", "--max-memory", "cpu=40KB", "--offload-folder", offload,
    )  # fmt: skip
    assert code == 2 and "contains engine.offload_folder" in err, err
    assert (offload / "keep").read_text() == "x"


def test_the_hub_cache_is_an_input_of_a_hub_source(
    tmp_path: Path, run_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    (cache / "models--org--base").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for out in (tmp_path / "hf", cache / "merged"):
        code, _, err = run_cli(
            "merge", "--base", "org/base", "--adapters", "org/a", "--output_dir", out,
            "--overwrite",
        )  # fmt: skip
        assert code == 2 and "the Hub cache" in err and "org/base, org/a" in err, err
        assert (cache / "models--org--base").is_dir()


# ---------------------------------------------------------------------------------------
# Item 9: a rerun on a finished output


@pytest.fixture
def finished(inputs: Path, tmp_path: Path, run_cli: Any) -> Path:
    out = tmp_path / "out"
    code, _, err = run_cli("merge", *merge_flags(inputs, out))
    assert code == 0, err
    return out


def test_a_rerun_on_its_own_finished_output_has_nothing_to_do(
    inputs: Path, finished: Path, run_cli: Any
) -> None:
    before = digests(finished)
    code, out, err = run_cli("merge", *merge_flags(inputs, finished))
    assert code == 0, err
    assert "already holds this merge: nothing to do" in out
    assert digests(finished) == before


@pytest.mark.parametrize("damage", ["missing", "cut", "recipe-without-sizes"])
def test_a_finished_output_whose_files_disagree_with_its_recipe_is_not_taken_as_done(
    inputs: Path, finished: Path, run_cli: Any, damage: str
) -> None:
    shard = sorted(finished.glob("*.safetensors"))[-1]
    if damage == "missing":
        shard.unlink()
    elif damage == "cut":
        os.truncate(shard, shard.stat().st_size - 1)
    else:
        path = finished / settings.RECIPE_FILE
        recipe = yaml.safe_load(path.read_text())
        del recipe["recipe"]["sizes"]
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, out, err = run_cli("merge", *merge_flags(inputs, finished))
    assert code == 2 and "folder is not empty" in err, out + err
    code, out, err = run_cli("merge", *merge_flags(inputs, finished, "--overwrite"))
    assert code == 0 and "nothing to do" not in out, err
    assert len(list(finished.glob("*.safetensors"))) >= 2


def test_a_finished_output_of_the_same_weights_but_another_config_is_not_taken_as_done(
    inputs: Path, finished: Path, run_cli: Any
) -> None:
    code, out, err = run_cli(
        "merge", *merge_flags(inputs, finished), "--set-config", "use_cache=false"
    )
    assert code == 2 and "folder is not empty" in err, out + err


def test_a_peft_rerun_on_its_own_finished_output_has_nothing_to_do(
    inputs: Path, tmp_path: Path, run_cli: Any
) -> None:
    out = tmp_path / "peft-out"
    flags = merge_flags(inputs, out, "--engine", "peft")
    code, _, err = run_cli("merge", *flags)
    assert code == 0, err
    before = digests(out)
    code, text, err = run_cli("merge", *flags)
    assert code == 0, err
    assert "nothing to do" in text
    assert digests(out) == before
    # The peft engine has no plan id: the inputs' sha256 say whether they are the same.
    config = inputs / "a" / "adapter_config.json"
    config.write_text(config.read_text().replace("{", '{"note": "changed", ', 1))
    code, text, err = run_cli("merge", *flags)
    assert code == 2 and "folder is not empty" in err, text + err


# ---------------------------------------------------------------------------------------
# Item 10: a kill between the two renames of --overwrite


def test_a_kill_between_the_renames_of_overwrite_loses_nothing(
    inputs: Path, finished: Path, tmp_path: Path
) -> None:
    old = digests(finished)
    replaced = tmp_path / f".out{settings.OLD_SUFFIX}"
    newer = [*merge_flags(inputs, finished, "--overwrite"), "--dtype", "float32"]
    code, log = mergejob("merge", *newer, kill_at="between-renames")
    assert code == -signal.SIGKILL, log
    assert replaced.is_dir() and not finished.exists()
    # Any later run puts the old output back while the new one is not in place ...
    code, log = mergejob("merge", *merge_flags(inputs, finished, "--dtype", "float32"))
    assert code == 2 and "folder is not empty" in log, log
    assert digests(finished) == old and not replaced.exists()
    # ... and the rerun finishes the replacement, leaving no old model behind.
    code, log = mergejob("merge", *newer, kill_at="between-renames")
    assert code == -signal.SIGKILL, log
    code, log = mergejob("merge", *newer)
    assert code == 0, log
    assert yaml.safe_load((finished / settings.RECIPE_FILE).read_text())["output"]["dtype"] == (
        "float32"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_an_old_output_left_beside_a_finished_one_is_removed_by_the_next_run(
    inputs: Path, finished: Path, tmp_path: Path
) -> None:
    newer = [*merge_flags(inputs, finished, "--overwrite"), "--dtype", "float32"]
    code, log = mergejob("merge", *newer, kill_at="renamed")
    assert code == -signal.SIGKILL, log
    # What a kill while the replaced output was being removed leaves beside the new one.
    replaced = tmp_path / f".out{settings.OLD_SUFFIX}"
    replaced.mkdir()
    (replaced / "model.safetensors").write_bytes(b"old")
    code, log = mergejob("merge", *newer)
    assert code == 0 and "nothing to do" in log, log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


# ---------------------------------------------------------------------------------------
# Item 11: a kill right after the Hub commit


def hub_commits(hub: SeededHubServer, repo_id: str) -> list[Any]:
    return HfApi(endpoint=hub.url, token=hub.alice_token).list_repo_commits(repo_id)


def publish_env(hub: SeededHubServer, home: Path) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_TOKEN": hub.alice_token,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


@pytest.mark.parametrize("local_copy", [False, True], ids=["publish-only", "with-local-dir"])
def test_a_rerun_after_a_kill_right_after_the_commit_commits_nothing(
    inputs: Path, tmp_path: Path, hub_env: SeededHubServer, local_copy: bool
) -> None:
    hub = hub_env
    env = publish_env(hub, tmp_path / "home")
    flags = merge_flags(inputs, "org/merged", "--push_to_hub")
    if local_copy:
        flags += ["--local-dir", tmp_path / "local"]
    code, log = mergejob("merge", *flags, kill_at="committed", **env)
    assert code == -signal.SIGKILL, log
    assert len(hub_commits(hub, "org/merged")) == 2  # the repo's first commit, and ours
    code, log = mergejob("merge", *flags, **env)
    assert code == 0, log
    assert "nothing to commit" in log
    assert len(hub_commits(hub, "org/merged")) == 2
    assert not [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path][1:]
    if local_copy:
        assert (tmp_path / "local" / settings.RECIPE_FILE).is_file()


def test_publishing_a_folder_the_branch_holds_already_commits_nothing(
    finished: Path, hub_env: SeededHubServer
) -> None:
    from mergejob.publish import check_access, publish_folder
    from mergejob.spec import PublishSpec

    hub = hub_env
    target = check_access(PublishSpec(repo_id="org/merged"), token=hub.alice_token)
    first = publish_folder(finished, target, token=hub.alice_token)
    again = publish_folder(finished, target, token=hub.alice_token)
    assert again.commit_oid == first.commit_oid and again.uploaded_bytes == 0
    assert len(hub_commits(hub, "org/merged")) == 2
    # One changed file: a new commit.
    (finished / "README.md").write_text("changed\n")
    third = publish_folder(finished, target, token=hub.alice_token)
    assert third.commit_oid != first.commit_oid
    assert len(hub_commits(hub, "org/merged")) == 3


def test_a_publish_only_rerun_with_another_config_publishes_it(
    inputs: Path, tmp_path: Path, hub_env: SeededHubServer
) -> None:
    hub = hub_env
    env = publish_env(hub, tmp_path / "home")
    flags = merge_flags(inputs, "org/merged", "--push_to_hub")
    code, log = mergejob("merge", *flags, kill_at="renamed", **env)  # the marker stays
    assert code == -signal.SIGKILL, log
    code, log = mergejob("merge", *flags, "--set-config", "use_cache=false", **env)
    assert code == 0 and "nothing to do" not in log, log
    assert len(hub_commits(hub, "org/merged")) == 3
    code, log = mergejob("merge", *flags, **env)  # the first job again: the Hub is not it now
    assert code == 0 and "nothing to do" not in log, log
    assert len(hub_commits(hub, "org/merged")) == 4
