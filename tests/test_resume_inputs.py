"""A resumed shard is tied to the inputs it was made from by content (issue 14, item 2).

The plan id names inputs by name, size and mtime; a rewritten adapter of the same size with
its old mtime keeps the plan id, so the shard records carry the sha256 of every input file
their shard read, and a rerun redoes the shards whose inputs are not those bytes any more.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import mergejob
from mergejob.engines.stream import merge_plan
from mergejob.io.shards import RECORDS_DIR, read_record
from mergejob.output import partial_dir_for
from mergejob.plan.work import build_plan
from tests.support.models import ModelFactory

SHARD = "20KB"
ADAPTER_FILE = "adapter_model.safetensors"

# `mergejob run` whose write_shard sleeps first: slow enough to be killed between shards.
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


def _run(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MERGEJOB_LOG_FORMAT": "text", "MERGEJOB_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _flags(base: Path, adapter: Path, out: Path) -> list[str]:
    return [
        "--base", str(base), "--adapters", str(adapter), "--output_dir", str(out),
        "--max-shard-size", SHARD,
    ]  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewrite_keeping_stat(path: Path, new: Path) -> None:
    """Replace ``path``'s bytes with ``new``'s, same size, and put its old mtime back."""
    before = path.stat()
    assert new.stat().st_size == before.st_size
    path.write_bytes(new.read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.fixture(scope="module")
def adapters(models: ModelFactory) -> tuple[Path, Path, Path]:
    """A base and two adapters of the same shapes (so the same file size), other weights."""
    base = models.base()
    old = models.adapter(base, seed=1)
    new = models.adapter(base, seed=2)
    assert (old / ADAPTER_FILE).stat().st_size == (new / ADAPTER_FILE).stat().st_size
    assert _sha256(old / ADAPTER_FILE) != _sha256(new / ADAPTER_FILE)
    return base, old, new


def test_a_rerun_redoes_shards_whose_adapter_was_rewritten_with_the_same_size_and_mtime(
    adapters: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, old, new = adapters
    adapter = tmp_path / "adapter"
    shutil.copytree(old, adapter)
    out = tmp_path / "out"
    plan = build_plan(base, [(adapter, 1.0)], max_shard_size=20_000)
    reads_adapter = {s.name for s in plan.shards if any(t.changed for t in s.tensors)}
    assert 0 < len(reads_adapter) < len(plan.shards)

    # Kill the merge once a shard that read the adapter is finished.
    worker = _run(SLOW_MERGEJOB, *_flags(base, adapter, out))
    records = partial_dir_for(out) / RECORDS_DIR
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.poll() is None:
        done = {p.name.removesuffix(".json") for p in records.glob("*.json")}
        if done & reads_adapter:
            break
        time.sleep(0.02)
    assert worker.poll() is None, worker.communicate()[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.communicate()
    finished = {p.name.removesuffix(".json") for p in records.glob("*.json")}
    assert finished & reads_adapter and len(finished) < len(plan.shards)

    _rewrite_keeping_stat(adapter / ADAPTER_FILE, new / ADAPTER_FILE)
    again = _run(MERGEJOB, *_flags(base, adapter, out))
    log, _ = again.communicate(timeout=300)
    assert again.returncode == 0, log
    assert "changed since" in log, log

    # The output is a clean merge of the new adapter, byte for byte, and says so.
    clean = tmp_path / "clean"
    done = _run(MERGEJOB, *_flags(base, adapter, clean))
    clean_log, _ = done.communicate(timeout=300)
    assert done.returncode == 0, clean_log
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in clean.iterdir())
    for name in names:
        if name != "mergejob.yaml":
            assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    recipe = yaml.safe_load((out / "mergejob.yaml").read_text())
    files = next(i for i in recipe["recipe"]["inputs"] if i["role"] == "adapter")["files"]
    assert files[ADAPTER_FILE] == _sha256(new / ADAPTER_FILE)


def test_a_rerun_keeps_shards_whose_inputs_are_unchanged_and_says_what_it_hashes(
    adapters: tuple[Path, Path, Path], tmp_path: Path, caplog: Any
) -> None:
    """Only the shards that read the rewritten file are merged again; a resume that hashes
    local inputs first says so (with how much), since it can take minutes on a big base."""
    base, old, new = adapters
    adapter = tmp_path / "adapter"
    shutil.copytree(old, adapter)
    plan = build_plan(base, [(adapter, 1.0)], max_shard_size=20_000)
    partial = tmp_path / "partial"
    merge_plan(plan, partial, keep_records=True)
    assert all(read_record(partial, s.name).inputs for s in plan.shards)  # type: ignore[union-attr]
    _rewrite_keeping_stat(adapter / ADAPTER_FILE, new / ADAPTER_FILE)
    again = build_plan(base, [(adapter, 1.0)], max_shard_size=20_000)
    assert again.plan_id == plan.plan_id  # names, sizes and mtimes are all the same
    with caplog.at_level(logging.INFO, logger="mergejob"):
        report = merge_plan(again, partial, keep_records=True)
    changed = sum(1 for s in plan.shards if any(t.changed for t in s.tensors))
    assert report.extra["shards_merged"] == changed
    assert report.extra["shards_resumed"] == len(plan.shards) - changed
    messages = [r.getMessage() for r in caplog.records]
    assert any("hashing" in m and "local input" in m for m in messages), messages
    assert any("changed since" in m and ADAPTER_FILE in m for m in messages), messages

    mergejob.merge(
        mergejob.MergeSpec.model_validate(
            {
                "base": str(base),
                "adapters": [str(adapter)],
                "output": {"dir": str(tmp_path / "clean"), "max_shard_size": SHARD},
            }
        )
    )
    for shard in plan.shards:
        assert (partial / shard.name).read_bytes() == (tmp_path / "clean" / shard.name).read_bytes()


def test_records_written_by_worker_processes_carry_their_inputs_sha256(
    adapters: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Spawned workers write their records without the inputs; the parent adds them."""
    base, old, _ = adapters
    plan = build_plan(base, [(old, 1.0)], max_shard_size=20_000)
    partial = tmp_path / "partial"
    merge_plan(plan, partial, workers=2, keep_records=True)
    sha = _sha256(old / ADAPTER_FILE)
    for i, shard in enumerate(plan.shards):
        record = read_record(partial, shard.name)
        assert record is not None
        assert set(record.inputs) == set(plan.shard_inputs(i))
        if any(t.changed for t in shard.tensors):
            assert record.inputs[f"adapter0/{ADAPTER_FILE}"] == sha
