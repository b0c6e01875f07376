"""Hub to Hub as one pipeline: a Hub base fetched shard by shard as the merge needs it.

Against the project's Hub test server: the output equals a merge of the same base on disk;
each index of an Indexed Job downloads only the base shards its output shards read; a rerun
downloads no complete shard twice; the commit is pinned once; with --delete-downloaded the
cache holds a window of shards and keeps what was there before the job.
"""

from __future__ import annotations

import filecmp
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi, hf_hub_download

import mergejob
from mergejob import indexed
from mergejob.fetch import DEFAULT_AHEAD, cache_bytes
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.plan.work import plan_for_job
from tests.support.hubserver.fixtures import SeededHubServer
from tests.support.models import ModelFactory

BASE_SHARD = "30KB"  # the tiny base in several shards, as a 70B base comes in ~30
OUT_SHARD = "30KB"


@pytest.fixture
def hub_base(hub_env: SeededHubServer, models: ModelFactory) -> dict[str, Any]:
    base = models.base(max_shard_size=BASE_SHARD)
    adapter = models.adapter(base, target_modules=["q_proj", "v_proj", "down_proj"])
    api = HfApi(token=hub_env.alice_token)
    api.create_repo("org/base")
    commit = api.upload_folder(repo_id="org/base", folder_path=base).oid
    hub_env.clear_requests()
    shards = CheckpointIndex.from_folder(base).shards
    assert len(shards) >= 4
    return {"base": base, "adapter": adapter, "commit": commit, "shards": shards, "api": api}


def _spec(adapter: Path, out: Path, base: str = "org/base", **engine: Any) -> mergejob.MergeSpec:
    return mergejob.MergeSpec.model_validate(
        {
            "base": base,
            "adapters": [str(adapter)],
            "output": {"dir": str(out), "max_shard_size": OUT_SHARD},
            "engine": engine,
        }
    )


def _served(hub: SeededHubServer) -> dict[str, int]:
    """Bytes served per base shard file by whole-file downloads (status 200: the range reads
    of the headers, 206, are a few kilobytes)."""
    served: dict[str, int] = {}
    for r in hub.requests:
        if (
            r.method == "GET"
            and r.status == 200
            and r.path.endswith(".safetensors")
            and "/org/base/" in r.path
        ):
            name = r.path.rsplit("/", 1)[-1]
            served[name] = served.get(name, 0) + r.bytes_out
    return served


def _weights_and_config(folder: Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.suffix in (".safetensors", ".json") and p.name != "mergejob.yaml"
    )


def test_a_hub_base_merges_shard_by_shard_to_the_bytes_of_a_local_merge(
    hub_env: SeededHubServer, hub_base: dict[str, Any], tmp_path: Path, caplog: Any
) -> None:
    local = mergejob.merge(_spec(hub_base["adapter"], tmp_path / "local", str(hub_base["base"])))
    with caplog.at_level(logging.INFO, logger="mergejob"):
        streamed = mergejob.merge(_spec(hub_base["adapter"], tmp_path / "hub"))
    assert local.output_dir is not None and streamed.output_dir is not None
    downloads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("download ")]
    assert len(downloads) == len(hub_base["shards"])
    served = _served(hub_env)
    assert sorted(served) == sorted(hub_base["shards"])
    for name in hub_base["shards"]:  # each shard once, whole: no snapshot_download of them
        assert served[name] == (hub_base["base"] / name).stat().st_size
    names = _weights_and_config(local.output_dir)
    assert names == _weights_and_config(streamed.output_dir)
    for name in names:
        assert filecmp.cmp(local.output_dir / name, streamed.output_dir / name, shallow=False)
    # The plan of today's way (the whole snapshot downloaded first; its id names the inputs
    # by content), with the shards fetched one file at a time instead.
    from huggingface_hub import snapshot_download

    from mergejob.plan.work import build_plan

    spec = _spec(hub_base["adapter"], tmp_path / "unused")
    whole = snapshot_download("org/base", revision=hub_base["commit"], token=hub_env.alice_token)
    today = build_plan(
        whole, [(hub_base["adapter"], 1.0)], max_shard_size=spec.output.max_shard_bytes
    )
    assert today.plan_id == streamed.engine.extra["plan_id"]
    recipe = (streamed.output_dir / "mergejob.yaml").read_text()
    assert hub_base["commit"] in recipe
    assert all(name in recipe for name in hub_base["shards"])


