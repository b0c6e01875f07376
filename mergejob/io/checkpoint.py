"""Read a safetensors checkpoint's layout without reading its weights.

``CheckpointIndex.from_folder`` reads ``model.safetensors.index.json`` (or a single file's
header): which tensor lives in which shard, as :class:`~mergejob.io.headers.TensorRef`
descriptors. Broken headers are reported with the file's name.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mergejob import settings
from mergejob.errors import ModelError
from mergejob.io.headers import FLOAT_DTYPES, SafetensorsHeader, TensorRef, read_header


@dataclass
class CheckpointIndex:
    """Which tensor lives in which shard, read from headers only."""

    folder: Path
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path, *, check_size: bool = True) -> CheckpointIndex:
        """Read the layout; ``check_size`` also checks each shard holds all its data."""
        folder = Path(folder)
        index_file = folder / settings.SAFETENSORS_INDEX_FILE
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelError(f"{index_file}: not a valid safetensors index ({exc})") from None
            shards = sorted(set(weight_map.values()))
        elif (folder / settings.SINGLE_SAFETENSORS_FILE).is_file():
            shards = [settings.SINGLE_SAFETENSORS_FILE]
        else:
            shards = sorted(p.name for p in folder.glob("*.safetensors"))
            if not shards:
                raise ModelError(
                    f"{folder}: no safetensors weights found (model.safetensors or an index); "
                    "convert .bin weights with transformers' save_pretrained first"
                )
        index = cls(folder=folder, shards=shards)
        for shard in shards:
            header = read_header(folder / shard, check_size=check_size)
            index.metadata.update(header.metadata)
            index.tensors.update(header.tensors())
        return index

    @classmethod
    def from_headers(cls, folder: Path, headers: dict[str, SafetensorsHeader]) -> CheckpointIndex:
        """The layout of a checkpoint whose shards are not on disk yet (a Hub base still to
        be downloaded into ``folder``), from their headers (shard name -> header)."""
        index = cls(folder=Path(folder), shards=sorted(headers))
        for shard in index.shards:
            index.metadata.update(headers[shard].metadata)
            index.tensors.update(headers[shard].tensors())
        return index

    def stored_dtype(self) -> str:
        """The dtype most of the floating-point weights are stored in."""
        counts: Counter[str] = Counter()
        for ref in self.tensors.values():
            if ref.dtype in FLOAT_DTYPES:
                counts[ref.dtype] += ref.nbytes
        if not counts:
            raise ModelError(f"{self.folder}: no floating-point tensors in the checkpoint")
        return counts.most_common(1)[0][0]
