"""The extraction engine: ΔW module by module, out of core, resumable per group.

Both checkpoints are read with ``pread`` (:class:`~mergejob.io.reader.FileReader`), one
module at a time in the order the base's shards hold them; ΔW = W_tuned - W_base is formed
in fp32 a block of rows at a time, so memory holds one module's ΔW and its factors, never a
model. Each group (a layer) ends as a part file with its record; a rerun skips the groups
whose part holds (:mod:`mergejob.extraction.writer`).

Before any large read, the tensors no LoRA can carry (the bias of a LoRA layer, a 3-D
expert weight) are compared: one that changed stops the job (exit 2) unless
``skip_undecomposable`` leaves it out.

Devices: ``cpu`` (one process; torch's threads use every core), ``cuda``/``cuda:N`` (one
GPU), ``auto`` (every visible GPU, one thread each over its share of the groups, balanced by
bytes; the CPU when there is none).

Example::

    outcome = run_extraction(plan, partial, device="cpu", dtype="float32")
    print(len(outcome.rows), "modules")
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergejob import logs
from mergejob.errors import InputError
from mergejob.extraction.plan import ExtractionPlan, ModuleWork, few
from mergejob.extraction.svd import RankRule, choose_rank, decompose, factors, residual
from mergejob.extraction.writer import (
    full_key,
    lora_keys,
    part_name,
    read_part,
    write_part,
)
from mergejob.io.headers import DTYPE_SIZES, TensorRef
from mergejob.io.reader import FileReader, byte_view
from mergejob.io.shards import ShardRecord, assign_shards, read_record, record_holds, write_record

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


def devices_for(device: str) -> list[torch.device]:
    """The devices ``engine.device`` names: ``auto`` is every visible GPU, else the CPU."""
    if device == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device(f"cuda:{i}") for i in range(count)] or [torch.device("cpu")]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"engine.device (--device) {device}: no CUDA GPU is visible here")
    return [torch.device(device)]


def run_extraction(
    plan: ExtractionPlan,
    partial: Path,
    *,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> ExtractionOutcome:
    """Extract every group of ``plan`` into part files in ``partial`` (resuming the finished
    ones) and return the parts and report rows, in group order."""
    started = time.monotonic()
    reader = FileReader()
    try:
        dropped = _check_undecomposable(plan, reader)
        groups = plan.groups
        todo: list[int] = []
        resumed = 0
        for index, _ in enumerate(groups):
            name = part_name(index)
            if record_holds(partial, read_record(partial, name), plan.plan_id):
                resumed += 1
            else:
                todo.append(index)
        if resumed:
            log.info("resuming: %d of %d groups are done already", resumed, len(groups))
        devices = devices_for(device)
        sizes = [sum(_module_bytes(plan, m) for m in groups[i]) for i in todo]
        shares = assign_shards(sizes, len(devices)) if todo else [[] for _ in devices]
        counter = _Counter(len(groups), resumed, progress)

        def work(share: list[int], dev: torch.device) -> None:
            for position in share:
                index = todo[position]
                rows, tensors = _extract_group(plan, groups[index], reader, dev)
                name = part_name(index)
                size, sha = write_part(partial / name, tensors, rows)
                write_record(partial, ShardRecord(name, size, sha, plan.plan_id))
                counter.done(_group_label(groups[index]))

        if len(devices) == 1:
            work(shares[0], devices[0])
        else:
            with ThreadPoolExecutor(len(devices), thread_name_prefix="mergejob-extract") as pool:
                futures = [pool.submit(work, s, d) for s, d in zip(shares, devices, strict=True)]
                for future in futures:
                    future.result()
    finally:
        reader.close()
    parts = [partial / part_name(i) for i in range(len(groups))]
    rows = [row for part in parts for row in read_part(part)[1]]
    outcome = ExtractionOutcome(
        parts=parts,
        rows=rows,
        dropped=dropped,
        resumed=resumed,
        seconds=time.monotonic() - started,
    )
    if not outcome.extracted:
        raise InputError(
            f"{plan.tuned_dir}: every extracted tensor equals the base's "
            f"({len(rows)} modules compared): the fine-tuned model is the base itself (or "
            "include/exclude left out what changed); nothing to extract"
        )
    return outcome


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
                log.info(logs.shard_done_line(self.count, self.total, label, seconds))


def _group_label(group: Sequence[ModuleWork]) -> str:
    first = group[0].module
    return first if len(group) == 1 else first.rpartition(".")[0].rpartition(".")[0] or first


def _module_bytes(plan: ExtractionPlan, module: ModuleWork) -> int:
    return sum(plan.base[n].nbytes + plan.tuned[n].nbytes for n in module.tensors)


# ---------------------------------------------------------------------------------------
# Tensors no LoRA carries


def _check_undecomposable(plan: ExtractionPlan, reader: FileReader) -> list[str]:
    names = list(plan.checks) + [n for m in plan.modules for n in m.checks]
    changed = [n for n in names if not _equal(reader, plan.base[n], plan.tuned[n])]
    if changed and not plan.settings.skip_undecomposable:
        raise InputError(
            f"{plan.tuned_dir}: {len(changed)} tensor(s) changed that no LoRA carries (the "
            f"bias of a LoRA layer, a weight that is neither a layer nor a norm: "
            f"{few(changed)}); pass --skip-undecomposable (extract.skip_undecomposable) to "
            "leave them out, or --exclude their modules"
        )
    for name in changed:
        log.warning("%s changed and no LoRA carries it: left out (skip_undecomposable)", name)
    return changed


def _equal(reader: FileReader, base: TensorRef, tuned: TensorRef) -> bool:
    a, b = reader.tensor(base), reader.tensor(tuned)
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
    delta = read_delta(reader, plan.base[module.weight], plan.tuned[module.weight])
    row: dict[str, Any] = {
        "module": module.module,
        "kind": module.kind,
        "shape": list(module.shape),
    }
    if not bool(delta.any()):
        row["status"] = "identical"
        return row, []
    if module.transposed:
        delta = delta.T  # (out, in) for the factors: PEFT's B is out x r, A is r x in
    work = delta.to(device)
    dec = decompose(work, rank=settings_.max_rank, method=settings_.svd, seed=_seed(module.module))
    rule = RankRule(settings_.max_rank, settings_.sv_epsilon, settings_.min_energy)
    rank = max(1, choose_rank(dec, rule))
    b, a = factors(dec, rank, distribute_scale=settings_.distribute_scale)
    dtype = getattr(torch, settings_.dtype)
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
    # Transposed modules were decomposed as ΔWᵀ: PEFT's delta is then (B @ A).T, with
    # lora_embedding_A r x vocab and lora_embedding_B hidden x r (Conv1D alike).
    key_a, key_b = lora_keys(module.module, embedding=module.kind == "embedding")
    return row, [(key_a, a.cpu()), (key_b, b.cpu())]
