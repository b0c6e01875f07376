"""The stream engine: shard by shard, in bounded memory, exact, parallel and resumable.

The path of one job::

    plan = plan_for_job(job)                          # headers and configs only
    run_worker(plan, partial, index=i, count=n)       # each worker: its output shards
    finalize(plan, partial)                           # index, config, tokenizer

``merge_with_stream`` (the pipeline's engine) runs the workers as local processes (or one per
GPU) and then ``finalize``; an Indexed Job runs ``run_worker`` in pod ``i`` of ``n`` and
``finalize`` once at the end. Output shards are assigned to workers by
:func:`mergejob.io.shards.assign_shards`; the layout of the output does not depend on how many
workers there are, and neither do its bytes: every tensor is computed by the same
expressions whichever worker computes it.

Each finished shard leaves a record (name, size, sha256, plan id) in the partial folder; a
rerun after a crash skips shards whose record and checksum hold and redoes the rest.
``on_shard_done(path)`` is called for every finished shard (those an earlier run finished
too), so a publisher can upload it while the next ones merge.

CPU and GPU results agree byte for byte except in LoRA/DoRA tensors: cuBLAS orders the sums
of a matrix product differently from the CPU's BLAS (TF32 is switched off, so the difference
is the last bit of some fp32 sums, which can move a rounding of the output by one step).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergejob import output, settings
from mergejob.engines.stream_compute import TensorComputer
from mergejob.errors import MergeFailedError, MergeJobError, SpecError
from mergejob.io.shards import (
    INDEX_FILE,
    RECORDS_DIR,
    ShardRecord,
    assign_shards,
    read_record,
    record_holds,
    write_record,
)
from mergejob.io.tensors import ShardWriter, shard_header, write_index
from mergejob.job import EngineReport, PreparedJob
from mergejob.plan.work import Plan, plan_for_job

log = logging.getLogger(__name__)

ShardCallback = Callable[[Path], None]
ProgressCallback = Callable[[int], None]


@dataclass
class WorkerReport:
    """What one worker did: shards merged, shards found finished, and their records."""

    index: int
    merged: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    records: list[ShardRecord] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# One worker


def run_worker(
    plan: Plan,
    partial_dir: Path,
    *,
    index: int = 0,
    count: int = 1,
    device: str = "cpu",
    on_shard_done: ShardCallback | None = None,
    progress: ProgressCallback | None = None,
    threads: int | None = None,
    shards: Sequence[int] | None = None,
) -> WorkerReport:
    """Write the output shards of worker ``index`` of ``count`` into ``partial_dir``.

    Shards with a record of this plan whose checksum holds are skipped (and reported as
    resumed); each shard written gets its record. ``on_shard_done`` gets the path of every
    finished shard; ``progress`` the number of output bytes done since its last call.
    ``threads`` is how many blocks are computed at once on CPU (default: this machine's
    cores); each runs torch single-threaded (coarse blocks in threads beat torch's own
    threads, whose per-op synchronisation costs more than it brings on small machines). ``shards`` overrides
    the assignment with an explicit list of shard indices (a pod's share split among its
    GPUs: see :mod:`mergejob.indexed`).

    Example (pod ``i`` of an Indexed Job of ``n`` pods, on shared storage)::

        plan = build_plan(base, adapters, output_dtype=None, max_shard_size=5 * 10**9)
        run_worker(plan, partial_dir_for(out), index=i, count=n)
    """
    partial_dir = Path(partial_dir)
    partial_dir.mkdir(parents=True, exist_ok=True)
    report = WorkerReport(index=index)
    mine = list(shards) if shards is not None else assign_shards(plan.shard_sizes(), count)[index]
    lanes = threads if threads is not None else cpu_threads(1)
    computer = TensorComputer(device, lanes=lanes)
    with torch_threads(1 if device == "cpu" else torch.get_num_threads()):
        _run_shards(plan, partial_dir, mine, computer, report, on_shard_done, progress)
    return report


def _run_shards(
    plan: Plan,
    partial_dir: Path,
    mine: list[int],
    computer: TensorComputer,
    report: WorkerReport,
    on_shard_done: ShardCallback | None,
    progress: ProgressCallback | None,
) -> None:
    try:
        for i in mine:
            shard = plan.shards[i]
            record = read_record(partial_dir, shard.name)
            if record is not None and record_holds(partial_dir, record, plan.plan_id):
                report.resumed.append(shard.name)
                report.records.append(record)
                if progress:
                    progress(shard.nbytes)
            else:
                record = write_shard(plan, i, partial_dir, computer, progress=progress)
                write_record(partial_dir, record)
                report.merged.append(shard.name)
                report.records.append(record)
            if on_shard_done:
                on_shard_done(partial_dir / shard.name)
    finally:
        computer.close()


def write_shard(
    plan: Plan,
    shard_index: int,
    partial_dir: Path,
    computer: TensorComputer,
    *,
    progress: ProgressCallback | None = None,
) -> ShardRecord:
    """Compute and write one output shard; returns its record (not yet stored)."""
    shard = plan.shards[shard_index]
    header, sizes = shard_header([(t.name, t.dtype, t.shape) for t in shard.tensors])
    writer = ShardWriter(
        Path(partial_dir) / shard.name, header, sum(sizes), release=computer.ring.release
    )
    try:
        for tensor in shard.tensors:
            for chunk in computer.chunks(tensor):
                writer.submit(chunk.data, chunk.slot)
                if progress:
                    progress(len(chunk.data))
        size, sha256 = writer.close()
    except BaseException:
        writer.abort()
        raise
    return ShardRecord(name=shard.name, size=size, sha256=sha256, plan_id=plan.plan_id)


# ---------------------------------------------------------------------------------------
# Finishing the folder


def finalize(
    plan: Plan, partial_dir: Path, *, verify_checksums: bool = True, keep_records: bool = False
) -> list[ShardRecord]:
    """Check every shard's record, then write the index, config.json, tokenizer and
    generation_config; the records are removed once everything is written (unless
    ``keep_records``: a finaliser that may be rerun removes them itself, last).

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
        (partial_dir / INDEX_FILE).unlink(missing_ok=True)
    write_config(plan, partial_dir)
    for stray in partial_dir.glob(".*.tmp-*"):  # half-written shards of crashed workers
        stray.unlink(missing_ok=True)
    tokenizer = Path(plan.tokenizer_from) if plan.tokenizer_from else None
    output.copy_tokenizer(tokenizer, partial_dir)
    output.copy_generation_config(Path(plan.base_dir), partial_dir)
    if not keep_records:
        output.drop_records(partial_dir)
    return records


