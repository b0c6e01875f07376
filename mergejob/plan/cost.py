"""The cost model behind ``mergejob plan``: memory, disk and time of a job, per engine.

Constants are measured (``bench/bench_plan_estimate.py``, ``bench/RESULTS.md``); the stream
engine's buffer sizes are defined here, where its memory model reads them, and used by the
engine (:mod:`mergejob.engines.stream_compute`).
"""

from __future__ import annotations

import math
import os
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergejob.spec import MergeSpec

if TYPE_CHECKING:
    from mergejob.plan.work import Plan

GB = 10**9

# The stream engine's buffers: plain LoRA is applied to row blocks of about CHUNK_BYTES of
# fp32 (cache-sized); unchanged tensors are copied COPY_BYTES at a time.
CHUNK_BYTES = 2**20
COPY_BYTES = 16 * 2**20
# Expert LoRA factors the stream engine keeps across tensors (A and B of a layer's gate_up
# and down, twice over): every expert tensor of a layer reads the same ones.
EXPERT_FACTORS_KEPT = 8


@dataclass(frozen=True)
class JobSizes:
    """The sizes a time estimate starts from: the output, and what must be downloaded."""

    output_bytes: int
    download_bytes: int


# ---------------------------------------------------------------------------------------
# Throughput and memory constants


@dataclass(frozen=True)
class Throughput:
    """Rates the time estimate uses, bytes or flops per second (one worker).

    Measured with ``bench/bench_plan_estimate.py`` on a 2-core CPU VM with a network disk
    (see bench/RESULTS.md); a faster machine finishes sooner, so there the estimates are an
    upper bound. ``download_bps`` and ``gpu_flops`` are assumptions (a well-connected pod
    pulling from the Hub; an fp32 GEMM on a datacenter GPU).
    """

    startup_s: float = 8.0  # python, torch and transformers imports
    read_bps: float = 0.46 * GB  # safetensors data read with pread
    write_bps: float = 0.12 * GB  # shard files written, hashed and fsynced
    convert_bps: float = 0.25 * GB  # fp32 work per output byte of a changed tensor
    hash_bps: float = 0.54 * GB  # sha256 per thread (the recipe's input checksums)
    cpu_flops: float = 10e9  # fp32 B @ A per worker (2 cores, AVX2; the rest is convert_bps)
    gpu_flops: float = 20e12  # fp32 matmul on one GPU (TF32 off)
    download_bps: float = 0.2 * GB  # assumed Hub bandwidth
    peft_load_bps: float = 0.1 * GB  # from_pretrained into memory
    peft_save_bps: float = 0.07 * GB  # save_pretrained


THROUGHPUT = Throughput()

# Resident memory of a merge process that has imported torch, transformers and mergejob and
# built its plan, and of a spawned stream worker before its buffers (fitted to peak RSS
# measured on the 1B benchmark fixture; see bench/RESULTS.md).
BASE_RSS = 274 * 10**6
WORKER_RSS = 190 * 10**6
PEFT_BASE_RSS = 450 * 10**6  # + peft and accelerate
# The recipe hashes the inputs with 4 threads reading 8 MiB chunks (plus the bytes in flight).
RECIPE_HASH_BYTES = 64 * 10**6
# Live fp32 blocks of a worker at its peak while it changes a tensor: w32, the delta, the rows
# read, the rounded rows, and the allocator's and BLAS's temporaries (measured: about five).
LIVE_BLOCKS = 5


@dataclass
class MemoryEstimate:
    """Peak memory of one engine for this job."""

    engine: str
    host_bytes: int
    gpu_bytes: int = 0  # per GPU
    note: str = ""


def stream_buffers(plan: Plan | None) -> int:
    """Bytes of the buffers one stream worker holds at its peak for ``plan``.

    The worker reads, works and writes in row blocks of at most ``CHUNK_BYTES`` of fp32
    (``LIVE_BLOCKS`` of them alive at the peak) and copies unchanged tensors in
    ``COPY_BYTES`` steps; a DoRA tensor is worked on whole, with several fp32 copies of it
    alive inside PEFT's formula. Adapter factors of the tensor at hand are kept in fp32.
    """
    if plan is None:
        return 4 * CHUNK_BYTES
    copy = 0
    work = 0
    for tensor in plan.tensors:
        numel = math.prod(tensor.shape) if tensor.shape else 1
        if tensor.byte_copy:
            copy = max(copy, min(COPY_BYTES, tensor.nbytes))
            continue
        fp32 = numel * 4
        if any(op.kind == "dora" for op in tensor.ops):
            need = 6 * fp32  # whole tensor: w32 plus PEFT's formula's temporaries
        else:
            block = min(CHUNK_BYTES, fp32)
            need = LIVE_BLOCKS * block if tensor.ops else 2 * block
        factors = sum(
            4 * math.prod(ref.shape)
            for op in tensor.ops
            for ref in (op.a, op.b, op.magnitude)
            if ref is not None
        )
        work = max(work, need + factors)
    # Expert LoRAs' factors stay loaded across tensors (the engine keeps the last few).
    expert_factors = sorted(
        {
            (ref.path, ref.offset): 4 * math.prod(ref.shape)
            for tensor in plan.tensors
            for op in tensor.ops
            if op.experts
            for ref in (op.a, op.b)
            if ref is not None
        }.values(),
        reverse=True,
    )[:EXPERT_FACTORS_KEPT]
    return copy + work + sum(expert_factors)


