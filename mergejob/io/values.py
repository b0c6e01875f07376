"""What a floating-point dtype holds, and the range of values a stored tensor holds.

``float16`` holds magnitudes up to 65504; ``bfloat16`` and ``float32`` about 3.4e38. A weight
beyond 65504 (bf16 bases have them: Gemma, some Llama norms) becomes ``inf`` when written as
float16, so every engine checks what it writes (the stream engine each block it converts or
merges, the peft engine each tensor it saved) and ``mergejob plan`` reads the base's values
when the output dtype is narrower than the stored one. The messages are made here, so they
read the same from every engine.

Example::

    limit = rounding_limit("float16")                      # 65520.0: rounds to inf from here
    holder = holding_dtype(7.1e4)                          # "bfloat16"
    found = value_range(FileReader(), ref)                 # streamed, in bounded memory
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergejob.io.headers import TensorRef
from mergejob.io.reader import FileReader, byte_view

RANGE_CHUNK_BYTES = 64 * 1024 * 1024  # bytes read at a time when scanning a tensor's values
# The output dtypes a merge offers, narrowest range first.
OUTPUT_DTYPES = ("float16", "bfloat16", "float32")


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def rounding_limit(dtype: str | torch.dtype) -> float:
    """The smallest magnitude that rounds to inf in ``dtype`` (max plus half a step)."""
    dtype = _torch_dtype(dtype)
    info = torch.finfo(dtype)
    if dtype in (torch.float32, torch.float64):
        return math.inf
    return float(info.max) + float(info.eps) * 2.0 ** math.floor(math.log2(info.max)) / 2


def holds(dtype: str | torch.dtype, magnitude: float) -> bool:
    """Whether a finite value of ``magnitude`` stays finite when rounded to ``dtype``."""
    if not math.isfinite(magnitude):
        return False
    limit = rounding_limit(dtype)
    if math.isinf(limit):  # float32: an fp32 value is finite by now
        return True
    return magnitude < limit


def narrower(output: str, stored: str) -> bool:
    """Whether some ``stored`` value can overflow in ``output`` (float16 from bf16/fp32)."""
    return rounding_limit(output) < rounding_limit(stored)


def holding_dtype(magnitude: float) -> str | None:
    """The narrowest output dtype that holds ``magnitude`` (None: no dtype does)."""
    return next((d for d in OUTPUT_DTYPES if holds(d, magnitude)), None)


def range_message(name: str, dtype: str, magnitude: float | None, *, what: str) -> str:
    """The one message for a tensor ``dtype`` cannot hold: which, how far, and what to pass.

    ``what`` says which tensor it is (``the merged tensor``, ``the base tensor``, ...);
    ``magnitude`` is the largest value found (None: not known, the output holds inf)."""
    if magnitude is None:
        holder = next((d for d in OUTPUT_DTYPES if narrower(dtype, d)), "float32")
        reach = "overflow to inf"
    else:
        holder = holding_dtype(magnitude) or "float32"
        reach = f"reach {magnitude:.4g}"
    limit = torch.finfo(_torch_dtype(dtype)).max
    also = " (or float32)" if holder == "bfloat16" else ""
    return (
        f"{name}: the values of {what} {reach}, beyond what {dtype} holds (+-{limit:.6g}); "
        f"{holder} holds them: pass --dtype {holder}{also}"
    )


@dataclass(frozen=True)
class ValueRange:
    """The finite values' extremes of a tensor, and whether it also holds NaN or inf."""

    low: float
    high: float
    nonfinite: bool

    @property
    def magnitude(self) -> float:
        """The largest finite magnitude (0 for a tensor with no finite value)."""
        return max(abs(self.low), abs(self.high)) if self.low <= self.high else 0.0


def value_range(
    reader: FileReader, ref: TensorRef, *, chunk_bytes: int = RANGE_CHUNK_BYTES
) -> ValueRange:
    """Scan ``ref``'s values, ``chunk_bytes`` at a time into one reused buffer."""
    dtype = _torch_dtype(ref.dtype)
    item = dtype.itemsize
    step = max(item, chunk_bytes - chunk_bytes % item)
    buffer = torch.empty(min(step, max(ref.nbytes, item)), dtype=torch.uint8)
    low, high, nonfinite = math.inf, -math.inf, False
    done = 0
    while done < ref.nbytes:
        size = min(step, ref.nbytes - done)
        raw = buffer[:size]
        reader.read_into(ref.path, ref.offset + done, byte_view(raw))
        values = raw.view(dtype)
        lo, hi = (float(v) for v in torch.aminmax(values))  # NaN propagates
        if not (math.isfinite(lo) and math.isfinite(hi)):
            nonfinite = True
            values = values[torch.isfinite(values)]
            if not values.numel():
                done += size
                continue
            lo, hi = (float(v) for v in torch.aminmax(values))
        low, high = min(low, lo), max(high, hi)
        done += size
    return ValueRange(low=low, high=high, nonfinite=nonfinite)
