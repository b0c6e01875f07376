"""Extraction worker processes: ``engine.workers`` N on the CPU.

:func:`run_processes` starts N spawned processes (they die with their parent, as the merge's
pool's do: :mod:`mergejob.engines.pool`), each running torch on ``cores // N`` threads, and
hands them items (the extraction's group indices) one at a time in the order given, as
workers free up: a worker holds at most one item, so the items start in order and the
parent's ``before(item)`` (the input gate) is called for an item only when a worker is free
to take it. Each finished item comes back to ``done(item)`` in the parent (the progress
line). The first failure stops every worker: a worker's error is raised in the parent as
it was (an :class:`~mergejob.errors.InputError` stays exit 2; anything else becomes a
:class:`~mergejob.errors.MergeFailedError` naming the worker and the item), and a worker
that dies without a word (killed for memory) fails the job at once. What the workers
finished is on disk (their part files and records), so a rerun resumes from it.

The work itself comes as two picklable functions (module-level, so a spawned process
imports them): ``setup(*setup_args)`` once per process, whose result is the state handed to
``task(state, item)`` for each item.

Example::

    run_processes(
        4, todo, setup=open_state, setup_args=(plan, str(partial)), task=write_group,
        before=lambda i: gate(files_of(i)), done=lambda i: counter.done(label(i)),
    )
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mergejob.engines.pool import POLL_SECONDS, _die_with_parent
from mergejob.engines.worker import cpu_threads, torch_threads
from mergejob.errors import EXIT_BAD_INPUT, InputError, MergeFailedError, MergeJobError

ItemCallback = Callable[[int], None]


def run_processes(
    count: int,
    items: Sequence[int],
    *,
    setup: Callable[..., Any],
    setup_args: tuple[Any, ...],
    task: Callable[[Any, int], None],
    before: ItemCallback | None = None,
    done: ItemCallback | None = None,
    label: Callable[[int], str] = str,
) -> None:
    """Run ``task(state, item)`` for every item in ``count`` spawned processes, items
    dispatched in order as workers free up; see the module doc. ``label(item)`` names an
    item in error messages."""
    context = multiprocessing.get_context("spawn")
    tasks: Any = context.Queue()
    results: Any = context.Queue()
    threads = cpu_threads(count)
    processes = [
        context.Process(
            target=_worker_main,
            args=(i, threads, setup, setup_args, task, tasks, results, os.getpid()),
            name=f"mergejob-extract-{i}",
            daemon=True,
        )
        for i in range(count)
    ]
    for process in processes:
        process.start()
    waiting = iter(items)
    outstanding = 0  # items handed out and not done: at most one per worker
    held: dict[int, int] = {}  # worker -> the item it took (for a death's message)
    finished = False
    try:
        while True:
            while outstanding < count and (item := next(waiting, None)) is not None:
                if before is not None:
                    before(item)
                tasks.put(item)
                outstanding += 1
            if not outstanding:
                break
            try:
                kind, worker, item, payload = results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                _check_alive(processes, results, held, label)
                continue
            if kind == "took":
                held[worker] = item
            elif kind == "done":
                held.pop(worker, None)
                outstanding -= 1
                if done is not None:
                    done(item)
            else:
                raise _parent_error(payload, worker, item, label)
        finished = True
    finally:
        _stop(processes, tasks, finished)


def _stop(processes: Sequence[Any], tasks: Any, finished: bool) -> None:
    """Finished: each worker gets the ``None`` that ends it; else they are terminated."""
    if finished:
        for _ in processes:
            tasks.put(None)
    else:
        tasks.cancel_join_thread()  # nobody reads what is left: do not wait at exit
    for process in processes:
        if not finished and process.is_alive():
            process.terminate()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def _check_alive(
    processes: Sequence[Any], results: Any, held: dict[int, int], label: Callable[[int], str]
) -> None:
    """Raise for a worker that died without a report (its report may still be queued)."""
    for i, process in enumerate(processes):
        if not process.is_alive() and results.empty():
            what = f" while on {label(held[i])}" if i in held else ""
            raise MergeFailedError(
                f"extraction worker {i} died{what} (exit code {process.exitcode}) without a "
                "report (killed for memory?); rerun to resume from the finished groups"
            )


def _parent_error(
    payload: Any, worker: int, item: int | None, label: Callable[[int], str]
) -> MergeJobError:
    """The error a worker reported, as the parent raises it."""
    if isinstance(payload, MergeJobError):
        return payload
    where = f"extraction worker {worker}" + (f" ({label(item)})" if item is not None else "")
    exit_code, text = payload
    if exit_code == EXIT_BAD_INPUT:
        return InputError(f"{where}: {text}")
    return MergeFailedError(f"{where}: {text}")


def _worker_main(
    index: int,
    threads: int,
    setup: Callable[..., Any],
    setup_args: tuple[Any, ...],
    task: Callable[[Any, int], None],
    tasks: Any,
    results: Any,
    parent: int,
) -> None:
    """A worker process: takes items until the ``None`` that ends it; the first error is
    reported and ends it. It leaves with ``os._exit`` once its reports are sent: its work
    is on disk, and tearing down torch's interpreter would cost seconds."""
    _die_with_parent(parent)
    item: int | None = None
    code = 0
    try:
        with torch_threads(threads):
            state = setup(*setup_args)
            while (item := tasks.get()) is not None:
                results.put(("took", index, item, None))
                task(state, item)
                results.put(("done", index, item, None))
    except BaseException as exc:
        results.put(("error", index, item, _portable(exc)))
        code = 1
    results.close()
    results.join_thread()  # every report written to the pipe
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _portable(exc: BaseException) -> Any:
    """``exc`` itself when it is one of mergejob's and crosses the process boundary whole,
    else ``(exit code, message)`` for the parent to raise."""
    if isinstance(exc, MergeJobError):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:  # an error whose arguments pickle cannot rebuild
            return (exc.exit_code, str(exc))
    return (1, f"{type(exc).__name__}: {exc}")
