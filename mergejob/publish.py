"""Publishing to the Hugging Face Hub: checked first, uploaded during the merge, resumable.

The path of a publish::

    target = check_access(spec.publish, token=token)        # seconds, before any heavy work
    uploader = ShardUploader(hub_api(token), target, token=token)
    merge_with_stream(job, partial, on_shard_done=uploader)  # shards go up as they finish
    publish_folder(partial, target, token=token, uploader=uploader)   # the rest, one commit

:func:`check_access` resolves the token, asks ``whoami``, checks that the token may write to
the repo's namespace, creates the repo (``exist_ok``) and the branch, and probes the commit
rights, so a bad token fails in seconds with exit code 2.

Everything on the wire is huggingface_hub's own machinery: each finished shard is handed to
``HfApi.preupload_lfs_files`` (Xet by default, the LFS batch API where Xet is off) on a
background thread, and the last step is one ``HfApi.create_commit`` holding every file (the
preuploaded shards, the index, config, tokenizer, card and recipe), so the repo never shows a
half-published model. Resuming needs no state of ours: after a crash, the rerun hands the same
files to the client, whose preupload and LFS batch calls skip what the Hub already holds (Xet
deduplicates the same way), and the commit goes through once.

The client retries its own requests on 5xx, 408, 429 and dropped connections, except the
commit POST and repo creation; those are retried here, and a commit whose reply was lost is
recognised by looking at the branch (its files are there) instead of committing twice.

The token is never logged, never put in an exception text, and never written to a file.

Example::

    from mergejob.publish import check_access, publish_folder
    from mergejob.spec import PublishSpec
    target = check_access(PublishSpec(repo_id="org/merged"), token=None)  # HF_TOKEN
    result = publish_folder("merged", target, token=None)
    print(result.commit_url)
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mergejob import logs, settings
from mergejob.errors import InputError, PublishError, TokenError
from mergejob.spec import PublishSpec

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

log = logging.getLogger(__name__)

T = TypeVar("T")

# The statuses the client itself retries on (huggingface_hub.utils._http).
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Organisation roles that may create and write repos (the server has the last word).
WRITE_ROLES = frozenset({"admin", "write", "contributor"})
# Top-level remote files that hold a transformers model's weights: those the new output lacks
# are deleted in the commit, so a republish with fewer shards leaves no stale shard behind
# (other files of the repo, in folders or not, are left alone).
WEIGHT_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
)
# Files at least this large go through the background uploader (one byte bar, in parallel);
# smaller ones ride in the commit.
PREUPLOAD_MIN_BYTES = 1024 * 1024
PROBE_PATH = ".mergejob-write-check"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed Hub call is tried again (on top of the
    client's own retries of single requests)."""

    attempts: int = 4
    base_wait: float = 2.0
    max_wait: float = 60.0

    def wait(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_wait, self.base_wait * 2 ** (attempt - 1))


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class HubTarget:
    """Where a publish goes, as checked by :func:`check_access` (never holds the token)."""

    repo_id: str
    user: str
    endpoint: str
    revision: str | None = None
    create_pr: bool = False
    private: bool = False
    token_source: str = "the token"

    @property
    def url(self) -> str:
        """The repo's web address."""
        return f"{self.endpoint.rstrip('/')}/{self.repo_id}"

    @property
    def display(self) -> str:
        """``org/name``, with ``@branch`` when not the default branch."""
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


@dataclass
class PublishResult:
    """What a publish did: the commit (or pull request) and how much went up."""

    repo_id: str
    url: str
    commit_oid: str
    commit_url: str
    revision: str | None = None
    pr_url: str | None = None
    files: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------
# Token and access


def resolve_token(token: str | None = None) -> str:
    """The token to publish with: ``token``, else ``HF_TOKEN`` / ``HF_TOKEN_PATH``, else the
    huggingface_hub login. No token at all is bad input (exit code 2)."""
    token = token or settings.hub_token()
    if not token:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        raise TokenError(
            "publishing needs a Hub token with write access: set HF_TOKEN, or HF_TOKEN_PATH "
            "to a file holding it (tokens: https://huggingface.co/settings/tokens)"
        )
    return token


def hub_api(token: str) -> HfApi:
    """An ``HfApi`` for ``HF_ENDPOINT`` that sends ``token`` and names mergejob as its user agent."""
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="mergejob", library_version=settings.VERSION)


