"""The files of an extracted adapter: per-group parts, the adapter's one safetensors file, and
``adapter_config.json``.

Each group of modules is written as a *part* (``.mergejob-parts/group-00007.safetensors`` in
the partial folder) holding its tensors under PEFT's key names and its report rows in the
header's metadata, with a shard record beside it (:mod:`mergejob.io.shards`): a rerun after a
crash skips every group whose part holds. Once every group is done the parts are streamed,
one tensor at a time, into ``adapter_model.safetensors``; no step holds more than one group's
factors.

Example::

    size, sha = write_part(partial / part_name(3), tensors, rows)
    assemble_adapter([partial / part_name(g) for g in range(groups)], partial)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergejob import settings
from mergejob.io.headers import DTYPE_SIZES, TensorRef, read_header
from mergejob.io.reader import FileReader, byte_view
from mergejob.io.shards import read_record, record_holds
from mergejob.io.writer import ShardWriter, shard_header

PARTS_DIR = settings.EXTRACT_PARTS_DIR
ROWS_KEY = "mergejob.extraction.rows"
# The adapter file is assembled through buffers of this size (one tensor may be larger).
_COPY_BYTES = 64 * 1024 * 1024


def part_name(group: int) -> str:
    """A group's part, relative to the partial folder (its shard record's name too)."""
    return f"{PARTS_DIR}/group-{group:05d}.safetensors"


def group_done(partial: Path, plan_id: str, group: int) -> bool:
    """Whether group ``group``'s part in ``partial`` holds its record for ``plan_id`` (an
    earlier try finished it)."""
    return record_holds(partial, read_record(partial, part_name(group)), plan_id)


def lora_keys(module: str, *, embedding: bool) -> tuple[str, str]:
    """PEFT's saved keys of a module's ``(A, B)`` factors."""
    prefix = f"{settings.PEFT_PREFIX}{module}"
    if embedding:
        return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def lora_bias_key(module: str) -> str:
    """PEFT's saved key of a module's ``lora_B`` bias (``lora_bias``)."""
    return f"{settings.PEFT_PREFIX}{module}.lora_B.bias"


def full_key(tensor_name: str) -> str:
    """PEFT's saved key of a ``modules_to_save`` tensor (the wrapper's infix is dropped)."""
    return f"{settings.PEFT_PREFIX}{tensor_name}"


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return byte_view(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8))


def write_part(
    path: Path, tensors: Sequence[tuple[str, torch.Tensor]], rows: Sequence[Mapping[str, Any]]
) -> tuple[int, str]:
    """Write one group's tensors (in the order given) and report rows; returns
    ``(size, sha256)`` for its record. Written under a temporary name, renamed when whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in tensors]
    header, sizes = shard_header(entries, {ROWS_KEY: json.dumps(list(rows), sort_keys=True)})
    writer = ShardWriter(path, header, sum(sizes))
    try:
        for _, tensor in tensors:
            writer.submit(_bytes_of(tensor))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def read_part(path: Path) -> tuple[dict[str, TensorRef], list[dict[str, Any]]]:
    """A part's tensors (as descriptors) and its report rows."""
    header = read_header(path)
    rows = json.loads(header.metadata.get(ROWS_KEY, "[]"))
    return header.tensors(), [dict(r) for r in rows]


def assemble_adapter(parts: Sequence[Path], folder: Path) -> tuple[int, str]:
    """Stream every part's tensors, sorted by key, into ``folder/adapter_model.safetensors``;
    returns ``(size, sha256)``."""
    refs: dict[str, TensorRef] = {}
    for part in parts:
        refs.update(read_part(part)[0])
    ordered = [refs[name] for name in sorted(refs)]
    header, sizes = shard_header([(r.name, r.dtype, r.shape) for r in ordered])
    writer = ShardWriter(Path(folder) / settings.ADAPTER_WEIGHTS_FILE, header, sum(sizes))
    reader = FileReader()
    try:
        for ref in ordered:
            done = 0
            while done < ref.nbytes:
                count = min(_COPY_BYTES, ref.nbytes - done)
                buffer = torch.empty(count, dtype=torch.uint8)
                reader.read_into(ref.path, ref.offset + done, byte_view(buffer))
                writer.submit(byte_view(buffer))
                done += count
        return writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()


def factor_bytes(shape: tuple[int, int], rank: int, dtype: str) -> int:
    """Bytes of a module's two factors at ``rank``."""
    return rank * (shape[0] + shape[1]) * DTYPE_SIZES[dtype]


def write_adapter_config(
    folder: Path,
    *,
    ranks: Mapping[str, int],
    modules_to_save: Sequence[str],
    all_modules: Sequence[str],
    fan_in_fan_out: bool,
    base_model_name_or_path: str,
    revision: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it (built with ``peft.LoraConfig``): the most
    common rank as ``r``, the others in ``rank_pattern``; ``lora_alpha = r`` everywhere
    (``alpha_pattern`` follows ``rank_pattern``), so every scale is 1 and ``B @ A`` is ΔW.
    ``lora_bias`` is set when ``folder``'s adapter file (assembled first) holds ``lora_B``
    biases: then it holds one for every LoRA layer (zeros where the bias did not change),
    and PEFT's merge adds it, times the scale 1, to the layer's bias. Returns the config as
    written."""
    from peft import LoraConfig

    weights = Path(folder) / settings.ADAPTER_WEIGHTS_FILE
    lora_bias = weights.is_file() and any(
        name.endswith(".lora_B.bias") for name in read_header(weights).tensors()
    )

    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k)) if counts else 1
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=target_modules(list(ranks), all_modules),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        modules_to_save=list(modules_to_save) or None,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        bias="none",
        lora_bias=lora_bias,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        revision=revision,
        inference_mode=True,
    )
    config.save_pretrained(str(folder))
    # PEFT keeps target_modules as a set and writes it in the set's order, which follows
    # the process's string hash seed: sorted, the file is the same bytes in every process
    # (a recipe rerun reproduces it). Written back as PEFT writes it.
    path = Path(folder) / settings.ADAPTER_CONFIG_FILE
    written = json.loads(path.read_text())
    if isinstance(written.get("target_modules"), list):
        written["target_modules"] = sorted(written["target_modules"])
    path.write_text(json.dumps(written, indent=2, sort_keys=True))
    return written


def target_modules(lora_modules: Sequence[str], all_modules: Sequence[str]) -> list[str]:
    """``target_modules``: a leaf name (``q_proj``) where every module of the model with that
    leaf has a LoRA here, else the full module names (PEFT matches ``name`` or ``*.name``). A
    layer saved whole (``modules_to_save``, e.g. for its changed bias) has no LoRA here, so
    its leaf is never listed and no entry matches it."""
    chosen = set(lora_modules)
    by_leaf: dict[str, list[str]] = {}
    for module in all_modules:
        by_leaf.setdefault(module.rpartition(".")[2], []).append(module)
    targets: set[str] = set()
    for module in chosen:
        leaf = module.rpartition(".")[2]
        if all(m in chosen for m in by_leaf.get(leaf, [module])):
            targets.add(leaf)
        else:
            targets.add(module)
    return sorted(targets)
