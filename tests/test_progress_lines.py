"""Each progress line `mergejob status` reads is parsed back from what its formatter writes."""

from __future__ import annotations

import io
import json
import logging

import pytest

from mergejob import logs
from mergejob.launch.status import progress_from_log


def test_phase_lines_round_trip() -> None:
    start = logs.phase_start_line("merge", {"engine": "stream", "workers": 2})
    assert start == "phase merge start engine=stream workers=2"
    assert logs.phase_start_line("write") == "phase write start"
    assert logs.parse_phase(start) == logs.PhaseEvent("merge", "start")
    assert logs.parse_phase(logs.phase_done_line("merge", 12.34)) == logs.PhaseEvent(
        "merge", "done"
    )
    assert logs.parse_phase(logs.phase_failed_line("resolve", 0.05)) == logs.PhaseEvent(
        "resolve", "failed"
    )
    assert logs.parse_phase("shard 1/2 done: x (1.0s elapsed)") is None


def test_shard_line_round_trips() -> None:
    line = logs.shard_done_line(3, 30, "model-00003-of-00030.safetensors", 41.25)
    assert line == "shard 3/30 done: model-00003-of-00030.safetensors (41.2s elapsed)"
    assert logs.parse_shard_done(line) == logs.ShardDone(3, 30)
    assert logs.parse_shard_done("phase merge start") is None


def test_index_lines_round_trip() -> None:
    shard = logs.index_shard_done_line(1, 4, 2, 8, "model-00010-of-00030.safetensors")
    assert shard == "index 1/4: shard 2/8 done: model-00010-of-00030.safetensors"
    assert logs.parse_index_shard_done(shard) == logs.IndexShardDone(1, 4, 2, 8)
    assert logs.parse_index(shard) == 1
    assert logs.parse_shard_done(shard) == logs.ShardDone(2, 8)  # the finaliser's progress

    done = logs.index_done_line(3, 4, 8, 6, 2)
    assert done == "index 3/4 done: 8 shard(s), 6 merged, 2 already finished"
    assert logs.parse_index_done(done) == logs.IndexDone(
        3, 4, "8 shard(s), 6 merged, 2 already finished"
    )
    assert logs.parse_index(done) == 3
    assert logs.parse_index_done(shard) is None and logs.parse_index_shard_done(done) is None

    waiting = logs.finaliser_waiting_line([1, 3], 4)
    assert waiting == "finaliser: waiting for index(es) [1, 3] of 4"
    assert logs.parse_finaliser_waiting(waiting) == [1, 3]
    assert logs.parse_finaliser_waiting(done) is None


def test_output_lines_round_trip() -> None:
    merged = logs.merged_line("/cache/out", 93.04)
    assert merged == "merged model written to /cache/out in 93.0s"
    assert logs.parse_merged(merged) == "/cache/out"
    published = logs.published_line("https://hf.co/org/m", "https://hf.co/org/m/commit/abc")
    assert published == "published to https://hf.co/org/m: https://hf.co/org/m/commit/abc"
    assert logs.parse_published(published) == (
        "https://hf.co/org/m",
        "https://hf.co/org/m/commit/abc",
    )
    assert logs.parse_merged(published) is None and logs.parse_published(merged) is None


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_phase_writes_what_status_reads(fmt: str) -> None:
    """Through the real logger (either format), logs.phase's lines give status its progress."""
    saved = (logs.log.handlers[:], logs.log.level, logs.log.propagate)
    logs.setup_logging(fmt=fmt)
    stream = io.StringIO()
    handler = logs.log.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        with logs.phase("merge", engine="stream"):
            logs.log.info(logs.shard_done_line(2, 5, "model-2.safetensors", 1.0))
        with pytest.raises(RuntimeError), logs.phase("write"):
            raise RuntimeError("boom")
    finally:
        logs.log.handlers[:], logs.log.level, logs.log.propagate = saved
    lines = stream.getvalue().splitlines()
    if fmt == "json":
        assert json.loads(lines[0])["event"] == "start"
    assert progress_from_log(lines[:2]) == "phase merge running, shard 2/5 done"
    assert progress_from_log(lines[:3]) == "phase merge done"
    assert progress_from_log(lines) == "phase write failed"


def test_download_line_round_trips_and_status_shows_it_beside_the_merge() -> None:
    line = logs.download_done_line(3, 30, "model-00003-of-00030.safetensors", 4_983_463_256)
    assert line == "download 3/30 done: model-00003-of-00030.safetensors (4983463256 bytes)"
    parsed = logs.parse_download_done(line)
    assert parsed == logs.DownloadDone(3, 30, 4_983_463_256)
    assert logs.parse_shard_done(line) is None  # not taken for an output shard
    log = [
        logs.phase_start_line("merge", {"engine": "stream"}),
        logs.download_done_line(1, 30, "model-00001-of-00030.safetensors", 10),
        logs.shard_done_line(1, 30, "model-00001-of-00030.safetensors", 2.0),
        line,
    ]
    assert progress_from_log(log) == "phase merge running, download 3/30, shard 1/30 done"


def test_an_extraction_counts_groups_where_a_merge_counts_shards() -> None:
    """An extraction's lines say ``group``; status shows them beside its downloads, and an
    index's progress and summary say groups and extracted."""
    group = logs.shard_done_line(3, 5, "model.layers.1", 2.0, unit="group")
    assert group == "group 3/5 done: model.layers.1 (2.0s elapsed)"
    assert logs.parse_shard_done(group) == logs.ShardDone(3, 5, "group")
    log = [
        logs.phase_start_line("extract", {"device": "cpu"}),
        logs.download_done_line(2, 16, "model-00002-of-00008.safetensors", 10),
        group,
    ]
    assert progress_from_log(log) == "phase extract running, download 2/16, group 3/5 done"
    line = logs.index_shard_done_line(1, 2, 2, 3, "model.layers.4", unit="group")
    assert line == "index 1/2: group 2/3 done: model.layers.4"
    assert logs.parse_index_shard_done(line) == logs.IndexShardDone(1, 2, 2, 3, "group")
    done = logs.index_done_line(1, 2, 3, 2, 1, unit="group", verb="extracted")
    assert done == "index 1/2 done: 3 group(s), 2 extracted, 1 already finished"
