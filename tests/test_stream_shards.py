"""Shard packing, assignment to workers, and finished-shard records."""

from __future__ import annotations

import hashlib
import itertools
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergejob.io.shards import (
    ShardRecord,
    assign_shards,
    pack_shards,
    read_record,
    record_holds,
    sha256_of,
    shard_file_names,
    write_record,
)

sizes_strategy = st.lists(st.integers(min_value=0, max_value=10**10), min_size=0, max_size=60)


@given(sizes=sizes_strategy, workers=st.integers(min_value=1, max_value=9))
@settings(max_examples=200, deadline=None)
def test_assign_shards_gives_every_shard_to_exactly_one_worker(
    sizes: list[int], workers: int
) -> None:
    assigned = assign_shards(sizes, workers)
    assert len(assigned) == workers
    flat = sorted(i for shards in assigned for i in shards)
    assert flat == list(range(len(sizes)))
    assert all(shards == sorted(shards) for shards in assigned)
    assert assign_shards(list(sizes), workers) == assigned  # deterministic


@given(sizes=sizes_strategy, workers=st.integers(min_value=1, max_value=9))
@settings(max_examples=200, deadline=None)
def test_assign_shards_balances_bytes(sizes: list[int], workers: int) -> None:
    """Largest first to the least loaded: no worker exceeds another by more than a shard."""
    loads = [sum(sizes[i] for i in shards) for shards in assign_shards(sizes, workers)]
    biggest = max(sizes, default=0)
    assert max(loads) - min(loads) <= biggest


def test_assign_shards_examples() -> None:
    assert assign_shards([4, 6, 1], 2) == [[1], [0, 2]]
    assert assign_shards([5, 5, 5], 1) == [[0, 1, 2]]
    assert assign_shards([5, 5], 3) == [[0], [1], []]
    with pytest.raises(ValueError):
        assign_shards([1], 0)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=1000), max_size=50),
    limit=st.integers(1, 2000),
)
@settings(max_examples=200, deadline=None)
def test_pack_shards_keeps_order_and_bound(sizes: list[int], limit: int) -> None:
    files = pack_shards(sizes, limit)
    assert [i for f in files for i in f] == list(range(len(sizes)))
    for f in files:
        total = sum(sizes[i] for i in f)
        assert total <= limit or len(f) == 1  # only a single oversized tensor may exceed it
    for first, second in itertools.pairwise(files):
        # a file was closed only because the next tensor did not fit
        assert sum(sizes[i] for i in first) + sizes[second[0]] > limit


def test_shard_file_names_are_the_standard_ones() -> None:
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]


def test_records_round_trip_and_hold_only_for_their_file(tmp_path: Path) -> None:
    shard = tmp_path / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"x" * 1000)
    record = ShardRecord(shard.name, 1000, sha256_of(shard), "plan-a")
    write_record(tmp_path, record)
    assert read_record(tmp_path, shard.name) == record
    assert record_holds(tmp_path, record, "plan-a")
    assert not record_holds(tmp_path, record, "plan-b")
    shard.write_bytes(b"y" * 1000)
    assert not record_holds(tmp_path, record, "plan-a")
    shard.unlink()
    assert not record_holds(tmp_path, record, "plan-a")
    assert read_record(tmp_path, "missing.safetensors") is None


def test_record_holds_hashes_a_file_once_and_sees_it_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergejob.io import shards

    data = b"x" * 4096
    (tmp_path / "a.safetensors").write_bytes(data)
    record = shards.ShardRecord("a.safetensors", len(data), hashlib.sha256(data).hexdigest(), "p")
    hashed: list[Path] = []
    real = shards.sha256_of
    monkeypatch.setattr(shards, "sha256_of", lambda p: hashed.append(p) or real(p))
    assert shards.record_holds(tmp_path, record, "p")
    assert shards.record_holds(tmp_path, record, "p")
    assert len(hashed) == 1  # the second ask (the worker after the downloads) is answered
    # Same size, other bytes: the file changed since, so it is hashed again and fails
    # (after a clock tick: the kernel stamps files with a coarse clock, a few ms).
    time.sleep(0.05)
    (tmp_path / "a.safetensors").write_bytes(b"y" * 4096)
    assert not shards.record_holds(tmp_path, record, "p")
    assert len(hashed) == 2
