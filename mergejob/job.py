"""A job ready to run: the spec with every source resolved to local files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergejob.fetch import StreamedBase
from mergejob.io.digests import FileDigests
from mergejob.sources import ResolvedSource
from mergejob.spec import MergeSpec


@dataclass
class PreparedJob:
    """The spec plus local folders for the base and each adapter, in order."""

    spec: MergeSpec
    base: ResolvedSource
    adapters: list[ResolvedSource]
    output_dtype: str  # torch dtype name: bfloat16, float16 or float32
    config_from: ResolvedSource | None = None
    # A Hub base the stream engine fetches shard by shard during the merge (None: on disk).
    streamed: StreamedBase | None = None
    # The Hub token the sources were fetched with (the streamed base's shards still are).
    token: str | None = field(default=None, repr=False, compare=False)
    # The sha256 of the input files, each hashed once for the whole job: the recipe records
    # them, the stream engine's shard records carry those their shard read.
    digests: FileDigests = field(default_factory=FileDigests, repr=False, compare=False)

    @property
    def adapter_dirs(self) -> list[Path]:
        return [a.local_dir for a in self.adapters]


@dataclass
class EngineReport:
    """What an engine did, for logs and the recipe."""

    engine: str
    tensors_changed: int | None = None
    # The config.json keys the merge decided (tying, vocab_size, dtype), for
    # :func:`mergejob.output.write_config`; None where the engine saved config.json itself.
    config_updates: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