def stream_memory(plan: Plan | None, workers: int, device: str, out_bytes: int) -> MemoryEstimate:
    """Peak RSS of the stream engine: the process, plus each worker's buffers."""
    buffers = stream_buffers(plan)
    if workers <= 1 or device != "cpu":
        host = BASE_RSS + RECIPE_HASH_BYTES + buffers
        gpu = buffers if device != "cpu" else 0
        note = "one process" if device == "cpu" else "per GPU worker process"
        return MemoryEstimate("stream", host, gpu, note)
    host = BASE_RSS + RECIPE_HASH_BYTES + workers * (WORKER_RSS + buffers)
    return MemoryEstimate("stream", host, 0, f"{workers} worker processes")


def peft_memory(out_bytes: int, spec: MergeSpec, adapter_bytes: int) -> MemoryEstimate:
    """Peak memory of the peft engine: the whole model in the output dtype and the adapters
    (PEFT keeps them in fp32); spread over the GPUs with device auto."""
    # save_pretrained makes no extra copy (measured); the recipe then hashes the files.
    save = RECIPE_HASH_BYTES
    engine = spec.engine
    if engine.device == "cpu":
        note = "disk offload lowers this" if engine.offload_folder else ""
        return MemoryEstimate("peft", PEFT_BASE_RSS + out_bytes + adapter_bytes + save, 0, note)
    if engine.device == "auto":
        gpus = visible_gpus()
        if gpus:
            per_gpu = math.ceil((out_bytes + adapter_bytes) / gpus)
            return MemoryEstimate(
                "peft", PEFT_BASE_RSS + save, per_gpu, f"device auto over {gpus} GPU(s)"
            )
        return MemoryEstimate(
            "peft",
            PEFT_BASE_RSS + out_bytes + adapter_bytes + save,
            0,
            "device auto, no GPU visible here: all on CPU",
        )
    return MemoryEstimate("peft", PEFT_BASE_RSS + save, out_bytes + adapter_bytes, "one GPU")


def visible_gpus() -> int:
    """CUDA GPUs this process sees (0 without torch's CUDA)."""
    with suppress(Exception):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    return 0


def stream_seconds(
    plan: Plan | None, sizes: JobSizes, spec: MergeSpec, rates: Throughput = THROUGHPUT
) -> float:
    """Download + (read + compute + write) / workers + hashing for the recipe."""
    out_bytes = sizes.output_bytes
    changed_bytes = sum(t.nbytes for t in plan.tensors if t.changed) if plan is not None else 0
    flops = plan.lora_flops if plan is not None else 0
    read = (plan.input_bytes if plan is not None else out_bytes) / rates.read_bps
    gpu = spec.engine.device != "cpu" and visible_gpus() > 0
    compute = flops / (rates.gpu_flops if gpu else rates.cpu_flops)
    work = changed_bytes / rates.convert_bps + compute
    parallel = max(1, spec.engine.workers if not gpu else visible_gpus())
    cores = os.cpu_count() or 1
    parallel = min(parallel, cores) if not gpu else parallel
    write = out_bytes / rates.write_bps
    return (
        rates.startup_s
        + sizes.download_bytes / rates.download_bps
        + (read + work) / parallel
        + write
        + _hashed_input_bytes(plan, sizes) / rates.hash_bps
    )


def _hashed_input_bytes(plan: Plan | None, sizes: JobSizes) -> int:
    """Bytes the recipe hashes: local inputs (Hub files are named by their sha256)."""
    if sizes.download_bytes or plan is None:
        return 0
    return plan.input_bytes


def peft_seconds(
    plan: Plan | None, sizes: JobSizes, spec: MergeSpec, rates: Throughput = THROUGHPUT
) -> float:
    """Download + load + merge (the changed weights, once per adapter) + save + hashing."""
    out_bytes = sizes.output_bytes
    changed = sum(t.nbytes for t in plan.tensors if t.changed) if plan is not None else out_bytes
    merge = len(spec.adapters) * changed / rates.convert_bps
    return (
        rates.startup_s
        + sizes.download_bytes / rates.download_bps
        + out_bytes / rates.peft_load_bps
        + merge
        + out_bytes / rates.peft_save_bps
        + (out_bytes + _hashed_input_bytes(plan, sizes)) / rates.hash_bps
    )
