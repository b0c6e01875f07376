"""Base shards from the Hub, one file at a time, several at once, as the merge needs them.

A Hub-to-Hub merge does not wait for the whole base: the revision is pinned to a commit once,
the plan is made from the shard headers (HTTP range reads), and :class:`ShardFetcher`
downloads the shards with the client's own per-file download (``hf_hub_download``: into the
normal HF cache, Xet or LFS as the client is configured, a partly downloaded file completed
or fetched again by the client, never used half-written) in the order the output shards
need them. A worker waits only for the input shards of the output shard at hand.

With ``delete_after_use`` (``engine.delete_downloaded``) a shard this job downloaded leaves
the cache once every output shard that reads it is finished, and at most ``ahead`` shards
are on disk and not yet used: the disk holds a window of a few shards, not the model.
A file that was in the cache before the job is never deleted.

An extraction reads two Hub models: :class:`FetchQueue` downloads the files of several
fetchers (one per repo) in one order, the order the extraction's groups read them, base and
fine-tuned shards interleaved (:mod:`mergejob.extraction.inputs`).

Example::

    fetcher = ShardFetcher("org/base", commit, ["model-00001-of-00002.safetensors", ...])
    fetcher.start()
    path = fetcher.wait("model-00001-of-00002.safetensors")
    ...                                   # read it
    fetcher.done_with("model-00001-of-00002.safetensors")
    fetcher.close()
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mergejob import logs, settings
from mergejob.errors import MergeFailedError, MergeJobError, ModelError
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.headers import SafetensorsHeader, read_remote_header

log = logging.getLogger(__name__)

DEFAULT_DOWNLOAD_WORKERS = 4
DEFAULT_AHEAD = 4


@dataclass(frozen=True)
class StreamedFile:
    """One base shard of a Hub repo, known from its metadata before it is downloaded."""

    name: str
    size: int
    sha256: str | None  # the LFS object id (the sha256 of its bytes), where LFS stores it
    blob_id: str  # the git object id


@dataclass(frozen=True)
class StreamedBase:
    """A Hub base whose weights are fetched shard by shard during the merge: the small files
    are in ``folder`` (the HF cache's snapshot of ``commit``), the shards will be there.

    ``index`` is the checkpoint's layout from the shards' headers, read over HTTP;
    ``identities`` names each shard's future path by its content, as the plan of a fully
    downloaded base would (``blob:<sha256>``), so that both give the same plan id.
    """

    repo_id: str
    commit: str
    folder: str
    files: tuple[StreamedFile, ...]
    index: CheckpointIndex = field(compare=False, hash=False, repr=False)
    # Each shard's header as the Hub holds it (file name -> header), for another plan
    # made from them (an extraction's).
    headers: dict[str, SafetensorsHeader] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def path(self, name: str) -> str:
        return str(Path(self.folder) / name)

    def identities(self) -> dict[str, str]:
        return {self.path(f.name): f"blob:{f.sha256 or f.blob_id}" for f in self.files}

    def sha256s(self) -> dict[str, str]:
        """``{path: sha256}`` of the shards LFS names by their content."""
        return {self.path(f.name): f.sha256 for f in self.files if f.sha256}

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class FetchOptions:
    """How the stream engine fetches a :class:`StreamedBase` during the merge."""

    base: StreamedBase
    token: str | None = None
    workers: int = DEFAULT_DOWNLOAD_WORKERS
    delete_after_use: bool = False


def open_streamed_base(repo_id: str, commit: str, folder: Path, token: str | None) -> StreamedBase:
    """The base ``repo_id`` at ``commit`` as a :class:`StreamedBase`: its shard list (from
    the small files already in ``folder``, else the repo's listing), their sizes and content
    hashes (one paths-info request) and their headers (HTTP range reads)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    folder = Path(folder)
    api = HfApi(token=token)
    names = _shard_names(folder) or sorted(
        n
        for n in api.list_repo_files(repo_id, revision=commit)
        if n.endswith(".safetensors") and "/" not in n
    )
    if not names:
        raise ModelError(
            f"{repo_id}@{commit[:12]}: no safetensors weights (model.safetensors or an index)"
        )
    infos = {info.path: info for info in api.get_paths_info(repo_id, names, revision=commit)}
    files = []
    for name in names:
        info = infos.get(name)
        if not isinstance(info, RepoFile):
            raise ModelError(f"{repo_id}@{commit[:12]}: {name}, named by the index, is missing")
        lfs = getattr(info, "lfs", None)
        files.append(
            StreamedFile(
                name=name,
                size=int(info.size),
                sha256=getattr(lfs, "sha256", None) if lfs is not None else None,
                blob_id=str(info.blob_id),
            )
        )

    def header(f: StreamedFile) -> SafetensorsHeader:
        return read_remote_header(
            repo_id, f.name, commit=commit, file_size=f.size, local_path=folder / f.name,
            token=token,
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=8) as pool:  # ~30 shards: round trips in parallel
        headers = dict(zip([f.name for f in files], pool.map(header, files), strict=True))
    index = CheckpointIndex.from_headers(folder, headers)
    return StreamedBase(
        repo_id=repo_id,
        commit=commit,
        folder=str(folder),
        files=tuple(files),
        index=index,
        headers=headers,
    )


def _shard_names(folder: Path) -> list[str]:
    import json

    index_file = folder / settings.SAFETENSORS_INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index_file}: not a valid safetensors index ({exc})") from None
        return sorted(set(weight_map.values()))
    return []


@dataclass
class _File:
    name: str
    cached_before: bool
    done: threading.Event
    path: Path | None = None
    error: BaseException | None = None
    users: int = 0  # consumers that still need it
    nbytes: int = 0
    downloaded: bool = False
    windowed: bool = False  # holds a place in the disk window until used up


class ShardFetcher:
    """Download ``files`` of ``repo_id`` at ``commit`` in the order given, ``workers`` at a
    time. ``wait(name)`` blocks until a file is complete on disk; ``done_with(name)`` says a
    consumer has finished with it (with ``delete_after_use``, the last one frees its disk).

    ``users`` maps a file to how many consumers will call ``done_with`` for it (default 1).
    ``announce(name, nbytes)``, when given, reports each file downloaded instead of the
    fetcher's own log line (a :class:`FetchQueue` counts over all its fetchers).
    """

    def __init__(
        self,
        repo_id: str,
        commit: str,
        files: Sequence[str],
        *,
        token: str | None = None,
        workers: int = DEFAULT_DOWNLOAD_WORKERS,
        delete_after_use: bool = False,
        ahead: int = DEFAULT_AHEAD,
        users: dict[str, int] | None = None,
        progress: Callable[[int], None] | None = None,
        announce: Callable[[str, int], None] | None = None,
    ) -> None:
        from huggingface_hub import try_to_load_from_cache

        self.repo_id = repo_id
        self.commit = commit
        self.token = token
        self.workers = max(1, workers)
        self.delete_after_use = delete_after_use
        self.progress = progress
        self.announce = announce  # instead of this fetcher's own line per file downloaded
        self._lock = threading.Lock()
        self._files: dict[str, _File] = {}
        self._order: queue.Queue[str | None] = queue.Queue()
        for name in dict.fromkeys(files):
            cached = try_to_load_from_cache(repo_id, name, revision=commit)
            entry = _File(
                name=name,
                cached_before=isinstance(cached, str),
                done=threading.Event(),
                users=(users or {}).get(name, 1),
            )
            if entry.cached_before:
                entry.path = Path(str(cached))
                entry.done.set()
            else:
                self._order.put(name)
            self._files[name] = entry
        # The window: files fetched and not yet used up, with deletion on.
        self._window = threading.Semaphore(max(1, ahead)) if delete_after_use else None
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self.error: BaseException | None = None
        self.downloaded_bytes = 0
        self.downloaded_files = 0
        self._total = sum(1 for f in self._files.values() if not f.cached_before)

    # -- lifecycle

    def start(self) -> ShardFetcher:
        if self._total:
            log.info(
                "download: %d of %d base shard(s) of %s@%s to fetch (%d already cached), "
                "%d at a time%s",
                self._total,
                len(self._files),
                self.repo_id,
                self.commit[:12],
                len(self._files) - self._total,
                self.workers,
                ", deleted once used" if self.delete_after_use else "",
            )
        for i in range(min(self.workers, self._total)):
            self._order.put(None)  # one stop mark per thread, after the files
            thread = threading.Thread(target=self._run, name=f"mergejob-fetch-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop fetching (files being downloaded finish in the background: the client
        leaves a partial file it resumes next time)."""
        self._closed.set()
        if self._window is not None:
            for _ in self._threads:
                self._window.release()

    def __enter__(self) -> ShardFetcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- consumers

    def path(self, name: str) -> Path:
        """Where ``name`` is (or will be) in the HF cache's snapshot of the commit."""
        entry = self._files[name]
        if entry.path is not None:
            return entry.path
        from huggingface_hub import constants

        folder = "models--" + self.repo_id.replace("/", "--")
        return Path(constants.HF_HUB_CACHE) / folder / "snapshots" / self.commit / name

    def ready(self, name: str) -> bool:
        entry = self._files.get(name)
        return entry is None or entry.done.is_set()

    def wait(self, name: str, timeout: float | None = None) -> Path:
        """Block until ``name`` is complete on disk; raises the download's error."""
        entry = self._files[name]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not entry.done.wait(0.2):
            self.raise_if_failed()
            if deadline is not None and time.monotonic() > deadline:
                raise MergeFailedError(f"{self.repo_id}/{name}: not downloaded after {timeout}s")
        if entry.error is not None:
            raise entry.error
        assert entry.path is not None
        return entry.path

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def failed_file(self) -> str | None:
        """The file whose download failed (the one :attr:`error` is about), if any."""
        if self.error is None:
            return None
        return next((e.name for e in self._files.values() if e.error is self.error), None)

    def done_with(self, name: str) -> None:
        """One consumer has finished with ``name``; the last frees it (with deletion on)."""
        entry = self._files.get(name)
        if entry is None:
            return
        with self._lock:
            entry.users -= 1
            last = entry.users <= 0
        if not last:
            return
        if self.delete_after_use and entry.downloaded and not entry.cached_before:
            _remove_from_cache(entry.path)
        if self._window is not None and entry.windowed:
            self._window.release()

    # -- the download threads

    def _run(self) -> None:
        while not self._closed.is_set():
            name = self._order.get()
            if name is None or not self.fetch_one(name):
                return

    def fetch_one(self, name: str, *, window: bool = True) -> bool:
        """Download ``name`` in the calling thread, within the disk window (a thread of this
        fetcher, or of a :class:`FetchQueue` that orders several fetchers' files); False
        when the fetcher was closed while waiting for room. ``window=False``: now, outside
        the window (a file its consumer needs at once and nobody fetches)."""
        entry = self._files[name]
        if self._window is not None and window:
            self._window.acquire()
            if self._closed.is_set():
                return False
            entry.windowed = True
        try:
            entry.path = self._download(name)
            entry.nbytes = entry.path.stat().st_size
            entry.downloaded = True
            with self._lock:
                self.downloaded_bytes += entry.nbytes
                self.downloaded_files += 1
                count = self.downloaded_files
            if self.progress is not None:
                self.progress(entry.nbytes)
            if self.announce is not None:
                self.announce(name, entry.nbytes)
            else:
                log.info(logs.download_done_line(count, self._total, name, entry.nbytes))
        except BaseException as exc:
            entry.error = exc if isinstance(exc, MergeJobError) else _fetch_error(name, exc)
            self.error = entry.error
            if self._window is not None and entry.windowed:
                entry.windowed = False
                self._window.release()
        finally:
            entry.done.set()
        return True

    def _download(self, name: str) -> Path:
        from huggingface_hub import hf_hub_download

        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                return Path(
                    hf_hub_download(self.repo_id, name, revision=self.commit, token=self.token)
                )
            except OSError as exc:  # a connection that broke: the client resumes the file
                if attempt == attempts:
                    raise
                log.warning("download of %s failed (%s); trying again", name, exc)
                time.sleep(attempt)
        raise AssertionError("unreachable")


class FetchQueue:
    """The files of several :class:`ShardFetcher` (several repos: an extraction's base and
    fine-tuned model) downloaded in one order, ``workers`` at a time: the order their
    consumer needs them across repos, so that the first piece of work waits for its own
    files only. Each fetcher keeps its files, window and errors (``wait``, ``done_with``);
    the queue's threads only download, and count for the log over all of them.
    """

    def __init__(
        self,
        fetchers: Sequence[ShardFetcher],
        items: Sequence[tuple[ShardFetcher, str]],
        *,
        workers: int = DEFAULT_DOWNLOAD_WORKERS,
    ) -> None:
        self.workers = max(1, workers)
        self.fetchers = list(fetchers)
        self._todo = [(f, n) for f, n in dict.fromkeys(items) if not f.ready(n)]
        self._order: queue.Queue[tuple[ShardFetcher, str] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._count = 0
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        for fetcher in self.fetchers:
            fetcher.announce = functools.partial(self._announce, fetcher.repo_id)

    @property
    def total(self) -> int:
        """Files to download (those already in the cache are not)."""
        return len(self._todo)

    def start(self) -> FetchQueue:
        if self._todo:
            repos = ", ".join(f"{f.repo_id}@{f.commit[:12]}" for f in self.fetchers)
            log.info(
                "download: %d shard(s) of %s, %d at a time, in the order the work reads them",
                len(self._todo),
                repos,
                self.workers,
            )
        for item in self._todo:
            self._order.put(item)
        for i in range(min(self.workers, len(self._todo))):
            self._order.put(None)
            thread = threading.Thread(target=self._run, name=f"mergejob-fetch-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop fetching (a file being downloaded finishes in the background)."""
        self._closed.set()
        for fetcher in self.fetchers:
            fetcher._closed.set()
            if fetcher._window is not None:
                for _ in self._threads:
                    fetcher._window.release()

    def __enter__(self) -> FetchQueue:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raise_if_failed(self) -> None:
        for fetcher in self.fetchers:
            fetcher.raise_if_failed()

    def _run(self) -> None:
        while not self._closed.is_set():
            item = self._order.get()
            if item is None:
                return
            fetcher, name = item
            if not fetcher.fetch_one(name):
                return

    def _announce(self, repo_id: str, name: str, nbytes: int) -> None:
        """One line per file, counted over every repo (the file named with its repo)."""
        with self._lock:
            self._count += 1
            count = self._count
        log.info(logs.download_done_line(count, len(self._todo), f"{repo_id}/{name}", nbytes))


def _fetch_error(name: str, exc: BaseException) -> MergeFailedError:
    error = MergeFailedError(
        f"downloading {name} failed ({type(exc).__name__}: {exc}); rerun: finished shards "
        "and complete downloads are kept"
    )
    error.__cause__ = exc  # for a caller that words it its own way
    return error


def _remove_from_cache(path: Path | None) -> None:
    """Remove a snapshot entry and its blob (the HF cache's layout: the snapshot file is a
    link to ``blobs/<etag>``; on systems without links it is the file itself)."""
    if path is None:
        return
    try:
        blob = path.resolve() if path.is_symlink() else None
        path.unlink(missing_ok=True)
        if blob is not None:
            blob.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s from the cache: %s", path, exc)


def cache_bytes(repo_id: str) -> int:
    """Bytes the HF cache holds for ``repo_id`` (its blobs), for the disk window's tests and
    figures."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "blobs"
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
