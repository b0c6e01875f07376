"""Pytest fixtures for the Hub test server.

`hub_server`: a fresh `SeededHubServer` per test (storage under `tmp_path`), with users:
  - alice: `alice_token` writes `alice/*` and `org/*` (alice is a write member of `org`);
    `alice_read_token` is read-only.
  - bob: `bob_token` writes `bob/*` only (bob is not a member of `org`); `bob_read_token`
    is read-only.
`hub_env`: points the real client at that server (returns it too): `HF_ENDPOINT`,
`HF_HUB_DISABLE_XET=1`, `HF_HOME` under `tmp_path`, telemetry off, offline mode and any
ambient `HF_TOKEN` removed. No token is set: pass one (`token=hub_env.alice_token`).

`huggingface_hub` reads its environment once, at import, so `hub_env` also patches
`huggingface_hub.constants`, the module-level `HfApi` behind `huggingface_hub.create_repo`
and friends, and the `HfApi` that transformers caches.

Use them from a conftest with `pytest_plugins = ["tests.support.hubserver.fixtures"]`, or by
importing `hub_server` and `hub_env` into it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .server import HubTestServer

ORG = "org"


class SeededHubServer(HubTestServer):
    """A `HubTestServer` with the test users alice and bob (see the module docstring)."""

    org = ORG
    alice_token = "hf_test_alice_write"
    alice_read_token = "hf_test_alice_read"
    bob_token = "hf_test_bob_write"
    bob_read_token = "hf_test_bob_read"

    def __init__(self, data_dir: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.add_user("alice", token=self.alice_token, orgs={ORG: "write"})
        self.add_token("alice", self.alice_read_token, role="read")
        self.add_user("bob", token=self.bob_token)
        self.add_token("bob", self.bob_read_token, role="read")


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[SeededHubServer]:
    """A Hub test server of its own for each test, stopped afterwards."""
    with SeededHubServer(tmp_path / "hub-server") as server:
        yield server


_CLEARED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN_PATH",
    "HF_STORED_TOKENS_PATH",
    "HUGGINGFACE_CO_STAGING",
)


@pytest.fixture
def hub_env(
    hub_server: SeededHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> SeededHubServer:
    """Environment (and already-imported client state) pointing at `hub_server`."""
    from huggingface_hub import constants, hf_api

    url = hub_server.url
    hf_home = tmp_path / "hf-home"
    hub_cache = str(hf_home / "hub")
    assets_cache = str(hf_home / "assets")
    for name in _CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "HF_ENDPOINT": url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }.items():
        monkeypatch.setenv(name, value)

    for name, setting in {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(hf_home),
        "default_cache_path": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_HUB_CACHE": hub_cache,
        "default_assets_cache_path": assets_cache,
        "HUGGINGFACE_ASSETS_CACHE": assets_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_XET_CACHE": str(hf_home / "xet"),
    }.items():
        monkeypatch.setattr(constants, name, setting)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        # transformers keeps one HfApi, made with the endpoint of its first call.
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    return hub_server
