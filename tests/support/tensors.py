"""An output folder's tensors, and comparisons of them: bit for bit, or in rounding steps."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``folder``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert key not in tensors, f"{key} is in two shards"
                tensors[key] = handle.get_tensor(key)
    return tensors


def steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable bf16/fp16 values lie between a and b (0 = equal)."""
    assert a.dtype == b.dtype and a.element_size() == 2

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        magnitude = bits & 0x7FFF
        return torch.where(bits < 0, -magnitude, magnitude)

    return (ordered(a) - ordered(b)).abs()


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One step of ``dtype`` (bf16 or fp16) at ``magnitude`` (fp32 tensor)."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    _, exponent = torch.frexp(magnitude.clamp(min=info.tiny))
    exponent = (exponent - 1).clamp(min=int(torch.log2(torch.tensor(info.tiny))))
    return torch.pow(2.0, (exponent - mantissa_bits).float())


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape, same bytes."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )
