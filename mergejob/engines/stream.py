"""The stream engine: shard by shard, in bounded memory, exact, parallel and resumable.

The path of one job::

    plan = plan_for_job(job)                          # headers and configs only
    write_shards(plan, partial, shards, devices=...)  # the pool's workers: their shards
    finalize(plan, partial)                           # every record checked; the index

``merge_with_stream`` (the pipeline's engine) runs every shard with the job's workers (local
processes, or one per GPU: :mod:`mergejob.engines.pool`) and then ``finalize``; an index of
an Indexed Job (:mod:`mergejob.indexed`) runs ``write_shards`` over its share, and its
finaliser ``finalize`` once at the end. One worker is :mod:`mergejob.engines.worker`. Output
shards are assigned by :func:`mergejob.io.shards.assign_shards`; the layout of the output
does not depend on how many workers there are, and neither do its bytes: every tensor is
computed by the same expressions whichever worker computes it. The rest of the folder
(config.json, tokenizer, card, recipe) is written by :mod:`mergejob.output` and the pipeline.

Each finished shard leaves a record (name, size, sha256, plan id, and the sha256 of the input
files it read) in the partial folder; a rerun after a crash skips shards whose record and
checksum hold and whose inputs are still those bytes, and redoes the rest
(:mod:`mergejob.engines.shard_inputs`).
``on_shard_done(path)`` is called for every finished shard (those an earlier run finished
too), so a publisher can upload it while the next ones merge.

CPU and GPU results agree byte for byte except in LoRA/DoRA tensors: cuBLAS orders the sums
of a matrix product differently from the CPU's BLAS (TF32 is switched off, so the difference
is the last bit of some fp32 sums, which can move a rounding of the output by one step).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mergejob import logs, output, settings
from mergejob.engines.pool import run_shares, split_shares
from mergejob.engines.shard_inputs import ShardInputs, drop_stale_records
from mergejob.engines.worker import InputGate, WorkerReport, worker_devices
from mergejob.errors import MergeFailedError
from mergejob.fetch import DEFAULT_DOWNLOAD_WORKERS, FetchOptions, ShardFetcher
from mergejob.io.digests import FileDigests
from mergejob.io.shards import RECORDS_DIR, ShardRecord, read_record, record_holds
from mergejob.io.writer import write_index
from mergejob.job import EngineReport, PreparedJob
from mergejob.plan.work import Plan, plan_for_job

log = logging.getLogger(__name__)

ShardCallback = Callable[[Path], None]


# ---------------------------------------------------------------------------------------
# Finishing the folder


def finalize(
    plan: Plan, partial_dir: Path, *, verify_checksums: bool = True, keep_records: bool = False
) -> list[ShardRecord]:
    """Check every shard's record, then write the weights' index (the rest of the folder,
    config.json and tokenizer included, is :mod:`mergejob.output`'s); the records are removed
    then (unless ``keep_records``: the pipeline removes them itself, last).

    Raises :class:`MergeFailedError` naming the shards that are missing or do not match
    their record (rerun their workers). ``verify_checksums`` re-reads every shard (use it
    when other machines wrote them).
    """
    partial_dir = Path(partial_dir)
    records: list[ShardRecord] = []
    bad: list[str] = []
    for shard in plan.shards:
        record = read_record(partial_dir, shard.name)
        path = partial_dir / shard.name
        if record is None or record.plan_id != plan.plan_id:
            bad.append(f"{shard.name}: no record of this plan")
        elif not path.is_file() or path.stat().st_size != record.size:
            bad.append(f"{shard.name}: missing or not {record.size} bytes")
        elif verify_checksums and not record_holds(partial_dir, record, plan.plan_id):
            bad.append(f"{shard.name}: checksum differs from its record")
        else:
            records.append(record)
    if bad:
        raise MergeFailedError(
            f"{partial_dir}: {len(bad)} of {len(plan.shards)} shards are not finished:\n  "
            + "\n  ".join(bad[:20])
            + "\nrun the workers again (they redo only these shards)"
        )
    if len(plan.shards) > 1:
        weight_map = {t.name: shard.name for shard in plan.shards for t in shard.tensors}
        params = sum(math.prod(t.shape) for t in plan.tensors)
        write_index(partial_dir, weight_map, plan.output_bytes, params)
    else:
        (partial_dir / settings.SAFETENSORS_INDEX_FILE).unlink(missing_ok=True)
    for stray in partial_dir.glob(".*.tmp-*"):  # half-written shards of crashed workers
        stray.unlink(missing_ok=True)
    if not keep_records:
        output.drop_records(partial_dir)
    return records


def clean_partial(plan: Plan, partial_dir: Path) -> None:
    """Remove what a rerun cannot use: files of other plans and half-written shards."""
    keep = {shard.name for shard in plan.shards} | {RECORDS_DIR}
    output.remove_all_but(partial_dir, keep)
    records = Path(partial_dir) / RECORDS_DIR
    if records.is_dir():
        for path in records.iterdir():
            if path.name.removesuffix(".json") not in keep:
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Several workers on one machine


def merge_plan(
    plan: Plan,
    partial_dir: Path,
    *,
    workers: int = 1,
    device: str = "cpu",
    on_shard_done: ShardCallback | None = None,
    keep_records: bool = False,
    digests: FileDigests | None = None,
    fetch: FetchOptions | None = None,
) -> EngineReport:
    """Run every worker of ``plan`` here (processes over shards, or one per GPU), then
    :func:`finalize`. Finished shards of an earlier, interrupted run of the same plan are kept
    if their inputs are the same bytes (``digests``: the job's, shared with its recipe).
    ``keep_records``: leave the shard records for the caller to remove once the folder is in
    place (so that a rerun after a later step failed, a publish say, merges nothing again).
    """
    partial_dir = Path(partial_dir)
    partial_dir.mkdir(parents=True, exist_ok=True)
    clean_partial(plan, partial_dir)
    devices = worker_devices(device, workers)
    started = time.monotonic()
    for warning in plan.warnings:
        log.warning("%s", warning)
    for adapter, ignored in plan.ignored:
        log.info("adapter %d: not used: %s (%s)", adapter, ignored.key, ignored.reason)
    log.info(
        "stream merge: %d shards, %s, %d tensors changed, %d worker(s) on %s",
        len(plan.shards),
        _gb(plan.output_bytes),
        plan.changed_tensors,
        len(devices),
        ", ".join(sorted(set(devices))),
    )
    reports = write_shards(
        plan,
        partial_dir,
        range(len(plan.shards)),
        devices=devices,
        on_shard_done=on_shard_done,
        digests=digests,
        fetch=fetch,
    )
    settings.kill_point("shards-written")
    records = finalize(plan, partial_dir, verify_checksums=False, keep_records=keep_records)
    merged = sum(len(r.merged) for r in reports)
    resumed = sum(len(r.resumed) for r in reports)
    if resumed:
        log.info("resumed: %d shard(s) were finished already, %d merged now", resumed, merged)
    return stream_report(
        plan,
        records,
        workers=len(devices),
        device=devices[0] if len(set(devices)) == 1 else "cuda",
        merged=merged,
        resumed=resumed,
        seconds=time.monotonic() - started,
    )


def write_shards(
    plan: Plan,
    partial_dir: Path,
    shards: Sequence[int],
    *,
    devices: Sequence[str],
    on_shard_done: ShardCallback | None = None,
    log_shards: bool = True,
    digests: FileDigests | None = None,
    fetch: FetchOptions | None = None,
) -> list[WorkerReport]:
    """Write ``shards`` (positions in the plan) into ``partial_dir`` with one worker per
    entry of ``devices`` (:mod:`mergejob.engines.pool`), shards split between them by bytes;
    a bar over their bytes on a terminal, else a log line per shard (``log_shards``).

    A shard an earlier run finished is kept only if its record's inputs are these bytes
    (:mod:`mergejob.engines.shard_inputs`); every record written carries them. ``digests``:
    the job's sha256 of its input files (one is made if not given). ``fetch``: the base is a
    Hub repo fetched now, shard by shard, as the output shards need it
    (:class:`BaseDownloads`)."""
    shards = list(shards)
    partial_dir = Path(partial_dir)
    inputs = ShardInputs(plan, partial_dir, digests if digests is not None else FileDigests())
    drop_stale_records(plan, partial_dir, shards, inputs.digests)
    inputs.start(shards)
    downloads = BaseDownloads(plan, partial_dir, shards, fetch) if fetch is not None else None
    with _Progress(plan, shards, log_shards=log_shards) as progress:

        def done(path: Path) -> None:
            inputs.seal(path.name)  # a spawned worker's record: its inputs' sha256 now
            if downloads is not None:
                downloads.shard_done(path.name)
            progress.shard_done(path)
            if on_shard_done:
                on_shard_done(path)
            settings.kill_point("shard-done")

        try:
            return run_shares(
                plan,
                partial_dir,
                split_shares(shards, plan.shard_sizes(), list(devices)),
                on_shard_done=done,
                progress=progress.update,
                inputs_of=inputs.of,
                gate=downloads.gate if downloads is not None else None,
                watch=downloads.fetcher.raise_if_failed if downloads is not None else None,
            )
        finally:
            if downloads is not None:
                downloads.close()


class BaseDownloads:
    """The base shards a :func:`write_shards` call fetches (a Hub base streamed during the
    merge): only those its unfinished output shards read, in the order they read them, each
    freed (with ``delete_after_use``) once every output shard that reads it is written."""

    def __init__(
        self, plan: Plan, partial_dir: Path, shards: Sequence[int], fetch: FetchOptions
    ) -> None:
        names = {fetch.base.path(f.name): f.name for f in fetch.base.files}
        # Finished shards (kept by the workers) need nothing downloaded.
        pending = [
            i
            for i in shards
            if not record_holds(
                partial_dir, read_record(partial_dir, plan.shards[i].name), plan.plan_id
            )
        ]
        reads = {i: tuple(p for p in plan.shard_inputs(i).values() if p in names) for i in pending}
        users = Counter(names[p] for paths in reads.values() for p in paths)
        order = [names[p] for p in plan.input_order(pending) if p in names]
        self._reads = {plan.shards[i].name: [names[p] for p in reads[i]] for i in pending}
        self.bytes = sum(f.size for f in fetch.base.files if f.name in users)
        # A bar of bytes downloaded on a terminal (the log has a line per shard).
        self.bar: Any = None
        if settings.progress_bars_enabled() and self.bytes:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.bytes, unit="B", unit_scale=True, desc="download")
        self.fetcher = ShardFetcher(
            fetch.base.repo_id,
            fetch.base.commit,
            order,
            token=fetch.token,
            workers=fetch.workers,
            delete_after_use=fetch.delete_after_use,
            users=dict(users),
            progress=self.bar.update if self.bar is not None else None,
        ).start()
        self.gate = InputGate(
            {i: paths for i, paths in reads.items() if paths}, check=self.fetcher.raise_if_failed
        )

    def shard_done(self, name: str) -> None:
        for file in self._reads.pop(name, ()):
            self.fetcher.done_with(file)

    def close(self) -> None:
        self.fetcher.close()
        if self.bar is not None:
            self.bar.close()


def stream_report(
    plan: Plan,
    records: Sequence[ShardRecord],
    *,
    workers: int,
    device: str,
    merged: int | None = None,
    resumed: int | None = None,
    seconds: float | None = None,
) -> EngineReport:
    """What the stream engine did, for logs and the recipe (the engine section)."""
    extra: dict[str, Any] = {"workers": workers, "device": device, "shards": len(plan.shards)}
    if merged is not None and resumed is not None:
        extra.update(shards_merged=merged, shards_resumed=resumed)
    extra["plan_id"] = plan.plan_id
    if seconds is not None:
        extra["seconds"] = round(seconds, 3)
    extra["shard_records"] = {r.name: {"size": r.size, "sha256": r.sha256} for r in records}
    return EngineReport(
        engine="stream",
        tensors_changed=plan.changed_tensors,
        config_updates=dict(plan.config_updates),
        extra=extra,
    )


def merge_with_stream(
    job: PreparedJob, out_dir: Path, *, on_shard_done: ShardCallback | None = None
) -> EngineReport:
    """The pipeline's engine: plan the job and merge it into ``out_dir`` (the partial folder).
    The shard records stay: the pipeline removes them just before the folder goes into place."""
    plan = plan_for_job(job)
    return merge_plan(
        plan,
        out_dir,
        workers=job.spec.engine.workers,
        device=job.spec.engine.device,
        on_shard_done=on_shard_done,
        keep_records=True,
        digests=job.digests,
        fetch=fetch_options(job),
    )


def fetch_options(job: PreparedJob) -> FetchOptions | None:
    """How a streamed Hub base is fetched during the merge (None: the base is on disk)."""
    if job.streamed is None:
        return None
    engine = job.spec.engine
    return FetchOptions(
        base=job.streamed,
        token=job.token,
        workers=engine.download_workers or DEFAULT_DOWNLOAD_WORKERS,
        delete_after_use=bool(engine.delete_downloaded),
    )


# ---------------------------------------------------------------------------------------
# Progress


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class _Progress:
    """One tqdm bar over output bytes on a terminal; a log line per shard otherwise."""

    def __init__(self, plan: Plan, shards: Sequence[int], *, log_shards: bool = True) -> None:
        self.total = sum(plan.shards[i].nbytes for i in shards)
        self.shards = len(shards)
        self.log_shards = log_shards
        self.finished = 0
        self.started = time.monotonic()
        self.bar: Any = None

    def __enter__(self) -> _Progress:
        if settings.progress_bars_enabled():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc="merge")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def shard_done(self, path: Path) -> None:
        self.finished += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.finished}/{self.shards} shards", refresh=False)
            return
        if not self.log_shards:
            return
        seconds = time.monotonic() - self.started
        log.info(logs.shard_done_line(self.finished, self.shards, path.name, seconds))
