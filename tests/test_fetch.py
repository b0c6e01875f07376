"""Base shards fetched one file at a time, in order, with a disk window (mergejob.fetch)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from mergejob.errors import MergeFailedError
from mergejob.fetch import ShardFetcher, cache_bytes
from tests.support.hubserver.fixtures import SeededHubServer
from tests.support.models import ModelFactory

SHARD_BYTES = 300_000
NAMES = [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]


@pytest.fixture
def repo(hub_env: SeededHubServer) -> tuple[str, str, dict[str, bytes]]:
    api = HfApi(token=hub_env.alice_token)
    api.create_repo("org/base")
    blobs = {name: os.urandom(SHARD_BYTES) for name in NAMES}
    folder = Path(hub_env.data_dir).parent / "upload"
    folder.mkdir()
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    (folder / "config.json").write_text("{}")
    commit = api.upload_folder(repo_id="org/base", folder_path=folder).oid
    return "org/base", commit, blobs


def _served(hub: SeededHubServer, name: str) -> int:
    return sum(r.bytes_out for r in hub.requests if r.method == "GET" and name in r.path)


def test_files_arrive_complete_in_the_order_asked(
    hub_env: SeededHubServer, repo: tuple[str, str, dict[str, bytes]]
) -> None:
    repo_id, commit, blobs = repo
    order = list(reversed(NAMES))
    with ShardFetcher(repo_id, commit, order, token=hub_env.alice_token, workers=1) as fetcher:
        for name in order:
            assert fetcher.wait(name, timeout=60).read_bytes() == blobs[name]
    assert fetcher.downloaded_files == len(NAMES)
    gets = [r.path.rsplit("/", 1)[-1] for r in hub_env.requests if r.method == "GET"]
    assert [g for g in gets if g in blobs] == order  # one worker: exactly the order asked


def test_only_the_files_asked_for_are_downloaded(
    hub_env: SeededHubServer, repo: tuple[str, str, dict[str, bytes]]
) -> None:
    repo_id, commit, _ = repo
    mine = NAMES[:2]
    with ShardFetcher(repo_id, commit, mine, token=hub_env.alice_token) as fetcher:
        for name in mine:
            fetcher.wait(name, timeout=60)
    for name in NAMES:
        assert _served(hub_env, name) == (SHARD_BYTES if name in mine else 0), name


def test_the_delete_window_keeps_the_cache_small_and_leaves_what_was_there(
    hub_env: SeededHubServer, repo: tuple[str, str, dict[str, bytes]]
) -> None:
    repo_id, commit, blobs = repo
    kept = hf_hub_download(repo_id, NAMES[2], revision=commit, token=hub_env.alice_token)
    before = cache_bytes(repo_id)
    hub_env.clear_requests()
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cache_bytes(repo_id) - before)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ShardFetcher(
            repo_id,
            commit,
            NAMES,
            token=hub_env.alice_token,
            workers=2,
            delete_after_use=True,
            ahead=2,
        ) as fetcher:
            for name in NAMES:
                assert fetcher.wait(name, timeout=60).read_bytes() == blobs[name]
                time.sleep(0.05)  # a slow consumer: the fetcher must not run ahead
                fetcher.done_with(name)
    finally:
        stop.set()
        watcher.join()
    # At most `ahead` shards downloaded and not yet used up, plus the one being written.
    assert peak[0] <= 3 * SHARD_BYTES
    assert Path(kept).read_bytes() == blobs[NAMES[2]]  # in the cache before: never deleted
    assert cache_bytes(repo_id) == before
    assert _served(hub_env, NAMES[2]) == 0


def test_a_download_that_fails_is_reported_to_the_one_waiting(
    hub_env: SeededHubServer, repo: tuple[str, str, dict[str, bytes]]
) -> None:
    repo_id, commit, _ = repo
    hub_env.fail(NAMES[0], method="GET", status=403, times=10)
    fetcher = ShardFetcher(repo_id, commit, NAMES[:1], token=hub_env.alice_token).start()
    try:
        with pytest.raises(MergeFailedError, match=NAMES[0]):
            fetcher.wait(NAMES[0], timeout=60)
    finally:
        fetcher.close()


def test_remote_headers_give_the_layout_the_downloaded_files_have(
    hub_env: SeededHubServer, models: ModelFactory, tmp_path: Path
) -> None:
    from huggingface_hub import snapshot_download

    from mergejob.io.checkpoint import CheckpointIndex
    from mergejob.io.headers import read_remote_header

    base = models.base(max_shard_size="20KB")
    api = HfApi(token=hub_env.alice_token)
    api.create_repo("org/tiny")
    commit = api.upload_folder(repo_id="org/tiny", folder_path=base).oid
    local = CheckpointIndex.from_folder(base)
    folder = tmp_path / "not-yet-downloaded"
    sizes = {f.path: f.size for f in api.get_paths_info("org/tiny", local.shards, revision=commit)}
    headers = {
        name: read_remote_header(
            "org/tiny",
            name,
            commit=commit,
            file_size=sizes[name],
            local_path=folder / name,
            token=hub_env.alice_token,
        )
        for name in local.shards
    }
    remote = CheckpointIndex.from_headers(folder, headers)
    downloaded = Path(snapshot_download("org/tiny", revision=commit, token=hub_env.alice_token))
    on_disk = CheckpointIndex.from_folder(downloaded)
    assert list(remote.tensors) == list(on_disk.tensors)
    for name, ref in remote.tensors.items():
        other = on_disk.tensors[name]
        assert (ref.dtype, ref.shape, ref.offset, ref.nbytes, ref.shard) == (
            other.dtype,
            other.shape,
            other.offset,
            other.nbytes,
            other.shard,
        )
