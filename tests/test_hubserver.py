"""The Hub test server, driven only through the real `huggingface_hub` client (and transformers)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.support.hubserver.fixtures import SeededHubServer
from tests.support.hubserver.server import HubTestServer

MiB = 1024 * 1024


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@pytest.fixture
def alice(hub_env: SeededHubServer) -> HfApi:
    return HfApi(token=hub_env.alice_token)


@pytest.fixture
def model_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "llama"}\n',
        "README.md": b"---\nlicense: apache-2.0\n---\n# A model\n",
        "weights/large.dat": os.urandom(11 * MiB),  # > 10 MB: LFS by size
        "small.safetensors": os.urandom(200_000),  # LFS by .gitattributes
    }


# ---------------------------------------------------------------------------- repos and auth


def test_whoami_names_user_orgs_and_token_role(hub_env: SeededHubServer) -> None:
    me = HfApi(token=hub_env.alice_token).whoami()
    assert me["name"] == "alice"
    assert [(o["name"], o["roleInOrg"]) for o in me["orgs"]] == [("org", "write")]
    assert HfApi(token=hub_env.bob_read_token).whoami()["auth"]["accessToken"]["role"] == "read"


def test_create_repo_with_exist_ok_and_conflict(alice: HfApi) -> None:
    url = alice.create_repo("org/model")
    assert url.repo_id == "org/model"
    assert alice.create_repo("org/model", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as conflict:
        alice.create_repo("org/model")
    assert conflict.value.response.status_code == 409
    # A new repo holds the Hub's initial commit with its .gitattributes.
    assert alice.list_repo_files("org/model") == [".gitattributes"]
    assert alice.list_repo_commits("org/model")[0].title == "initial commit"


def test_delete_repo(alice: HfApi) -> None:
    alice.create_repo("alice/doomed")
    alice.delete_repo("alice/doomed")
    assert not alice.repo_exists("alice/doomed")
    with pytest.raises(RepositoryNotFoundError):
        alice.delete_repo("alice/doomed")
    alice.delete_repo("alice/doomed", missing_ok=True)


def test_bad_token_is_401(hub_env: SeededHubServer) -> None:
    HfApi(token=hub_env.alice_token).create_repo("org/public")
    bad = HfApi(token="hf_not_a_token")
    with pytest.raises(HfHubHTTPError) as whoami:
        bad.whoami()
    assert whoami.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as info:
        bad.model_info("org/public")
    assert info.value.response.status_code == 401


def test_bob_cannot_write_to_org_403(hub_env: SeededHubServer, tmp_path: Path) -> None:
    HfApi(token=hub_env.alice_token).create_repo("org/shared")
    bob = HfApi(token=hub_env.bob_token)
    with pytest.raises(HfHubHTTPError) as create:
        bob.create_repo("org/bobs")
    assert create.value.response.status_code == 403
    folder = make_folder(tmp_path / "up", {"a.txt": b"a"})
    with pytest.raises(HfHubHTTPError) as upload:
        bob.upload_folder(repo_id="org/shared", folder_path=folder)
    assert upload.value.response.status_code == 403
    # His own namespace is fine, but not with his read-only token.
    bob.create_repo("bob/mine")
    with pytest.raises(HfHubHTTPError) as read_only:
        HfApi(token=hub_env.bob_read_token).upload_folder(repo_id="bob/mine", folder_path=folder)
    assert read_only.value.response.status_code == 403
    # exist_ok on someone else's existing repo: 403 then found => no error (client logic).
    assert bob.create_repo("org/shared", exist_ok=True).repo_id == "org/shared"


def test_private_repo_is_invisible_to_others(hub_env: SeededHubServer, tmp_path: Path) -> None:
    alice = HfApi(token=hub_env.alice_token)
    alice.create_repo("org/secret", private=True)
    alice.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/secret")
    assert alice.model_info("org/secret").private is True
    assert HfApi(token=hub_env.alice_read_token).list_repo_files("org/secret")
    for api in (HfApi(token=hub_env.bob_token), HfApi(token=False)):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("org/secret")
        with pytest.raises(RepositoryNotFoundError):
            api.hf_hub_download("org/secret", "config.json", cache_dir=tmp_path / "c")
        assert not api.repo_exists("org/secret")


def test_gated_repo_lists_but_does_not_serve_files(hub_env: SeededHubServer) -> None:
    alice = HfApi(token=hub_env.alice_token)
    alice.create_repo("alice/gated")
    alice.upload_file(path_or_fileobj=b"x", path_in_repo="f.txt", repo_id="alice/gated")
    hub_env.set_gated("alice/gated")
    bob = HfApi(token=hub_env.bob_token)
    assert bob.model_info("alice/gated").gated == "auto"
    with pytest.raises(GatedRepoError):
        bob.hf_hub_download("alice/gated", "f.txt")
    hub_env.grant_access("alice/gated", "bob")
    assert Path(bob.hf_hub_download("alice/gated", "f.txt")).read_bytes() == b"x"


# ---------------------------------------------------------------------------- upload and download


def test_upload_folder_sends_large_files_through_lfs(
    hub_env: SeededHubServer, alice: HfApi, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    alice.create_repo("org/model")
    folder = make_folder(tmp_path / "model", model_files)
    info = alice.upload_folder(repo_id="org/model", folder_path=folder, commit_message="Add model")
    assert info.oid == alice.model_info("org/model").sha

    assert sorted(alice.list_repo_files("org/model")) == sorted([".gitattributes", *model_files])
    siblings = {s.rfilename: s for s in alice.model_info("org/model", files_metadata=True).siblings}
    assert siblings["weights/large.dat"].lfs is not None
    assert siblings["weights/large.dat"].lfs.sha256 == sha256_hex(model_files["weights/large.dat"])
    assert siblings["small.safetensors"].lfs is not None
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].size == len(model_files["config.json"])

    paths = [(r.method, r.path) for r in hub_env.requests]
    assert ("POST", "/api/validate-yaml") in paths  # README.md has YAML front matter
    assert sorted(hub_env.uploaded_oids()) == sorted(
        sha256_hex(model_files[n]) for n in ("weights/large.dat", "small.safetensors")
    )

    # Same folder again: nothing changes, nothing is uploaded, no commit is made.
    hub_env.clear_requests()
    again = alice.upload_folder(repo_id="org/model", folder_path=folder)
    assert again.oid == info.oid
    assert hub_env.uploaded_oids() == []
    assert not [r for r in hub_env.requests if r.path.endswith("/commit/main")]


def test_download_by_branch_and_by_commit(
    hub_env: SeededHubServer, alice: HfApi, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    alice.create_repo("org/model")
    v1 = alice.upload_folder(
        repo_id="org/model", folder_path=make_folder(tmp_path / "v1", model_files)
    )
    alice.create_branch("org/model", branch="v1")
    v2 = alice.upload_file(
        path_or_fileobj=b'{"v": 2}', path_in_repo="config.json", repo_id="org/model"
    )
    assert v1.oid != v2.oid

    refs = alice.list_repo_refs("org/model")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": v2.oid, "v1": v1.oid}
    assert alice.revision_exists("org/model", "v1")
    assert not alice.revision_exists("org/model", "v9")

    for revision, expected in (
        ("v1", model_files["config.json"]),
        (v1.oid, model_files["config.json"]),
    ):
        path = hf_hub_download("org/model", "config.json", revision=revision)
        assert Path(path).read_bytes() == expected
    assert Path(hf_hub_download("org/model", "config.json")).read_bytes() == b'{"v": 2}'
    large = hf_hub_download("org/model", "weights/large.dat", revision="v1")
    assert Path(large).read_bytes() == model_files["weights/large.dat"]

    for revision in ("v1", v1.oid):
        snapshot = Path(
            snapshot_download("org/model", revision=revision, local_dir=tmp_path / revision)
        )
        for name, content in model_files.items():
            assert (snapshot / name).read_bytes() == content

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/model", "config.json", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/model", "missing.json")
    assert alice.file_exists("org/model", "weights/large.dat")
    assert not alice.file_exists("org/model", "weights/other.dat")
    infos = alice.get_paths_info("org/model", ["config.json", "weights", "nope"], revision="v1")
    assert [(type(i).__name__, i.path) for i in infos] == [
        ("RepoFile", "config.json"),
        ("RepoFolder", "weights"),
    ]


def test_commit_as_pull_request(hub_env: SeededHubServer, alice: HfApi, tmp_path: Path) -> None:
    alice.create_repo("org/model")
    main_before = alice.model_info("org/model").sha
    pr = alice.create_commit(
        "org/model",
        operations=[CommitOperationAdd("proposal.txt", b"please merge")],
        commit_message="Proposal",
        create_pr=True,
    )
    assert pr.pr_revision == "refs/pr/1"
    assert pr.pr_url is not None and pr.pr_url.endswith("/discussions/1")
    assert alice.model_info("org/model").sha == main_before
    assert "proposal.txt" in alice.list_repo_files("org/model", revision="refs/pr/1")
    assert "proposal.txt" not in alice.list_repo_files("org/model")
    assert Path(
        hf_hub_download("org/model", "proposal.txt", revision="refs/pr/1")
    ).read_bytes() == (b"please merge")
    refs = alice.list_repo_refs("org/model", include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests or []] == ["refs/pr/1"]

    # upload_folder(create_pr=True) opens the next one; so may bob, a reader of org/model.
    folder = make_folder(tmp_path / "f", {"b.txt": b"b"})
    assert alice.upload_folder(repo_id="org/model", folder_path=folder, create_pr=True).pr_num == 2
    bob_pr = HfApi(token=hub_env.bob_token).create_commit(
        "org/model",
        operations=[CommitOperationAdd("c.txt", b"c")],
        commit_message="c",
        create_pr=True,
    )
    assert bob_pr.pr_num == 3
    with pytest.raises(HfHubHTTPError) as read_only:
        HfApi(token=hub_env.bob_read_token).create_commit(
            "org/model", [CommitOperationAdd("d.txt", b"d")], commit_message="d", create_pr=True
        )
    assert read_only.value.response.status_code == 403

    # A draft PR opened first, then pushed to (what the Xet upload pipeline does).
    draft = alice.create_pull_request("org/model", title="Draft")
    assert (draft.num, draft.git_reference, draft.status) == (4, "refs/pr/4", "draft")
    alice.upload_file(
        path_or_fileobj=b"e", path_in_repo="e.txt", repo_id="org/model", revision="refs/pr/4"
    )
    assert "e.txt" in alice.list_repo_files("org/model", revision="refs/pr/4")


def test_parent_commit_guards_against_concurrent_commits(alice: HfApi) -> None:
    alice.create_repo("alice/model")
    base = alice.model_info("alice/model").sha
    assert base is not None
    alice.upload_file(
        path_or_fileobj=b"1", path_in_repo="one.txt", repo_id="alice/model", parent_commit=base
    )
    with pytest.raises(HfHubHTTPError) as stale:
        alice.upload_file(
            path_or_fileobj=b"2", path_in_repo="two.txt", repo_id="alice/model", parent_commit=base
        )
    assert stale.value.response.status_code == 412


def test_tree_pagination_and_multipart_lfs(
    hub_env: SeededHubServer, alice: HfApi, tmp_path: Path
) -> None:
    hub_env.tree_page_size = 2
    hub_env.multipart_chunk_size = 1 * MiB
    content = os.urandom(2 * MiB + 123)
    files = {f"f{i}.txt": b"%d" % i for i in range(5)} | {"model.bin": content}
    alice.create_repo("alice/paged")
    alice.upload_folder(repo_id="alice/paged", folder_path=make_folder(tmp_path / "p", files))
    assert sorted(alice.list_repo_files("alice/paged")) == sorted([".gitattributes", *files])
    assert len([r for r in hub_env.requests if r.path.startswith("/__lfs/parts/")]) == 3
    assert hub_env.uploaded_oids() == [sha256_hex(content)]
    assert Path(hf_hub_download("alice/paged", "model.bin")).read_bytes() == content


def test_range_reads_through_hf_file_system(hub_env: SeededHubServer, alice: HfApi) -> None:
    content = bytes(range(256)) * 4096  # 1 MiB
    alice.create_repo("alice/ranged")
    alice.upload_file(path_or_fileobj=content, path_in_repo="blob.bin", repo_id="alice/ranged")
    with HfFileSystem(token=hub_env.alice_token).open(
        "alice/ranged/blob.bin", "rb", block_size=1000
    ) as f:
        f.seek(300_000)
        assert f.read(500) == content[300_000:300_500]
    partial = [r for r in hub_env.requests if r.method == "GET" and r.status == 206]
    assert partial and all(r.bytes_out < len(content) for r in partial)


# ---------------------------------------------------------------------------- faults


def test_injected_5xx_on_lfs_put_is_retried_by_the_client(
    hub_env: SeededHubServer, alice: HfApi
) -> None:
    alice.create_repo("alice/flaky")
    content = os.urandom(300_000)
    fault = hub_env.fail(r"^/__lfs/objects/", method="PUT", status=503)
    alice.upload_file(path_or_fileobj=content, path_in_repo="w.bin", repo_id="alice/flaky")
    assert fault.fired == 1
    puts = [(r.status, r.fault) for r in hub_env.requests if r.method == "PUT"]
    assert puts == [(503, "status"), (200, None)]
    assert hub_env.uploaded_oids() == [sha256_hex(content)]


def test_injected_5xx_on_commit_is_not_retried_and_a_rerun_uploads_nothing_twice(
    hub_env: SeededHubServer, alice: HfApi, tmp_path: Path
) -> None:
    alice.create_repo("alice/flaky")
    content = os.urandom(300_000)
    folder = make_folder(tmp_path / "f", {"w.bin": content, "config.json": b"{}"})
    hub_env.fail(r"/commit/main$", status=500)
    # create_commit posts the commit once: a 5xx there surfaces to the caller.
    with pytest.raises(HfHubHTTPError) as failed:
        alice.upload_folder(repo_id="alice/flaky", folder_path=folder)
    assert failed.value.response.status_code == 500
    alice.upload_folder(repo_id="alice/flaky", folder_path=folder)
    assert sorted(alice.list_repo_files("alice/flaky")) == [
        ".gitattributes",
        "config.json",
        "w.bin",
    ]
    assert hub_env.uploaded_oids() == [sha256_hex(content)]  # the LFS batch knew the object


def test_connection_dropped_mid_put_is_retried_by_the_client(
    hub_env: SeededHubServer, alice: HfApi, tmp_path: Path
) -> None:
    alice.create_repo("alice/model")
    large = os.urandom(11 * MiB)
    folder = make_folder(tmp_path / "f", {"large.dat": large, "config.json": b"{}"})
    fault = hub_env.drop(r"^/__lfs/objects/", method="PUT", after_bytes=1 * MiB)
    alice.upload_folder(repo_id="alice/model", folder_path=folder)
    assert fault.fired == 1
    puts = [(r.status, r.bytes_in, r.fault) for r in hub_env.requests if r.method == "PUT"]
    assert puts == [(None, 1 * MiB, "drop"), (200, len(large), None)]
    assert hub_env.uploaded_oids() == [sha256_hex(large)]


def test_rerun_after_failed_upload_skips_committed_and_uploaded_files(
    hub_env: SeededHubServer, alice: HfApi, tmp_path: Path
) -> None:
    alice.create_repo("alice/model")
    first = {"a.safetensors": os.urandom(300_000), "config.json": b"{}"}
    folder = make_folder(tmp_path / "f", first)
    committed = alice.upload_folder(repo_id="alice/model", folder_path=folder)

    second = {"b.safetensors": os.urandom(300_000), "c.safetensors": os.urandom(400_000)}
    make_folder(folder, second)
    # The upload URL of b "expires" (S3 answers 403, which the client does not retry).
    hub_env.fail(rf"^/__lfs/objects/{sha256_hex(second['b.safetensors'])}$", status=403)
    with pytest.raises(RuntimeError, match=r"b\.safetensors"):
        alice.upload_folder(repo_id="alice/model", folder_path=folder)
    assert alice.model_info("alice/model").sha == committed.oid

    alice.upload_folder(repo_id="alice/model", folder_path=folder)
    uploads = hub_env.uploaded_oids()
    lfs_files = [first["a.safetensors"], *second.values()]
    assert sorted(uploads) == sorted(sha256_hex(c) for c in lfs_files)
    assert len(uploads) == len(set(uploads))  # no object went up twice
    tree = {f.path: f for f in alice.list_repo_tree("alice/model", expand=True)}
    assert tree["a.safetensors"].last_commit.oid == committed.oid  # type: ignore[union-attr]


def test_lost_commit_reply_then_rerun_is_a_no_op(
    hub_env: SeededHubServer, alice: HfApi, tmp_path: Path
) -> None:
    alice.create_repo("alice/model")
    folder = make_folder(tmp_path / "f", {"w.bin": os.urandom(100_000), "config.json": b"{}"})
    # The commit is applied, then the connection drops before the reply.
    hub_env.drop(r"/commit/main$", after_bytes=10 * MiB)
    with pytest.raises(httpx2.TransportError):
        alice.upload_folder(repo_id="alice/model", folder_path=folder)
    sha = alice.model_info("alice/model").sha
    assert sorted(alice.list_repo_files("alice/model")) == [
        ".gitattributes",
        "config.json",
        "w.bin",
    ]
    assert alice.upload_folder(repo_id="alice/model", folder_path=folder).oid == sha
    assert len(hub_env.uploaded_oids()) == 1


def test_download_resumes_with_range_after_a_drop(hub_env: SeededHubServer, alice: HfApi) -> None:
    content = os.urandom(12 * MiB)
    alice.create_repo("alice/model")
    alice.upload_file(path_or_fileobj=content, path_in_repo="w.bin", repo_id="alice/model")
    hub_env.drop(r"/resolve/", method="GET", where="response", after_bytes=11 * MiB)
    assert Path(hf_hub_download("alice/model", "w.bin")).read_bytes() == content
    # The client writes in 10 MiB chunks: it resumes from the last whole chunk it wrote.
    gets = [(r.status, r.bytes_out) for r in hub_env.requests if r.method == "GET"]
    assert gets == [(None, 11 * MiB), (206, 2 * MiB)]


def test_download_reset_by_peer_is_not_resumed(
    hub_env: SeededHubServer, alice: HfApi, tmp_path: Path
) -> None:
    content = os.urandom(3 * MiB)
    alice.create_repo("alice/model")
    alice.upload_file(path_or_fileobj=content, path_in_repo="w.bin", repo_id="alice/model")
    hub_env.drop(r"/resolve/", method="GET", where="response", after_bytes=MiB, reset=True)
    # huggingface_hub 2.4 resumes only after "peer closed" (RemoteProtocolError), not ECONNRESET.
    with pytest.raises(httpx2.ReadError):
        hf_hub_download("alice/model", "w.bin")
    # A new call starts over: the partial file of the failed call was deleted.
    assert Path(hf_hub_download("alice/model", "w.bin")).read_bytes() == content
    gets = [(r.status, r.bytes_out) for r in hub_env.requests if r.method == "GET"]
    assert gets == [(None, MiB), (200, 3 * MiB)]


def test_slow_link_throttles_uploads_and_downloads(hub_env: SeededHubServer, alice: HfApi) -> None:
    alice.create_repo("alice/slow")
    hub_env.bytes_per_second = 2 * MiB
    content = os.urandom(MiB)
    alice.upload_file(path_or_fileobj=content, path_in_repo="w.bin", repo_id="alice/slow")
    start = time.monotonic()
    hf_hub_download("alice/slow", "w.bin")
    assert time.monotonic() - start >= 0.4
    put = next(r for r in hub_env.requests if r.method == "PUT")
    assert put.seconds >= 0.4


# ---------------------------------------------------------------------------- transformers, CLI


def test_transformers_auto_config_loads_from_the_server(
    hub_env: SeededHubServer, alice: HfApi, tmp_path: Path
) -> None:
    from transformers import AutoConfig, LlamaConfig
    from transformers.utils.peft_utils import find_adapter_config_file

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    config.save_pretrained(tmp_path / "tiny")
    alice.create_repo("org/tiny", private=True)
    alice.upload_folder(repo_id="org/tiny", folder_path=tmp_path / "tiny")

    # The probe transformers makes on every model load: a clean 404 (HEAD, no body) on a
    # kept-alive connection, then the real load on the same connection pool.
    assert find_adapter_config_file("org/tiny", token=hub_env.alice_token) is None
    assert [(r.method, r.status) for r in hub_env.requests if "adapter_config" in r.path] == [
        ("HEAD", 404)
    ]
    loaded = AutoConfig.from_pretrained("org/tiny", token=hub_env.alice_token)
    assert loaded.model_type == "llama" and loaded.hidden_size == 32
    assert HfApi(token=hub_env.alice_read_token).auth_check("org/tiny") is None
    # On a cache of its own (the client serves cached files when the Hub says 404).
    with pytest.raises(OSError, match="org/tiny"):
        AutoConfig.from_pretrained(
            "org/tiny", token=hub_env.bob_token, cache_dir=tmp_path / "bob-cache"
        )


def test_server_restarts_on_its_data(tmp_path: Path) -> None:
    with HubTestServer(tmp_path / "data") as hub:
        hub.add_user("carol", token="hf_carol")
        HfApi(endpoint=hub.url, token="hf_carol").create_repo("carol/kept")
    with HubTestServer(tmp_path / "data") as hub:
        hub.add_user("carol", token="hf_carol")
        assert HfApi(endpoint=hub.url, token="hf_carol").list_repo_files("carol/kept") == [
            ".gitattributes"
        ]


def test_command_line_server(tmp_path: Path) -> None:
    repo_root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.hubserver.server",
            "--data",
            str(tmp_path / "data"),
            "--token",
            "dave:hf_dave:write:team",
        ],
        cwd=repo_root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        api = HfApi(endpoint=url, token="hf_dave")
        assert [o["name"] for o in api.whoami()["orgs"]] == ["team"]
        assert api.create_repo("team/x").repo_id == "team/x"
        assert json.loads((tmp_path / "data" / "state.json").read_text())["repos"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------- the link


def test_the_link_books_each_direction_on_its_own_line_and_both_on_the_shared_one() -> None:
    from tests.support.hubserver.server import Link

    link = Link()
    link.download_bytes_per_second = 1_000_000.0
    link.upload_bytes_per_second = 1_000_000.0
    now = time.monotonic()
    down = link.reserve("down", 500_000)
    up = link.reserve("up", 500_000)
    # Full duplex: an upload does not wait for a download, each takes its own 0.5 s.
    assert down - now == pytest.approx(0.5, abs=0.05)
    assert up - now == pytest.approx(0.5, abs=0.05)
    # A second download queues behind the first on the same line.
    assert link.reserve("down", 500_000) - now == pytest.approx(1.0, abs=0.05)
    # With a shared limit too, both directions queue on it.
    shared = Link()
    shared.bytes_per_second = 1_000_000.0
    now = time.monotonic()
    shared.reserve("down", 500_000)
    assert shared.reserve("up", 500_000) - now == pytest.approx(1.0, abs=0.05)


def test_concurrent_downloads_share_the_download_rate(
    alice: HfApi, hub_env: SeededHubServer
) -> None:
    import threading

    alice.create_repo("alice/link")
    blobs = {f"part-{i}.safetensors": os.urandom(400_000) for i in range(2)}
    for name, data in blobs.items():
        alice.upload_file(path_or_fileobj=data, path_in_repo=name, repo_id="alice/link")
    hub_env.link.download_bytes_per_second = 1_000_000.0
    hub_env.link.upload_bytes_per_second = 50_000.0  # slow uploads do not slow downloads
    hub_env.clear_requests()
    paths: list[str] = []

    def fetch(name: str) -> None:
        paths.append(hf_hub_download("alice/link", name, token=alice.token))

    started = time.monotonic()
    threads = [threading.Thread(target=fetch, args=(name,)) for name in blobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert sorted(Path(p).read_bytes() for p in paths) == sorted(blobs.values())
    # 800 kB through one 1 MB/s line: 0.8 s however many connections carry it, less the
    # last chunk of each (the server books a chunk's time after writing it: 50 kB, 0.05 s).
    assert elapsed >= 0.65
    assert sum(r.bytes_out for r in hub_env.requests if r.method == "GET") >= 800_000