def test_each_index_downloads_only_the_base_shards_its_share_reads(
    hub_env: SeededHubServer, hub_base: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = _spec(hub_base["adapter"], out)
    count = 2
    prepared = mergejob.prepare(spec)
    plan = plan_for_job(prepared)
    sizes = {name: (hub_base["base"] / name).stat().st_size for name in hub_base["shards"]}
    for index in (1, 0):  # index 0 last: it finalises
        hub_env.clear_requests()
        indexed.run_index(spec, index=index, count=count, poll_seconds=0.1, wait_timeout=60)
        share = indexed.index_shards(plan.shard_sizes(), count, index)
        reads = {
            Path(path).name
            for i in share
            for path in plan.shard_inputs(i).values()
            if Path(path).name in sizes
        }
        served = _served(hub_env)
        if index == 1:
            assert set(served) == reads, (served, reads)
            # Consecutive output shards read the same input shards: an index fetches about
            # its half of the base, plus the shard at the boundary.
            assert sum(served.values()) <= sum(sizes.values()) / 2 + max(sizes.values())
        else:  # index 0 reads its own share; index 1's files are in this machine's cache
            assert set(served) <= reads
        for name, nbytes in served.items():
            assert nbytes == sizes[name], name  # whole files, each once
    local = mergejob.merge(_spec(hub_base["adapter"], tmp_path / "local", str(hub_base["base"])))
    assert local.output_dir is not None
    for name in _weights_and_config(local.output_dir):
        assert filecmp.cmp(local.output_dir / name, out / name, shallow=False), name


def test_a_rerun_downloads_no_complete_shard_twice(
    hub_env: SeededHubServer, hub_base: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = _spec(hub_base["adapter"], out, download_workers=1)
    hub_env.link.download_bytes_per_second = 150_000.0  # slow enough to stop half-way
    failure: list[BaseException] = []

    def first_run() -> None:
        try:
            mergejob.merge(spec)
        except BaseException as exc:  # the cut below
            failure.append(exc)

    # Cut the third shard's download half-way, every try: the job fails there. (Its first
    # two GETs are the range reads of its header, a few hundred bytes each.)
    third = hub_base["shards"][2]
    hub_env.drop(third, method="GET", where="response", after_bytes=5_000, nth=3, times=50)
    thread = threading.Thread(target=first_run)
    thread.start()
    thread.join(timeout=120)
    assert failure, "the first run was expected to fail on the cut download"
    first = _served(hub_env)
    hub_env.clear_requests()
    hub_env.faults.clear()
    hub_env.link.download_bytes_per_second = None
    result = mergejob.merge(spec)
    assert result.output_dir is not None
    again = _served(hub_env)
    sizes = {name: (hub_base["base"] / name).stat().st_size for name in hub_base["shards"]}
    complete_before = {n for n, b in first.items() if b >= sizes[n]}
    assert complete_before, first
    assert not complete_before & set(again), (complete_before, again)
    local = mergejob.merge(_spec(hub_base["adapter"], tmp_path / "local", str(hub_base["base"])))
    assert local.output_dir is not None
    for name in _weights_and_config(local.output_dir):
        assert filecmp.cmp(local.output_dir / name, out / name, shallow=False), name


def test_the_commit_is_pinned_once_though_the_branch_moves_during_the_job(
    hub_env: SeededHubServer, hub_base: dict[str, Any], tmp_path: Path
) -> None:
    api: HfApi = hub_base["api"]
    shards = hub_base["shards"]
    out = tmp_path / "out"
    hub_env.link.download_bytes_per_second = 200_000.0
    result: list[Any] = []
    thread = threading.Thread(
        target=lambda: result.append(
            mergejob.merge(_spec(hub_base["adapter"], out, download_workers=1))
        )
    )
    thread.start()
    # Once the first shard is being served, push a commit that changes the last one.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _served(hub_env):
        time.sleep(0.01)
    assert _served(hub_env), "the job never started downloading"
    changed = bytearray((hub_base["base"] / shards[-1]).read_bytes())
    changed[-1] ^= 0xFF
    moved = api.upload_file(
        path_or_fileobj=bytes(changed), path_in_repo=shards[-1], repo_id="org/base"
    ).oid
    assert moved != hub_base["commit"]
    thread.join(timeout=120)
    assert result, "the merge did not finish"
    hub_env.link.download_bytes_per_second = None
    local = mergejob.merge(_spec(hub_base["adapter"], tmp_path / "local", str(hub_base["base"])))
    assert local.output_dir is not None
    for name in _weights_and_config(local.output_dir):
        assert filecmp.cmp(local.output_dir / name, out / name, shallow=False), name
    recipe = (out / "mergejob.yaml").read_text()
    assert hub_base["commit"] in recipe and moved not in recipe


def test_delete_downloaded_keeps_a_window_and_what_the_cache_held_before(
    hub_env: SeededHubServer, hub_base: dict[str, Any], tmp_path: Path
) -> None:
    shards = hub_base["shards"]
    kept = Path(
        hf_hub_download(
            "org/base", shards[1], revision=hub_base["commit"], token=hub_env.alice_token
        )
    )
    before = cache_bytes("org/base")
    largest = max((hub_base["base"] / n).stat().st_size for n in shards)
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cache_bytes("org/base") - before)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = mergejob.merge(
            _spec(hub_base["adapter"], tmp_path / "out", delete_downloaded=True)
        )
    finally:
        stop.set()
        watcher.join()
    assert result.output_dir is not None
    assert kept.is_file()  # cached before the job: never deleted
    small = sum(p.stat().st_size for p in hub_base["base"].iterdir() if p.suffix != ".safetensors")
    # What this job downloaded is gone again, but for the small files (config, tokenizer).
    assert before <= cache_bytes("org/base") <= before + small
    # The small files (config, tokenizer) stay; the shards: at most the window at once
    # (ahead, plus the one being written), well below the whole base.
    total = sum((hub_base["base"] / n).stat().st_size for n in shards)
    window = (DEFAULT_AHEAD + 1) * largest + small
    assert window < total
    assert peak[0] <= window
    local = mergejob.merge(_spec(hub_base["adapter"], tmp_path / "local", str(hub_base["base"])))
    assert local.output_dir is not None
    for name in _weights_and_config(local.output_dir):
        assert filecmp.cmp(local.output_dir / name, result.output_dir / name, shallow=False)


def test_plan_shows_each_index_s_download_and_the_disk_window(
    hub_env: SeededHubServer, hub_base: dict[str, Any], tmp_path: Path, run_cli: Any
) -> None:
    import json

    code, out, err = run_cli(
        "plan", "--base", "org/base", "--adapters", hub_base["adapter"],
        "--output_dir", tmp_path / "out", "--max-shard-size", OUT_SHARD,
        "--index-count", "2", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    sizes = {n: (hub_base["base"] / n).stat().st_size for n in hub_base["shards"]}
    assert report["streamed"] is True
    assert report["largest_input_shard_bytes"] == max(sizes.values())
    downloads = report["index_downloads"]
    assert len(downloads) == 2
    # Each index its half of the base (plus the shard at the boundary), together all of it.
    assert all(d <= sum(sizes.values()) / 2 + max(sizes.values()) for d in downloads)
    assert sum(downloads) >= sum(sizes.values())
    disk = report["disk"]
    assert 0 < disk["windowed_bytes"] < disk["needed_bytes"]
    assert not _served(hub_env)  # planning downloads no shard

    code, out, _ = run_cli(
        "plan", "--base", "org/base", "--adapters", hub_base["adapter"],
        "--output_dir", tmp_path / "out", "--index-count", "2",
    )  # fmt: skip
    assert code == 0
    assert "index 0/2: downloads" in out and "index 1/2: downloads" in out
    assert "disk with --delete-downloaded and --delete-uploaded" in out


def test_a_rerun_after_a_kill_during_the_merge_downloads_nothing_twice(
    hub_env: SeededHubServer, hub_base: dict[str, Any], tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "mergejob.cli", "merge", "--base", "org/base",
        "--adapters", str(hub_base["adapter"]), "--output_dir", str(out),
        "--max-shard-size", OUT_SHARD, "--download-workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "HF_TOKEN": hub_env.alice_token, "MERGEJOB_TEST_KILL_AT": "shard-done"}
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr  # SIGKILL after the first output shard
    from huggingface_hub import try_to_load_from_cache

    assert _served(hub_env) and not out.exists()
    # Complete in the cache at the kill (a shard still in flight may have to come again: the
    # client completes or refetches a partial download, never uses it half-written).
    cached = {
        name
        for name in hub_base["shards"]
        if isinstance(try_to_load_from_cache("org/base", name, revision=hub_base["commit"]), str)
    }
    assert cached
    hub_env.clear_requests()
    env.pop("MERGEJOB_TEST_KILL_AT")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    again = _served(hub_env)
    assert not cached & set(again), (cached, again)
    local = mergejob.merge(_spec(hub_base["adapter"], tmp_path / "local", str(hub_base["base"])))
    assert local.output_dir is not None
    for name in _weights_and_config(local.output_dir):
        assert filecmp.cmp(local.output_dir / name, out / name, shallow=False), name