def write_config(plan: Plan, out_dir: Path) -> None:
    """The base's config.json with the keys the merge decides (tie, vocab_size, dtype)."""
    config = output.read_json(Path(plan.base_dir) / "config.json")
    text = config.get("text_config")
    for key, value in plan.config_updates.items():
        if key == "dtype":
            config.pop("torch_dtype", None)
            config["dtype"] = value
            continue
        if isinstance(text, dict) and (key in text or key not in config):
            text[key] = value
        if key in config or not isinstance(text, dict):
            config[key] = value
    output.write_json(Path(out_dir) / "config.json", config)


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


def worker_devices(device: str, workers: int) -> list[str]:
    """One entry per worker: ``cpu`` N times, every visible GPU for ``cuda``, or one GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return ["cpu"] * max(1, workers)
    if not torch.cuda.is_available():
        raise SpecError(f"engine.device: {device!r} but no CUDA GPU is visible; use --device cpu")
    if device == "cuda":
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    gpu = int(device.split(":", 1)[1])
    if gpu >= torch.cuda.device_count():
        raise SpecError(
            f"engine.device: {device!r} but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    return [device]


def merge_plan(
    plan: Plan,
    partial_dir: Path,
    *,
    workers: int = 1,
    device: str = "cpu",
    on_shard_done: ShardCallback | None = None,
    keep_records: bool = False,
) -> EngineReport:
    """Run every worker of ``plan`` here (processes over shards, or one per GPU), then
    :func:`finalize`. Finished shards of an earlier, interrupted run of the same plan are kept.
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
    with _Progress(plan) as progress:

        def done(path: Path) -> None:
            progress.shard_done(path)
            if on_shard_done:
                on_shard_done(path)

        if len(devices) == 1:
            reports = [
                run_worker(
                    plan,
                    partial_dir,
                    device=devices[0],
                    on_shard_done=done,
                    progress=progress.update,
                )
            ]
        else:
            reports = _run_processes(plan, partial_dir, devices, done, progress.update)
    records = finalize(plan, partial_dir, verify_checksums=False, keep_records=keep_records)
    merged = sum(len(r.merged) for r in reports)
    resumed = sum(len(r.resumed) for r in reports)
    seconds = time.monotonic() - started
    if resumed:
        log.info("resumed: %d shard(s) were finished already, %d merged now", resumed, merged)
    return EngineReport(
        engine="stream",
        tensors_changed=plan.changed_tensors,
        extra={
            "workers": len(devices),
            "device": devices[0] if len(set(devices)) == 1 else "cuda",
            "shards": len(plan.shards),
            "shards_merged": merged,
            "shards_resumed": resumed,
            "plan_id": plan.plan_id,
            "seconds": round(seconds, 3),
            "shard_records": {r.name: {"size": r.size, "sha256": r.sha256} for r in records},
        },
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
    )


