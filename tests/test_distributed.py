"""A merge split over indices (mergejob/distributed.py): the assignment, --local --workers N,
resuming an index killed with SIGKILL, and the idempotent finaliser."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mergejob.errors import SpecError
from mergejob.indexed import device_shares, index_from_env, index_shards
from mergejob.io.shards import RECORDS_DIR
from tests.support.models import ModelFactory

RunCli = Callable[..., tuple[int, str, str]]
SHARD = "20KB"  # the tiny base in 12 shards

# `mergejob` in a subprocess whose write_shard sleeps first: slow enough to kill mid-way.
SLOW_MERGEJOB = (
    "import sys, time\n"
    "import mergejob.engines.worker as stream\n"
    "real = stream.write_shard\n"
    "def slow(*a, **k):\n"
    "    time.sleep(0.4)\n"
    "    return real(*a, **k)\n"
    "stream.write_shard = slow\n"
    "from mergejob.cli import main\n"
    "sys.exit(main())\n"
)
MERGEJOB = "import sys\nfrom mergejob.cli import main\nsys.exit(main())\n"


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=10**10), max_size=40),
    count=st.integers(min_value=1, max_value=8),
)
def test_the_indices_together_write_every_shard_exactly_once(sizes: list[int], count: int) -> None:
    shares = [index_shards(sizes, count, i) for i in range(count)]
    assert sorted(s for share in shares for s in share) == list(range(len(sizes)))
    assert all(share == sorted(share) for share in shares)
    # Balanced by bytes (largest first to the least loaded): no index carries more than
    # the lightest one plus the largest shard.
    loads = [sum(sizes[s] for s in share) for share in shares]
    if sizes:
        assert max(loads) - min(loads) <= max(sizes)
    # A pure function: the same answer every time; a pod's GPUs split its share again.
    assert shares == [index_shards(list(sizes), count, i) for i in range(count)]
    for share in shares:
        parts = device_shares(share, sizes, 3)
        assert sorted(s for part in parts for s in part) == share


def test_index_and_count_come_from_the_indexed_job_environment() -> None:
    assert index_from_env({"JOB_COMPLETION_INDEX": "2", "MERGEJOB_INDEX_COUNT": "4"}) == (2, 4)
    assert index_from_env({}) == (None, None)
    with pytest.raises(SpecError, match="JOB_COMPLETION_INDEX"):
        index_from_env({"JOB_COMPLETION_INDEX": "two"})
    with pytest.raises(SpecError, match=r"must be in 0\.\.2"):
        index_shards([1, 2, 3], 3, 3)


@pytest.fixture(scope="module")
def job(models: ModelFactory) -> tuple[Path, Path]:
    base = models.base()
    return base, models.adapter(base)


@pytest.fixture(scope="module")
def reference(job: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same merge in one process (`mergejob merge`)."""
    import mergejob

    out = tmp_path_factory.mktemp("reference") / "out"
    spec = mergejob.MergeSpec.model_validate(
        {
            "base": str(job[0]),
            "adapters": [str(job[1])],
            "output": {"dir": str(out), "max_shard_size": SHARD},
        }
    )
    mergejob.merge(spec)
    return out


def flags(job: tuple[Path, Path], out: Path) -> list[str]:
    return [
        "--base", str(job[0]), "--adapters", str(job[1]), "--output_dir", str(out),
        "--max-shard-size", SHARD,
    ]  # fmt: skip


def recipe_core(folder: Path) -> dict[str, Any]:
    """mergejob.yaml less what differs between runs (when, how long, how many workers)."""
    recipe = yaml.safe_load((folder / "mergejob.yaml").read_text())
    recipe["output"].pop("dir", None)
    run = recipe["recipe"]
    run.pop("created", None)
    run.pop("timings", None)
    run["engine"] = {
        k: v for k, v in run["engine"].items() if k in ("name", "plan_id", "tensors_changed")
    }
    return recipe


def assert_same_output(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert sum(n.endswith(".safetensors") for n in names) == 12
    for name in names:
        if name != "mergejob.yaml":
            assert filecmp.cmp(a / name, b / name, shallow=False), name
    assert recipe_core(a) == recipe_core(b)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_local_workers_give_byte_identical_outputs(
    workers: int,
    job: tuple[Path, Path],
    reference: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from mergejob.cli import main

    out = tmp_path / "out"
    code = main(["submit", "--local", "--workers", str(workers), *flags(job, out)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert_same_output(out, reference)
    if workers > 1:
        # Each index merged its own share, index 0 finalised, nothing is left behind.
        for i in range(workers):
            assert f"index {i}/{workers} done" in captured.out
        assert captured.out.count("merged model written to") == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers == []


def _run(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "MERGEJOB_LOG_FORMAT": "text"}
    return subprocess.Popen(
        [sys.executable, "-c", code, "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_an_index_killed_midway_redoes_only_its_unfinished_shards(
    job: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    partial = tmp_path / ".out.mergejob-partial"
    args = [*flags(job, out), "--index", "1", "--index-count", "2"]
    worker = _run(SLOW_MERGEJOB, *args)
    records = partial / RECORDS_DIR
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.poll() is None:
        if records.is_dir() and len(list(records.glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    assert worker.poll() is None, worker.communicate()[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.communicate()
    finished = {p.name.removesuffix(".json") for p in records.glob("*.json")}
    assert 2 <= len(finished) < 6

    again = _run(MERGEJOB, *args)
    log, _ = again.communicate(timeout=300)
    assert again.returncode == 0, log
    assert f"index 1/2 done: 6 shard(s), {6 - len(finished)} merged, {len(finished)} " in log

    first = _run(MERGEJOB, *flags(job, out), "--index", "0", "--index-count", "2")
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log
    assert "merged model written to" in log
    assert not partial.exists()
    assert_same_output(out, reference)

    # The finaliser again, and index 0 again: the same output, nothing done.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for extra in (["--finalize"], ["--index", "0", "--index-count", "2"]):
        rerun = _run(MERGEJOB, *flags(job, out), *extra)
        log, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, log
        assert "already finalised" in log or "already finished" in log
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_the_finaliser_refuses_a_merge_with_missing_shards(
    job: tuple[Path, Path], tmp_path: Path, run_cli: RunCli
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("run", *flags(job, out), "--finalize")
    assert code == 1
    assert "run the indices first" in err


def test_a_split_merge_needs_the_stream_engine_and_a_whole_index(
    job: tuple[Path, Path], tmp_path: Path, run_cli: RunCli
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("run", *flags(job, out), "--engine", "peft", "--index-count", "2",
                           "--index", "0")  # fmt: skip
    assert code == 2 and "needs the stream engine" in err
    code, _, err = run_cli("run", *flags(job, out), "--index-count", "2")
    assert code == 2 and "give this worker's index too" in err
    code, _, err = run_cli("run", *flags(job, out), "--index", "2", "--index-count", "2")
    assert code == 2 and "0 <= index < count" in err