def check_access(
    spec: PublishSpec,
    *,
    token: str | None = None,
    api: HfApi | None = None,
    retry: RetryPolicy | None = None,
) -> HubTarget:
    """Check, before any heavy work, that the job can publish where ``spec`` says.

    Resolves the token, asks ``whoami`` (a bad token fails here), checks that its user may
    write to the repo's namespace (a fork-style pull request to a repo of someone else is
    allowed with ``create_pr``), creates the repo (``exist_ok``; ``private`` applies to a new
    repo only) and the branch ``spec.revision`` if missing, and probes the commit rights with
    a preupload call that uploads nothing. Raises :class:`TokenError` (exit code 2) for a
    missing, invalid or under-privileged token, :class:`PublishError` when the Hub cannot be
    reached.
    """
    token = resolve_token(token)
    api = api or hub_api(token)
    retry = retry or DEFAULT_RETRY
    source = settings.token_source()
    try:
        me = _retrying("whoami", lambda: api.whoami(token=token), token, retry)
    except Exception as exc:
        if _http_status(exc) == 401:
            raise TokenError(
                f"{source}: the Hub at {api.endpoint} refused the token (401 Unauthorized): "
                "it is invalid, expired or revoked; set HF_TOKEN (or HF_TOKEN_PATH) to a "
                "write token"
            ) from None
        raise PublishError(
            f"cannot reach the Hub at {api.endpoint}: {_describe(exc, token)}"
        ) from None
    user = str(me.get("name") or "")
    access = (me.get("auth") or {}).get("accessToken") or {}
    namespace, name = _split_repo_id(spec.repo_id, user)
    repo_id = f"{namespace}/{name}"
    if access.get("role") == "read":
        raise TokenError(
            f"{source}: the token of {user} is read-only; publishing to {repo_id} needs a "
            "token with write access"
        )
    writable = _may_write(me, access, namespace, repo_id)
    exists = _retrying("repo lookup", lambda: api.repo_exists(repo_id, token=token), token, retry)
    if writable is False and not (spec.create_pr and exists):
        raise TokenError(
            f"{source}: {user} cannot write to {namespace!r} (neither {user}'s namespace nor "
            f"an organisation where {user} may write); publish under {user}/{name}, use "
            f"--create-pr on an existing repo, or use a token with write access to {namespace}"
        )
    target = HubTarget(
        repo_id=repo_id,
        user=user,
        endpoint=api.endpoint,
        revision=spec.revision,
        create_pr=spec.create_pr,
        private=spec.private,
        token_source=source,
    )
    try:
        if writable is not False:
            _retrying(
                "create repo",
                lambda: api.create_repo(repo_id, private=spec.private, exist_ok=True, token=token),
                token,
                retry,
            )
            if exists and spec.private:
                info = api.model_info(repo_id, token=token)
                if not info.private:
                    log.warning(
                        "%s exists and is public; mergejob does not change the visibility of "
                        "an existing repo (private applies to a new one)",
                        repo_id,
                    )
        if spec.revision and not spec.revision.startswith("refs/"):
            _retrying(
                "create branch",
                lambda: api.create_branch(
                    repo_id, branch=str(spec.revision), exist_ok=True, token=token
                ),
                token,
                retry,
            )
        _probe_commit_rights(api, target, token, retry)
    except (TokenError, PublishError):
        raise
    except Exception as exc:
        raise _failure(f"preparing {target.display}", exc, token, target) from None
    log.info(
        "publishing to %s as %s%s%s",
        target.url,
        user,
        f" on branch {spec.revision}" if spec.revision else "",
        " as a pull request" if spec.create_pr else "",
    )
    return target


def _split_repo_id(repo_id: str, user: str) -> tuple[str, str]:
    if "/" in repo_id:
        namespace, name = repo_id.split("/", 1)
        return namespace, name
    return user, repo_id


