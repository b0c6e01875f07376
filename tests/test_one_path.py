"""The job's one path: the drifts the three copies of it had, each pinned by a test.

* an Indexed rerun from a recipe checks its inputs as a plain rerun does;
* a worker of the one pool that dies mid-merge fails the job instead of hanging it;
* a job without an output folder fails with one error type, whichever path it takes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import mergejob
from mergejob import indexed
from mergejob.errors import EXIT_BAD_INPUT, SpecError
from mergejob.io.shards import RECORDS_DIR
from tests.support.models import ModelFactory

SHARD = "20KB"  # the tiny base in 12 shards


@pytest.fixture(scope="module")
def job(models: ModelFactory) -> tuple[Path, Path]:
    base = models.base()
    return base, models.adapter(base)


def _spec(base: Path, adapter: Path, out: Path, **extra: Any) -> mergejob.MergeSpec:
    output: dict[str, Any] = {"max_shard_size": SHARD, "dir": str(out)}
    return mergejob.MergeSpec.model_validate(
        {"base": str(base), "adapters": [str(adapter)], "output": output, **extra}
    )


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("index", [0, 1])
def test_an_indexed_rerun_from_a_recipe_whose_input_changed_fails_before_writing(
    job: tuple[Path, Path], tmp_path: Path, run_cli: Any, index: int
) -> None:
    base, adapter = job
    # A copy of the adapter, so that changing it leaves the shared fixture alone.
    mine = tmp_path / "adapter"
    mine.mkdir()
    for path in adapter.iterdir():
        (mine / path.name).write_bytes(path.read_bytes())
    first = tmp_path / "first"
    mergejob.merge(_spec(base, mine, first))
    weights = mine / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight, same size
    weights.write_bytes(bytes(data))
    again = tmp_path / "again"
    before = _tree(tmp_path)

    code, _, err = run_cli(
        "run", "--config", first / "mergejob.yaml", "--output_dir", again,
        "--index", str(index), "--index-count", "2",
    )  # fmt: skip

    assert code == EXIT_BAD_INPUT, err
    assert "adapter_model.safetensors" in err and "differ from those the recipe recorded" in err
    assert not again.exists()
    assert not list(tmp_path.glob(".again*"))
    assert _tree(tmp_path) == before


# `mergejob` whose shard writer sleeps first, in every process: spawned workers import the
# main script again as __mp_main__, so the patch at its top reaches them too.
SLOW_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import mergejob.engines.worker as worker
    real = worker.write_shard
    def slow(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)
    worker.write_shard = slow
    if __name__ == "__main__":
        from mergejob.cli import main
        sys.exit(main())
    """
)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
@pytest.mark.parametrize("command", ["merge", "index"])
def test_a_worker_killed_mid_merge_fails_the_job_instead_of_hanging(
    job: tuple[Path, Path], tmp_path: Path, command: str
) -> None:
    base, adapter = job
    script = tmp_path / "slow_mergejob.py"
    script.write_text(SLOW_SCRIPT)
    out = tmp_path / "out"
    args = ["--base", str(base), "--adapters", str(adapter), "--output_dir", str(out),
            "--max-shard-size", SHARD, "--workers", "2"]  # fmt: skip
    if command == "index":
        args = ["run", *args, "--index", "0", "--index-count", "1"]
    else:
        args = ["merge", *args]
    env = {**os.environ, "MERGEJOB_LOG_FORMAT": "text", "MERGEJOB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    records = tmp_path / ".out.mergejob-partial" / RECORDS_DIR
    victims: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not victims:
        if records.is_dir() and list(records.glob("*.json")):
            victims = [p for p in _children(proc.pid) if p != proc.pid]
        time.sleep(0.02)
    assert proc.poll() is None and victims, proc.communicate()[0]
    # The OOM killer's way: SIGKILL to one worker, no goodbye on the queue.
    workers = [p for p in victims if "spawn_main" in _cmdline(p)]
    assert workers, [_cmdline(p) for p in victims]
    os.kill(workers[0], signal.SIGKILL)
    try:
        log, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hangs after one of its workers was killed")
    assert proc.returncode == 1, log
    assert "died" in log and "rerun to resume" in log
    assert "Traceback" not in log


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_job_without_an_output_folder_fails_with_one_error_type(
    job: tuple[Path, Path],
) -> None:
    base, adapter = job
    # The spec's own validation refuses this too; a spec built in code can still get here.
    spec = _spec(base, adapter, Path("unused"))
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": None})})
    errors = []
    for run in (
        lambda: mergejob.merge(spec),
        lambda: indexed.run_index(spec, index=0, count=2),
        lambda: indexed.finalize_job(spec),
    ):
        with pytest.raises(SpecError, match=r"output\.dir: required") as caught:
            run()
        errors.append(type(caught.value))
    assert len(set(errors)) == 1
