"""The extraction engine: ΔW module by module, out of core, resumable per group.

Both checkpoints are read with ``pread`` (:class:`~mergejob.io.reader.FileReader`), one
module at a time in the order the base's shards hold them; ΔW = W_tuned - W_base is formed
in fp32 a block of rows at a time, so memory holds one module's ΔW and its factors, never a
model. Each group (a layer) ends as a part file with its record; a rerun skips the groups
whose part holds (:mod:`mergejob.extraction.writer`).

Before any large read, the tensors no LoRA can carry (a 3-D expert weight) and the biases
of the LoRA layers are compared. A changed bias is carried as ``lora_B``'s bias (PEFT's
``lora_bias``, Δb in fp32 stored in the factors' dtype; every LoRA layer then gets one,
zeros where the bias did not change) unless a changed LoRA layer cannot take one (no bias in
the base, or an embedding): PEFT's ``lora_bias`` is for every layer of the adapter or none.
Then each LoRA layer whose bias changed is saved whole instead (its tuned weight and bias as
``modules_to_save``, no factors), or with ``skip_undecomposable`` keeps its LoRA and the
biases are left out. The decision depends on the input files only: every worker process and
every index of an Indexed Job reaches the same. A changed tensor no LoRA carries (a 3-D
expert weight) stops the job (exit 2) unless ``skip_undecomposable`` leaves it out.

Groups are taken in plan order (the order their bytes lie in the base's shards), each by
the next free worker: on ``cpu`` one process (torch's threads use every core) or, with
``workers`` N > 1, N spawned processes (:mod:`mergejob.extraction.workers`, ``cores // N``
torch threads each) writing their groups' parts and records; on GPUs (``cuda``: every
visible GPU, as the stream engine; ``cuda:N``: that one; ``auto``: every visible GPU, else
the CPU) one thread per GPU in this process. ``workers`` is for the CPU: with ``cuda`` or
``cuda:N`` it is refused, with ``auto`` on GPUs it is not used (a log line says so). The
bytes do not depend on the workers, the GPUs' number or the cores: each module's
randomized sketch has its own seed, and LAPACK runs on one thread
(:mod:`mergejob.extraction.svd`).

``gate(paths)`` is the hook for inputs still arriving (a streamed Hub model): it is called
in this process with the files a step is about to read and returns once they are whole on
disk (or raises, which stops the job); ``peek`` (a :class:`TensorSource`) is where the
checks read what they compare, a streamed model's tensors by HTTP range requests, so the
checks wait for no shard. See :func:`run_extraction`.

Example::

    outcome = run_extraction(plan, partial, device="cpu", workers=4)
    print(len(outcome.rows), "modules")
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mergejob import logs
from mergejob.errors import InputError
from mergejob.extraction.plan import ExtractionPlan, ModuleWork, few
from mergejob.extraction.svd import RankRule, choose_rank, decompose, factors, residual
from mergejob.extraction.writer import (
    full_key,
    group_done,
    lora_bias_key,
    lora_keys,
    part_name,
    read_part,
    write_part,
)
from mergejob.io.headers import DTYPE_SIZES, TensorRef
from mergejob.io.reader import FileReader, byte_view
from mergejob.io.shards import ShardRecord, write_record

log = logging.getLogger(__name__)

# ΔW is formed through buffers of about this many bytes per checkpoint.
_BLOCK_BYTES = 64 * 1024 * 1024


@dataclass
class ExtractionOutcome:
    """What the engine made: every group's part, the report rows, what was left out."""

    parts: list[Path]
    rows: list[dict[str, Any]]
    dropped: list[str] = field(default_factory=list)
    resumed: int = 0
    seconds: float = 0.0

    @property
    def extracted(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "identical"]


# The input gate: returns once the files given are whole on disk (or raises).
Gate = Callable[[Sequence[Path]], None]


class TensorSource(Protocol):
    """Where the checks before the groups read what they compare (``run_extraction``'s
    ``peek``): a :class:`~mergejob.io.reader.FileReader`, or a streamed input's source that
    reads a tensor of a file not yet whole on disk by one HTTP range request
    (:class:`mergejob.extraction.inputs.StreamedTensors`)."""

    def tensor(self, ref: TensorRef) -> torch.Tensor: ...