def _may_write(
    me: Mapping[str, Any], access: Mapping[str, Any], namespace: str, repo_id: str
) -> bool | None:
    """Whether the token may write to ``namespace``: True, False, or None when the token's
    description is one this code does not know (the commit probe then decides)."""
    if access.get("role") == "fineGrained":
        grained = access.get("fineGrained") or {}
        scoped = grained.get("scoped")
        if not isinstance(scoped, list):
            return None
        for entry in scoped:
            entity = entry.get("entity") or {}
            permissions = entry.get("permissions") or []
            if "repo.write" not in permissions:
                continue
            if entity.get("name") in {namespace, repo_id}:
                return True
        return None  # its permission names may differ: the commit probe decides
    if namespace == me.get("name"):
        return True
    for org in me.get("orgs") or []:
        if org.get("name") == namespace:
            role = org.get("roleInOrg")
            return None if role is None else role in WRITE_ROLES
    return False


def _probe_commit_rights(api: HfApi, target: HubTarget, token: str, retry: RetryPolicy) -> None:
    """A preupload call for an empty file: the Hub checks the right to commit to the branch
    (or to open a pull request) and nothing is uploaded."""
    from huggingface_hub import CommitOperationAdd

    probe = CommitOperationAdd(path_in_repo=PROBE_PATH, path_or_fileobj=b"")
    try:
        _retrying(
            "commit rights check",
            lambda: api.preupload_lfs_files(
                target.repo_id,
                additions=[probe],
                token=token,
                revision=target.revision,
                create_pr=target.create_pr,
            ),
            token,
            retry,
        )
    except Exception as exc:
        status = _http_status(exc)
        if status in {401, 403}:
            raise TokenError(
                f"{target.token_source}: {target.user} may not commit to {target.display}"
                f" ({_describe(exc, token)}); use a token with write access to it"
                + ("" if target.create_pr else ", or --create-pr to open a pull request")
            ) from None
        raise


# ---------------------------------------------------------------------------------------
# Where the local copy goes when only the Hub was asked for


def default_local_dir(target: HubTarget) -> Path:
    """The folder that holds the local copy of a publish with no ``output.dir``.

    Under ``$HF_HOME/mergejob/publish/`` (the large cache volume in a pod), named after the
    repo and branch, so a rerun after a crash finds the finished shards and resumes. It is
    removed once the model is on the Hub.
    """
    from huggingface_hub import constants

    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", target.display)
    digest = hashlib.sha256(f"{target.endpoint}|{target.display}".encode()).hexdigest()[:8]
    return Path(constants.HF_HOME) / "mergejob" / "publish" / f"{slug}-{digest}"


# ---------------------------------------------------------------------------------------
# Uploading while the merge runs


