"""The sha256 of input files, each computed at most once per job and shared by its users.

A job needs the sha256 of its inputs twice: the recipe records them, and every finished
shard's record carries those of the files its shard read, so that a rerun resumes a shard
only if its inputs are still those bytes (a name, a size and an mtime prove nothing: a file
rewritten with the same size and its old mtime keeps all three). :class:`FileDigests` hashes
each file once for both, on daemon threads (a failing job never waits for them), in the
order the merge needs them.

A file in the Hugging Face cache costs nothing: the cache names an LFS file by its sha256
(``blobs/<sha256>``, which the download checked). A local file is read whole: sha256 ran at
0.4-0.5 GB/s per thread on the benchmark machines, so minutes for a 140 GB base.

Example::

    digests = FileDigests()
    digests.start(["base/model-00001-of-00002.safetensors", ...])  # beside the merge
    digests.get("adapter/adapter_model.safetensors")                # waits if needed
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

_CHUNK = 8 * 1024 * 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cached_sha256(path: str | os.PathLike[str]) -> str | None:
    """The sha256 a Hub cache file is named by (``blobs/<sha256>``: LFS files), else None."""
    resolved = Path(os.path.realpath(path))
    if resolved.parent.name == "blobs" and _SHA256_RE.match(resolved.name):
        return resolved.name
    return None


class FileDigests:
    """sha256 of files by path: each computed once, by whichever thread asks first.

    Thread-safe. ``get`` returns a digest, waiting for the thread computing it or computing
    it itself; ``start`` hashes files on background daemon threads, in the order given;
    ``hash_all`` hashes several at once and waits. An error (a file that vanished) is
    raised to every caller that asks for that file.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[str, str] = {}
        self._errors: dict[str, BaseException] = {}
        self._running: dict[str, threading.Event] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._threads = 0

    @staticmethod
    def _key(path: str | os.PathLike[str]) -> str:
        return os.path.realpath(path)

    def add_known(self, digests: Mapping[str, str]) -> None:
        """Digests known without reading the files (``{path: sha256}``: a Hub shard's LFS
        object id, before it is downloaded)."""
        with self._lock:
            for path, digest in digests.items():
                self._done[self._key(path)] = digest

    def known(self, path: str | os.PathLike[str]) -> str | None:
        """The digest if it costs nothing now (computed already, or a Hub cache file)."""
        key = self._key(path)
        with self._lock:
            if key in self._done:
                return self._done[key]
        return cached_sha256(key)

    def get(self, path: str | os.PathLike[str]) -> str:
        """The sha256 of ``path`` (blocking)."""
        key = self._key(path)
        free = cached_sha256(key)
        if free is not None:
            return free
        with self._lock:
            if key in self._done:
                return self._done[key]
            if key in self._errors:
                raise self._errors[key]
            event = self._running.get(key)
            mine = event is None
            if mine:
                event = self._running[key] = threading.Event()
        assert event is not None
        if not mine:
            event.wait()
            with self._lock:
                if key in self._errors:
                    raise self._errors[key]
                return self._done[key]
        try:
            digest = sha256_file(key)
        except BaseException as exc:
            with self._lock:
                self._errors[key] = exc
                del self._running[key]
            event.set()
            raise
        with self._lock:
            self._done[key] = digest
            del self._running[key]
        event.set()
        return digest

    def bytes_to_read(self, paths: Iterable[str | os.PathLike[str]]) -> int:
        """How many bytes hashing ``paths`` still has to read (0 for Hub cache files)."""
        total = 0
        for key in {self._key(p) for p in paths}:
            if self.known(key) is None:
                try:
                    total += os.stat(key).st_size
                except OSError:
                    continue
        return total

    def start(self, paths: Sequence[str | os.PathLike[str]], *, threads: int = 1) -> None:
        """Hash ``paths`` on up to ``threads`` daemon threads, in this order, beside the
        caller's work (paths already queued or known are skipped)."""
        with self._lock:
            queued = set(self._queue)
            for path in paths:
                key = self._key(path)
                if key not in queued and key not in self._done and cached_sha256(key) is None:
                    self._queue.append(key)
                    queued.add(key)
            spawn = max(0, min(threads, len(self._queue)) - self._threads)
            self._threads += spawn
        for _ in range(spawn):
            threading.Thread(target=self._drain, name="mergejob-sha256", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._threads -= 1
                    return
                key = self._queue.popleft()
            with contextlib.suppress(Exception):  # kept for the caller that asks for this file
                self.get(key)

    def hash_all(
        self, paths: Iterable[str | os.PathLike[str]], *, threads: int = 4
    ) -> dict[str, str]:
        """``{path: sha256}`` for ``paths``, hashed ``threads`` at a time (blocking)."""
        paths = list(paths)
        self.start(paths, threads=threads)
        return {str(p): self.get(p) for p in paths}
