"""The one worker pool of the stream engine: local CPU workers and per-GPU workers alike.

A pool runs :func:`mergejob.engines.stream.run_worker` once per *share* (a device and the
output shards it writes). One share runs in this process; several run as spawned processes
that die with their parent, report progress and finished shards on a queue, and are watched:
a worker that dies without a report (the OOM killer, a segfault in a GPU driver) fails the
job at once with a clear error instead of leaving it waiting. Every caller that spreads a
merge (a local job's ``engine.workers``, the GPUs of a pod, one index of an Indexed Job) goes
through :func:`run_shares`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergejob.engines.worker import InputGate, InputsCallback, WorkerReport, cpu_threads, run_worker
from mergejob.errors import MergeFailedError, MergeJobError
from mergejob.io.shards import assign_shards
from mergejob.plan.work import Plan

ShardCallback = Callable[[Path], None]
ProgressCallback = Callable[[int], None]

# How often the parent looks at its workers while none reports (seconds).
POLL_SECONDS = 1.0


@dataclass
class Share:
    """One worker's part: the device it computes on and the plan's shards it writes."""

    device: str
    shards: list[int]


def split_shares(
    shards: Sequence[int], shard_sizes: Sequence[int], devices: Sequence[str]
) -> list[Share]:
    """``shards`` (positions in the plan) split over ``devices`` by bytes; a pure function of
    the sizes, so the same split comes out on every machine. Devices left with no shard are
    dropped (at least one share is returned)."""
    parts = assign_shards([shard_sizes[s] for s in shards], max(1, len(devices)))
    shares = [
        Share(device, [shards[i] for i in part])
        for device, part in zip(devices, parts, strict=True)
        if part
    ]
    return shares or [Share(devices[0] if devices else "cpu", [])]


def run_shares(
    plan: Plan,
    partial_dir: Path,
    shares: Sequence[Share],
    *,
    on_shard_done: ShardCallback | None = None,
    progress: ProgressCallback | None = None,
    inputs_of: InputsCallback | None = None,
    gate: InputGate | None = None,
    watch: Callable[[], None] | None = None,
) -> list[WorkerReport]:
    """Write every share's shards into ``partial_dir``: in this process for one share, in
    one spawned process per share otherwise. ``on_shard_done`` gets each finished shard as
    soon as its worker reports it; ``progress`` output bytes as they are written.
    ``inputs_of`` (the input files' sha256 for a shard's record) is used in this process
    only: a spawned worker's records get them from ``on_shard_done``'s caller."""
    if len(shares) == 1:
        share = shares[0]
        return [
            run_worker(
                plan,
                partial_dir,
                device=share.device,
                shards=share.shards,
                on_shard_done=on_shard_done,
                progress=progress,
                inputs_of=inputs_of,
                gate=gate,
            )
        ]
    return _run_processes(
        plan,
        Path(partial_dir),
        list(shares),
        on_shard_done,
        progress,
        gate.portable() if gate is not None else None,
        watch,
    )


def _run_processes(
    plan: Plan,
    partial_dir: Path,
    shares: list[Share],
    on_shard_done: ShardCallback | None,
    progress: ProgressCallback | None,
    gate: InputGate | None = None,
    watch: Callable[[], None] | None = None,
) -> list[WorkerReport]:
    context = multiprocessing.get_context("spawn")
    messages: Any = context.Queue()
    processes = [
        context.Process(
            target=_worker_main,
            args=(plan, str(partial_dir), i, len(shares), share, messages, os.getpid(), gate),
            name=f"mergejob-worker-{i}",
            daemon=True,
        )
        for i, share in enumerate(shares)
    ]
    for process in processes:
        process.start()
    reports: dict[int, WorkerReport] = {}
    try:
        while len(reports) < len(processes):
            try:
                message = messages.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if watch is not None:
                    watch()  # a failed download stops the job (its workers wait for it)
                for i, process in enumerate(processes):
                    if i not in reports and not process.is_alive() and messages.empty():
                        raise MergeFailedError(
                            f"stream worker {i} ({shares[i].device}) died (exit code "
                            f"{process.exitcode}) without a report (killed for memory?); "
                            "rerun to resume from the finished shards"
                        ) from None
                continue
            kind = message[0]
            if kind == "progress":
                if progress is not None:
                    progress(message[1])
            elif kind == "shard":
                if on_shard_done is not None:
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
    share: Share,
    messages: Any,
    parent: int,
    gate: InputGate | None = None,
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
            device=share.device,
            shards=share.shards,
            on_shard_done=shard_done,
            progress=progress,
            threads=cpu_threads(count) if share.device == "cpu" else None,
            gate=gate,
        )
        messages.put(("done", report))
    except BaseException as exc:
        error: BaseException = exc
        if not isinstance(exc, MergeJobError):
            error = MergeFailedError(
                f"stream worker {index} ({share.device}): {type(exc).__name__}: {exc}"
            )
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
