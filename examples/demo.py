"""``make demo``: the main job on an embedded default, with nothing to download.

Builds a tiny Llama-shaped bf16 model and two LoRA adapters in ``demo-output/``, starts the
project's Hub test server on a free local port (``tests/support/hubserver``, the protocol of
the real huggingface_hub client, uploads over the LFS path), merges them with the same
pipeline a pod runs and publishes the result to it, shards going up while the merge runs,
then downloads the repo back with ``snapshot_download`` and checks it against the local copy.
``--no-hub`` writes to a folder only.

An example run from a checkout (``python examples/demo.py``): the models and the server come
from the tests' helpers (``tests/support``), which the package never imports. The work folder
is marked as the demo's (a ``.mergejob-demo`` file) and replaced on the next run; a folder
without that mark is refused (exit 2), never deleted.
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

# The checkout's root, so that `tests.support` (and this checkout's mergejob) import when the
# script is run by its path.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMO_REPO = "demo/merged-model"
# Marks a work folder as made by this demo: only such a folder is ever replaced.
MARKER = ".mergejob-demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="examples/demo.py")
    parser.add_argument(
        "--dir",
        default="demo-output",
        help=f"work folder: made, or replaced if an earlier run made it (it holds {MARKER})",
    )
    parser.add_argument("--engine", default=None, help="merge engine (default: the default)")
    parser.add_argument(
        "--no-hub", action="store_true", help="merge into a folder only; start no test Hub"
    )
    args = parser.parse_args(argv)

    work = Path(args.dir).absolute()
    try:
        prepare_work_folder(work)
    except FileExistsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    # The test Hub starts first: its environment must be set before huggingface_hub imports.
    hub = None if args.no_hub else start_test_hub(work)
    try:
        import torch

        import mergejob
        from mergejob.logs import setup_logging
        from tests.support.models import make_adapter, make_base

        setup_logging()
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


def prepare_work_folder(work: Path) -> None:
    """Make ``work`` an empty folder marked as the demo's.

    An existing ``work`` is replaced only when it is a folder an earlier run made (it holds
    the marker file); anything else there (a file, a link, a folder without the marker) is
    left as it is and ``FileExistsError`` says why.
    """
    if work.exists() or work.is_symlink():
        if work.is_symlink() or not (work / MARKER).is_file():
            raise FileExistsError(
                f"{work} exists and is not a folder this demo made (no {MARKER} in it); "
                "name another --dir, or remove it yourself"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by examples/demo.py, which replaces this folder\n")


def start_test_hub(work: Path) -> Any:
    """Start the Hub test server for this process and point huggingface_hub at it (the
    environment is set before the client is imported)."""
    from tests.support.hubserver.server import HubTestServer

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