class UploadProgress:
    """One bar in bytes for the whole upload on a terminal; a log line per file otherwise."""

    def __init__(self, target: HubTarget) -> None:
        self.target = target
        self.total = 0
        self.done = 0
        self.files_total = 0
        self.files_done = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._bar: Any = None
        if settings.progress_bars_enabled():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=0, unit="B", unit_scale=True, desc=f"upload {target.repo_id}", position=1
            )

    def add(self, nbytes: int) -> None:
        """A file of ``nbytes`` joins the upload."""
        with self._lock:
            self.total += nbytes
            self.files_total += 1
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()

    def advance(self, nbytes: int, name: str) -> None:
        """``name`` (``nbytes``) is on the Hub."""
        with self._lock:
            self.done += nbytes
            self.files_done += 1
            if self._bar is not None:
                self._bar.update(nbytes)
                return
            seconds = max(time.monotonic() - self.started, 1e-6)
            log.info(
                "uploaded %s (%s): %d/%d files, %s of %s, %.1f MB/s",
                name,
                logs.size_text(nbytes),
                self.files_done,
                self.files_total,
                logs.size_text(self.done),
                logs.size_text(self.total),
                self.done / seconds / 1e6,
            )

    def close(self) -> None:
        """Close the bar (a no-op without one)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ShardUploader:
    """Uploads finished files to the Hub in the background while the next ones are merged.

    Pass it as the stream engine's ``on_shard_done``: each call hands the file to
    ``HfApi.preupload_lfs_files`` on one of ``workers`` threads and returns at once, or, when
    ``max_pending`` files are already waiting, blocks until one is up (so the disk holds at
    most that many finished shards besides the one being written, with ``delete_uploaded``).
    With ``delete_uploaded``, a file's disk space is freed once it is on the Hub: its bytes
    are dropped but its size is kept (a sparse file), because the engine checks the size of
    every shard when it finalises the folder; :func:`publish_folder` removes those files
    after the commit.

    A failed upload does not stop the merge: the file is tried again by the final commit.
    """

    def __init__(
        self,
        api: HfApi,
        target: HubTarget,
        *,
        token: str,
        workers: int = 2,
        max_pending: int | None = None,
        delete_uploaded: bool = False,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.api = api
        self.target = target
        self.delete_uploaded = delete_uploaded
        self.retry = retry or DEFAULT_RETRY
        self.progress = UploadProgress(target)
        self._token = token
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="upload")
        self._slots = threading.BoundedSemaphore(max_pending) if max_pending else None
        self._futures: dict[str, Future[CommitOperationAdd]] = {}
        self._hollowed: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._quiet = _client_bars_off()
        self._quiet.__enter__()

    def __call__(self, path: Path) -> None:
        """The engine's ``on_shard_done`` hook."""
        self.submit(path)

    @property
    def submitted(self) -> set[str]:
        """Names of the files handed to the uploader so far."""
        with self._lock:
            return set(self._futures)

    def submit(
        self, path: Path, *, path_in_repo: str | None = None, sha256: str | None = None
    ) -> None:
        """Start uploading ``path`` as ``path_in_repo`` (default: its name, at the top).

        ``sha256`` saves reading the file once more when it is known; by default it is taken
        from the stream engine's record of the shard, if there is one.
        """
        from huggingface_hub import CommitOperationAdd

        path = Path(path)
        name = path_in_repo or path.name
        if self._closed:
            raise PublishError("the uploader is closed")
        with self._lock:
            if name in self._futures:
                return
        operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        digest = sha256 or _recorded_sha256(path)
        if digest:
            operation.upload_info.sha256 = bytes.fromhex(digest)
        if self._slots is not None:
            self._slots.acquire()
        self.progress.add(operation.upload_info.size)
        try:
            future = self._pool.submit(self._upload, path, operation)
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise
        with self._lock:
            self._futures[name] = future

    def _upload(self, path: Path, operation: CommitOperationAdd) -> CommitOperationAdd:
        size = operation.upload_info.size
        try:
            _retrying(
                f"upload of {path.name}",
                lambda: self.api.preupload_lfs_files(
                    self.target.repo_id,
                    additions=[operation],
                    token=self._token,
                    revision=self.target.revision,
                    create_pr=self.target.create_pr,
                    num_threads=1,
                    free_memory=True,
                ),
                self._token,
                self.retry,
            )
            if self.delete_uploaded and operation._upload_mode == "lfs" and operation._is_uploaded:
                _hollow(path, size)
                with self._lock:
                    self._hollowed.add(operation.path_in_repo)
            self.progress.advance(size, operation.path_in_repo)
            settings.kill_point("uploaded-one")
            return operation
        except Exception as exc:
            log.warning(
                "upload of %s failed (%s); the final commit tries it again",
                path.name,
                _describe(exc, self._token),
            )
            raise
        finally:
            if self._slots is not None:
                self._slots.release()

    def wait(self) -> dict[str, CommitOperationAdd]:
        """Wait for every upload; the operations of those that succeeded, by file name."""
        with self._lock:
            futures = dict(self._futures)
        done: dict[str, CommitOperationAdd] = {}
        for name, future in futures.items():
            try:
                done[name] = future.result()
            except Exception:
                continue  # already logged; publish_folder uploads it again
        return done

    @property
    def hollowed(self) -> set[str]:
        """Files whose disk space was freed after their upload (``delete_uploaded``)."""
        with self._lock:
            return set(self._hollowed)

    @property
    def uploaded_bytes(self) -> int:
        """Bytes of the files on the Hub so far (whether sent now or found there)."""
        return self.progress.done

    def close(self, *, wait: bool = True) -> None:
        """Stop: cancel uploads not started, wait for those running (unless ``wait`` is
        false, on the way out of a failure), close the bar."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self.progress.close()
        self._quiet.__exit__(None, None, None)


def _recorded_sha256(path: Path) -> str | None:
    """The sha256 the stream engine recorded for this shard when it wrote it, if any."""
    from mergejob.io.shards import read_record

    record = read_record(path.parent, path.name)
    if record is None:
        return None
    try:
        if path.stat().st_size != record.size:
            return None
    except OSError:
        return None
    return record.sha256


def _hollow(path: Path, size: int) -> None:
    """Free a file's disk blocks but keep its size: truncate to 0, then extend (sparse)."""
    os.truncate(path, 0)
    os.truncate(path, size)