ProgressCallback = Callable[[int, int, str], None]


def devices_for(device: str) -> list[torch.device]:
    """The devices ``engine.device`` names: ``cuda`` every visible GPU (as the stream
    engine), ``cuda:N`` that one, ``auto`` every visible GPU or else the CPU, ``cpu``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [torch.device(f"cuda:{i}") for i in range(count)]
    if device == "auto":
        return gpus or [torch.device("cpu")]
    if device.startswith("cuda") and not gpus:
        raise InputError(f"engine.device (--device) {device}: no CUDA GPU is visible here")
    if device == "cuda":
        return gpus
    if device.startswith("cuda:") and int(device.split(":", 1)[1]) >= count:
        raise InputError(
            f"engine.device (--device) {device}: only {count} GPU(s) are visible here "
            f"(cuda:0..cuda:{count - 1})"
        )
    return [torch.device(device)]


def run_extraction(
    plan: ExtractionPlan,
    partial: Path,
    *,
    device: str = "cpu",
    workers: int = 1,
    progress: ProgressCallback | None = None,
    gate: Gate | None = None,
    groups: Sequence[int] | None = None,
    peek: TensorSource | None = None,
) -> ExtractionOutcome:
    """Extract every group of ``plan`` into part files in ``partial`` (resuming the finished
    ones) and return the parts and report rows, in group order.

    ``groups`` (positions in ``plan.groups``): only those (an index's share of an Indexed
    Job, :mod:`mergejob.extraction.split`); the outcome's parts, rows and ``resumed`` are
    then those groups' only, and a share in which nothing changed is no error (the caller
    that gathers every group checks that). The checks before the groups run all the same.

    ``device``: see :func:`devices_for`. ``workers`` N > 1 on the CPU: N spawned processes
    with ``cores // N`` torch threads each, groups handed out in plan order as they free up;
    a worker's error stops the job with that error (an :class:`InputError` stays exit 2),
    the groups finished are kept for a rerun. ``progress(done, total, label)`` is called in
    this process as each group is finished (default: a log line ``mergejob status`` reads).

    ``gate(paths)`` (optional) is called in this process, never in a worker, with the input
    files a step is about to read: without ``peek``, the base's and the fine-tune's files of
    the tensors the undecomposable check compares (the checked tensors and the LoRA layers'
    biases, then any weight the bias decision reads) before that check; for each group not
    finished yet in plan order, the files of its tensors before the group is extracted here
    or handed to a worker (so never more than a group per worker ahead). It must return only once those files are whole on disk, and
    may raise (the job stops with that error). Groups are taken in plan order, the order
    their bytes lie in the base's shards, so a gate fed by downloads in that order holds
    the extraction only as long as the next files are missing.

    ``peek`` (optional): where the checks read the tensors they compare, in this process
    (default: the files, through the engine's reader); the checks then call no gate. A
    streamed input's (:class:`~mergejob.extraction.inputs.StreamedTensors`) reads a tensor of
    a file still downloading by an HTTP range request, so the checks need no whole shard.
    """
    started = time.monotonic()
    devices = devices_for(device)
    gpu = devices[0].type == "cuda"
    if workers > 1 and gpu:
        if device != "auto":
            raise InputError(
                f"engine.workers (--workers) {workers}: worker processes are for the CPU; "
                f"with --device {device} each GPU gets one thread: leave out --workers, or "
                "use --device cpu"
            )
        log.info("engine.workers %d: for the CPU; each of the %d GPU(s) gets one thread",
                 workers, len(devices))  # fmt: skip
    reader = FileReader()
    try:
        if peek is None and gate is not None:
            checked = [*_checked(plan), *_biases(plan)]
            if checked:
                gate(input_files(plan, checked))
        if peek is None:
            dropped = _check_undecomposable(plan, reader, gate)
        else:  # the source reads what is not on disk yet: no gate
            dropped = _check_undecomposable(plan, peek)
        everything = plan.groups
        mine = range(len(everything)) if groups is None else sorted(set(groups))
        todo: list[int] = []
        resumed = 0
        for index in mine:
            if group_done(partial, plan.plan_id, index):
                resumed += 1
            else:
                todo.append(index)
        if resumed:
            log.info("resuming: %d of %d groups are done already", resumed, len(mine))
        counter = _Counter(len(mine), resumed, progress)

        def opened(index: int) -> None:
            if gate is not None:
                gate(group_files(plan, everything[index]))

        def finished(index: int) -> None:
            counter.done(_group_label(everything[index]))

        if workers > 1 and not gpu and len(todo) > 1:
            from mergejob.extraction.workers import run_processes  # spawns: only when asked

            run_processes(
                min(workers, len(todo)),
                todo,
                setup=_worker_state,
                setup_args=(plan, str(partial)),
                task=_worker_group,
                before=opened,
                done=finished,
                label=lambda i: f"group {i}, {_group_label(everything[i])}",
            )
        else:
            _run_threads(plan, partial, todo, devices, reader, opened, finished)
    finally:
        reader.close()
    parts = [partial / part_name(i) for i in mine]
    rows = [row for part in parts for row in read_part(part)[1]]
    outcome = ExtractionOutcome(
        parts=parts,
        rows=rows,
        dropped=dropped,
        resumed=resumed,
        seconds=time.monotonic() - started,
    )
    if groups is None and not outcome.extracted:
        raise InputError(
            f"{plan.tuned_dir}: every extracted tensor equals the base's "
            f"({len(rows)} modules compared): the fine-tuned model is the base itself (or "
            "include/exclude left out what changed); nothing to extract"
        )
    return outcome


def input_files(plan: ExtractionPlan, names: Sequence[str]) -> list[Path]:
    """The files of both models that hold the tensors ``names``: each once, base first."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(plan.base[name].path)
        seen.setdefault(plan.tuned[name].path)
    return [Path(path) for path in seen]


def group_files(plan: ExtractionPlan, group: Sequence[ModuleWork]) -> list[Path]:
    """The input files a group's extraction reads (what the gate is given for it)."""
    return [Path(path) for path in plan.group_files(group)]


def write_group(
    plan: ExtractionPlan, partial: Path, index: int, reader: FileReader, device: torch.device
) -> None:
    """Extract group ``index`` and write its part, then its record (what a rerun trusts)."""
    rows, tensors = _extract_group(plan, plan.groups[index], reader, device)
    name = part_name(index)
    size, sha = write_part(partial / name, tensors, rows)
    write_record(partial, ShardRecord(name, size, sha, plan.plan_id))


def _run_threads(
    plan: ExtractionPlan,
    partial: Path,
    todo: Sequence[int],
    devices: Sequence[torch.device],
    reader: FileReader,
    opened: Callable[[int], None],
    finished: Callable[[int], None],
) -> None:
    """The groups in this process: one device in this thread, several GPUs one thread each,
    every thread taking the next group in plan order (the gate called under the lock, so
    its calls come one at a time and in that order)."""
    lock = threading.Lock()
    waiting: Iterator[int] = iter(todo)
    failed = threading.Event()

    def take() -> int | None:
        with lock:
            index = None if failed.is_set() else next(waiting, None)
            if index is not None:
                opened(index)
            return index

    def work(dev: torch.device) -> None:
        try:
            while (index := take()) is not None:
                write_group(plan, partial, index, reader, dev)
                finished(index)
        except BaseException:
            failed.set()  # the other threads stop after their group
            raise

    if len(devices) == 1:
        work(devices[0])
        return
    with ThreadPoolExecutor(len(devices), thread_name_prefix="mergejob-extract") as pool:
        futures = [pool.submit(work, d) for d in devices]
        for future in futures:
            future.result()


def _worker_state(plan: ExtractionPlan, partial: str) -> tuple[ExtractionPlan, Path, FileReader]:
    """A worker process's state (:func:`mergejob.extraction.workers.run_processes`)."""
    return plan, Path(partial), FileReader()


def _worker_group(state: tuple[ExtractionPlan, Path, FileReader], index: int) -> None:
    plan, partial, reader = state
    write_group(plan, partial, index, reader, torch.device("cpu"))


class _Counter:
    """Groups done, for the progress line ``mergejob status`` reads (or the caller's bar)."""

    def __init__(
        self, total: int, done: int, progress: Callable[[int, int, str], None] | None
    ) -> None:
        self.total = total
        self.count = done
        self.progress = progress
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def done(self, label: str) -> None:
        with self._lock:
            self.count += 1
            if self.progress is not None:
                self.progress(self.count, self.total, label)
            else:
                seconds = time.monotonic() - self.started
                line = logs.shard_done_line(self.count, self.total, label, seconds, unit="group")
                log.info(line)


def _group_label(group: Sequence[ModuleWork]) -> str:
    first = group[0].module
    return first if len(group) == 1 else first.rpartition(".")[0].rpartition(".")[0] or first


# ---------------------------------------------------------------------------------------
# Tensors no LoRA carries


def _checked(plan: ExtractionPlan) -> list[str]:
    """The tensors no LoRA carries: each must be equal in both models (else refused or,
    with ``skip_undecomposable``, left out)."""
    return list(plan.checks) + [n for m in plan.modules for n in m.checks]


def _biases(plan: ExtractionPlan) -> list[str]:
    """The LoRA layers' biases (compared first for the bias decision)."""
    return [m.bias for m in plan.modules if m.bias is not None]


def _check_undecomposable(
    plan: ExtractionPlan, source: TensorSource, gate: Gate | None = None
) -> list[str]:
    """Compare what a LoRA may not carry, decide ``plan.lora_bias`` and ``plan.whole``, and
    return what ``skip_undecomposable`` leaves out (else raise :class:`InputError`, exit 2).
    ``source``: where the compared tensors are read (``run_extraction``'s ``peek``, or its
    reader); ``gate``: as :func:`run_extraction`'s, for the weights the bias decision reads
    beyond the tensors the caller gated already (None with a source that needs no gate)."""
    changed = _changed(source, plan, _checked(plan))
    if changed and not plan.settings.skip_undecomposable:
        raise InputError(
            f"{plan.tuned_dir}: {len(changed)} tensor(s) changed that no LoRA carries (a "
            f"weight that is neither a layer nor a norm: {few(changed)}); pass "
            "--skip-undecomposable (extract.skip_undecomposable) to leave them out, or "
            "--exclude their modules"
        )
    biases, blocker = _bias_decision(plan, source, gate)
    dropped = changed + (biases if blocker and not plan.whole else [])
    for name in dropped:
        log.warning("%s changed and no LoRA carries it: left out (skip_undecomposable)", name)
    if plan.lora_bias:
        log.info("%d changed bias(es) carried as lora_B biases (lora_bias)", len(biases))
    if plan.whole:
        assert blocker is not None
        size = sum(
            plan.tuned[n].nbytes for m in plan.modules if m.module in plan.whole for n in m.tensors
        )
        log.info(
            "%d LoRA layer(s) whose bias changed saved whole (modules_to_save, %s): PEFT's "
            "lora_bias is for every LoRA layer or none, and the changed LoRA layer %s cannot "
            "take one (%s)",
            len(plan.whole),
            logs.size_text(size),
            blocker,
            _no_bias_reason(plan, blocker),
        )
    return dropped


def _bias_decision(
    plan: ExtractionPlan, source: TensorSource, gate: Gate | None = None
) -> tuple[list[str], str | None]:
    """Set ``plan.lora_bias``, ``plan.whole`` and ``plan.bias_blocker``: lora_bias when a
    LoRA layer's bias changed and every changed LoRA layer can take a ``lora_B`` bias; else
    the layers whose bias changed are saved whole (none with ``skip_undecomposable``).
    Returns the changed biases and the first changed layer that cannot take one (None when
    every one can). Reads the biases, and only when one changed, the weights of the layers
    without one (stopping at the first that changed)."""
    biases = _changed(source, plan, _biases(plan))
    blocker = None
    for m in plan.decomposed if biases else ():
        if m.bias is not None or m.weight is None:
            continue
        if gate is not None:  # a streamed input: this weight's files may not be here yet
            gate(input_files(plan, [m.weight]))
        if not _equal(source, plan.base[m.weight], plan.tuned[m.weight]):
            blocker = m.module
            break
    whole = blocker is not None and not plan.settings.skip_undecomposable
    plan.whole = frozenset(b.rpartition(".")[0] for b in biases) if whole else frozenset()
    plan.bias_blocker = blocker
    plan.lora_bias = bool(biases) and blocker is None
    return biases, blocker


def _no_bias_reason(plan: ExtractionPlan, module: str) -> str:
    work = next(m for m in plan.modules if m.module == module)
    if work.kind == "embedding":
        return "PEFT has no lora_bias for an embedding"
    return "it has no bias in the base"


# The checks' small tensors are compared this many at a time: a streamed input's are HTTP
# range requests, a round trip each (hundreds of biases in a large model).
_CHECK_THREADS = 8


def _changed(source: TensorSource, plan: ExtractionPlan, names: Sequence[str]) -> list[str]:
    """The tensors of ``names`` that differ between the models, in their order."""
    if len(names) <= 1:
        return [n for n in names if not _equal(source, plan.base[n], plan.tuned[n])]
    with ThreadPoolExecutor(min(_CHECK_THREADS, len(names))) as pool:
        same = list(pool.map(lambda n: _equal(source, plan.base[n], plan.tuned[n]), names))
    return [n for n, equal in zip(names, same, strict=True) if not equal]


def _equal(source: TensorSource, base: TensorRef, tuned: TensorRef) -> bool:
    a, b = source.tensor(base), source.tensor(tuned)
    if a.dtype == b.dtype:  # bytes: NaN == NaN, -0.0 != 0.0, as the files hold them
        return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if a.is_floating_point() and b.is_floating_point():
        return bool(torch.equal(a.double(), b.double()))
    return False


# ---------------------------------------------------------------------------------------
# One group


def _seed(module: str) -> int:
    """The randomized sketch's seed: fixed per module, so a rerun writes the same bytes."""
    return int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "little")


def _extract_group(
    plan: ExtractionPlan, group: Sequence[ModuleWork], reader: FileReader, device: torch.device
) -> tuple[list[dict[str, Any]], list[tuple[str, torch.Tensor]]]:
    rows: list[dict[str, Any]] = []
    tensors: list[tuple[str, torch.Tensor]] = []
    for module in group:
        if module.kind == "full":
            row, saved = _full_module(plan, module, reader)
        else:
            row, saved = _lora_module(plan, module, reader, device)
        rows.append(row)
        tensors.extend(saved)
    return rows, tensors


def _full_module(
    plan: ExtractionPlan, module: ModuleWork, reader: FileReader
) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    same = all(_equal(reader, plan.base[n], plan.tuned[n]) for n in module.tensors)
    row: dict[str, Any] = {
        "module": module.module,
        "kind": "full",
        "shape": list(plan.tuned[module.tensors[0]].shape),
        "status": "identical" if same else "full",
    }
    if same:
        return row, []
    row.update({"kept": 1.0, "error": 0.0})
    saved = [(full_key(n), reader.tensor(plan.tuned[n])) for n in module.tensors]
    if module.mirror is not None:
        row["mirror"] = module.mirror
        weight = f"{module.module}.weight"
        saved += [
            (full_key(f"{module.mirror}.weight"), t) for k, t in saved if k == full_key(weight)
        ]
    return row, saved


def _whole_lora_module(
    plan: ExtractionPlan, module: ModuleWork, reader: FileReader
) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """A LoRA layer whose bias changed where lora_bias cannot carry it: its tuned tensors
    (weight and bias), whole, as ``modules_to_save``; no factors."""
    blocker = plan.bias_blocker
    row: dict[str, Any] = {
        "module": module.module,
        "kind": "full",
        "shape": list(module.shape),
        "status": "full",
        "kept": 1.0,
        "error": 0.0,
        "reason": f"bias changed; lora_bias blocked by {blocker}",
    }
    return row, [(full_key(n), reader.tensor(plan.tuned[n])) for n in module.tensors]


def read_delta(reader: FileReader, base: TensorRef, tuned: TensorRef) -> torch.Tensor:
    """``tuned - base`` in fp32, formed a block of rows at a time (whatever the dtypes)."""
    rows = base.shape[0]
    cols = 1
    for dim in base.shape[1:]:
        cols *= dim
    delta = torch.empty(rows, cols, dtype=torch.float32)
    row_base = cols * DTYPE_SIZES[base.dtype]
    row_tuned = cols * DTYPE_SIZES[tuned.dtype]
    step = max(1, _BLOCK_BYTES // max(row_base, row_tuned, 1))
    buf_base = torch.empty(min(step, rows) * row_base, dtype=torch.uint8)
    buf_tuned = torch.empty(min(step, rows) * row_tuned, dtype=torch.uint8)
    for start in range(0, rows, step):
        count = min(step, rows - start)
        b = buf_base[: count * row_base]
        t = buf_tuned[: count * row_tuned]
        reader.read_into(base.path, base.offset + start * row_base, byte_view(b))
        reader.read_into(tuned.path, tuned.offset + start * row_tuned, byte_view(t))
        block = delta[start : start + count]
        block.copy_(t.view(getattr(torch, tuned.dtype)).reshape(count, cols))
        block.sub_(b.view(getattr(torch, base.dtype)).reshape(count, cols).float())
    return delta.reshape(base.shape)


def _lora_module(
    plan: ExtractionPlan, module: ModuleWork, reader: FileReader, device: torch.device
) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    assert module.weight is not None
    settings_ = plan.settings
    # Decided by _check_undecomposable before any group (a worker gets the plan after it).
    assert plan.lora_bias is not None
    if module.module in plan.whole:
        return _whole_lora_module(plan, module, reader)
    delta = read_delta(reader, plan.base[module.weight], plan.tuned[module.weight])
    delta_bias = None
    if module.bias is not None and plan.lora_bias:
        delta_bias = read_delta(reader, plan.base[module.bias], plan.tuned[module.bias])
    bias_changed = delta_bias is not None and bool(delta_bias.any())
    row: dict[str, Any] = {
        "module": module.module,
        "kind": module.kind,
        "shape": list(module.shape),
    }
    if not bool(delta.any()) and not bias_changed:
        row["status"] = "identical"
        return row, []
    dtype = getattr(torch, settings_.dtype)
    # Transposed modules were decomposed as ΔWᵀ: PEFT's delta is then (B @ A).T, with
    # lora_embedding_A r x vocab and lora_embedding_B hidden x r (Conv1D alike).
    key_a, key_b = lora_keys(module.module, embedding=module.kind == "embedding")
    if not bool(delta.any()):  # only the bias changed: zero factors at the smallest rank
        out, inputs = module.lora_shape
        b, a = torch.zeros(out, 1, dtype=dtype), torch.zeros(1, inputs, dtype=dtype)
        row.update({"status": "extracted", "rank": 1, "kept": 1.0, "error": 0.0})
        row.update({"optimal_error": 0.0, "method": "none", "norm": 0.0})
    else:
        if module.transposed:
            delta = delta.T  # (out, in) for the factors: PEFT's B is out x r, A is r x in
        work = delta.to(device)
        dec = decompose(
            work, rank=settings_.max_rank, method=settings_.svd, seed=_seed(module.module)
        )
        rule = RankRule(settings_.max_rank, settings_.sv_epsilon, settings_.min_energy)
        rank = max(1, choose_rank(dec, rule))
        b, a = factors(dec, rank, distribute_scale=settings_.distribute_scale)
        b, a = b.to(dtype), a.to(dtype)
        err, total = residual(work, b, a)
        optimal = dec.optimal_error(rank)
        row.update(
            {
                "status": "extracted",
                "rank": rank,
                "kept": dec.kept_fraction(rank),
                "error": (err / total) ** 0.5 if total > 0 else 0.0,
                "optimal_error": optimal,
                "method": dec.method,
                "norm": total**0.5,
            }
        )
    saved = [(key_a, a.cpu()), (key_b, b.cpu())]
    if delta_bias is not None:
        # lora_bias: PEFT's merge adds lora_B.bias x scale (1) to the layer's bias. Every
        # LoRA layer gets one (zeros where the bias did not change); Δb, formed in fp32, is
        # rounded once to the factors' dtype, so base + Δb rounds back to the fine-tune's.
        saved.append((lora_bias_key(module.module), delta_bias.to(dtype)))
        if bias_changed:
            row["bias"] = True
    return row, saved
