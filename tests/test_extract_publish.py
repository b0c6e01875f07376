"""Publishing an extracted adapter, against the Hub test server driven by the real
huggingface_hub client: Hub inputs at a commit, the access checked before any download, one
commit holding every file, a card PEFT users recognise, and a rerun that does nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download

import mergejob.publish
from mergejob.publish import RetryPolicy
from tests.support.hub import BASE_CARD
from tests.support.hubserver.fixtures import SeededHubServer

CLI = Callable[..., tuple[int, str, str]]


def tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture
def hub(hub_env: SeededHubServer, models: Any, monkeypatch: pytest.MonkeyPatch) -> SeededHubServer:
    """org/base (with a card) and org/tuned (its fine-tune) on the server; alice's token."""
    base = models.base(max_shard_size="60KB")
    tuned = models.finetune(base, rank=4, norms=True, rows_only=True)
    api = HfApi(endpoint=hub_env.url, token=hub_env.alice_token)
    for name, folder in (("base", base), ("tuned", tuned)):
        api.create_repo(f"org/{name}", exist_ok=True)
        api.upload_folder(repo_id=f"org/{name}", folder_path=folder)
    api.upload_file(
        path_or_fileobj=BASE_CARD.encode(), path_in_repo="README.md", repo_id="org/base"
    )
    hub_env.clear_requests()
    monkeypatch.setenv("HF_TOKEN", hub_env.alice_token)
    monkeypatch.setattr(mergejob.publish, "DEFAULT_RETRY", RetryPolicy(3, 0.05, 0.2))
    return hub_env


def extract_args(*extra: object) -> list[object]:
    return [
        "extract",
        "--base_model_name_or_path", "org/base",
        "--finetuned_model_name_or_path", "org/tuned",
        "--output_dir", "org/extracted",
        "--push_to_hub",
        *extra,
    ]  # fmt: skip


def test_an_extracted_adapter_is_published_like_a_merge(
    hub: SeededHubServer, run_cli: CLI, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    code, out, err = run_cli(*extract_args("--local-dir", local))
    assert code == 0, err
    assert "published to" in out and "org/extracted" in out
    api = HfApi(token=hub.alice_token)
    commits = api.list_repo_commits("org/extracted")
    snapshot = Path(snapshot_download("org/extracted", token=hub.alice_token))
    published = tree(snapshot)
    assert published == tree(local)  # one commit holds the local folder, file for file
    assert {"adapter_config.json", "adapter_model.safetensors", "extraction.json"} <= set(published)
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.base_model == "org/base"
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft"
    assert card.data.license == "apache-2.0"  # the fine-tune's card has none: the base's
    assert card.data.tags == ["mergejob", "lora", "peft", "extracted-lora"]
    assert "| `model.layers.0.self_attn.q_proj` | lora |" in card.text
    recipe = (snapshot / "mergejob.yaml").read_text()
    base_commit = api.model_info("org/base").sha
    assert base_commit is not None and base_commit in recipe  # pinned to what was read
    assert str(tmp_path) not in recipe  # no local path reaches the Hub

    # PEFT loads it from the Hub as it is.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained("org/base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, "org/extracted")
    assert model.peft_config["default"].r == 4

    # The same job again: nothing is extracted, uploaded or committed.
    hub.clear_requests()
    code, out, err = run_cli(*extract_args("--local-dir", local))
    assert code == 0, err
    assert "already holds this extraction" in out
    assert len(api.list_repo_commits("org/extracted")) == len(commits)
    assert hub.uploaded_oids() == []


def test_a_read_only_token_fails_before_anything_is_downloaded(
    hub: SeededHubServer, run_cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", hub.alice_read_token)
    code, _, err = run_cli(*extract_args())
    assert code == 2
    assert "read-only" in err.strip().splitlines()[-1]
    assert not (Path(constants.HF_HUB_CACHE) / "models--org--base").exists()
