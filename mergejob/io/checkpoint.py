"""Read a safetensors checkpoint's layout without reading its weights.

``CheckpointIndex.from_folder`` reads ``model.safetensors.index.json`` (or a single file's
header): which tensor lives in which shard, with dtype and shape. Broken headers are
reported with the file's name.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergejob.errors import ModelError

SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    shard: str  # file name inside the folder
    nbytes: int


@dataclass
class CheckpointIndex:
    """Which tensor lives in which shard, read from headers only."""

    folder: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path, *, check_size: bool = True) -> CheckpointIndex:
        """Read the layout; ``check_size`` also checks each shard holds all its data."""
        folder = Path(folder)
        index_file = folder / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelError(f"{index_file}: not a valid safetensors index ({exc})") from None
            shards = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            shards = sorted(p.name for p in folder.glob("*.safetensors"))
            if not shards:
                raise ModelError(
                    f"{folder}: no safetensors weights found (model.safetensors or an index); "
                    "convert .bin weights with transformers' save_pretrained first"
                )
        index = cls(folder=folder, shards=shards)
        for shard in shards:
            header, metadata = read_header(folder / shard, check_size=check_size)
            if metadata:
                index.metadata.update(metadata)
            for name, info in header.items():
                index.tensors[name] = info_from_header(name, info, shard, folder / shard)
        return index

    def stored_dtype(self) -> str:
        """The dtype most of the floating-point weights are stored in."""
        counts: Counter[str] = Counter()
        for info in self.tensors.values():
            if info.dtype in FLOAT_DTYPES:
                counts[info.dtype] += info.nbytes
        if not counts:
            raise ModelError(f"{self.folder}: no floating-point tensors in the checkpoint")
        return counts.most_common(1)[0][0]

    def shard_sizes(self) -> dict[str, int]:
        sizes: Counter[str] = Counter()
        for info in self.tensors.values():
            sizes[info.shard] += info.nbytes
        return dict(sizes)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def read_header(
    path: Path, *, check_size: bool = True
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Parse a safetensors header: ``(tensors, __metadata__)``. Reads no tensor data."""
    try:
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise ModelError(f"{path}: not a safetensors file (shorter than its header)")
            (length,) = struct.unpack("<Q", raw_len)
            if length > _MAX_HEADER:
                raise ModelError(f"{path}: not a safetensors file (header length {length})")
            raw = handle.read(length)
            if len(raw) != length:
                raise ModelError(f"{path}: truncated safetensors header")
            handle.seek(0, 2)
            file_size = handle.tell()
    except FileNotFoundError:
        raise ModelError(f"{path}: shard named in the index is missing") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{path}: broken safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: broken safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    data_len = file_size - 8 - length
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not offsets or len(offsets) != 2:
            raise ModelError(f"{path}: broken safetensors header entry for {name}")
        if check_size and offsets[1] > data_len:
            raise ModelError(
                f"{path}: tensor {name} ends at byte {offsets[1]} but the file holds only "
                f"{data_len} bytes of data (truncated download?)"
            )
    return header, metadata


def info_from_header(name: str, info: dict[str, Any], shard: str, path: Path) -> TensorInfo:
    dtype = SAFETENSORS_DTYPES.get(str(info.get("dtype")))
    if dtype is None:
        raise ModelError(f"{path}: tensor {name} has unknown dtype {info.get('dtype')}")
    shape = tuple(int(x) for x in info.get("shape", []))
    start, end = info["data_offsets"]
    return TensorInfo(
        name=name, dtype=dtype, shape=shape, shard=shard, nbytes=int(end) - int(start)
    )
