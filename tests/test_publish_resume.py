"""Resume: the publishing process is killed (SIGKILL) at several points; a rerun completes.

Each test runs `python -m mergejob.cli merge ... --push_to_hub` as a subprocess against a Hub
test server started in this process (throttled, so the kill lands where it should), kills it,
reruns it, and checks from the server's request log that no object was uploaded twice, and
from the repo that every file matches the checksums the recipe recorded.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import HfApi, snapshot_download

from tests.support.hub import merge_args, seed_hub, uploaded_twice
from tests.support.hubserver.fixtures import SeededHubServer

REPO_ROOT = Path(__file__).resolve().parents[1]


def publish_process(hub: SeededHubServer, home: Path, shard_size: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_TOKEN": hub.alice_token,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MERGEJOB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": "60",
        "HF_HUB_DOWNLOAD_TIMEOUT": "60",
    }
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN_PATH"):
        env.pop(name, None)
    args = [str(a) for a in merge_args("--push_to_hub", "--max-shard-size", shard_size)]
    return subprocess.Popen(
        [sys.executable, "-m", "mergejob.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        if process.poll() is not None:
            out = process.stdout.read().decode() if process.stdout else ""
            pytest.fail(f"the publish ended (code {process.returncode}) before {what}:\n{out}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def puts_done(hub: SeededHubServer) -> int:
    return len(hub.uploaded_oids())


def requested(hub: SeededHubServer, fragment: str) -> bool:
    return any(fragment in r.path for r in hub.requests)


def receiving(hub: SeededHubServer, low: int, high: int) -> bool:
    """Whether the server is receiving an upload, with between ``low`` and ``high`` bytes in."""
    sizes = []
    for path in hub.store.incoming.iterdir():
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:  # adopted meanwhile
            continue
    return any(low <= size <= high for size in sizes)


def cut_uploads(hub: SeededHubServer) -> list[Any]:
    return [r for r in hub.requests if r.method == "PUT" and r.status is None]


# Where the first run is killed: the condition to wait for, on a server set up by `prepare`.
KILL_POINTS: dict[str, Callable[[SeededHubServer], bool]] = {
    "after-the-first-shard": lambda hub: puts_done(hub) >= 1,
    # Shards far larger than the socket buffers (a few MB), so that the kill cuts one.
    "in-the-middle-of-a-shard": lambda hub: (
        puts_done(hub) >= 1 and receiving(hub, 1_000_000, 4_000_000)
    ),
    "before-the-commit": lambda hub: requested(hub, "/commit/"),
    # The check of the published files (the base's own paths-info, read when the job starts
    # to stream it, is not this point).
    "after-the-commit": lambda hub: requested(hub, "org/merged/paths-info/"),
}
BIG = {"hidden_size": 1024, "intermediate_size": 2816}  # 50 MB in bfloat16
SLOW = pytest.mark.slow


@pytest.fixture
def small_receive_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the server's TCP receive buffer small (no autotuning to tens of MB on loopback),
    so that a killed client has most of a large shard still unsent."""
    from tests.support.hubserver import server

    setup = server._HubRequestHandler.setup

    def small_setup(self: Any) -> None:
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
        setup(self)

    monkeypatch.setattr(server._HubRequestHandler, "setup", small_setup)


@pytest.mark.usefixtures("small_receive_buffers")
@pytest.mark.parametrize(
    "point",
    [
        pytest.param("after-the-first-shard", marks=SLOW),
        pytest.param("in-the-middle-of-a-shard", marks=SLOW),
        "before-the-commit",
        pytest.param("after-the-commit", marks=SLOW),
    ],
)
def test_a_killed_publish_resumes_without_uploading_anything_twice(
    hub_env: SeededHubServer, models: Any, tmp_path: Path, point: str
) -> None:
    hub = hub_env
    big = point == "in-the-middle-of-a-shard"
    seed_hub(hub, models, **(BIG if big else {}))
    shard_size = "20MB" if big else "20KB"
    home = tmp_path / "publisher-home"
    hub.bytes_per_second = 5_000_000 if big else 50_000  # a shard takes 0.3 s or more
    if point == "before-the-commit":
        hub.fail(r"/commit/", status=503, times=10_000)
    if point == "after-the-commit":
        hub.fail(r"org/merged/paths-info/", status=503, times=10_000)

    first = publish_process(hub, home, shard_size)
    wait_for(lambda: KILL_POINTS[point](hub), first, point)
    first.send_signal(signal.SIGKILL)
    first.wait()
    if big:
        deadline = time.monotonic() + 10
        while not cut_uploads(hub) and time.monotonic() < deadline:
            time.sleep(0.01)  # the server sees the connection end once it has read the rest
        assert cut_uploads(hub), "no upload was cut by the kill"
    before = set(hub.uploaded_oids())
    killed_at = len(hub.requests)
    hub.faults.clear()
    hub.bytes_per_second = None

    second = publish_process(hub, home, shard_size)
    out = second.communicate(timeout=300)[0].decode()
    assert second.returncode == 0, out
    assert hub.alice_token not in out

    after = hub.requests[killed_at:]
    again = [r.oid for r in after if r.oid in before and r.method == "PUT" and r.status == 200]
    assert again == [], f"uploaded again after the kill: {again}"
    assert uploaded_twice(hub) == []
    if point == "after-the-commit":
        assert not [r for r in after if r.method == "PUT"]

    snapshot = Path(snapshot_download("org/merged", token=hub.alice_token))
    recipe = yaml.safe_load((snapshot / "mergejob.yaml").read_text())
    outputs = recipe["recipe"]["outputs"]
    files = {p.name for p in snapshot.iterdir() if p.is_file()} - {
        "mergejob.yaml",
        ".gitattributes",
    }
    assert files == set(outputs)
    for name in files:
        assert hashlib.sha256((snapshot / name).read_bytes()).hexdigest() == outputs[name], name
    assert len([n for n in files if n.endswith(".safetensors")]) >= 2
    api = HfApi(endpoint=hub.url, token=hub.alice_token)
    assert len(api.list_repo_commits("org/merged")) == 2  # initial, ours (never twice)
    work = home / "mergejob" / "publish"
    assert not any(p.is_file() for p in work.rglob("*"))  # the temporary copy is gone