def cpu_threads(workers: int) -> int:
    """Compute lanes per worker: this machine's cores shared among ``workers``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` torch threads, restoring the caller's setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_processes(
    plan: Plan,
    partial_dir: Path,
    devices: list[str],
    on_shard_done: ShardCallback,
    progress: ProgressCallback,
) -> list[WorkerReport]:
    context = multiprocessing.get_context("spawn")
    messages: Any = context.Queue()
    processes = [
        context.Process(
            target=_worker_main,
            args=(plan, str(partial_dir), i, len(devices), devices[i], messages, os.getpid()),
            name=f"mergejob-worker-{i}",
            daemon=True,
        )
        for i in range(len(devices))
    ]
    for process in processes:
        process.start()
    reports: dict[int, WorkerReport] = {}
    try:
        while len(reports) < len(processes):
            try:
                message = messages.get(timeout=1.0)
            except queue.Empty:
                for i, process in enumerate(processes):
                    if i not in reports and not process.is_alive() and messages.empty():
                        raise MergeFailedError(
                            f"stream worker {i} died (exit code {process.exitcode}) without "
                            "a report (killed for memory?); rerun to resume"
                        ) from None
                continue
            kind = message[0]
            if kind == "progress":
                progress(message[1])
            elif kind == "shard":
                on_shard_done(Path(message[1]))
            elif kind == "done":
                reports[message[1].index] = message[1]
            elif kind == "error":
                raise message[2]
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=30)
    return [reports[i] for i in sorted(reports)]


def _worker_main(
    plan: Plan,
    partial_dir: str,
    index: int,
    count: int,
    device: str,
    messages: Any,
    parent: int,
) -> None:
    """A worker process: dies with its parent, reports progress and results on ``messages``."""
    _die_with_parent(parent)
    progress = _Batched(lambda n: messages.put(("progress", n)))

    def shard_done(path: Path) -> None:
        progress.flush()
        messages.put(("shard", str(path)))

    try:
        report = run_worker(
            plan,
            Path(partial_dir),
            index=index,
            count=count,
            device=device,
            on_shard_done=shard_done,
            progress=progress,
            threads=cpu_threads(count) if device == "cpu" else None,
        )
        messages.put(("done", report))
    except BaseException as exc:
        error: BaseException = exc
        if not isinstance(exc, MergeJobError):
            error = MergeFailedError(f"stream worker {index}: {type(exc).__name__}: {exc}")
        messages.put(("error", index, error))
        sys.exit(1)


class _Batched:
    """Progress sent on at most every quarter second (each message costs the parent a wake)."""

    def __init__(self, send: ProgressCallback) -> None:
        self.send = send
        self.pending = 0
        self.last = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        self.pending += nbytes
        now = time.monotonic()
        if now - self.last >= 0.25:
            self.send(self.pending)
            self.pending, self.last = 0, now

    def flush(self) -> None:
        if self.pending:
            self.send(self.pending)
            self.pending = 0


def _die_with_parent(parent: int) -> None:
    """On Linux, ask the kernel to kill this worker when the parent dies (even kill -9)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


# ---------------------------------------------------------------------------------------
# Progress


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class _Progress:
    """One tqdm bar over output bytes on a terminal; a log line per shard otherwise."""

    def __init__(self, plan: Plan) -> None:
        self.total = plan.output_bytes
        self.shards = len(plan.shards)
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
        seconds = time.monotonic() - self.started
        log.info(
            "shard %d/%d done: %s (%.1fs elapsed)", self.finished, self.shards, path.name, seconds
        )
