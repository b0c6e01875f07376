"""Inputs on the Hub test server, and the seed-compatible command that publishes their merge.

``seed_hub`` uploads a tiny base (with a model card) and two adapters as org/base, org/a and
org/b; ``merge_args`` is the ``mergejob merge`` command line that merges them into a repo;
``uploaded_twice`` names the blobs the server received more than once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from tests.support.hubserver.fixtures import SeededHubServer

BASE_CARD = "---\nlicense: apache-2.0\ntags:\n- llama\n- tiny-test\n---\n# A tiny base\n"


def seed_hub(hub: SeededHubServer, models: Any, **shape: Any) -> dict[str, Path]:
    """Upload a tiny base (with a card) and two adapters to the server as org/base, org/a, org/b."""
    base = models.base(max_shard_size="60KB", **shape)
    folders = {
        "base": base,
        "a": models.adapter(base, target_modules=["q_proj", "v_proj"]),
        "b": models.adapter(base, target_modules=["o_proj", "up_proj"], seed=3, use_rslora=True),
    }
    api = HfApi(endpoint=hub.url, token=hub.alice_token)
    for name, folder in folders.items():
        api.create_repo(f"org/{name}", exist_ok=True)
        api.upload_folder(repo_id=f"org/{name}", folder_path=folder)
    api.upload_file(
        path_or_fileobj=BASE_CARD.encode(), path_in_repo="README.md", repo_id="org/base"
    )
    hub.clear_requests()
    return folders


def merge_args(*extra: object, out: str = "org/merged") -> list[object]:
    """``mergejob merge`` of org/base with org/a and org/b into ``out``, then ``extra``."""
    return [
        "merge",
        "--base_model_name_or_path", "org/base",
        "--peft_model_paths", "org/a", "org/b",
        "--output_dir", out,
        "--max-shard-size", "40KB",
        *extra,
    ]  # fmt: skip


def uploaded_twice(hub: SeededHubServer) -> list[str]:
    """The blob ids the server received more than once, sorted."""
    oids = hub.uploaded_oids()
    return sorted({oid for oid in oids if oids.count(oid) > 1})
