"""One stream worker: writes its output shards of a plan into the partial folder.

:func:`run_worker` is what every worker runs, in this process or in one of the pool's
(:mod:`mergejob.engines.pool`): shards whose record holds are kept, the others computed
tensor by tensor (:class:`~mergejob.engines.stream_compute.TensorComputer`) and written with
their record, so a rerun after a crash redoes only unfinished shards.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergejob import settings
from mergejob.engines.stream_compute import TensorComputer
from mergejob.errors import SpecError
from mergejob.io.shards import (
    ShardRecord,
    assign_shards,
    read_record,
    record_holds,
    write_record,
)
from mergejob.io.writer import ShardWriter, shard_header
from mergejob.plan.work import Plan

ShardCallback = Callable[[Path], None]
ProgressCallback = Callable[[int], None]
# The sha256 of the input files a shard read ({label: sha256}), for its record.
InputsCallback = Callable[[int], Mapping[str, str]]


@dataclass
class WorkerReport:
    """What one worker did: shards merged, shards found finished, and their records."""

    index: int
    merged: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    records: list[ShardRecord] = field(default_factory=list)


@dataclass(frozen=True)
class InputGate:
    """The input files each shard reads that may not be on disk yet (a Hub base fetched
    during the merge: :mod:`mergejob.fetch`): a worker waits for them before it writes the
    shard. The files appear whole (the HF cache links a snapshot entry only to a finished
    download), so their existence is the signal, in this process and in a spawned worker.

    ``check`` (this process only; dropped when the gate goes to a spawned worker, whose
    parent watches the downloads instead) raises a failed download's error while waiting.
    """

    paths: dict[int, tuple[str, ...]]
    check: Callable[[], None] | None = field(default=None, compare=False)

    def wait(self, shard: int) -> None:
        for path in self.paths.get(shard, ()):
            while not os.path.exists(path):
                if self.check is not None:
                    self.check()
                time.sleep(0.05)

    def portable(self) -> InputGate:
        """The gate for a spawned worker (no callback crosses a process boundary)."""
        return InputGate(self.paths)


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
    inputs_of: InputsCallback | None = None,
    gate: InputGate | None = None,
) -> WorkerReport:
    """Write the output shards of worker ``index`` of ``count`` into ``partial_dir``.

    Shards with a record of this plan whose checksum holds are skipped (and reported as
    resumed); each shard written gets its record. ``on_shard_done`` gets the path of every
    finished shard; ``progress`` the number of output bytes done since its last call.
    ``threads`` is how many blocks are computed at once on CPU (default: this machine's
    cores); each runs torch single-threaded (coarse blocks in threads beat torch's own
    threads, whose per-op synchronisation costs more than it brings on small machines). ``shards`` overrides
    the assignment with an explicit list of shard indices (a pod's share split among its
    GPUs: see :mod:`mergejob.indexed`). ``inputs_of(shard)`` gives the sha256 of the input
    files a shard read, written into its record with it (without it, records carry none:
    :func:`mergejob.engines.stream.write_shards`, which checks them on a rerun, adds them).
    ``gate`` holds a shard until its input files are on disk (a streamed Hub base).

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
        _run_shards(
            plan, partial_dir, mine, computer, report, on_shard_done, progress, inputs_of, gate
        )
    return report


def _run_shards(
    plan: Plan,
    partial_dir: Path,
    mine: list[int],
    computer: TensorComputer,
    report: WorkerReport,
    on_shard_done: ShardCallback | None,
    progress: ProgressCallback | None,
    inputs_of: InputsCallback | None = None,
    gate: InputGate | None = None,
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
                if gate is not None:
                    gate.wait(i)
                record = write_shard(plan, i, partial_dir, computer, progress=progress)
                if inputs_of is not None:  # with the record, at once: no window without them
                    record = record.with_inputs(inputs_of(i))
                settings.kill_point("shard-before-record")
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
            settings.kill_point("mid-shard")
        size, sha256 = writer.close()
    except BaseException:
        writer.abort()
        raise
    return ShardRecord(name=shard.name, size=size, sha256=sha256, plan_id=plan.plan_id)


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
