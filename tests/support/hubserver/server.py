"""A small Hugging Face Hub server for tests, speaking the protocol of `huggingface_hub` 2.4.

It serves the endpoints the real client uses when Xet is off (`HF_HUB_DISABLE_XET=1`): repo
creation and deletion, repo info, refs, trees, paths-info, preupload, the LFS batch API and
its transfers (basic and multipart), NDJSON commits (with pull requests), branches, tags and
`resolve` downloads (HEAD and GET, with Range). Replies carry the headers the client reads
(`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`, `X-Error-Code`, ...), so the
client raises its own exception classes.

Faults can be injected while it runs (see `HubTestServer.fail`, `HubTestServer.drop` and
`HubTestServer.bytes_per_second`) and every request is logged (`HubTestServer.requests`).

Run it by hand (e.g. for `make demo`):

    python -m tests.support.hubserver.server --port 8765 --data /tmp/hub \\
        --token alice:hf_alice:write:org --token bob:hf_bob:read

then point the client at it with `HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import hashlib
import hmac
import json
import mimetypes
import os
import re
import secrets
import signal
import socket
import struct
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Self, cast
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from .store import (
    REPO_TYPES,
    Commit,
    FileEntry,
    HubError,
    HubStore,
    PullRequest,
    Repo,
    RepoType,
)

Role = Literal["read", "write"]

_CHUNK = 64 * 1024
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_OID = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------------------- accounts


@dataclass
class HubAccount:
    """A user; `orgs` maps each organisation the user belongs to to the user's role there."""

    name: str
    orgs: dict[str, Role] = field(default_factory=dict)

    def role_in(self, namespace: str) -> Role | None:
        return "write" if namespace == self.name else self.orgs.get(namespace)


@dataclass(frozen=True)
class HubToken:
    """An access token of `account`; a `read` token never writes, whatever the account may."""

    token: str
    account: HubAccount
    role: Role

    def can_write(self, namespace: str) -> bool:
        return self.role == "write" and self.account.role_in(namespace) == "write"

    def is_member(self, namespace: str) -> bool:
        return self.account.role_in(namespace) is not None


# ---------------------------------------------------------------------------- faults and log


@dataclass
class Fault:
    """One injected fault; `seen` counts matching requests, `fired` how often it struck.

    kind `status`: reply `status` (the request body is read first, so the connection stays
    usable). kind `drop`: cut the connection, `where="request"` after `after_bytes` bytes of
    the request body (if the body is shorter, the request IS handled and its reply is lost),
    `where="response"` after the headers and `after_bytes` bytes of the reply body. The
    connection ends with a FIN (the client sees "peer closed connection"), or with a TCP
    reset (ECONNRESET) when `reset` is set; unread request bytes always make it a reset.
    The fault strikes on the `nth` matching request and the `times - 1` matching ones after.
    """

    path_pattern: str
    kind: Literal["status", "drop"]
    method: str | None = None
    status: int = 500
    after_bytes: int = 0
    where: Literal["request", "response"] = "request"
    reset: bool = False
    nth: int = 1
    times: int = 1
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        return re.search(self.path_pattern, path) is not None


@dataclass
class RequestRecord:
    """One request as the server saw it. `status` is None when the connection was cut."""

    method: str
    path: str
    query: str
    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    oid: str | None = None  # for LFS transfers: the sha256 of the object
    user: str | None = None
    fault: str | None = None  # "status" or "drop" when an injected fault struck
    started: float = 0.0
    seconds: float = 0.0


# ---------------------------------------------------------------------------- plumbing


class _Dropped(Exception):
    """The connection is to be cut (injected fault, or the client went away)."""


class Link:
    """The server's network link, shared by every request in flight: a full-duplex line
    with its own rate each way (`download_bytes_per_second`: replies, `upload_...`:
    request bodies) and, optionally, one rate for both together (`bytes_per_second`: a
    half-duplex line). None: no limit. Settable at any time.

    Each chunk reserves its transmission time on the line (and on the shared total), so
    concurrent transfers divide the rate between them as they would on a real link.
    """

    def __init__(self) -> None:
        self.download_bytes_per_second: float | None = None
        self.upload_bytes_per_second: float | None = None
        self.bytes_per_second: float | None = None
        self._lock = threading.Lock()
        self._free_at = {"down": 0.0, "up": 0.0, "both": 0.0}

    def rate(self, direction: str) -> float | None:
        return (
            self.download_bytes_per_second
            if direction == "down"
            else (self.upload_bytes_per_second)
        )

    def limited(self) -> bool:
        return bool(self.download_bytes_per_second or self.upload_bytes_per_second
                    or self.bytes_per_second)  # fmt: skip

    def reserve(self, direction: str, n: int) -> float:
        """Book ``n`` bytes on the line; returns when (monotonic) they have gone through."""
        now = time.monotonic()
        done = now
        with self._lock:
            for key, rate in ((direction, self.rate(direction)), ("both", self.bytes_per_second)):
                if rate:
                    start = max(now, self._free_at[key])
                    self._free_at[key] = start + n / rate
                    done = max(done, self._free_at[key])
        return done


class _Throttle:
    """Holds one transfer to `bytes_per_second` (None: no limit) and to the server's shared
    `link`, in `direction` ("down": a reply, "up": a request body)."""

    def __init__(
        self, bytes_per_second: float | None, link: Link | None = None, direction: str = "down"
    ) -> None:
        self.rate = bytes_per_second
        self.link = link
        self.direction = direction
        self.start = time.monotonic()
        self.done = 0

    def chunk_size(self) -> int:
        rates = [r for r in (self.rate, *self._link_rates()) if r]
        if not rates:
            return _CHUNK
        return int(max(1024, min(_CHUNK, min(rates) / 20)))

    def _link_rates(self) -> tuple[float | None, float | None]:
        if self.link is None:
            return None, None
        return self.link.rate(self.direction), self.link.bytes_per_second

    def account(self, n: int) -> None:
        self.done += n
        until = time.monotonic()
        if self.rate:
            until = max(until, self.start + self.done / self.rate)
        if self.link is not None and self.link.limited():
            until = max(until, self.link.reserve(self.direction, n))
        ahead = until - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