@contextmanager
def _client_bars_off() -> Iterator[None]:
    """huggingface_hub's per-file bars off while ours counts the bytes of the whole upload."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


# ---------------------------------------------------------------------------------------
# The commit


def publish_folder(
    folder: str | os.PathLike[str],
    target: HubTarget,
    *,
    token: str | None = None,
    uploader: ShardUploader | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    delete_uploaded: bool = False,
    workers: int = 2,
    retry: RetryPolicy | None = None,
) -> PublishResult:
    """Upload every file of ``folder`` to ``target`` and make one commit (or pull request).

    Files an ``uploader`` already sent during the merge are not sent again; large files it
    has not seen go through it now (one byte bar, ``workers`` in parallel). The commit holds
    every file, deletes remote weight files the folder no longer has (a republish with fewer
    shards), and is checked afterwards: each file on the branch has the local file's
    checksum. With ``delete_uploaded``, the folder's ``*.safetensors`` files are removed
    after the commit. A rerun after any failure uploads only what the Hub lacks, and commits
    nothing when the branch holds the folder already (a crash came after the commit).
    """
    started = time.monotonic()
    token = resolve_token(token)
    retry = retry or DEFAULT_RETRY
    folder = Path(folder)
    own = uploader is None
    if uploader is None:
        uploader = ShardUploader(
            hub_api(token),
            target,
            token=token,
            workers=workers,
            delete_uploaded=delete_uploaded,
            retry=retry,
        )
    api = uploader.api
    try:
        names = publishable_files(folder)
        if not names:
            raise InputError(f"{folder}: no files to publish (is it the merged model's folder?)")
        # A rerun after a crash that came after the commit: the branch holds this folder
        # already, and a second, identical commit would only clutter its history.
        held = None if target.create_pr else _branch_holds(api, target, folder, names, token)
        if held is not None:
            log.info("%s holds these files already (%s): nothing to commit", target.display, held)
            oid, commit_url, pr_url, deleted = held, f"{target.url}/commit/{held}", None, []
        else:
            submitted = uploader.submitted
            for name in names:
                path = folder / name
                if name not in submitted and (
                    name.endswith(".safetensors") or path.stat().st_size >= PREUPLOAD_MIN_BYTES
                ):
                    uploader.submit(path, path_in_repo=name)
            uploaded = uploader.wait()
            hollowed = uploader.hollowed
            operations: list[CommitOperationAdd | CommitOperationDelete] = []
            for name in names:
                if name in uploaded:
                    operations.append(uploaded[name])
                elif name in hollowed:  # cannot happen: a hollowed file was uploaded
                    raise PublishError(
                        f"{folder / name}: freed after an upload that is not recorded"
                    )
                else:
                    operations.append(_add(folder, name))
            deleted = _stale_weight_files(api, target, names, token, retry)
            operations += _deletions(deleted)
            message = commit_message or f"Upload {folder.name} with mergejob"
            oid, commit_url, pr_url = _commit(
                api, target, operations, message, commit_description or "", token, retry
            )
            settings.kill_point("committed")
            _check_published(api, target, folder, operations, oid, token, retry)
        if delete_uploaded:
            for name in names:
                if name.endswith(".safetensors"):
                    (folder / name).unlink(missing_ok=True)
    except (InputError, PublishError):
        raise
    except Exception as exc:
        raise _failure(f"publishing to {target.display}", exc, token, target) from None
    finally:
        if own:
            uploader.close()
    result = PublishResult(
        repo_id=target.repo_id,
        url=target.url,
        commit_oid=oid,
        commit_url=commit_url,
        revision=target.revision,
        pr_url=pr_url,
        files=names,
        deleted=deleted,
        uploaded_bytes=uploader.uploaded_bytes,
        seconds=time.monotonic() - started,
    )
    where = pr_url or commit_url
    log.info("published %d files to %s: %s", len(names), target.display, where)
    return result


def publishable_files(folder: Path) -> list[str]:
    """The files of an output folder that go to the Hub, as repo paths (hidden files and
    folders, such as the engine's records, stay local)."""
    folder = Path(folder)
    names = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            names.append(relative.as_posix())
    return names


def _add(folder: Path, name: str) -> CommitOperationAdd:
    from huggingface_hub import CommitOperationAdd

    return CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))


