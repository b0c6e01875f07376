"""``make demo``: the main job on an embedded default, with nothing to download.

Builds a tiny Llama-shaped bf16 model and two LoRA adapters in ``demo-output/``, starts the
project's Hub test server on a free local port (``tests/hubserver``, the protocol of the real
huggingface_hub client, uploads over the LFS path), merges them with the same pipeline a pod
runs and publishes the result to it, shards going up while the merge runs, then downloads the
repo back with ``snapshot_download`` and checks it against the local copy. ``--no-hub`` (or a
checkout without ``tests/``) writes to a folder only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

DEMO_REPO = "demo/merged-model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergejob.demo")
    parser.add_argument("--dir", default="demo-output", help="work folder (replaced)")
    parser.add_argument("--engine", default=None, help="merge engine (default: the default)")
    parser.add_argument(
        "--no-hub", action="store_true", help="merge into a folder only; start no test Hub"
    )
    args = parser.parse_args(argv)

    work = Path(args.dir).absolute()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    hub = None if args.no_hub else start_test_hub(work)

    import torch

    import mergejob
    from mergejob.fixtures import make_adapter, make_base
    from mergejob.logs import setup_logging

    setup_logging()
    try:
        base = make_base(work / "base", dtype=torch.bfloat16, max_shard_size="100KB")
        adapter_a = make_adapter(base, work / "adapter-attn", target_modules=["q_proj", "v_proj"])
        adapter_b = make_adapter(
            base, work / "adapter-mlp", target_modules=["gate_proj", "up_proj", "down_proj"], seed=2
        )
        spec_data: dict[str, Any] = {
            "base": str(base),
            "adapters": [str(adapter_a), str(adapter_b)],
            "output": {"dir": str(work / "merged"), "max_shard_size": "60KB"},
        }
        if args.engine:
            spec_data["engine"] = {"name": args.engine}
        if hub is not None:
            spec_data["publish"] = {"repo_id": DEMO_REPO}
        spec = mergejob.MergeSpec.model_validate(spec_data)
        result = mergejob.merge(spec)
        print(f"demo: base {base}")
        print(f"demo: adapters {adapter_a}, {adapter_b}")
        print(f"demo: merged model in {result.output_dir}: {', '.join(result.files)}")
        if hub is not None and result.published is not None:
            print(f"demo: published to the local test Hub: {result.published.commit_url}")
            check_published(result.output_dir)
    finally:
        if hub is not None:
            hub.stop()
    return 0


def start_test_hub(work: Path) -> Any:
    """Start the Hub test server for this process and point huggingface_hub at it (the
    environment is set before the client is imported); None when tests/ is not there."""
    try:
        from tests.hubserver.server import HubTestServer
    except ImportError:
        print("demo: tests/hubserver not found; merging into a folder only", file=sys.stderr)
        return None
    hub = HubTestServer(work / "hub")
    token = f"hf_demo_{secrets.token_hex(16)}"  # fresh each run, never printed
    hub.add_user("demo", token=token)
    hub.start()
    os.environ.update(
        {
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(work / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN": token,
        }
    )
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ.pop("HF_TOKEN_PATH", None)
    if "huggingface_hub" in sys.modules:  # imported already: its constants were read
        from huggingface_hub import constants

        constants.ENDPOINT = hub.url
        constants.HF_HUB_DISABLE_XET = True
        constants.HF_HUB_OFFLINE = False
    print(f"demo: Hub test server on {hub.url} (repos in {work / 'hub'})")
    return hub


def check_published(local: Path | None) -> None:
    """Download the demo repo and compare it with the local copy, file by file."""
    from huggingface_hub import ModelCard, snapshot_download

    snapshot = Path(snapshot_download(DEMO_REPO))
    names = sorted(p.name for p in snapshot.iterdir() if p.is_file() and p.name != ".gitattributes")
    if local is not None:
        differ = [n for n in names if _sha256(snapshot / n) != _sha256(local / n)]
        if differ:
            raise SystemExit(f"demo: the Hub copy differs from {local}: {', '.join(differ)}")
        print(f"demo: snapshot_download gives {len(names)} files, each equal to the local copy")
    card = ModelCard.load(snapshot / "README.md")
    print(f"demo: model card metadata: {card.data.to_dict()}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
