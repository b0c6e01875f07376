"""An extraction's two models as the engine reads them: a local folder as it is, a Hub model
streamed the merge's way (:mod:`mergejob.fetch`).

A Hub model (unless ``HF_HUB_OFFLINE``) is pinned to a commit once; its small files come
first (configs, tokenizer, index) and its shards' headers are read with two HTTP range
requests each (:func:`~mergejob.fetch.open_streamed_base`). The plan is made from those
headers (:meth:`ExtractionInputs.plan`): each shard is named by its content
(``blob:<sha256>``, as the HF cache names a downloaded one), so the plan id is that of a
whole download, and each tensor points at its file's final place in the HF cache (the
commit's snapshot), at the offsets of the real file.

:class:`Downloads` then fetches both models' shards in the order the plan's unfinished
groups read them, base and fine-tuned interleaved, ``engine.download_workers`` at a time,
and its :meth:`~Downloads.gate` (the engine calls it before a group reads its files) holds
a group until its own files are on disk: the first group starts after its two shards, not
after both models. The checks before the first group (the LoRA layers' biases, the tensors
no LoRA carries, with a changed bias the bias-less LoRA layers' weights until one changed)
wait for no shard: they read each tensor they compare through :attr:`Downloads.peek`
(:class:`StreamedTensors`), from its file when that is whole on disk, else its bytes alone
by one HTTP range request. A finished group's files are not fetched on a rerun. With
``engine.delete_downloaded`` a shard this job downloaded leaves the cache once every group
that reads it is written (at most a few shards ahead are on disk and not yet used).

The recipe's sha256 of a streamed shard is its LFS object id (the bytes the client checked),
so the inputs it records are those of a whole download too. A shard the Hub keeps in git
(under 10 MB, no LFS sha256) is downloaded with the small files.

Example::

    inputs = open_inputs(spec.base, spec.extract.finetuned, token=token)
    plan = inputs.plan(spec.extract)
    with Downloads(plan, partial, inputs, token=token) as downloads:
        run_extraction(plan, partial, device="cpu", gate=downloads.gate, peek=downloads.peek)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergejob import settings
from mergejob.errors import MergeFailedError, MergeJobError
from mergejob.extraction.plan import ExtractionPlan, plan_extraction
from mergejob.extraction.writer import group_done, part_name
from mergejob.fetch import (
    DEFAULT_AHEAD,
    DEFAULT_DOWNLOAD_WORKERS,
    FetchQueue,
    ShardFetcher,
    StreamedBase,
    open_streamed_base,
)
from mergejob.io.digests import FileDigests
from mergejob.io.header_view import write_sparse_copy
from mergejob.io.headers import RangeRead, TensorRef, hub_range_reader
from mergejob.io.shards import read_record, record_path
from mergejob.sources import BASE_PATTERNS, BASE_SMALL_PATTERNS, ResolvedSource, resolve_source
from mergejob.spec import ExtractSpec, SourceSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ROLES = ("base model", "fine-tuned model")


@dataclass
class ExtractionInputs:
    """The base and the fine-tuned model: local folders (a Hub model downloaded whole, or
    its small files only), and for each streamed Hub model its shards (``streams``)."""

    base: ResolvedSource
    tuned: ResolvedSource
    streams: tuple[StreamedBase | None, StreamedBase | None] = (None, None)
    # The sha256 of the input files, shared by the recipe's records: a streamed shard's is
    # its LFS object id, known before it is downloaded (and after it is deleted).
    digests: FileDigests = field(default_factory=FileDigests, repr=False)

    def __post_init__(self) -> None:
        for stream in self.streams:
            if stream is not None:
                self.digests.add_known(stream.sha256s())

    @property
    def sources(self) -> tuple[ResolvedSource, ResolvedSource]:
        return self.base, self.tuned

    @property
    def streamed(self) -> bool:
        return any(s is not None for s in self.streams)

    def plan(self, spec: ExtractSpec, *, trust_remote_code: bool = False) -> ExtractionPlan:
        """The plan, from the streamed models' headers where there are some: the same plan
        (and plan id) as from both models downloaded whole, its tensors at their files'
        final paths."""
        with ExitStack() as stack:
            views = [
                stack.enter_context(_blob_view(s)) if s is not None else None for s in self.streams
            ]
            plan = plan_extraction(
                spec,
                self.base.local_dir,
                self.tuned.local_dir,
                base_view=views[0],
                tuned_view=views[1],
                trust_remote_code=trust_remote_code,
            )
        # The views stood for the files: the tensors are read from the files themselves,
        # at the offsets of the headers as the Hub holds them.
        for stream, refs in zip(self.streams, (plan.base, plan.tuned), strict=True):
            if stream is not None:
                exact = stream.index.tensors
                refs.update({name: exact[name] for name in refs})
        return plan

    def record(self, side: int, role: str, *, workers: int = 4) -> dict[str, Any]:
        """The recipe's record of one input (``side`` 0: the base, 1: the fine-tuned model)
        with the sha256 of the files an extraction reads."""
        from mergejob import recipe

        source, stream = self.sources[side], self.streams[side]
        if stream is None:
            return recipe.source_record(role, source, BASE_PATTERNS, workers=workers)
        return recipe.source_record(
            role,
            source,
            BASE_PATTERNS,
            workers=workers,
            digest=self.digests.get,
            also=[f.name for f in stream.files],
        )


def open_inputs(
    base: SourceSpec, tuned: SourceSpec, *, token: str | None = None, stream: bool | None = None
) -> ExtractionInputs:
    """Both models: a local folder as it is; a Hub model streamed (``stream``, default:
    unless ``HF_HUB_OFFLINE``), else downloaded whole."""
    if stream is None:
        stream = not settings.hub_offline()
    resolved: list[ResolvedSource] = []
    streams: list[StreamedBase | None] = []
    for spec, role in zip((base, tuned), ROLES, strict=True):
        patterns = BASE_SMALL_PATTERNS if stream else BASE_PATTERNS
        source = resolve_source(spec, role=role, patterns=patterns, token=token)
        streamed: StreamedBase | None = None
        repo_id, commit = source.repo_id, source.commit
        if stream and repo_id is not None and commit is not None:
            streamed = open_streamed_base(repo_id, commit, source.local_dir, token)
            _fetch_git_shards(streamed, token)
        elif stream and repo_id is not None:  # no pinned snapshot: the whole model, as before
            source = resolve_source(spec, role=role, patterns=BASE_PATTERNS, token=token)
        resolved.append(source)
        streams.append(streamed)
    return ExtractionInputs(resolved[0], resolved[1], (streams[0], streams[1]))


def _fetch_git_shards(stream: StreamedBase, token: str | None) -> None:
    """Shards the Hub keeps in git, not LFS (small: under 10 MB), have no sha256 to name
    them by before they are read: they come now, with the small files."""
    from huggingface_hub import hf_hub_download

    for f in stream.files:
        if f.sha256 is None:
            hf_hub_download(stream.repo_id, f.name, revision=stream.commit, token=token)


@contextmanager
def _blob_view(stream: StreamedBase) -> Iterator[Path]:
    """A folder that a header reader takes for the model: its index, and each shard its
    header followed by a hole, linked from ``blobs/<sha256>`` as the HF cache links a
    downloaded shard (so the plan names it by its content, as it would the real file)."""
    tmp = Path(tempfile.mkdtemp(prefix="mergejob-extract-plan-"))
    try:
        view, blobs = tmp / "view", tmp / "blobs"
        view.mkdir()
        blobs.mkdir()
        index = Path(stream.folder) / settings.SAFETENSORS_INDEX_FILE
        if index.is_file():
            (view / index.name).symlink_to(index.resolve())
        for f in stream.files:
            blob = blobs / (f.sha256 or f.blob_id)
            if not blob.exists():
                write_sparse_copy(stream.headers[f.name].as_dict(), blob)
            (view / f.name).symlink_to(blob)
        yield view
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A range read that fails is tried again, as a download (ShardFetcher) is: 3 tries in all.
RANGE_ATTEMPTS = 3


class StreamedTensors:
    """One tensor at a time of the streamed models, for the checks before the groups: from
    its file when that is whole on disk (``ready(path)``; a local input's file always is),
    else its bytes alone, by one HTTP range request for the file at the pinned commit (with
    the token; a failed request tried again, ``RANGE_ATTEMPTS`` in all). The bytes are the
    file's either way. ``range_reads``/``range_bytes`` count what came by range requests.

    A file read on disk is opened for that read only (a shard deleted once used, with
    ``engine.delete_downloaded``, is not held open)."""

    def __init__(
        self,
        streams: Sequence[StreamedBase | None],
        ready: Callable[[str], bool],
        *,
        token: str | None = None,
        attempts: int = RANGE_ATTEMPTS,
    ) -> None:
        self._ready = ready
        self._remote: dict[str, tuple[str, RangeRead]] = {
            stream.path(f.name): (
                f"{stream.repo_id}/{f.name}@{stream.commit[:12]}",
                hub_range_reader(
                    stream.repo_id, f.name, commit=stream.commit, token=token, attempts=attempts
                ),
            )
            for stream in streams
            if stream is not None
            for f in stream.files
        }
        self._lock = threading.Lock()
        self.range_reads = 0
        self.range_bytes = 0

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """``ref``'s tensor (a fresh CPU tensor of its dtype and shape)."""
        import torch

        from mergejob.io.reader import FileReader

        remote = self._remote.get(ref.path)
        if remote is None or self._ready(ref.path):
            reader = FileReader()
            try:
                return reader.tensor(ref)
            finally:
                reader.close()
        import httpx2

        where, read = remote
        try:
            data = read(ref.offset, ref.offset + ref.nbytes - 1) if ref.nbytes else b""
        except (OSError, httpx2.TransportError) as exc:
            raise MergeFailedError(
                f"{where}: reading {ref.name} by an HTTP range request failed "
                f"({type(exc).__name__}: {exc}); rerun the job"
            ) from exc
        if len(data) != ref.nbytes:
            raise MergeFailedError(
                f"{where}: the Hub answered {len(data)} bytes for the {ref.nbytes} bytes of "
                f"{ref.name} (bytes {ref.offset}-{ref.offset + ref.nbytes - 1}); rerun the job"
            )
        with self._lock:
            self.range_reads += 1
            self.range_bytes += len(data)
        log.debug("%s: %s read by a range request (%d bytes)", where, ref.name, len(data))
        raw = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )
        return raw.view(getattr(torch, ref.dtype)).reshape(ref.shape)