def _deletions(paths: list[str]) -> list[CommitOperationDelete]:
    from huggingface_hub import CommitOperationDelete

    return [CommitOperationDelete(path_in_repo=p) for p in paths]


def _stale_weight_files(
    api: HfApi, target: HubTarget, names: list[str], token: str, retry: RetryPolicy
) -> list[str]:
    """Weight files on the branch (the pull request's base) that the new output lacks."""
    revision = target.revision
    remote = _retrying(
        "listing the repo",
        lambda: api.list_repo_files(target.repo_id, revision=revision, token=token),
        token,
        retry,
    )
    return _stale_among(remote, names)


def _stale_among(remote: Iterable[str], names: Iterable[str]) -> list[str]:
    """The top-level weight files of ``remote`` (repo paths) that ``names`` lacks."""
    keep = set(names)
    return sorted(
        path
        for path in remote
        if path not in keep
        and "/" not in path
        and any(fnmatch.fnmatch(path, p) for p in WEIGHT_PATTERNS)
    )


def _branch_holds(
    api: HfApi, target: HubTarget, folder: Path, names: list[str], token: str
) -> str | None:
    """The head commit of the target branch if it holds this folder already, else None:
    every file at its path with the local content (the LFS sha256, or a small file's git
    blob id, as :func:`_landed` compares after a lost reply) and no weight file the folder
    lacks. Sizes first: a file is hashed (or its shard record read) only if all agree.
    Anything the Hub cannot answer (no such branch yet) means: commit."""
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils.sha import git_hash

    from mergejob.recipe import sha256_file

    try:
        head = api.repo_info(target.repo_id, revision=target.revision or "main", token=token).sha
        if not head:
            return None
        tree = api.list_repo_tree(target.repo_id, revision=head, recursive=True, token=token)
        remote = {entry.path: entry for entry in tree if isinstance(entry, RepoFile)}
    except Exception:
        return None
    if _stale_among(remote, names) or not set(names) <= set(remote):
        return None
    if any(remote[name].size != (folder / name).stat().st_size for name in names):
        return None
    for name in names:
        entry, path = remote[name], folder / name
        if entry.lfs is not None:
            if entry.lfs.sha256 != (_recorded_sha256(path) or sha256_file(path)):
                return None
        elif entry.blob_id != git_hash(path.read_bytes()):
            return None
    return str(head)


def _commit(
    api: HfApi,
    target: HubTarget,
    operations: list[Any],
    message: str,
    description: str,
    token: str,
    retry: RetryPolicy,
) -> tuple[str, str, str | None]:
    """``create_commit`` with retries; a lost reply is recognised, not committed twice."""
    attempt = 0
    while True:
        attempt += 1
        try:
            info = api.create_commit(
                target.repo_id,
                operations,
                commit_message=message,
                commit_description=description,
                token=token,
                revision=target.revision,
                create_pr=target.create_pr,
            )
            return str(info.oid), str(info.commit_url), info.pr_url
        except Exception as exc:
            if not _transient(exc) or attempt >= retry.attempts:
                raise
            if target.create_pr and _reached_commit(exc):
                raise PublishError(
                    f"{target.repo_id}: the commit of the pull request failed "
                    f"({_describe(exc, token)}) and may have opened it anyway; check the "
                    "repo's pull requests, then rerun (with --branch refs/pr/N to add to one)"
                ) from None
            if not target.create_pr:
                landed = _landed(api, target, operations, token)
                if landed is not None:
                    log.info("the commit went through although its reply was lost")
                    return landed, f"{target.url}/commit/{landed}", None
            wait = retry.wait(attempt)
            log.warning(
                "commit to %s failed (%s); retry %d/%d in %.0fs",
                target.display,
                _describe(exc, token),
                attempt,
                retry.attempts - 1,
                wait,
            )
            time.sleep(wait)


