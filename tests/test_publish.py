"""Publishing to the Hub, against the Hub test server driven by the real huggingface_hub client.

Every test runs `mergejob merge ... --push_to_hub` in-process on Hub inputs (org/base, org/a,
org/b uploaded to the test server) and looks at the repo through the client (and at the
server's request log).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

import mergejob.publish
from mergejob.publish import RetryPolicy, ShardUploader, check_access
from mergejob.spec import PublishSpec
from tests.support.hub import merge_args, seed_hub, uploaded_twice
from tests.support.hubserver.fixtures import SeededHubServer

CLI = Callable[..., tuple[int, str, str]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture
def hub(hub_env: SeededHubServer, models: Any, monkeypatch: pytest.MonkeyPatch) -> SeededHubServer:
    """The test server with the inputs on it, HF_TOKEN set to alice's, short retry waits."""
    from huggingface_hub import constants

    # A loaded test machine can take more than the client's 10 s to answer a download.
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 60)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 60)
    seed_hub(hub_env, models)
    monkeypatch.setenv("HF_TOKEN", hub_env.alice_token)
    monkeypatch.setattr(mergejob.publish, "DEFAULT_RETRY", RetryPolicy(3, 0.05, 0.2))
    return hub_env


def commits(hub: SeededHubServer, revision: str = "main") -> list[str]:
    api = HfApi(endpoint=hub.url, token=hub.alice_token)
    return [c.commit_id for c in api.list_repo_commits("org/merged", revision=revision)]


# ---------------------------------------------------------------------------------------
# The seed's command, end to end


def test_push_to_hub_publishes_every_file_byte_equal_to_a_local_merge(
    hub: SeededHubServer, run_cli: CLI, tmp_path: Path
) -> None:
    local = tmp_path / "local-copy"
    code, out, err = run_cli(*merge_args("--push_to_hub", "--local-dir", local))
    assert code == 0, err
    assert "published to" in out and "org/merged" in out
    assert uploaded_twice(hub) == []

    plain = tmp_path / "plain"
    code, _, err = run_cli(*merge_args(out=str(plain)))
    assert code == 0, err

    snapshot = Path(snapshot_download("org/merged", token=hub.alice_token))
    published = tree(snapshot)
    assert published == tree(local)  # the repo is the local copy, file for file
    plain_files = tree(plain)
    assert set(published) == set(plain_files)
    shards = [n for n in published if n.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in published
    for name in published:
        if name not in {"README.md", "mergejob.yaml"}:  # these name the repo
            assert published[name] == plain_files[name], name

    card = ModelCard.load(snapshot / "README.md")
    assert card.data.base_model == "org/base"
    assert card.data.base_model_relation == "finetune"
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"  # from the base's card
    assert card.data.tags[:3] == ["mergejob", "lora", "merge"]
    assert {"llama", "tiny-test"} <= set(card.data.tags)
    assert "`org/a`" in card.text and "`org/b`" in card.text and "rsLoRA" in card.text

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(snapshot))
    assert model.config.model_type == "llama"


def test_without_local_dir_the_local_copy_is_temporary(hub: SeededHubServer, run_cli: CLI) -> None:
    from huggingface_hub import constants

    code, out, err = run_cli(*merge_args("--push_to_hub"))
    assert code == 0, err
    assert "written to" not in out
    work = Path(constants.HF_HOME) / "mergejob" / "publish"
    assert not any(p.is_file() for p in work.rglob("*"))
    api = HfApi(token=hub.alice_token)
    assert "mergejob.yaml" in api.list_repo_files("org/merged")


def test_publish_to_a_branch_creates_it_and_leaves_main_alone(
    hub: SeededHubServer, run_cli: CLI
) -> None:
    code, _, err = run_cli(*merge_args("--push_to_hub", "--branch", "dev"))
    assert code == 0, err
    api = HfApi(token=hub.alice_token)
    assert [b.name for b in api.list_repo_refs("org/merged").branches] == ["dev", "main"]
    assert api.list_repo_files("org/merged") == [".gitattributes"]
    assert "config.json" in api.list_repo_files("org/merged", revision="dev")


