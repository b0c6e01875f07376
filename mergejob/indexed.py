"""One merge over many workers: index ``i`` of ``n`` merges its shards, one step finalises.

The same code runs in every setting that splits a merge:

* the pods of an Indexed Job (``completionMode: Indexed``; Kubernetes sets
  ``JOB_COMPLETION_INDEX``, the Job's args give ``--index-count n``), all writing into one
  partial folder on shared storage (a ReadWriteMany PVC);
* ``mergejob submit --local --workers n``: ``n`` processes on this machine, each with its own
  ``JOB_COMPLETION_INDEX``;
* within one pod, the index's share is split again over the pod's GPUs (one worker each).

Which shards index ``i`` writes is :func:`index_shards`, a pure function of the plan's shard
sizes, ``n`` and ``i`` (balanced by bytes: :func:`mergejob.io.shards.assign_runs`). Every
finished shard leaves its record (size, sha256, plan id, its inputs' sha256), so a pod killed
half-way and started again with the same index redoes only its unfinished shards (and those
whose inputs changed since); the finaliser checks every record's inputs against the sha256
the recipe records. An index that has
finished (and uploaded, when publishing) leaves a marker in ``.mergejob-indexes/``.

The finalising step, and why it runs in index 0
-----------------------------------------------
Index 0, once its own shards are done, waits until every index has left its marker, then
checks every shard record against its file, writes the index, config, tokenizer, card and
recipe, makes the one Hub commit and renames the folder into place. Chosen over a second Job
submitted by the launcher because:

* it survives the launcher going away (a laptop closed after ``submit``): nothing outside
  the Indexed Job has to watch it;
* the Job's own state says the whole truth: Complete means the model is finished (and
  published), so ``mergejob wait``, ``kubectl wait`` and GitOps tools need nothing else;
* there is no race and no lock to go stale: only index 0 ever finalises, and at most one pod
  of an index runs at a time (with a ``podFailurePolicy`` the controller replaces a pod only
  once it has failed), so a retried index 0 just finalises again;
* the cost is index 0's idle wait for the slowest index, short because shares are balanced
  by bytes.

The finalising step is idempotent: run again on a finished output of the same plan it does
nothing (the recipe's ``plan_id`` says so); run again after a crash half-way it redoes what
is left (records are removed only once everything else is written).

An index is the job's one path (:func:`mergejob.pipeline.start_job`, then the engine over its
share with the one worker pool, :mod:`mergejob.engines.pool`), and the finaliser ends it with
the same :func:`mergejob.pipeline.finish_output` as a local merge: nothing of the job's
opening or tail is written twice. ``mergejob run
--finalize`` runs it alone, e.g. by hand after a Job whose index 0 was given up on.

An extraction split over indices (:mod:`mergejob.extraction.split`: groups instead of
shards) takes its share, its index arguments, its markers and index 0's wait from here.

Example (pod ``i`` of ``n``)::

    from mergejob.indexed import run_index
    report = run_index(spec, index=i, count=n)   # index 0 also finalises
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mergejob import logs, output, settings
from mergejob.engines.shard_inputs import drop_stale_records
from mergejob.engines.stream import fetch_options, finalize, stream_report, write_shards
from mergejob.engines.worker import worker_devices
from mergejob.errors import MergeFailedError, SpecError
from mergejob.io.shards import RECORDS_DIR, assign_runs, assign_shards, read_record, record_holds
from mergejob.pipeline import (
    JobResult,
    MergeResult,
    StartedJob,
    finish_output,
    start_job,
    start_uploader,
)
from mergejob.plan.work import Plan, plan_for_job
from mergejob.spec import MergeSpec

if TYPE_CHECKING:
    from mergejob.publish import ShardUploader

log = logging.getLogger("mergejob")

INDEX_ENV = settings.INDEX_ENV
INDEX_COUNT_ENV = settings.INDEX_COUNT_ENV


# ---------------------------------------------------------------------------------------
# Who writes what


def index_shards(shard_sizes: Sequence[int], count: int, index: int) -> list[int]:
    """The shards (positions in the plan, in file order) that index ``index`` of ``count``
    writes: a pure function of the sizes, balanced by bytes, in runs of consecutive shards
    where that balances as well (:func:`mergejob.io.shards.assign_runs`: an index then reads,
    and fetches from the Hub, its own part of the base). Every shard belongs to exactly one
    index; with more indices than shards, the extra ones get nothing."""
    if not 0 <= index < count:
        raise SpecError(f"index {index}: must be in 0..{count - 1} for {count} indices")
    return assign_runs(shard_sizes, count)[index]


def device_shares(
    shards: Sequence[int], shard_sizes: Sequence[int], devices: int
) -> list[list[int]]:
    """An index's shards split again over the pod's ``devices`` workers, by bytes (the
    split :func:`mergejob.engines.pool.split_shares` makes)."""
    split = assign_shards([shard_sizes[s] for s in shards], max(1, devices))
    return [[shards[i] for i in part] for part in split]


def index_from_env(environ: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """``(JOB_COMPLETION_INDEX, MERGEJOB_INDEX_COUNT)`` as integers (None where unset)."""
    values: list[int | None] = []
    for name, raw in zip(
        (INDEX_ENV, INDEX_COUNT_ENV), settings.index_variables(environ), strict=True
    ):
        try:
            values.append(int(raw) if raw else None)
        except ValueError:
            raise SpecError(f"{name}={raw!r}: must be a whole number") from None
    return values[0], values[1]


def check_index_args(index: int | None, count: int | None) -> tuple[int, int]:
    """``--index``/``--index-count`` (or their variables) made whole: both or neither."""
    if count is None:
        raise SpecError(
            f"--index {index}: give the number of indices too (--index-count, or {INDEX_COUNT_ENV})"
        )
    if index is None:
        raise SpecError(
            f"--index-count {count}: give this worker's index too (--index, or {INDEX_ENV}, "
            "which an Indexed Job sets)"
        )
    if count < 1 or not 0 <= index < count:
        raise SpecError(f"--index {index} --index-count {count}: need 0 <= index < count")
    return index, count


# ---------------------------------------------------------------------------------------
# Markers: an index is done


@dataclass
class IndexMarker:
    """Left by an index once its shards are finished (and uploaded, when publishing)."""

    index: int
    count: int
    plan_id: str
    merged: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)


def _marker_path(partial_dir: Path, index: int, count: int) -> Path:
    return Path(partial_dir) / settings.INDEXES_DIR / f"{count}-{index}.json"


def write_marker(partial_dir: Path, marker: IndexMarker) -> None:
    path = _marker_path(partial_dir, marker.index, marker.count)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(marker), sort_keys=True))
    os.replace(tmp, path)


def read_marker(partial_dir: Path, index: int, count: int, plan_id: str) -> IndexMarker | None:
    """The marker of ``index`` for this plan, or None."""
    try:
        data = json.loads(_marker_path(partial_dir, index, count).read_text())
        marker = IndexMarker(**data)
    except (OSError, ValueError, TypeError):
        return None
    return marker if marker.plan_id == plan_id else None


def missing_indexes(partial_dir: Path, count: int, plan_id: str) -> list[int]:
    """The indices of ``count`` that have not yet left a marker of this plan."""
    return [i for i in range(count) if read_marker(partial_dir, i, count, plan_id) is None]


# ---------------------------------------------------------------------------------------
# One index


@dataclass
class IndexReport:
    """What one index did; ``result`` is set where it finalised."""

    index: int
    count: int
    shards: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    already_finalized: bool = False
    result: JobResult | None = None  # a merge's, or an extraction's (extraction/split.py)
    unit: str = "shard"  # what an index's share is made of: "group" in an extraction
    verb: str = "merged"

    def summary(self) -> str:
        """What ``mergejob run`` prints for this index."""
        lines = [
            logs.index_done_line(
                self.index,
                self.count,
                len(self.shards),
                len(self.merged),
                len(self.resumed),
                unit=self.unit,
                verb=self.verb,
            )
        ]
        if self.already_finalized:
            lines.append("the output was already finalised: nothing to do")
        if self.result is not None:
            lines.append(self.result.summary())
        return "\n".join(lines)


def _start(
    spec: MergeSpec,
    token: str | None,
    recorded_inputs: Sequence[Mapping[str, Any]] | None,
    *,
    hash_inputs: bool,
) -> tuple[StartedJob, Plan]:
    if spec.engine.name != "stream":
        raise SpecError(
            f"engine.name: {spec.engine.name!r}: a merge split over indices needs the stream "
            "engine (--engine stream); the peft engine spreads one pod's GPUs with device_map"
        )
    job = start_job(
        spec,
        token=token,
        recorded_inputs=recorded_inputs,
        hash_inputs=hash_inputs,
        shared_partial=True,
    )
    return job, plan_for_job(job.job)


def run_index(
    spec: MergeSpec,
    *,
    index: int,
    count: int,
    token: str | None = None,
    finalize: bool = True,
    poll_seconds: float = 2.0,
    wait_timeout: float | None = None,
    recorded_inputs: Sequence[Mapping[str, Any]] | None = None,
) -> IndexReport:
    """Merge the shards of index ``index`` of ``count`` into the job's partial folder (on
    storage every index shares); index 0 then waits for the others and finalises.

    Resumes: shards whose record holds are kept. Publishing, each shard is preuploaded as it
    finishes; the finaliser makes the commit. ``wait_timeout`` bounds index 0's wait (a Job
    bounds it with ``activeDeadlineSeconds``; a failed index fails the Job and its pods).
    ``recorded_inputs``: a rerun from a recipe; every index checks its inputs against it
    before writing anything, as a plain rerun does.
    """
    if count < 1:
        raise SpecError(f"--index-count {count}: must be at least 1")
    finalizes = index == 0 and finalize
    # Index 0 writes the recipe: its inputs are hashed beside its merge and its wait.
    job, plan = _start(spec, token, recorded_inputs, hash_inputs=finalizes)
    report = IndexReport(index=index, count=count)
    mine = index_shards(plan.shard_sizes(), count, index)
    report.shards = [plan.shards[i].name for i in mine]
    if job.finished:
        log.info("index %d/%d: %s is already finished for this plan", index, count, job.out_dir)
        report.already_finalized = True
        return report
    size = sum(plan.shards[i].nbytes for i in mine)
    log.info(
        "index %d/%d: %d of %d shard(s), %.1f MB of %.1f MB (plan %s)",
        index,
        count,
        len(mine),
        len(plan.shards),
        size / 1e6,
        plan.output_bytes / 1e6,
        plan.plan_id[:12],
    )
    # Never delete_uploaded here: the finaliser re-reads every shard for its checksum.
    uploader = (
        start_uploader(spec, job.target, job.token, delete_uploaded=False)
        if job.target is not None
        else None
    )
    try:
        with job.timings.phase("merge", engine="stream", index=index):
            merged, resumed = merge_share(
                job, plan, mine, on_shard_done=_shard_logger(index, count, len(mine), uploader)
            )
        if uploader is not None:
            uploader.wait()
    finally:
        if uploader is not None:
            uploader.close()
    report.merged, report.resumed = merged, resumed
    write_marker(
        job.partial,
        IndexMarker(index=index, count=count, plan_id=plan.plan_id, merged=merged, resumed=resumed),
    )
    if finalizes:
        wait_for_indexes(job.partial, plan, count, poll_seconds=poll_seconds, timeout=wait_timeout)
        report.result = finalize_output(job, plan, count=count)
    return report


def _shard_logger(
    index: int, count: int, total: int, uploader: ShardUploader | None
) -> Callable[[Path], None]:
    done = [0]

    def on_shard_done(path: Path) -> None:
        done[0] += 1
        # `mergejob status` reads these lines back from the pod's log.
        log.info(logs.index_shard_done_line(index, count, done[0], total, path.name))
        if uploader is not None:
            uploader(path)

    return on_shard_done


def merge_share(
    job: StartedJob,
    plan: Plan,
    shards: Sequence[int],
    *,
    on_shard_done: Callable[[Path], None] | None = None,
) -> tuple[list[str], list[str]]:
    """Write ``shards`` into the partial folder with the pod's workers (one per visible GPU
    for ``--device cuda``, else ``engine.workers`` CPU processes: the one worker pool);
    returns (merged, resumed)."""
    devices = worker_devices(job.spec.engine.device, job.spec.engine.workers)
    reports = write_shards(
        plan,
        job.partial,
        shards,
        devices=devices,
        on_shard_done=on_shard_done,
        log_shards=False,
        digests=job.job.digests,
        fetch=fetch_options(job.job),  # a Hub base: only the input shards of this share
    )
    merged = [name for r in reports for name in r.merged]
    resumed = [name for r in reports for name in r.resumed]
    return merged, resumed


class Planned(Protocol):
    """What the markers are matched on: a merge's plan, or an extraction's."""

    @property
    def plan_id(self) -> str: ...


def wait_for_indexes(
    partial: Path,
    plan: Planned,
    count: int,
    *,
    poll_seconds: float = 2.0,
    timeout: float | None = None,
) -> None:
    """Block until every index of ``count`` has left its marker for this plan (polled:
    shared file systems cache directory listings for a while, re-reading sees past that)."""
    started = time.monotonic()
    said = 0.0
    while True:
        missing = missing_indexes(partial, count, plan.plan_id)
        if not missing:
            return
        waited = time.monotonic() - started
        if timeout is not None and waited >= timeout:
            raise MergeFailedError(
                f"{partial}: index(es) {', '.join(map(str, missing))} of {count} have not "
                f"finished after {waited:.0f}s; see `mergejob status`, then rerun"
            )
        if waited - said >= 30 or said == 0:
            log.info(logs.finaliser_waiting_line(missing, count))
            said = waited or 1e-9
        time.sleep(poll_seconds)


# ---------------------------------------------------------------------------------------
# The finalising step


def finalize_job(
    spec: MergeSpec,
    *,
    token: str | None = None,
    count: int | None = None,
    recorded_inputs: Sequence[Mapping[str, Any]] | None = None,
) -> MergeResult | None:
    """``mergejob run --finalize``: check every shard, write the rest, commit. Returns None
    when the output is already finished for this plan (idempotent)."""
    job, plan = _start(spec, token, recorded_inputs, hash_inputs=True)
    if job.finished:
        log.info("finaliser: %s is already finished for this plan", job.out_dir)
        return None
    if not any(p.name != settings.INDEXES_DIR for p in job.partial.iterdir()):
        if not any(job.partial.iterdir()):
            job.partial.rmdir()  # made by start_job just now
        raise MergeFailedError(
            f"{job.partial}: no partial output; run the indices first (mergejob run --index)"
        )
    return finalize_output(job, plan, count=count)


def finalize_output(job: StartedJob, plan: Plan, *, count: int | None) -> MergeResult:
    """Every shard's record checked (re-read for its sha256), then the job's one tail
    (:func:`mergejob.pipeline.finish_output`: index, config, tokenizer, card, recipe, the Hub
    commit, the rename into place). A shard whose record does not hold is merged again
    here, so a corrupted file never blocks the job."""
    partial = job.partial
    if job.complete:  # an earlier finaliser wrote it all: only the commit and rename are left
        return finish_output(job, stream_report(plan, [], workers=count or 1, device="cpu"))
    _remove_foreign_files(plan, partial)
    with job.timings.phase("finalize"):
        # Every shard made from the inputs the recipe records (other pods wrote most of them;
        # the hashing is the recipe's own, done once).
        drop_stale_records(plan, partial, range(len(plan.shards)), job.job.digests)
        try:
            records = finalize(plan, partial, verify_checksums=True, keep_records=True)
        except MergeFailedError as exc:
            log.warning("finaliser: %s; merging those shards here", str(exc).splitlines()[0])
            names = set(_unfinished(plan, partial))
            redo = [i for i, s in enumerate(plan.shards) if s.name in names]
            write_shards(
                plan,
                partial,
                redo,
                devices=["cpu"],
                log_shards=False,
                digests=job.job.digests,
                fetch=fetch_options(job.job),
            )
            records = finalize(plan, partial, verify_checksums=True, keep_records=True)
    report = stream_report(plan, records, workers=count or 1, device=job.spec.engine.device)
    result = finish_output(job, report)
    log.info("finaliser: %d shard(s) checked and committed", len(records))
    return result


def _unfinished(plan: Plan, partial: Path) -> list[str]:
    return [
        s.name
        for s in plan.shards
        if not record_holds(partial, read_record(partial, s.name), plan.plan_id)
    ]


def _remove_foreign_files(plan: Plan, partial: Path) -> None:
    """What no index of this plan wrote (other plans' shards, half-written files, a crashed
    finaliser's extras) goes before the finaliser writes; records and markers stay."""
    output.remove_all_but(
        partial, {s.name for s in plan.shards} | {RECORDS_DIR, settings.INDEXES_DIR}
    )
