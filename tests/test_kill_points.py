"""The kill-point matrix: a ``mergejob merge`` SIGKILLed at each step of a merge and of a
publish, then run again, ends as if it had never been killed.

Each point is a ``settings.kill_point(NAME)`` call in the code; ``MERGEJOB_TEST_KILL_AT=NAME``
makes the process SIGKILL itself there. For every point: the killed run dies by SIGKILL, the
identical rerun exits 0, the result is byte-identical to an uninterrupted run (the recipe up
to its timings and run counts), no file of the job is left beside the output, the inputs are
unchanged, and, publishing, the Hub holds exactly one commit of the model.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergejob import settings
from tests.support.hubserver.fixtures import SeededHubServer

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARD = "40KB"  # the tiny base in a handful of shards

# Every point, in the order a job passes them (the names of the settings.kill_point calls).
MERGE_POINTS = [
    "resolved",  # every source resolved to local files
    "planned",  # checks and plan done, nothing written
    "mid-shard",  # the first shard half written (its temporary file)
    "shard-before-record",  # the first shard written, its record not yet
    "shard-done",  # the first shard and its record written
    "shards-written",  # every shard written, the weights' index not yet
    "merged",  # the engine done (index written), config and tokenizer not yet
    "written",  # tokenizer, config.json and card written, the recipe not yet
    "recipe-written",  # the partial folder complete
    "records-dropped",  # the shard records removed, the rename not yet
    "renamed",  # the output in place
]
OVERWRITE_POINTS = ["between-renames", "renamed"]  # --overwrite of an older output
PUBLISH_POINTS = [
    "uploaded-one",  # the first shard on the Hub, the merge still running
    "recipe-written",  # the partial folder complete, nothing committed
    "committed",  # the commit made, not yet checked or remembered
    "published",  # the commit checked and remembered, the local copy still there
    "renamed",  # the local copy removed
]


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def recipe_core(text: str) -> dict[str, Any]:
    """mergejob.yaml less what differs between runs (when, how long, how many shards were
    merged or resumed, where the output folder was and whether it replaced one)."""
    recipe = yaml.safe_load(text)
    recipe["output"].pop("dir", None)
    recipe["output"].pop("overwrite", None)
    run = recipe["recipe"]
    run.pop("created", None)
    run.pop("timings", None)
    run["engine"] = {
        k: v for k, v in run["engine"].items() if k in ("name", "plan_id", "tensors_changed")
    }
    return recipe


def mergejob(*args: object, kill_at: str | None = None, **env: str) -> tuple[int, str]:
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


def killed_then_rerun(args: list[object], point: str, **env: str) -> str:
    code, log = mergejob(*args, kill_at=point, **env)
    assert code == -signal.SIGKILL, f"not killed at {point} (exit {code}):\n{log}"
    code, log = mergejob(*args, **env)
    assert code == 0, f"the rerun after a kill at {point} failed:\n{log}"
    return log


@pytest.fixture(scope="module")
def inputs(models: Any) -> Iterator[tuple[Path, Path]]:
    """The base and two adapters; checked unchanged once every test of the module ran."""
    base = models.base()
    a = models.adapter(base, target_modules=["q_proj", "v_proj"])
    b = models.adapter(base, target_modules=["o_proj", "up_proj"], seed=3, use_rslora=True)
    before = [digests(f) for f in (base, a, b)]
    yield base, a, b
    assert [digests(f) for f in (base, a, b)] == before, "an input changed"


def flags(inputs: tuple[Path, ...], out: object, *extra: object) -> list[object]:
    base, a, b = inputs
    return [
        "merge", "--base_model_name_or_path", base, "--peft_model_paths", a, b,
        "--output_dir", out, "--max-shard-size", SHARD, "--workers", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(inputs: tuple[Path, ...], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    code, log = mergejob(*flags(inputs, out))
    assert code == 0, log
    return out


def assert_same_output(folder: Path, reference: Path) -> None:
    got, want = digests(folder), digests(reference)
    assert sorted(got) == sorted(want)
    assert sum(name.endswith(".safetensors") for name in got) >= 3
    recipe = settings.RECIPE_FILE
    assert {k: v for k, v in got.items() if k != recipe} == {
        k: v for k, v in want.items() if k != recipe
    }
    assert recipe_core((folder / recipe).read_text()) == recipe_core(
        (reference / recipe).read_text()
    )


@pytest.mark.parametrize("point", MERGE_POINTS)
def test_a_merge_killed_at_any_point_is_finished_by_its_rerun(
    inputs: tuple[Path, ...], reference: Path, tmp_path: Path, point: str
) -> None:
    out = tmp_path / "out"
    killed_then_rerun(flags(inputs, out), point)
    assert_same_output(out, reference)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("point", OVERWRITE_POINTS)
def test_an_overwrite_killed_at_any_point_is_finished_by_its_rerun(
    inputs: tuple[Path, ...], reference: Path, tmp_path: Path, point: str
) -> None:
    out = tmp_path / "out"
    code, log = mergejob(*flags(inputs, out, "--dtype", "float32"))  # an older, other output
    assert code == 0, log
    killed_then_rerun(flags(inputs, out, "--overwrite"), point)
    assert_same_output(out, reference)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------
# Publishing (publish-only: the local copy is temporary)


def hub_files(hub: SeededHubServer, repo_id: str) -> tuple[dict[str, str], str, int]:
    """The branch head's files (sha256 by path, less .gitattributes), its recipe, and how
    many commits the branch has."""
    repo = hub.store.get("model", repo_id)
    assert repo is not None
    head = repo.head()
    files = {p: e.sha256 for p, e in head.tree.items() if p != ".gitattributes"}
    recipe = hub.store.object_path(files[settings.RECIPE_FILE]).read_text()
    return files, recipe, len(repo.history(head))


def publish_env(hub: SeededHubServer, home: Path) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_TOKEN": hub.alice_token,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


@pytest.fixture(scope="module")
def published(
    inputs: tuple[Path, ...], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, str], str, int]:
    """What an uninterrupted publish puts on the Hub."""
    root = tmp_path_factory.mktemp("published")
    with SeededHubServer(root / "hub") as hub:
        code, log = mergejob(
            *flags(inputs, "org/merged", "--push_to_hub"), **publish_env(hub, root / "home")
        )
        assert code == 0, log
        return hub_files(hub, "org/merged")


@pytest.mark.parametrize("point", PUBLISH_POINTS)
def test_a_publish_killed_at_any_point_is_finished_by_its_rerun_with_one_commit(
    inputs: tuple[Path, ...],
    published: tuple[dict[str, str], str, int],
    hub_server: SeededHubServer,
    tmp_path: Path,
    point: str,
) -> None:
    home = tmp_path / "home"
    killed_then_rerun(
        flags(inputs, "org/merged", "--push_to_hub"), point, **publish_env(hub_server, home)
    )
    files, recipe, commits = hub_files(hub_server, "org/merged")
    want_files, want_recipe, want_commits = published
    assert commits == want_commits == 2  # the repo's first commit, and the model's
    recipe_name = settings.RECIPE_FILE
    assert {k: v for k, v in files.items() if k != recipe_name} == {
        k: v for k, v in want_files.items() if k != recipe_name
    }
    assert recipe_core(recipe) == recipe_core(want_recipe)
    work = home / "mergejob" / "publish"
    assert not work.exists() or not list(work.iterdir())  # the temporary copy, its marker
