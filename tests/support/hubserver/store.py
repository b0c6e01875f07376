"""On-disk state of the Hub test server: repositories, commits, refs and file contents.

Everything lives under one folder: `state.json` (repos, commits, refs, pull requests) and
`objects/` (file contents by sha256, shared by all repos, like an LFS bucket). A server
started again on the same folder sees the same repos.

Commits keep a full, flat tree (path -> entry): small test repos only, no packing.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

RepoType = Literal["model", "dataset", "space"]
REPO_TYPES: tuple[RepoType, ...] = ("model", "dataset", "space")

# The .gitattributes the Hub writes in the initial commit of a new repo (abridged): the
# preupload endpoint uses these patterns, like the Hub, to send files to LFS.
DEFAULT_GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.bz2 filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.ftz filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.joblib filter=lfs diff=lfs merge=lfs -text
*.lfs.* filter=lfs diff=lfs merge=lfs -text
*.mlmodel filter=lfs diff=lfs merge=lfs -text
*.model filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.ot filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pb filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.rar filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
saved_model/**/* filter=lfs diff=lfs merge=lfs -text
*.tar.* filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.tflite filter=lfs diff=lfs merge=lfs -text
*.tgz filter=lfs diff=lfs merge=lfs -text
*.wasm filter=lfs diff=lfs merge=lfs -text
*.xz filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""

LFS_POINTER_TEMPLATE = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"


class HubError(Exception):
    """An error reply: HTTP status, message, and the Hub's `X-Error-Code` when it has one.

    The client maps `X-Error-Code` to its exception classes (`RepoNotFound` ->
    `RepositoryNotFoundError`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob (what `git hash-object` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return LFS_POINTER_TEMPLATE.format(oid=sha256, size=size).encode()


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass
class FileEntry:
    """A file in a commit's tree. `oid` is the git blob id (of the LFS pointer for LFS files)."""

    oid: str
    sha256: str
    size: int
    lfs: bool
    pointer_size: int = 0


@dataclass
class Commit:
    id: str
    parents: list[str]
    title: str
    message: str
    author: str
    date: str
    tree: dict[str, FileEntry]


@dataclass
class PullRequest:
    num: int
    title: str
    author: str
    base: str  # "refs/heads/<branch>"
    head: str  # commit id of refs/pr/<num>
    status: str  # "draft" | "open"
    created_at: str
    description: str = ""


@dataclass
class Repo:
    type: RepoType
    id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pulls: dict[int, PullRequest] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    gated: bool | str = False
    granted: list[str] = field(default_factory=list)  # users allowed into a gated repo
    default_branch: str = "main"

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def url_path(self) -> str:
        """The repo's path in web URLs: `ns/name`, `datasets/ns/name`, `spaces/ns/name`."""
        return self.id if self.type == "model" else f"{self.type}s/{self.id}"

    def head(self, branch: str | None = None) -> Commit:
        return self.commits[self.branches[branch or self.default_branch]]

    def resolve(self, revision: str) -> Commit | None:
        """A branch, tag, `refs/heads|tags/...`, `refs/pr/N`, or a (7+ hex digit) commit id."""
        rev = revision
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/") :]
            return self.commits[self.branches[rev]] if rev in self.branches else None
        if rev.startswith("refs/tags/"):
            rev = rev[len("refs/tags/") :]
            return self.commits[self.tags[rev]] if rev in self.tags else None
        if rev.startswith("refs/pr/"):
            pr = self.pr_from_ref(rev)
            return self.commits[pr.head] if pr is not None else None
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.tags:
            return self.commits[self.tags[rev]]
        if 7 <= len(rev) <= 40 and all(c in "0123456789abcdef" for c in rev):
            matches = [c for cid, c in self.commits.items() if cid.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        return None

    def pr_from_ref(self, ref: str) -> PullRequest | None:
        num = ref[len("refs/pr/") :]
        return self.pulls.get(int(num)) if num.isdigit() else None

    def branch_of(self, revision: str) -> str | None:
        """The branch name a revision names, if it names one (commits can only go to refs)."""
        name = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        return name if name in self.branches else None

    def history(self, start: Commit) -> list[Commit]:
        """First-parent history, newest first."""
        out: list[Commit] = []
        commit: Commit | None = start
        while commit is not None:
            out.append(commit)
            commit = self.commits[commit.parents[0]] if commit.parents else None
        return out

    def last_commit_touching(self, start: Commit, path: str) -> Commit:
        """The newest commit in `start`'s history that changed `path` (a file or a folder)."""

        def view(commit: Commit) -> list[tuple[str, str]]:
            prefix = path + "/"
            return sorted(
                (p, e.oid) for p, e in commit.tree.items() if p == path or p.startswith(prefix)
            )

        history = self.history(start)
        for newer, older in itertools.pairwise(history):
            if view(newer) != view(older):
                return newer
        return history[-1]

    def next_discussion_num(self) -> int:
        return max(self.pulls, default=0) + 1


class HubStore:
    """Repos and file contents on disk; every method is safe to call from several threads."""

    def __init__(self, root: Path, *, lfs_threshold: int = 10 * 1024 * 1024) -> None:
        self.root = root
        self.objects = root / "objects"
        self.incoming = root / "incoming"
        self.lfs_threshold = lfs_threshold
        self.lock = threading.RLock()
        self.repos: dict[tuple[RepoType, str], Repo] = {}
        self._counter = 0
        self.objects.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._load()

    # ---------------------------------------------------------------- persistence

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def _load(self) -> None:
        if not self.state_file.exists():
            return
        data = json.loads(self.state_file.read_text())
        self._counter = data.get("counter", 0)
        for raw in data["repos"]:
            commits = {
                cid: Commit(
                    **{
                        **c,
                        "tree": {p: FileEntry(**e) for p, e in c["tree"].items()},
                    }
                )
                for cid, c in raw.pop("commits").items()
            }
            pulls = {int(n): PullRequest(**p) for n, p in raw.pop("pulls").items()}
            repo = Repo(**raw, commits=commits, pulls=pulls)
            self.repos[(repo.type, repo.id)] = repo

    def save(self) -> None:
        with self.lock:
            data: dict[str, Any] = {
                "counter": self._counter,
                "repos": [asdict(repo) for repo in self.repos.values()],
            }
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".json.tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.state_file)

    # ---------------------------------------------------------------- objects

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        path = self.object_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_bytes(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.object_path(sha256)
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.incoming)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            self.adopt(Path(tmp), sha256)
        return sha256

    def adopt(self, tmp: Path, sha256: str) -> None:
        """Move a fully received and checked upload into the object store."""
        path = self.object_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)

    def new_incoming(self) -> Path:
        fd, tmp = tempfile.mkstemp(dir=self.incoming)
        os.close(fd)
        return Path(tmp)

    # ---------------------------------------------------------------- repos

    def get(self, repo_type: RepoType, repo_id: str) -> Repo | None:
        with self.lock:
            return self.repos.get((repo_type, repo_id))

    def _new_commit_id(self, payload: dict[str, Any]) -> str:
        self._counter += 1
        blob = json.dumps({**payload, "n": self._counter, "t": time.time()}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()

    def _make_commit(
        self,
        repo: Repo,
        parents: list[str],
        tree: dict[str, FileEntry],
        title: str,
        message: str,
        author: str,
    ) -> Commit:
        cid = self._new_commit_id(
            {
                "repo": repo.id,
                "parents": parents,
                "tree": sorted((p, e.oid) for p, e in tree.items()),
                "title": title,
                "message": message,
            }
        )
        commit = Commit(cid, parents, title, message, author, utc_now(), tree)
        repo.commits[cid] = commit
        return commit

    def regular_entry(self, content: bytes) -> FileEntry:
        sha256 = self.put_bytes(content)
        return FileEntry(oid=git_blob_oid(content), sha256=sha256, size=len(content), lfs=False)

    @staticmethod
    def lfs_entry(sha256: str, size: int) -> FileEntry:
        pointer = lfs_pointer(sha256, size)
        return FileEntry(
            oid=git_blob_oid(pointer),
            sha256=sha256,
            size=size,
            lfs=True,
            pointer_size=len(pointer),
        )

    def create_repo(self, repo_type: RepoType, repo_id: str, *, private: bool) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(type=repo_type, id=repo_id, private=private, created_at=utc_now())
            tree = {".gitattributes": self.regular_entry(DEFAULT_GITATTRIBUTES.encode())}
            initial = self._make_commit(repo, [], tree, "initial commit", "", "system")
            repo.branches["main"] = initial.id
            self.repos[(repo_type, repo_id)] = repo
            self.save()
            return repo

    def delete_repo(self, repo: Repo) -> None:
        with self.lock:
            self.repos.pop((repo.type, repo.id), None)
            self.save()

    # ---------------------------------------------------------------- uploads

    def is_lfs_path(self, repo: Repo, commit: Commit, path: str) -> bool:
        """Whether `.gitattributes` at `commit` sends `path` to LFS (glob patterns only)."""
        attributes = commit.tree.get(".gitattributes")
        if attributes is None:
            return False
        text = self.object_path(attributes.sha256).read_text(errors="replace")
        name = path.rsplit("/", 1)[-1]
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 2 or "filter=lfs" not in parts[1:]:
                continue
            pattern = parts[0]
            target = path if "/" in pattern else name
            if fnmatch.fnmatchcase(target, pattern):
                return True
        return False

    def upload_mode(self, repo: Repo, commit: Commit, path: str, size: int, sample: bytes) -> str:
        """`lfs` or `regular`, decided like the Hub: big, binary, or matched by .gitattributes."""
        if size == 0:
            return "regular"
        if size > self.lfs_threshold or b"\0" in sample:
            return "lfs"
        return "lfs" if self.is_lfs_path(repo, commit, path) else "regular"

    def commit(
        self,
        repo: Repo,
        *,
        revision: str,
        operations: list[dict[str, Any]],
        title: str,
        message: str,
        author: str,
        parent_commit: str | None,
        create_pr: bool,
    ) -> tuple[Commit, PullRequest | None]:
        """Apply NDJSON commit operations on top of `revision` (a branch, or refs/pr/N)."""
        with self.lock:
            pr: PullRequest | None = None
            branch = repo.branch_of(revision)
            if revision.startswith("refs/pr/"):
                pr = repo.pr_from_ref(revision)
                if pr is None or create_pr:
                    raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
                base = repo.commits[pr.head]
            elif branch is None:
                raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            else:
                base = repo.head(branch)

            if parent_commit is not None:
                parent = repo.resolve(parent_commit)
                if parent is None:
                    raise HubError(
                        404, f"Invalid parent commit: {parent_commit}", code="RevisionNotFound"
                    )
                if create_pr:
                    base = parent
                elif parent.id != base.id:
                    raise HubError(
                        412,
                        "A commit has happened since. Please refresh and try again.",
                    )

            tree = dict(base.tree)
            for op in operations:
                self._apply(repo, tree, op)

            commit = self._make_commit(repo, [base.id], tree, title, message, author)
            if create_pr:
                pr = PullRequest(
                    num=repo.next_discussion_num(),
                    title=title,
                    author=author,
                    base=f"refs/heads/{branch}",
                    head=commit.id,
                    status="open",
                    created_at=utc_now(),
                    description=message,
                )
                repo.pulls[pr.num] = pr
            elif pr is not None:
                pr.head = commit.id
            else:
                assert branch is not None
                repo.branches[branch] = commit.id
            self.save()
            return commit, pr

    def _apply(self, repo: Repo, tree: dict[str, FileEntry], op: dict[str, Any]) -> None:
        key, value = op.get("key"), op.get("value") or {}
        path = str(value.get("path", "")).strip("/")
        if key in ("file", "lfsFile", "deletedFile", "deletedFolder") and not path:
            raise HubError(400, f"Invalid operation: missing path in {key}")
        if key == "file":
            if value.get("encoding", "base64") == "base64":
                content = base64.b64decode(value.get("content", ""))
            else:
                content = str(value.get("content", "")).encode()
            if len(content) > self.lfs_threshold:
                raise HubError(
                    400,
                    f"File {path} is larger than {self.lfs_threshold} bytes: upload it through LFS",
                )
            tree[path] = self.regular_entry(content)
        elif key == "lfsFile":
            oid = str(value.get("oid", ""))
            size = value.get("size")
            if not self.has_object(oid):
                raise HubError(400, f"LFS file {path} ({oid}) has not been uploaded")
            actual = self.object_path(oid).stat().st_size
            if size is not None and int(size) != actual:
                raise HubError(400, f"LFS file {path}: size {size} does not match {actual}")
            tree[path] = self.lfs_entry(oid, actual)
        elif key == "deletedFile":
            if path not in tree:
                raise HubError(404, f"File not found: {path}", code="EntryNotFound")
            del tree[path]
        elif key == "deletedFolder":
            doomed = [p for p in tree if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"Folder not found: {path}", code="EntryNotFound")
            for p in doomed:
                del tree[p]
        else:
            raise HubError(400, f"Unknown commit operation: {key!r}")

    # ---------------------------------------------------------------- refs

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        with self.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            start = repo.resolve(starting_point) if starting_point else repo.head()
            if start is None:
                raise HubError(404, f"Invalid rev id: {starting_point}", code="RevisionNotFound")
            repo.branches[branch] = start.id
            self.save()

    def delete_branch(self, repo: Repo, branch: str) -> None:
        with self.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            if branch == repo.default_branch:
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            self.save()

    def create_tag(self, repo: Repo, tag: str, revision: str) -> None:
        with self.lock:
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            commit = repo.resolve(revision)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            repo.tags[tag] = commit.id
            self.save()

    def delete_tag(self, repo: Repo, tag: str) -> None:
        with self.lock:
            if tag not in repo.tags:
                raise HubError(404, f"Invalid rev id: {tag}", code="RevisionNotFound")
            del repo.tags[tag]
            self.save()

    def open_pull_request(
        self, repo: Repo, *, title: str, description: str, author: str
    ) -> PullRequest:
        """A draft PR whose ref starts at the default branch's head (what the Hub does)."""
        with self.lock:
            pr = PullRequest(
                num=repo.next_discussion_num(),
                title=title,
                author=author,
                base=f"refs/heads/{repo.default_branch}",
                head=repo.head().id,
                status="draft",
                created_at=utc_now(),
                description=description,
            )
            repo.pulls[pr.num] = pr
            self.save()
            return pr

    def clear_incoming(self) -> None:
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