def _expected_oids(operations: list[Any]) -> dict[str, str] | None:
    """Path -> oid the branch shows for each added file (sha256 for LFS, git blob id else);
    None when an upload mode is not known yet (the commit never got that far)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils.sha import git_hash

    expected: dict[str, str] = {}
    for operation in operations:
        if not isinstance(operation, CommitOperationAdd):
            continue
        mode = operation._upload_mode
        if mode == "lfs":
            expected[operation.path_in_repo] = operation.upload_info.sha256.hex()
        elif mode == "regular":
            with operation.as_file() as handle:
                expected[operation.path_in_repo] = git_hash(handle.read())
        else:
            return None
    return expected


def _remote_oids(api: HfApi, repo_id: str, paths: list[str], revision: str, token: str) -> dict:
    from huggingface_hub.hf_api import RepoFile

    found: dict[str, str] = {}
    for entry in api.get_paths_info(repo_id, paths, revision=revision, token=token):
        if isinstance(entry, RepoFile):
            found[entry.path] = entry.lfs.sha256 if entry.lfs else entry.blob_id
    return found


def _landed(api: HfApi, target: HubTarget, operations: list[Any], token: str) -> str | None:
    """The head commit of the branch if it already holds exactly these files, else None."""
    expected = _expected_oids(operations)
    if not expected:
        return None
    try:
        revision = target.revision or "main"
        head = api.repo_info(target.repo_id, revision=revision, token=token).sha
        if not head:
            return None
        remote = _remote_oids(api, target.repo_id, sorted(expected), head, token)
    except Exception:
        return None
    return str(head) if remote == expected else None


def _check_published(
    api: HfApi,
    target: HubTarget,
    folder: Path,
    operations: list[Any],
    oid: str,
    token: str,
    retry: RetryPolicy,
) -> None:
    """Every file of the commit has the local file's checksum on the Hub."""
    expected = _expected_oids(operations)
    if expected is None:
        return
    remote = _retrying(
        "checking the commit",
        lambda: _remote_oids(api, target.repo_id, sorted(expected), oid, token),
        token,
        retry,
    )
    wrong = sorted(path for path, digest in expected.items() if remote.get(path) != digest)
    if wrong:
        raise PublishError(
            f"{target.repo_id}@{oid[:12]}: {len(wrong)} file(s) differ from {folder} after "
            f"the commit: {', '.join(wrong[:5])}; rerun to publish again"
        )


# ---------------------------------------------------------------------------------------
# Errors and retries


def _retrying(what: str, call: Callable[[], T], token: str, retry: RetryPolicy) -> T:
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:
            if not _transient(exc) or attempt >= retry.attempts:
                raise
            wait = retry.wait(attempt)
            log.warning(
                "%s failed (%s); retry %d/%d in %.0fs",
                what,
                _describe(exc, token),
                attempt,
                retry.attempts - 1,
                wait,
            )
            time.sleep(wait)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of the first Hub error in ``exc``'s chain, if any."""
    for error in _chain(exc):
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _transient(exc: BaseException) -> bool:
    """Worth another try: 5xx/408/429 replies, timeouts and broken connections."""
    import httpx2

    status = _http_status(exc)
    if status is not None:
        return status in RETRY_STATUS
    return any(
        isinstance(
            error,
            httpx2.TimeoutException
            | httpx2.NetworkError
            | httpx2.RemoteProtocolError
            | ConnectionError
            | TimeoutError,
        )
        for error in _chain(exc)
    )


def _reached_commit(exc: BaseException) -> bool:
    """Whether the failure may have happened after the commit request reached the Hub."""
    import httpx2

    return not any(isinstance(error, httpx2.ConnectError) for error in _chain(exc))


def _describe(exc: BaseException, token: str | None) -> str:
    """One line about ``exc`` (status and the Hub's message), with the token blanked out."""
    status = _http_status(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if status is not None and not text.startswith(str(status)):
        text = f"HTTP {status}: {text}"
    elif status is None:
        text = f"{type(exc).__name__}: {text}"
    return scrub(text[:500], token)


def _failure(what: str, exc: BaseException, token: str, target: HubTarget) -> Exception:
    status = _http_status(exc)
    detail = _describe(exc, token)
    if status in {401, 403}:
        return TokenError(
            f"{target.token_source}: {what}: the Hub refused the token ({detail}); use a "
            "token with write access"
        )
    return PublishError(
        f"{what}: {detail}; rerun the same command to resume (files already on the Hub are "
        "not uploaded again)"
    )


def scrub(text: str, token: str | None) -> str:
    """``text`` with ``token`` replaced by ``***``."""
    if token and len(token) >= 4:
        text = text.replace(token, "***")
    return text


def remove_local_copy(folder: Path) -> None:
    """Remove a temporary local copy once it is on the Hub."""
    shutil.rmtree(folder, ignore_errors=True)