class Downloads:
    """The streamed models' shards that the unfinished groups of ``plan`` read, fetched in
    the order they read them (base and fine-tuned interleaved, ``workers`` at a time), the
    gate the engine calls before a group reads files (:meth:`gate`), and where the checks
    before the groups read what they compare (:attr:`peek`: no shard waited for).

    ``parallel``: how many groups the engine may read at once (its devices or workers),
    for the disk window of ``delete_after_use`` (which never holds back a file a waiting
    group needs). ``groups``: only those groups' files (an index's share of an Indexed Job;
    default every group). Leaving the ``with`` block without an error frees what is left;
    after an error every complete download stays for the rerun.
    """

    def __init__(
        self,
        plan: ExtractionPlan,
        partial: Path,
        inputs: ExtractionInputs,
        *,
        token: str | None = None,
        workers: int = DEFAULT_DOWNLOAD_WORKERS,
        delete_after_use: bool = False,
        parallel: int = 1,
        groups: Sequence[int] | None = None,
    ) -> None:
        self.plan = plan
        self.partial = Path(partial)
        self._lock = threading.Lock()
        streams = inputs.streams
        # Files a group reads, by path: only streamed ones are ours to fetch.
        self._where: dict[str, tuple[int, str]] = {
            stream.path(f.name): (side, f.name)
            for side, stream in enumerate(streams)
            if stream is not None
            for f in stream.files
        }
        everything = plan.groups
        todo = [
            i
            for i in (range(len(everything)) if groups is None else groups)
            if not group_done(self.partial, plan.plan_id, i)
        ]
        reads = {i: [p for p in plan.group_files(everything[i]) if p in self._where] for i in todo}
        # The groups' order: the checks before them read through ``peek``, not these files.
        order = list(dict.fromkeys(p for i in todo for p in reads[i]))
        self._pending = {i: set(reads[i]) for i in todo}
        self._since = {i: _stamp(record_path(self.partial, part_name(i))) for i in todo}
        self._users: Counter[str] = Counter({p: 0 for p in order})
        self._users.update(p for files in self._pending.values() for p in files)
        self._checked = False  # the checks are over once a group is written
        self._asked = set(order)
        same_repo = (
            streams[0] is not None
            and streams[1] is not None
            and streams[0].repo_id == streams[1].repo_id
        )
        if delete_after_use and same_repo:  # two commits of one repo may share blobs
            log.info(
                "engine.delete_downloaded: both models are in %s; nothing is deleted",
                streams[0].repo_id if streams[0] else "",
            )
            delete_after_use = False
        self.fetchers: list[ShardFetcher | None] = []
        for side, stream in enumerate(streams):
            if stream is None:
                self.fetchers.append(None)
                continue
            mine = [p for p in order if self._where[p][0] == side]
            widest = max(
                (sum(1 for p in set(reads[i]) if self._where[p][0] == side) for i in todo),
                default=0,
            )
            ahead = DEFAULT_AHEAD + max(1, parallel) * widest
            self.fetchers.append(
                ShardFetcher(
                    stream.repo_id,
                    stream.commit,
                    [*(self._where[p][1] for p in mine), *(f.name for f in stream.files)],
                    token=token,
                    workers=workers,
                    delete_after_use=delete_after_use,
                    ahead=ahead,
                )
            )
        self.queue = FetchQueue(
            [f for f in self.fetchers if f is not None],
            [(self._fetcher(p), self._where[p][1]) for p in order],
            workers=workers,
        )
        self.streams = streams
        self.peek = StreamedTensors(streams, self._on_disk, token=token)

    # -- lifecycle

    def start(self) -> Downloads:
        self.queue.start()
        return self

    def close(self, *, finished: bool) -> None:
        """Stop fetching; ``finished`` (every group written): free what is left."""
        self.queue.close()
        if finished:
            self._release(everything=True)

    def __enter__(self) -> Downloads:
        return self.start()

    def __exit__(self, kind: object, *exc: object) -> None:
        self.close(finished=kind is None)

    # -- the engine's side

    def gate(self, paths: Sequence[Path | str]) -> None:
        """Block until every streamed file in ``paths`` is on disk (fetched now if nobody
        was fetching it); a failed download raises :class:`MergeFailedError` naming it."""
        self._release()
        for path in paths:
            key = str(Path(path))
            where = self._where.get(key)
            if where is None:
                continue  # a local file
            fetcher, name = self._fetcher(key), where[1]
            with self._lock:
                now = key not in self._asked and not fetcher.ready(name)
                self._asked.add(key)
                if now:  # beyond what the groups read (checks without peek): kept to the end
                    self._users[key] += 1
            if now:
                fetcher.fetch_one(name, window=False)
            try:
                fetcher.wait(name)
            except MergeJobError as exc:
                raise self._failure(where[0], exc) from None

    def _on_disk(self, path: str) -> bool:
        """Whether the streamed file ``path`` is whole on disk (downloaded, or cached)."""
        where = self._where.get(path)
        if where is None:
            return True
        return self._fetcher(path).ready(where[1]) and Path(path).is_file()

    def _fetcher(self, path: str) -> ShardFetcher:
        fetcher = self.fetchers[self._where[path][0]]
        assert fetcher is not None
        return fetcher

    def _failure(self, side: int, exc: BaseException) -> MergeFailedError:
        stream, fetcher = self.streams[side], self.fetchers[side]
        assert stream is not None and fetcher is not None
        name = fetcher.failed_file()
        cause = exc.__cause__ or exc
        what = f"downloading {name} failed ({type(cause).__name__}: {cause})" if name else str(exc)
        return MergeFailedError(
            f"{ROLES[side]} {stream.repo_id}@{stream.commit[:12]}: {what}; rerun the same "
            "job: the finished groups and the complete downloads are kept"
        )

    def _release(self, *, everything: bool = False) -> None:
        """Tell the fetchers which files no unfinished group reads any more (with
        ``delete_after_use`` they leave the cache)."""
        freed: list[str] = []
        with self._lock:
            finished = [g for g in self._pending if everything or self._finished(g)]
            for group in finished:
                for path in self._pending.pop(group):
                    self._users[path] -= 1
            self._checked = self._checked or bool(finished)
            if not self._checked:
                return
            freed = [p for p, n in self._users.items() if n <= 0 or everything]
            for path in freed:
                del self._users[path]
        for path in freed:
            self._fetcher(path).done_with(self._where[path][1])

    def _finished(self, group: int) -> bool:
        """Whether ``group``'s record was written since the job began."""
        name = part_name(group)
        if _stamp(record_path(self.partial, name)) == self._since[group]:
            return False
        record = read_record(self.partial, name)
        return record is not None and record.plan_id == self.plan.plan_id


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns)