@dataclass
class _Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None
    offset: int = 0
    length: int = 0

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Reply:
        return cls(
            status,
            {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
            json.dumps(data).encode(),
        )

    @property
    def content_length(self) -> int:
        return self.length if self.file is not None else len(self.body)


@dataclass
class _Exchange:
    """One request in flight: what the routes need, and what the log records."""

    handler: _HubRequestHandler
    method: str
    path: str
    query: dict[str, list[str]]
    record: RequestRecord
    throttle: _Throttle  # the reply (download)
    upload: _Throttle  # the request body
    caller: HubToken | None = None
    drop_request_after: int | None = None
    drop_response_after: int | None = None
    reset: bool = False
    body_done: bool = False

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true", "yes")

    # -- request body

    def body_chunks(self) -> Iterator[bytes]:
        """The request body, chunk by chunk, throttled and cut where a fault says so."""
        if self.body_done:
            return
        self.body_done = True
        for chunk in self._raw_body_chunks():
            limit = self.drop_request_after
            if limit is not None and self.record.bytes_in + len(chunk) >= limit:
                self.record.bytes_in = limit
                self.record.fault = "drop"
                raise _Dropped
            self.record.bytes_in += len(chunk)
            self.upload.account(len(chunk))
            yield chunk

    def _raw_body_chunks(self) -> Iterator[bytes]:
        rfile = self.handler.rfile
        headers = self.handler.headers
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            while True:
                line = rfile.readline(65537)
                if not line:
                    raise _Dropped
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield from self._read_exactly(size)
                rfile.readline(3)
        else:
            yield from self._read_exactly(int(headers.get("Content-Length") or 0))

    def _read_exactly(self, remaining: int) -> Iterator[bytes]:
        while remaining > 0:
            chunk = self.handler.rfile.read(min(remaining, self.upload.chunk_size()))
            if not chunk:
                raise _Dropped
            remaining -= len(chunk)
            yield chunk

    def body(self) -> bytes:
        return b"".join(self.body_chunks())

    def json_body(self) -> Any:
        raw = self.body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def drain(self) -> None:
        for _ in self.body_chunks():
            pass


# ---------------------------------------------------------------------------- the server


class HubTestServer:
    """A Hub test server on a free loopback port, storing its repos under `data_dir`.

    Example:
        >>> with HubTestServer(tmp_path / "hub") as hub:
        ...     hub.add_user("alice", token="hf_alice", orgs={"org": "write"})
        ...     HfApi(endpoint=hub.url, token="hf_alice").create_repo("org/model")

    Faults: `fail(...)` and `drop(...)` add entries to `faults` (a plain list, editable at
    any time); `bytes_per_second` throttles every request and reply body. Log: `requests`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        lfs_threshold: int = 10 * 1024 * 1024,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = HubStore(self.data_dir, lfs_threshold=lfs_threshold)
        self.host = host
        self.port = port
        self.accounts: dict[str, HubAccount] = {}
        self.tokens: dict[str, HubToken] = {}
        # Fault injection, settable at any time.
        self.faults: list[Fault] = []
        self.bytes_per_second: float | None = None  # per request
        # The link every request shares (full duplex: each way its own rate).
        self.link = Link()
        # LFS objects larger than this go through the multipart transfer (None: never).
        self.multipart_chunk_size: int | None = None
        self.tree_page_size = 1000
        self._secret = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self._log: list[RequestRecord] = []
        self._inflight = 0
        self._connections: set[socket.socket] = set()
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubTestServer is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        self._httpd = _HubHTTPServer((self.host, self.port), _HubRequestHandler, self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"hub-test-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.store.clear_incoming()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- accounts

    def add_user(
        self,
        name: str,
        *,
        token: str | None = None,
        role: Role = "write",
        orgs: Mapping[str, Role] | Iterable[str] = (),
    ) -> HubAccount:
        """Add (or extend) a user; `orgs` as names (write role) or {org: role}."""
        account = self.accounts.setdefault(name, HubAccount(name))
        roles: Mapping[str, Role] = (
            orgs if isinstance(orgs, Mapping) else dict.fromkeys(orgs, "write")
        )
        account.orgs.update(roles)
        if token is not None:
            self.add_token(name, token, role=role)
        return account

    def add_token(self, user: str, token: str, *, role: Role = "write") -> HubToken:
        account = self.accounts.setdefault(user, HubAccount(user))
        entry = HubToken(token=token, account=account, role=role)
        self.tokens[token] = entry
        return entry

    # -- repo settings from Python (no endpoint needed in tests)

    def set_gated(
        self, repo_id: str, gated: bool | str = "auto", *, repo_type: RepoType = "model"
    ) -> None:
        with self.store.lock:
            self._repo_or_raise(repo_type, repo_id).gated = gated
            self.store.save()

    def grant_access(self, repo_id: str, user: str, *, repo_type: RepoType = "model") -> None:
        with self.store.lock:
            self._repo_or_raise(repo_type, repo_id).granted.append(user)
            self.store.save()

    def _repo_or_raise(self, repo_type: RepoType, repo_id: str) -> Repo:
        repo = self.store.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id}")
        return repo

    # -- faults

    def fail(
        self,
        path_pattern: str,
        *,
        status: int = 500,
        method: str | None = None,
        nth: int = 1,
        times: int = 1,
    ) -> Fault:
        """Reply `status` to the `nth` request whose path matches (re.search) the pattern."""
        fault = Fault(path_pattern, "status", method=method, status=status, nth=nth, times=times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def drop(
        self,
        path_pattern: str,
        *,
        after_bytes: int = 0,
        where: Literal["request", "response"] = "request",
        reset: bool = False,
        method: str | None = None,
        nth: int = 1,
        times: int = 1,
    ) -> Fault:
        """Cut the connection of the `nth` matching request after `after_bytes` body bytes."""
        fault = Fault(
            path_pattern,
            "drop",
            method=method,
            after_bytes=after_bytes,
            where=where,
            reset=reset,
            nth=nth,
            times=times,
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def _take_faults(self, method: str, path: str) -> list[Fault]:
        struck: list[Fault] = []
        with self._lock:
            for fault in self.faults:
                if not fault.matches(method, path):
                    continue
                fault.seen += 1
                if fault.seen >= fault.nth and fault.fired < fault.times:
                    fault.fired += 1
                    struck.append(fault)
        return struck

    # -- request log

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first. A client can hold a whole reply before
        the server's thread has logged it: requests still in flight get a moment to finish
        (half a second at most; a long transfer is not waited for)."""
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight:
                    break
            time.sleep(0.005)
        with self._lock:
            return list(self._log)

    def _begin(self) -> None:
        with self._lock:
            self._inflight += 1

    def _end(self) -> None:
        with self._lock:
            self._inflight -= 1

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    def uploaded_oids(self) -> list[str]:
        """The oids of LFS objects whose upload completed (one entry per completed upload)."""
        return [
            r.oid
            for r in self.requests
            if r.oid is not None
            and r.status == 200
            and (
                (r.method == "PUT" and r.path.startswith("/__lfs/objects/"))
                or (r.method == "POST" and r.path.startswith("/__lfs/complete/"))
            )
        ]

    def _record(self, record: RequestRecord) -> None:
        record.seconds = time.monotonic() - record.started
        with self._lock:
            self._log.append(record)

    # -- signatures of the LFS transfer URLs (like presigned S3 URLs)

    def _sign(self, *parts: object) -> str:
        message = ":".join(str(p) for p in parts).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def _check_signature(self, ex: _Exchange, *parts: object) -> None:
        if not hmac.compare_digest(ex.param("sig") or "", self._sign(*parts)):
            raise HubError(403, "SignatureDoesNotMatch: the request signature is not valid")

    # ------------------------------------------------------------------------ access rules

    def _authenticate(self, ex: _Exchange) -> None:
        header = ex.handler.headers.get("Authorization")
        if not header:
            return
        scheme, _, token = header.partition(" ")
        entry = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if entry is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        ex.caller = entry
        ex.record.user = entry.account.name

    @staticmethod
    def _can_read(caller: HubToken | None, repo: Repo) -> bool:
        return not repo.private or (caller is not None and caller.is_member(repo.namespace))

    def _readable(self, ex: _Exchange, repo_type: RepoType, repo_id: str) -> Repo:
        repo = self.store.get(repo_type, repo_id)
        if repo is None or not self._can_read(ex.caller, repo):
            raise HubError(
                401 if ex.caller is None else 404,
                f"Repository not found: {repo_type} {repo_id}",
                code="RepoNotFound",
            )
        return repo

    @staticmethod
    def _require_login(ex: _Exchange) -> HubToken:
        if ex.caller is None:
            raise HubError(401, "You must be authenticated to do this")
        return ex.caller

    def _require_write(self, ex: _Exchange, namespace: str, what: str) -> HubToken:
        caller = self._require_login(ex)
        if not caller.can_write(namespace):
            raise HubError(
                403,
                f"You don't have the rights to {what} under the namespace {namespace!r}"
                + (" (read-only token)" if caller.role == "read" else ""),
            )
        return caller

    def _require_commit_rights(
        self, ex: _Exchange, repo: Repo, revision: str, create_pr: bool
    ) -> HubToken:
        """Writers commit anywhere; a reader with a write token may open a PR and push to it."""
        caller = self._require_login(ex)
        if caller.can_write(repo.namespace):
            return caller
        pr = repo.pr_from_ref(revision) if revision.startswith("refs/pr/") else None
        own_pr = pr is not None and pr.author == caller.account.name
        if caller.role == "write" and (create_pr or own_pr):
            return caller
        return self._require_write(ex, repo.namespace, f"write to {repo.id}")

    def _require_file_access(self, ex: _Exchange, repo: Repo) -> None:
        if not repo.gated:
            return
        caller = ex.caller
        if caller is not None and (
            caller.is_member(repo.namespace) or caller.account.name in repo.granted
        ):
            return
        raise HubError(
            401 if caller is None else 403,
            f"Access to {repo.type} {repo.id} is restricted. You must have access to it and"
            " be authenticated to access it. Please log in.",
            code="GatedRepo",
        )

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        with self.store.lock:
            commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    # ------------------------------------------------------------------------ routing

    def _dispatch(self, ex: _Exchange) -> _Reply:
        segments = [unquote(s) for s in ex.path.split("/")[1:]]
        if segments and segments[-1] == "":
            segments.pop()
        if not segments:
            return _Reply.json({"message": "huggingface_hub test server"})
        if segments[0] == "api":
            return self._api(ex, segments[1:])
        if segments[0] == "__lfs":
            return self._lfs_transfer(ex, segments[1:])
        repo_type: RepoType = "model"
        if segments[0] in ("datasets", "spaces"):
            repo_type = cast(RepoType, segments[0][:-1])
            segments = segments[1:]
        lfs_batch = ["info", "lfs", "objects", "batch"]
        if len(segments) == 6 and segments[1].endswith(".git") and segments[2:] == lfs_batch:
            if ex.method != "POST":
                raise HubError(405, "Method not allowed")
            repo_id = f"{segments[0]}/{segments[1].removesuffix('.git')}"
            return self._lfs_batch(ex, repo_type, repo_id)
        if len(segments) >= 5 and segments[2] == "resolve" and ex.method in ("GET", "HEAD"):
            rev, rest = _split_revision(segments[3:])
            return self._resolve_file(ex, repo_type, f"{segments[0]}/{segments[1]}", rev, rest)
        raise HubError(404, f"Not found: {ex.path}")

    def _api(self, ex: _Exchange, seg: list[str]) -> _Reply:
        method = ex.method
        head = seg[0] if seg else ""
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami(ex)
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo(ex)
        if seg == ["repos", "delete"] and method in ("DELETE", "POST"):
            return self._delete_repo(ex)
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(ex)
        if head == "telemetry":
            ex.drain()
            return _Reply.json({})
        if head in ("models", "datasets", "spaces") and len(seg) >= 3:
            repo_type = cast(RepoType, head[:-1])
            repo_id = f"{seg[1]}/{seg[2]}"
            return self._repo_api(ex, repo_type, repo_id, seg[3:])
        raise HubError(404, f"Not found: {ex.path}")

    def _repo_api(self, ex: _Exchange, repo_type: RepoType, repo_id: str, seg: list[str]) -> _Reply:
        method = ex.method
        action = seg[0] if seg else ""
        rest = seg[1:]
        if not seg and method == "GET":
            repo = self._readable(ex, repo_type, repo_id)
            return self._repo_info(ex, repo, self._resolve(repo, repo.default_branch))
        if action == "revision" and rest and method == "GET":
            repo = self._readable(ex, repo_type, repo_id)
            return self._repo_info(ex, repo, self._resolve(repo, "/".join(rest)))
        if action == "preupload" and rest and method == "POST":
            return self._preupload(ex, repo_type, repo_id, "/".join(rest))
        if action == "commit" and rest and method == "POST":
            return self._commit(ex, repo_type, repo_id, "/".join(rest))
        if action == "tree" and rest and method == "GET":
            rev, path = _split_revision(rest)
            return self._tree(ex, repo_type, repo_id, rev, path)
        if action == "paths-info" and rest and method == "POST":
            return self._paths_info(ex, repo_type, repo_id, "/".join(rest))
        if action == "refs" and not rest and method == "GET":
            return self._refs(ex, repo_type, repo_id)
        if action == "commits" and method == "GET":
            return self._commits(ex, repo_type, repo_id, "/".join(rest) or "main")
        if action == "branch" and rest and method in ("POST", "DELETE"):
            return self._branch(ex, repo_type, repo_id, "/".join(rest))
        if action == "tag" and rest and method in ("POST", "DELETE"):
            return self._tag(ex, repo_type, repo_id, "/".join(rest))
        if action == "discussions" and not rest and method == "POST":
            return self._open_discussion(ex, repo_type, repo_id)
        if action == "discussions" and len(rest) == 1 and method == "GET":
            return self._discussion(ex, repo_type, repo_id, rest[0])
        if action == "auth-check" and not rest and method == "GET":
            self._require_file_access(ex, self._readable(ex, repo_type, repo_id))
            return _Reply.json({})
        if action == "settings" and not rest and method == "PUT":
            return self._settings(ex, repo_type, repo_id)
        raise HubError(404, f"Not found: {ex.path}")

    # ------------------------------------------------------------------------ account routes

    def _whoami(self, ex: _Exchange) -> _Reply:
        if ex.caller is None:
            raise HubError(401, "Invalid username or password.")
        account, role = ex.caller.account, ex.caller.role
        return _Reply.json(
            {
                "type": "user",
                "id": hashlib.sha1(account.name.encode()).hexdigest()[:24],
                "name": account.name,
                "fullname": account.name.title(),
                "email": f"{account.name}@example.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [
                    {
                        "type": "org",
                        "id": hashlib.sha1(org.encode()).hexdigest()[:24],
                        "name": org,
                        "fullname": org,
                        "roleInOrg": org_role,
                        "isEnterprise": False,
                    }
                    for org, org_role in sorted(account.orgs.items())
                ],
                "auth": {
                    "type": "access_token",
                    "accessToken": {
                        "displayName": f"{account.name}-{role}",
                        "role": role,
                        "createdAt": "2024-01-01T00:00:00.000Z",
                    },
                },
            }
        )

    def _repo_url(self, repo_type: RepoType, repo_id: str) -> str:
        return f"{self.url}/{repo_id if repo_type == 'model' else f'{repo_type}s/{repo_id}'}"

    def _create_repo(self, ex: _Exchange) -> _Reply:
        body = ex.json_body()
        caller = self._require_login(ex)
        name = str(body.get("name") or "")
        namespace = str(body.get("organization") or caller.account.name)
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not _REPO_NAME.match(name) or ".." in name or name.endswith(".git"):
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        self._require_write(ex, namespace, f"create a {repo_type}")
        visibility = body.get("visibility")
        private = visibility in ("private", "protected") or bool(body.get("private"))
        url = self._repo_url(repo_type, repo_id)
        try:
            self.store.create_repo(repo_type, repo_id, private=private)
        except HubError as e:
            return _Reply.json({"error": e.message, "url": url}, status=e.status)
        return _Reply.json({"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _delete_repo(self, ex: _Exchange) -> _Reply:
        body = ex.json_body()
        caller = self._require_login(ex)
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        repo_id = f"{body.get('organization') or caller.account.name}/{body.get('name')}"
        repo = self._readable(ex, repo_type, repo_id)
        self._require_write(ex, repo.namespace, f"delete {repo_id}")
        self.store.delete_repo(repo)
        return _Reply.json({})

    def _validate_yaml(self, ex: _Exchange) -> _Reply:
        content = str(ex.json_body().get("content", ""))
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and "---" not in (s.strip() for s in lines[1:]):
            return _Reply.json(
                {"errors": [{"message": "YAML metadata is not closed by '---'"}], "warnings": []},
                status=400,
            )
        return _Reply.json({"errors": [], "warnings": []})

    # ------------------------------------------------------------------------ read routes

    def _repo_info(self, ex: _Exchange, repo: Repo, commit: Commit) -> _Reply:
        with_blobs = ex.flag("blobs")
        siblings: list[dict[str, Any]] = []
        for path, entry in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": entry.pointer_size,
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.type}/{repo.id}".encode()).hexdigest()[:24],
            "id": repo.id,
            "author": repo.namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.tree.values()),
        }
        if repo.type == "model":
            info["modelId"] = repo.id
        return _Reply.json(info)

    def _file_json(
        self, repo: Repo, commit: Commit, path: str, entry: FileEntry, expand: bool
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
        if entry.lfs:
            out["lfs"] = {
                "oid": entry.sha256,
                "size": entry.size,
                "pointerSize": entry.pointer_size,
            }
        if expand:
            out["lastCommit"] = _last_commit_json(repo.last_commit_touching(commit, path))
        return out

    def _folder_json(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        prefix = path + "/"
        listing = sorted((p, e.oid) for p, e in commit.tree.items() if p.startswith(prefix))
        tree_id = hashlib.sha1(json.dumps(listing).encode()).hexdigest()
        out: dict[str, Any] = {"type": "directory", "oid": tree_id, "size": 0, "path": path}
        if expand:
            out["lastCommit"] = _last_commit_json(repo.last_commit_touching(commit, path))
        return out

    def _tree(
        self, ex: _Exchange, repo_type: RepoType, repo_id: str, revision: str, base: str
    ) -> _Reply:
        repo = self._readable(ex, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        base = base.strip("/")
        recursive, expand = ex.flag("recursive"), ex.flag("expand")
        prefix = base + "/" if base else ""
        files = [p for p in commit.tree if p.startswith(prefix)]
        if base and not files:
            raise HubError(404, f"{base} does not exist on {revision!r}", code="EntryNotFound")
        folders: set[str] = set()
        shown: list[str] = []
        for path in files:
            parts = path[len(prefix) :].split("/")
            if recursive:
                folders.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
                shown.append(path)
            elif len(parts) == 1:
                shown.append(path)
            else:
                folders.add(prefix + parts[0])
        entries = sorted(
            [(p, True) for p in folders] + [(p, False) for p in shown],
            key=lambda item: (not item[1], item[0]),
        )
        page_size = min(self.tree_page_size, 50) if expand else self.tree_page_size
        start = int(ex.param("cursor") or 0)
        page = entries[start : start + page_size]
        data = [
            self._folder_json(repo, commit, p, expand)
            if is_dir
            else self._file_json(repo, commit, p, commit.tree[p], expand)
            for p, is_dir in page
        ]
        headers: dict[str, str] = {}
        if start + page_size < len(entries):
            params = urlencode(
                {"recursive": recursive, "expand": expand, "cursor": start + page_size}
            )
            headers["Link"] = f'<{self.url}{quote(ex.path)}?{params}>; rel="next"'
        return _Reply.json(data, headers=headers)

    def _paths_info(
        self, ex: _Exchange, repo_type: RepoType, repo_id: str, revision: str
    ) -> _Reply:
        raw = ex.body()
        content_type = ex.handler.headers.get("Content-Type", "")
        if "json" in content_type:
            body = json.loads(raw or b"{}")
            paths = body.get("paths", [])
            paths = [paths] if isinstance(paths, str) else list(paths)
            expand = bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = (form.get("expand") or ["false"])[0].lower() in ("1", "true")
        repo = self._readable(ex, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        out: list[dict[str, Any]] = []
        for path in (str(p).strip("/") for p in paths):
            if path in commit.tree:
                out.append(self._file_json(repo, commit, path, commit.tree[path], expand))
            elif path and any(p.startswith(path + "/") for p in commit.tree):
                out.append(self._folder_json(repo, commit, path, expand))
        return _Reply.json(out)

    def _refs(self, ex: _Exchange, repo_type: RepoType, repo_id: str) -> _Reply:
        repo = self._readable(ex, repo_type, repo_id)
        with self.store.lock:
            data: dict[str, Any] = {
                "branches": [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": cid}
                    for name, cid in sorted(repo.branches.items())
                ],
                "converts": [],
                "tags": [
                    {"name": name, "ref": f"refs/tags/{name}", "targetCommit": cid}
                    for name, cid in sorted(repo.tags.items())
                ],
            }
            if ex.flag("include_prs"):
                data["pullRequests"] = [
                    {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": pr.head}
                    for n, pr in sorted(repo.pulls.items())
                ]
        return _Reply.json(data)

    def _commits(self, ex: _Exchange, repo_type: RepoType, repo_id: str, revision: str) -> _Reply:
        repo = self._readable(ex, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        return _Reply.json(
            [
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author, "avatar": ""}],
                    "date": c.date,
                }
                for c in repo.history(commit)
            ]
        )

    def _resolve_file(
        self, ex: _Exchange, repo_type: RepoType, repo_id: str, revision: str, path: str
    ) -> _Reply:
        repo = self._readable(ex, repo_type, repo_id)
        self._require_file_access(ex, repo)
        commit = self._resolve(repo, revision)
        entry = commit.tree.get(path)
        if entry is None:
            raise HubError(
                404,
                f"Entry not found: {path} at {revision}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.id},
            )
        name = path.rsplit("/", 1)[-1]
        headers = {
            "X-Repo-Commit": commit.id,
            "Accept-Ranges": "bytes",
            "Content-Type": _content_type(name),
            "Content-Disposition": (
                f"inline; filename*=UTF-8''{quote(name)}; filename=\"{_ascii_name(name)}\";"
            ),
        }
        if entry.lfs:
            headers.update(
                {
                    "ETag": f'"{entry.sha256}"',
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": str(entry.size),
                }
            )
        else:
            headers["ETag"] = f'"{entry.oid}"'
        return _file_reply(ex, self.store.object_path(entry.sha256), entry.size, headers)

    # ------------------------------------------------------------------------ write routes

    def _preupload(self, ex: _Exchange, repo_type: RepoType, repo_id: str, revision: str) -> _Reply:
        body = ex.json_body()
        repo = self._readable(ex, repo_type, repo_id)
        create_pr = ex.flag("create_pr")
        self._require_commit_rights(ex, repo, revision, create_pr)
        commit = self._resolve(repo, revision)
        gitignore = body.get("gitIgnore")
        if gitignore is None and ".gitignore" in commit.tree:
            gitignore = self.store.object_path(commit.tree[".gitignore"].sha256).read_text()
        files_out = []
        for item in body.get("files", []):
            path = str(item["path"])
            sample = base64.b64decode(item.get("sample") or "")
            mode = self.store.upload_mode(repo, commit, path, int(item["size"]), sample)
            existing = commit.tree.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.oid
            files_out.append(
                {
                    "path": path,
                    "uploadMode": mode,
                    "shouldIgnore": _is_ignored(gitignore, path),
                    "oid": oid,
                }
            )
        return _Reply.json({"files": files_out, "commitOid": commit.id})

    def _commit(self, ex: _Exchange, repo_type: RepoType, repo_id: str, revision: str) -> _Reply:
        raw = ex.body()
        repo = self._readable(ex, repo_type, repo_id)
        create_pr = ex.flag("create_pr")
        caller = self._require_commit_rights(ex, repo, revision, create_pr)
        try:
            lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid NDJSON commit payload: {e}") from e
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit payload must be its header")
        header = lines[0].get("value") or {}
        title = str(header.get("summary") or "")
        if not title:
            raise HubError(400, "A commit needs a summary")
        commit, pr = self.store.commit(
            repo,
            revision=revision,
            operations=lines[1:],
            title=title,
            message=str(header.get("description") or ""),
            author=caller.account.name,
            parent_commit=header.get("parentCommit"),
            create_pr=create_pr,
        )
        base = self._repo_url(repo.type, repo.id)
        data: dict[str, Any] = {
            "success": True,
            "commitOid": commit.id,
            "commitUrl": f"{base}/commit/{commit.id}",
            "hookOutput": "",
        }
        if create_pr and pr is not None:
            data["pullRequestUrl"] = f"{base}/discussions/{pr.num}"
        return _Reply.json(data)

    def _branch(self, ex: _Exchange, repo_type: RepoType, repo_id: str, branch: str) -> _Reply:
        body = ex.json_body()
        repo = self._readable(ex, repo_type, repo_id)
        self._require_write(ex, repo.namespace, f"write to {repo.id}")
        if ex.method == "DELETE":
            self.store.delete_branch(repo, branch)
        else:
            if not branch or branch.startswith("refs/") or ".." in branch or " " in branch:
                raise HubError(400, f"Invalid branch name: {branch!r}")
            self.store.create_branch(repo, branch, body.get("startingPoint"))
        return _Reply.json({})

    def _tag(self, ex: _Exchange, repo_type: RepoType, repo_id: str, name: str) -> _Reply:
        body = ex.json_body()
        repo = self._readable(ex, repo_type, repo_id)
        self._require_write(ex, repo.namespace, f"write to {repo.id}")
        if ex.method == "DELETE":
            self.store.delete_tag(repo, name)
        else:
            tag = str(body.get("tag") or "")
            if not tag or tag.startswith("refs/"):
                raise HubError(400, f"Invalid tag name: {tag!r}")
            self.store.create_tag(repo, tag, name)
        return _Reply.json({})

    def _open_discussion(self, ex: _Exchange, repo_type: RepoType, repo_id: str) -> _Reply:
        body = ex.json_body()
        repo = self._readable(ex, repo_type, repo_id)
        caller = self._require_login(ex)
        if caller.role != "write":
            raise HubError(403, "A read-only token cannot open a pull request")
        if not body.get("pullRequest"):
            raise HubError(400, "The test server only supports pull requests")
        pr = self.store.open_pull_request(
            repo,
            title=str(body.get("title") or "Pull request"),
            description=str(body.get("description") or ""),
            author=caller.account.name,
        )
        return _Reply.json(
            {"num": pr.num, "url": f"{self._repo_url(repo.type, repo.id)}/discussions/{pr.num}"}
        )

    def _discussion(self, ex: _Exchange, repo_type: RepoType, repo_id: str, num: str) -> _Reply:
        repo = self._readable(ex, repo_type, repo_id)
        pr: PullRequest | None = repo.pulls.get(int(num)) if num.isdigit() else None
        if pr is None:
            raise HubError(404, f"Discussion {num} not found")
        return _Reply.json(
            {
                "num": pr.num,
                "title": pr.title,
                "status": pr.status,
                "isPullRequest": True,
                "createdAt": pr.created_at,
                "author": {"name": pr.author},
                "repo": {"name": repo.id, "type": repo.type},
                "events": [],
                "changes": {"base": pr.base},
                "filesWithConflicts": [],
                "diff": "",
            }
        )

    def _settings(self, ex: _Exchange, repo_type: RepoType, repo_id: str) -> _Reply:
        body = ex.json_body()
        repo = self._readable(ex, repo_type, repo_id)
        self._require_write(ex, repo.namespace, f"change the settings of {repo.id}")
        with self.store.lock:
            if "gated" in body:
                repo.gated = body["gated"]
            if "visibility" in body:
                repo.private = body["visibility"] != "public"
            elif "private" in body:
                repo.private = bool(body["private"])
            self.store.save()
        return _Reply.json({})

    # ------------------------------------------------------------------------ LFS

    def _lfs_batch(self, ex: _Exchange, repo_type: RepoType, repo_id: str) -> _Reply:
        body = ex.json_body()
        repo = self._readable(ex, repo_type, repo_id)
        operation = body.get("operation")
        if operation == "upload":
            # Any reader with a write token may upload objects (for a pull request): rights
            # to the branch are checked by preupload and commit.
            if self._require_login(ex).role != "write":
                raise HubError(403, "A read-only token cannot upload")
        elif operation == "download":
            self._require_file_access(ex, repo)
        else:
            raise HubError(400, f"Unknown LFS operation: {operation!r}")
        objects: list[dict[str, Any]] = []
        multipart = False
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if not _OID.match(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": oid,
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
                continue
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if operation == "download":
                if not self.store.has_object(oid, size):
                    entry["error"] = {"code": 404, "message": "Object does not exist"}
                else:
                    sig = self._sign("get", oid, size)
                    entry["actions"] = {
                        "download": {
                            "href": f"{self.url}/__lfs/objects/{oid}?size={size}&sig={sig}"
                        }
                    }
            elif not self.store.has_object(oid, size):
                entry["actions"] = self._upload_actions(oid, size)
                multipart = multipart or "chunk_size" in entry["actions"]["upload"].get(
                    "header", {}
                )
            objects.append(entry)
        return _Reply.json(
            {
                "transfer": "multipart" if multipart else "basic",
                "objects": objects,
                "hash_algo": "sha256",
            },
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _upload_actions(self, oid: str, size: int) -> dict[str, Any]:
        verify = {"href": f"{self.url}/__lfs/verify", "header": {}}
        chunk = self.multipart_chunk_size
        if chunk is None or size <= chunk:
            sig = self._sign("put", oid, size)
            return {
                "upload": {"href": f"{self.url}/__lfs/objects/{oid}?size={size}&sig={sig}"},
                "verify": verify,
            }
        upload_id = uuid.uuid4().hex
        nparts = -(-size // chunk)
        header: dict[str, str] = {"chunk_size": str(chunk)}
        for n in range(1, nparts + 1):
            sig = self._sign("part", upload_id, n)
            header[f"{n:05d}"] = f"{self.url}/__lfs/parts/{upload_id}/{n}?oid={oid}&sig={sig}"
        sig = self._sign("complete", oid, size, upload_id)
        href = f"{self.url}/__lfs/complete/{oid}?size={size}&upload_id={upload_id}&sig={sig}"
        return {"upload": {"href": href, "header": header}, "verify": verify}

    def _lfs_transfer(self, ex: _Exchange, seg: list[str]) -> _Reply:
        kind = seg[0] if seg else ""
        if kind == "objects" and len(seg) == 2 and ex.method == "PUT":
            return self._lfs_put(ex, seg[1])
        if kind == "objects" and len(seg) == 2 and ex.method in ("GET", "HEAD"):
            oid, size = seg[1], int(ex.param("size") or -1)
            self._check_signature(ex, "get", oid, size)
            if not self.store.has_object(oid, size):
                raise HubError(404, "NoSuchKey")
            return _file_reply(ex, self.store.object_path(oid), size, {"ETag": f'"{oid}"'})
        if kind == "parts" and len(seg) == 3 and ex.method == "PUT":
            return self._lfs_put_part(ex, seg[1], seg[2])
        if kind == "complete" and len(seg) == 2 and ex.method == "POST":
            return self._lfs_complete(ex, seg[1])
        if kind == "verify" and len(seg) == 1 and ex.method == "POST":
            body = ex.json_body()
            oid, size = str(body.get("oid", "")), body.get("size")
            ex.record.oid = oid
            if not self.store.has_object(oid, size if isinstance(size, int) else None):
                raise HubError(404, f"Object {oid} not found or of another size")
            return _Reply.json({})
        raise HubError(404, f"Not found: {ex.path}")

    def _receive(self, ex: _Exchange) -> tuple[Path, str, int]:
        """Stream the request body into a temp file; returns (path, sha256, size)."""
        tmp = self.store.new_incoming()
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("wb") as f:
                for chunk in ex.body_chunks():
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest(), size

    def _lfs_put(self, ex: _Exchange, oid: str) -> _Reply:
        ex.record.oid = oid
        size = int(ex.param("size") or -1)
        self._check_signature(ex, "put", oid, size)
        tmp, sha256, received = self._receive(ex)
        if sha256 != oid or received != size:
            tmp.unlink(missing_ok=True)
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        self.store.adopt(tmp, oid)
        return _Reply(200, {"ETag": f'"{oid}"'})

    def _lfs_put_part(self, ex: _Exchange, upload_id: str, number: str) -> _Reply:
        ex.record.oid = ex.param("oid")
        self._check_signature(ex, "part", upload_id, number)
        tmp, _, _ = self._receive(ex)
        target = self.store.incoming / f"{upload_id}.part{int(number):05d}"
        os.replace(tmp, target)
        etag = hashlib.md5(target.read_bytes()).hexdigest()
        return _Reply(200, {"ETag": f'"{etag}"'})

    def _lfs_complete(self, ex: _Exchange, oid: str) -> _Reply:
        ex.record.oid = oid
        body = ex.json_body()
        size = int(ex.param("size") or -1)
        upload_id = ex.param("upload_id") or ""
        self._check_signature(ex, "complete", oid, size, upload_id)
        parts = sorted(body.get("parts", []), key=lambda p: int(p["partNumber"]))
        tmp = self.store.new_incoming()
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for part in parts:
                path = self.store.incoming / f"{upload_id}.part{int(part['partNumber']):05d}"
                if not path.is_file():
                    tmp.unlink(missing_ok=True)
                    raise HubError(400, f"Part {part['partNumber']} of {oid} was not uploaded")
                data = path.read_bytes()
                if hashlib.md5(data).hexdigest() != str(part.get("etag", "")).strip('"'):
                    tmp.unlink(missing_ok=True)
                    raise HubError(400, f"ETag mismatch for part {part['partNumber']} of {oid}")
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != oid or tmp.stat().st_size != size:
            tmp.unlink(missing_ok=True)
            raise HubError(400, f"Assembled parts do not match oid {oid} and size {size}")
        self.store.adopt(tmp, oid)
        for part in self.store.incoming.glob(f"{upload_id}.part*"):
            part.unlink(missing_ok=True)
        return _Reply.json({})


# ---------------------------------------------------------------------------- HTTP layer


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        hub: HubTestServer,
    ) -> None:
        self.hub = hub
        super().__init__(address, handler)


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-test-server/1.0"
    timeout = 120
    server: _HubHTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request log is `HubTestServer.requests`."""

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        record = RequestRecord(self.command, split.path, split.query, started=time.monotonic())
        ex = _Exchange(
            handler=self,
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            record=record,
            throttle=_Throttle(hub.bytes_per_second, hub.link, "down"),
            upload=_Throttle(hub.bytes_per_second, hub.link, "up"),
        )
        hub._begin()
        try:
            reply = self._reply_for(ex)
            self._send(ex, reply)
        except (_Dropped, OSError):  # a fault, or the client went away
            record.status = None
            self._abort(reset=ex.reset)
        finally:
            hub._record(record)
            hub._end()

    def _reply_for(self, ex: _Exchange) -> _Reply:
        hub = self.server.hub
        status_fault: Fault | None = None
        for fault in hub._take_faults(ex.method, ex.path):
            if fault.kind == "status":
                status_fault = fault
            elif fault.where == "request":
                ex.drop_request_after = fault.after_bytes
                ex.reset = fault.reset
            else:
                ex.drop_response_after = fault.after_bytes
                ex.reset = fault.reset
        if status_fault is not None:
            ex.drain()
            ex.record.fault = "status"
            return _error_reply(
                HubError(status_fault.status, f"Injected fault: HTTP {status_fault.status}")
            )
        try:
            hub._authenticate(ex)
            reply = hub._dispatch(ex)
        except (_Dropped, OSError):
            raise
        except HubError as e:
            reply = _error_reply(e)
        except (KeyError, ValueError, TypeError) as e:
            reply = _error_reply(HubError(400, f"Bad request: {e!r}"))
        except Exception as e:
            traceback.print_exc()
            reply = _error_reply(HubError(500, f"Hub test server error: {e!r}"))
        ex.drain()  # a route may refuse before reading: keep the connection usable
        if ex.drop_request_after is not None:
            # The body was shorter than the cut: the request was handled, its reply is lost.
            ex.record.fault = "drop"
            raise _Dropped
        return reply

    def _send(self, ex: _Exchange, reply: _Reply) -> None:
        ex.record.status = reply.status
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(reply.content_length))
        self.end_headers()
        if ex.method == "HEAD":
            self.wfile.flush()
            if ex.drop_response_after is not None:
                ex.record.fault = "drop"
                raise _Dropped
            return
        for chunk in _reply_chunks(reply, ex.throttle.chunk_size()):
            limit = ex.drop_response_after
            if limit is not None and ex.record.bytes_out + len(chunk) >= limit:
                chunk = chunk[: limit - ex.record.bytes_out]
                self.wfile.write(chunk)
                self.wfile.flush()
                ex.record.bytes_out += len(chunk)
                ex.record.fault = "drop"
                raise _Dropped
            self.wfile.write(chunk)
            ex.record.bytes_out += len(chunk)
            ex.throttle.account(len(chunk))
        self.wfile.flush()
        if ex.drop_response_after is not None:
            ex.record.fault = "drop"
            raise _Dropped

    def _abort(self, *, reset: bool) -> None:
        """End the connection now: FIN, or RST when `reset` (like a failing network)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        if reset:
            # Close the descriptor now with a zero linger: RST, and no FIN before it (a
            # shutdown() would send one, and the client could read EOF before the reset).
            with contextlib.suppress(OSError):
                linger = struct.pack("ii", 1, 0)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            for stream in (self.wfile, self.rfile):
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
            self.connection.close()
            return
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------- helpers


def _error_reply(error: HubError) -> _Reply:
    headers = {"X-Error-Message": _header_safe(error.message), **error.headers}
    if error.code is not None:
        headers["X-Error-Code"] = error.code
    return _Reply.json({"error": error.message}, status=error.status, headers=headers)


def _file_reply(ex: _Exchange, path: Path, size: int, headers: dict[str, str]) -> _Reply:
    """The whole file, or the byte range the `Range` header asks for."""
    spec = ex.handler.headers.get("Range")
    byte_range = _parse_range(spec, size) if spec else None
    if byte_range is None:
        return _Reply(200, headers, file=path, offset=0, length=size)
    if byte_range == "unsatisfiable":
        raise HubError(
            416, f"Range {spec} not satisfiable", headers={"Content-Range": f"bytes */{size}"}
        )
    start, end = byte_range
    headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
    return _Reply(206, headers, file=path, offset=start, length=end - start + 1)


def _parse_range(spec: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """One `bytes=` range as (first, last), inclusive; None to serve the whole file."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", spec)
    if match is None:
        return None  # several ranges, or garbage: ignored, as RFC 9110 allows
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    if start >= size:
        return "unsatisfiable"
    end = min(int(last), size - 1) if last else size - 1
    if end < start:
        return None
    return start, end


def _reply_chunks(reply: _Reply, chunk_size: int) -> Iterator[bytes]:
    if reply.file is None:
        for i in range(0, len(reply.body), chunk_size):
            yield reply.body[i : i + chunk_size]
        return
    with reply.file.open("rb") as f:
        yield from _read_range(f, reply.offset, reply.length, chunk_size)


def _read_range(f: BinaryIO, offset: int, length: int, chunk_size: int) -> Iterator[bytes]:
    f.seek(offset)
    remaining = length
    while remaining > 0:
        chunk = f.read(min(chunk_size, remaining))
        if not chunk:
            return
        remaining -= len(chunk)
        yield chunk


def _split_revision(segments: list[str]) -> tuple[str, str]:
    """(revision, path) from URL segments; an unquoted `refs/pr/N` takes three segments."""
    if len(segments) >= 3 and segments[0] == "refs" and segments[1] in ("pr", "heads", "tags"):
        return "/".join(segments[:3]), "/".join(segments[3:])
    return segments[0], "/".join(segments[1:])


def _last_commit_json(commit: Commit) -> dict[str, str]:
    return {"id": commit.id, "title": commit.title, "date": commit.date}


def _is_ignored(gitignore: str | None, path: str) -> bool:
    """A small subset of .gitignore: globs on the path or its name, `dir/` for folders."""
    if not gitignore:
        return False
    name = path.rsplit("/", 1)[-1]
    for raw in gitignore.splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith(("#", "!")):
            continue
        if pattern.endswith("/"):
            folder = pattern.strip("/")
            if path.startswith(folder + "/") or f"/{folder}/" in f"/{path}":
                return True
            continue
        target = path if "/" in pattern.strip("/") else name
        if fnmatch.fnmatchcase(target, pattern.strip("/")):
            return True
    return False


def _content_type(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name)
    if guessed is None:
        return "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


def _ascii_name(name: str) -> str:
    return name.encode("ascii", "replace").decode().replace('"', "_")


def _header_safe(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1").replace("\n", " ")[:500]


# ---------------------------------------------------------------------------- CLI


def _parse_token_spec(spec: str) -> tuple[str, str, Role, dict[str, Role]]:
    """`user:token:role[:org1,org2=read]` -> (user, token, role, orgs)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[2] not in ("read", "write"):
        raise argparse.ArgumentTypeError(f"expected user:token:read|write[:orgs], got {spec!r}")
    orgs: dict[str, Role] = {}
    if len(parts) == 4 and parts[3]:
        for item in parts[3].split(","):
            org, _, org_role = item.partition("=")
            if org_role not in ("", "read", "write"):
                raise argparse.ArgumentTypeError(f"bad role in {item!r}")
            orgs[org] = cast(Role, org_role or "write")
    return parts[0], parts[1], cast(Role, parts[2]), orgs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--data", required=True, type=Path, help="folder for repos and files")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        type=_parse_token_spec,
        metavar="USER:TOKEN:ROLE[:ORGS]",
        help="a user and one of its tokens; ORGS is org1,org2=read (default role write)",
    )
    args = parser.parse_args(argv)
    server = HubTestServer(args.data, host=args.host, port=args.port)
    for user, token, role, orgs in args.token:
        server.add_user(user, token=token, role=role, orgs=orgs)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        print(f"Hub test server on {server.url} (data in {args.data})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