def test_create_pr_opens_a_pull_request(hub: SeededHubServer, run_cli: CLI) -> None:
    api = HfApi(token=hub.alice_token)
    api.create_repo("org/merged")
    code, out, err = run_cli(*merge_args("--push_to_hub", "--create-pr", "--commit-message", "v2"))
    assert code == 0, err
    assert "/discussions/1" in out
    assert api.list_repo_files("org/merged") == [".gitattributes"]
    files = api.list_repo_files("org/merged", revision="refs/pr/1")
    assert "model.safetensors.index.json" in files and "README.md" in files
    assert api.list_repo_commits("org/merged", revision="refs/pr/1")[0].title == "v2"


def test_a_private_repo_is_not_readable_by_another_user(hub: SeededHubServer, run_cli: CLI) -> None:
    code, _, err = run_cli(*merge_args("--push_to_hub", "--private"))
    assert code == 0, err
    assert HfApi(token=hub.alice_token).model_info("org/merged").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=hub.bob_token).model_info("org/merged")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=hub.bob_read_token).list_repo_files("org/merged")


def test_the_peft_engine_publishes_after_its_merge(hub: SeededHubServer, run_cli: CLI) -> None:
    code, _, err = run_cli(*merge_args("--push_to_hub", "--engine", "peft"))
    assert code == 0, err
    files = HfApi(token=hub.alice_token).list_repo_files("org/merged")
    assert {"config.json", "README.md", "mergejob.yaml"} <= set(files)
    assert any(f.endswith(".safetensors") for f in files)


# ---------------------------------------------------------------------------------------
# Bad tokens fail first, and the token is nowhere


