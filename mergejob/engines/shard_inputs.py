"""Which inputs a finished shard was made from, by content: recorded, and checked on a rerun.

A shard's record (:class:`~mergejob.io.shards.ShardRecord`) carries the sha256 of every input
file its shard read. The plan id alone names inputs by name, size and mtime, which a file
rewritten in place with the same size and its old mtime keeps; a rerun that trusted it would
mix the old file's weights into the new output. So before the workers start,
:func:`drop_stale_records` hashes the inputs of the shards an earlier run finished and drops
the records of those whose inputs are not those bytes any more (they are merged again), and
:class:`ShardInputs` gives each shard written now the sha256 of its inputs for its record.

The cost, and where it goes: the digests come from the job's one
:class:`~mergejob.io.digests.FileDigests`, which the recipe's record of the inputs shares,
so each input file is read once per job. Hub files cost nothing (the cache names them by
their sha256). Local files are hashed beside the merge, in the order it reads them; a shard's
record waits for its inputs' digests, so the merge waits where it runs ahead of hashing,
which the recipe waited for at the end anyway. A rerun hashes the inputs of its finished
shards before merging anything, and says so with the size, since it takes minutes on a large
local base (sha256 reads about 0.4 GB/s per thread).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergejob.io.digests import FileDigests
from mergejob.io.shards import drop_record, read_record, write_record
from mergejob.plan.work import Plan

log = logging.getLogger(__name__)

MAX_HASH_THREADS = 8  # a disk delivers no more than this many readers' worth


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def hash_threads() -> int:
    """Threads that hash inputs while nothing else runs (a rerun's check)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_HASH_THREADS, cores or 1))


def drop_stale_records(
    plan: Plan, partial_dir: Path, shards: Sequence[int], digests: FileDigests
) -> list[str]:
    """Drop the records of ``shards`` whose inputs are not the bytes they were made from
    (or that do not say), so their workers merge them again; returns their names.

    Hashes the inputs of every finished shard of this plan first (logged with how much,
    when local files must be read)."""
    partial_dir = Path(partial_dir)
    finished: list[tuple[int, Mapping[str, str]]] = []
    unknown: list[str] = []
    for i in shards:
        name = plan.shards[i].name
        record = read_record(partial_dir, name)
        if record is None or record.plan_id != plan.plan_id:
            continue  # the worker merges it anyway
        if not record.inputs:
            unknown.append(name)
            drop_record(partial_dir, name)
            continue
        finished.append((i, record.inputs))
    if unknown:
        log.info(
            "resume: %d finished shard(s) do not record the sha256 of their inputs (the run "
            "stopped before it had hashed them): merging them again",
            len(unknown),
        )
    if not finished:
        return unknown
    paths = sorted({path for i, _ in finished for path in plan.shard_inputs(i).values()})
    pending = digests.bytes_to_read(paths)
    started = time.monotonic()
    if pending:
        log.info(
            "resume: %d shard(s) were finished by an earlier run; hashing %s of local input "
            "files first, to merge again those whose inputs changed since (Hub files are "
            "named by their sha256 and cost nothing)",
            len(finished),
            _size(pending),
        )
    digests.hash_all(paths, threads=hash_threads())
    if pending:
        log.info("resume: inputs hashed in %.1f s", time.monotonic() - started)
    stale: list[str] = []
    changed: set[str] = set()
    for i, recorded in finished:
        now = {label: digests.get(path) for label, path in plan.shard_inputs(i).items()}
        if dict(recorded) != now:
            stale.append(plan.shards[i].name)
            changed |= {k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k)}
            drop_record(partial_dir, plan.shards[i].name)
    if stale:
        log.warning(
            "resume: %s changed since %d finished shard(s) were made from it (same name, size "
            "and time, other bytes): merging them again",
            ", ".join(sorted(changed)),
            len(stale),
        )
    return unknown + stale


class ShardInputs:
    """The sha256 of each shard's input files, for its record (:meth:`of`), hashed beside
    the merge in the order it reads them (:meth:`start`)."""

    def __init__(self, plan: Plan, partial_dir: Path, digests: FileDigests) -> None:
        self.plan = plan
        self.partial_dir = Path(partial_dir)
        self.digests = digests
        self._said = False
        self._lock = threading.Lock()

    def start(self, shards: Sequence[int]) -> None:
        """Hash the inputs of ``shards`` on background threads, as the merge will read them."""
        self.digests.start(self.plan.input_order(shards), threads=2)

    def of(self, index: int) -> dict[str, str]:
        """``{label: sha256}`` of the files shard ``index`` read (waits for their hashing)."""
        files = self.plan.shard_inputs(index)
        waiting = [path for path in files.values() if self.digests.known(path) is None]
        if waiting:
            with self._lock:
                say, self._said = not self._said, True
            if say:
                log.info(
                    "recording the sha256 of the local input files with each shard (so a rerun "
                    "resumes only shards whose inputs are unchanged): a shard's record waits "
                    "for its inputs' hashing (%s for this one)",
                    _size(self.digests.bytes_to_read(waiting)),
                )
        return {label: self.digests.get(path) for label, path in files.items()}

    def seal(self, name: str) -> None:
        """Add the inputs' sha256 to the record of shard ``name`` if its worker (another
        process) wrote it without them."""
        record = read_record(self.partial_dir, name)
        if record is None or record.plan_id != self.plan.plan_id or record.inputs:
            return
        index = next(i for i, shard in enumerate(self.plan.shards) if shard.name == name)
        write_record(self.partial_dir, record.with_inputs(self.of(index)))