def _no_input_touched(hub: SeededHubServer) -> None:
    touched = [r.path for r in hub.requests if "/org/base" in r.path or "/org/a" in r.path]
    assert touched == []


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("hf_not_a_token_123", "refused the token (401"),
        ("alice_read", "read-only"),
        ("bob", "bob cannot write to 'org'"),
    ],
)
def test_a_bad_token_fails_before_any_download_with_exit_2(
    hub: SeededHubServer,
    run_cli: CLI,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    token: str,
    message: str,
) -> None:
    value = {"alice_read": hub.alice_read_token, "bob": hub.bob_token}.get(token, token)
    monkeypatch.setenv("HF_TOKEN", value)
    local = tmp_path / "local"
    code, out, err = run_cli(*merge_args("--push_to_hub", "--local-dir", local))
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("mergejob: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert value not in out + err
    _no_input_touched(hub)
    assert not local.exists() and not list(tmp_path.glob(".local*"))


def test_no_token_at_all_is_bad_input(hub: SeededHubServer, run_cli: CLI, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_cli(*merge_args("--push_to_hub"))
    assert code == 2
    assert "set HF_TOKEN" in err
    _no_input_touched(hub)


def test_the_token_is_in_no_log_line_error_or_file(
    hub: SeededHubServer, run_cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = hub.alice_token
    local = tmp_path / "local"
    code, out, err = run_cli(*merge_args("-v", "--push_to_hub", "--local-dir", local))
    assert code == 0, err
    # A failing publish: its error text and logs hold no token either.
    hub.fail(r"/commit/", status=500, times=100)
    code2, out2, err2 = run_cli(
        *merge_args("-v", "--push_to_hub", "--branch", "b2", "--local-dir", tmp_path / "l2")
    )
    assert code2 == 1 and "commit" in err2
    assert token not in out + err + out2 + err2
    snapshot = Path(snapshot_download("org/merged", token=token))
    for folder in (local, snapshot, tmp_path):
        for path in folder.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------
# Retries, lost replies, stale files


def test_transient_failures_are_retried_and_nothing_goes_up_twice(
    hub: SeededHubServer, run_cli: CLI
) -> None:
    hub.fail(r"/preupload/", status=503, times=2)
    hub.fail(r"/commit/", status=502, times=1)
    hub.drop(r"^/__lfs/objects/", after_bytes=5_000, method="PUT", times=2)
    code, _, err = run_cli(*merge_args("--push_to_hub"))
    assert code == 0, err
    assert all(f.fired == f.times for f in hub.faults)
    assert uploaded_twice(hub) == []
    assert len(commits(hub)) == 2  # the initial one and ours


def test_a_commit_whose_reply_is_lost_is_not_made_twice(hub: SeededHubServer, run_cli: CLI) -> None:
    hub.drop(r"/commit/", where="response", method="POST")
    code, _, err = run_cli(*merge_args("--push_to_hub"))
    assert code == 0, err
    assert "reply was lost" in err
    posts = [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]
    assert len(posts) == 1
    assert len(commits(hub)) == 2


def test_a_republish_with_fewer_shards_removes_the_stale_ones(
    hub: SeededHubServer, run_cli: CLI
) -> None:
    assert run_cli(*merge_args("--push_to_hub"))[0] == 0
    api = HfApi(token=hub.alice_token)
    before = [f for f in api.list_repo_files("org/merged") if f.endswith(".safetensors")]
    code, _, err = run_cli(*merge_args("--push_to_hub", "--max-shard-size", "1GB"))
    assert code == 0, err
    after = [f for f in api.list_repo_files("org/merged") if f.endswith(".safetensors")]
    assert len(before) > 1 and after == ["model.safetensors"]
    assert "model.safetensors.index.json" not in api.list_repo_files("org/merged")


def test_a_rerun_of_a_finished_publish_uploads_nothing(hub: SeededHubServer, run_cli) -> None:
    assert run_cli(*merge_args("--push_to_hub"))[0] == 0
    hub.clear_requests()
    code, _, err = run_cli(*merge_args("--push_to_hub"))
    assert code == 0, err
    assert hub.uploaded_oids() == []
    # Only the recipe changed (its timings): one small commit, no weight sent again.
    posts = [r for r in hub.requests if "/commit/" in r.path]
    assert len(posts) == 1 and posts[0].bytes_in < 20_000


@pytest.mark.parametrize("local", [False, True], ids=["temporary-copy", "local-dir"])
def test_a_rerun_after_a_failed_publish_merges_nothing_again(
    hub: SeededHubServer,
    run_cli: CLI,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    local: bool,
) -> None:
    from mergejob.engines import worker as stream

    written: list[str] = []
    write_shard = stream.write_shard

    def counting_write_shard(*args: Any, **kwargs: Any) -> Any:
        record = write_shard(*args, **kwargs)
        written.append(record.name)
        return record

    monkeypatch.setattr(stream, "write_shard", counting_write_shard)
    extra = ["--local-dir", tmp_path / "local"] if local else []
    hub.fail(r"/commit/", status=503, times=10_000)  # every attempt of the final commit
    code, _, err = run_cli(*merge_args("--push_to_hub", *extra))
    assert code != 0 and "commit" in err, err
    merged_first = list(written)
    assert len(merged_first) > 2

    hub.faults.clear()
    written.clear()
    code, _, err = run_cli(*merge_args("--push_to_hub", *extra))
    assert code == 0, err
    assert written == [], f"merged again after the failed publish: {written}"
    # The folder was complete (recipe and all): published as it is, nothing merged or written.
    assert "written by an earlier run of this job; merging nothing" in err
    assert uploaded_twice(hub) == []
    if local:  # the finished folder holds no engine records
        assert (
            sorted(p.name for p in (tmp_path / "local").iterdir() if p.name.startswith(".")) == []
        )


# ---------------------------------------------------------------------------------------
# Overlap and disk


def test_shards_go_up_while_the_merge_runs(
    hub: SeededHubServer, run_cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergejob.engines import worker as stream

    written: list[float] = []
    write_shard = stream.write_shard

    def slow_write_shard(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)  # a merge slower than the upload of a shard
        record = write_shard(*args, **kwargs)
        written.append(time.monotonic())
        return record

    monkeypatch.setattr(stream, "write_shard", slow_write_shard)
    code, _, err = run_cli(*merge_args("--push_to_hub"))
    assert code == 0, err
    puts = [r.started for r in hub.requests if r.method == "PUT" and r.status == 200]
    assert len(puts) == len(written) > 2
    # Every shard but the last was on its way up before the merge finished.
    assert sum(start < written[-1] for start in puts) >= len(written) - 1


def test_delete_uploaded_frees_each_shard_and_keeps_the_rest(
    hub: SeededHubServer, run_cli: CLI, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    code, _, err = run_cli(*merge_args("--push_to_hub", "--delete-uploaded", "--local-dir", local))
    assert code == 0, err
    names = {p.name for p in local.iterdir()}
    assert not [n for n in names if n.endswith(".safetensors")]
    assert {"config.json", "model.safetensors.index.json", "README.md", "mergejob.yaml"} <= names
    snapshot = Path(snapshot_download("org/merged", token=hub.alice_token))
    assert len([p for p in snapshot.iterdir() if p.suffix == ".safetensors"]) > 2


def test_the_uploader_frees_disk_blocks_but_keeps_sizes(
    hub: SeededHubServer, tmp_path: Path
) -> None:
    from mergejob.logs import setup_logging

    setup_logging()  # log to this test's stderr
    target = check_access(PublishSpec(repo_id="org/merged"), token=hub.alice_token)
    files = []
    for i in range(3):
        path = tmp_path / f"model-{i}.safetensors"
        path.write_bytes(os.urandom(300_000))
        files.append(path)
    uploader = ShardUploader(
        mergejob.publish.hub_api(hub.alice_token),
        target,
        token=hub.alice_token,
        max_pending=1,
        delete_uploaded=True,
    )
    try:
        for path in files:
            uploader.submit(path)
        done = uploader.wait()
    finally:
        uploader.close()
    assert sorted(done) == [p.name for p in files]
    for path in files:
        assert path.stat().st_size == 300_000
        assert path.stat().st_blocks == 0  # sparse: the bytes are gone
    assert len(hub.uploaded_oids()) == 3


# ---------------------------------------------------------------------------------------
# Flags


def test_publish_flags_without_push_to_hub_are_refused(run_cli: CLI, tmp_path: Path) -> None:
    code, _, err = run_cli(*merge_args("--private", out=str(tmp_path / "out")))
    assert code == 2 and "--private: only when publishing" in err
    code, _, err = run_cli(*merge_args("--local-dir", tmp_path / "x", out=str(tmp_path / "o")))
    assert code == 2 and "--local-dir" in err
    code, _, err = run_cli("merge", "--base", "org/base", "--adapters", "org/a", "--push_to_hub")
    assert code == 2 and "give the Hub repo id as --output_dir" in err
    code, _, err = run_cli(*merge_args("--push_to_hub", out="./not a repo"))
    assert code == 2 and "not a Hub repo id" in err


def test_a_token_in_the_spec_is_refused_without_echoing_it() -> None:
    from mergejob.errors import SpecError
    from mergejob.spec import build_spec

    spec = {"base": "org/base", "adapters": ["org/a"]}
    with pytest.raises(SpecError) as error:
        build_spec({**spec, "publish": {"repo_id": "org/m", "token": "hf_secret_value"}})
    assert "HF_TOKEN" in str(error.value) and "hf_secret_value" not in str(error.value)


def test_write_rights_are_read_from_whoami() -> None:
    from mergejob.publish import _may_write

    me = {"name": "alice", "orgs": [{"name": "org", "roleInOrg": "write"}, {"name": "ro"}]}
    classic = {"role": "write"}
    assert _may_write(me, classic, "alice", "alice/m") is True
    assert _may_write(me, classic, "org", "org/m") is True
    assert _may_write(me, classic, "ro", "ro/m") is None  # role unknown: the probe decides
    assert _may_write(me, classic, "other", "other/m") is False
    scoped = {
        "role": "fineGrained",
        "fineGrained": {"scoped": [{"entity": {"name": "org"}, "permissions": ["repo.write"]}]},
    }
    assert _may_write(me, scoped, "org", "org/m") is True
    assert _may_write(me, scoped, "alice", "alice/m") is None
