"""Write safetensors shards: the header of a shard, a writer that streams its data to disk,
and the checkpoint's index.

The stream engine never holds a whole shard: the header of an output shard is known before
any weight is read (shapes and dtypes come from the plan), so it is written first and the
data follows in one pass, hashed as it is written. No torch: buffers are ``memoryview``s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mergejob import settings
from mergejob.io.headers import DTYPE_SIZES, METADATA_KEY, TORCH_TO_SAFETENSORS, encode_header


def shard_header(
    entries: Sequence[tuple[str, str, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, list[int]]:
    """The header bytes of a shard holding ``(name, dtype, shape)`` in this data order.

    Returns the header (length prefix included, padded to 8 bytes with spaces as the
    safetensors library does) and each tensor's byte size. ``metadata`` (string values, as
    safetensors requires) joins ``format: pt`` in ``__metadata__``.
    """
    meta: dict[str, object] = {METADATA_KEY: {"format": "pt", **(metadata or {})}}
    sizes: list[int] = []
    position = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        meta[name] = {
            "dtype": TORCH_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [position, position + size],
        }
        sizes.append(size)
        position += size
    return encode_header(meta, align=8), sizes


class ShardWriter:
    """Writes one shard file sequentially and hashes every byte written.

    Chunks handed to :meth:`submit` are hashed and written by a background thread (both
    release the GIL), so the caller computes the next chunk meanwhile; each chunk's buffer
    goes back to ``release`` once written. The file is written under a temporary name and
    renamed by :meth:`close` once complete, so a file with the shard's name is always a
    whole shard (short of a machine crash, which the checksum check on resume catches).
    """

    def __init__(
        self,
        path: Path,
        header: bytes,
        data_size: int,
        *,
        release: Callable[[int], None] | None = None,
        depth: int = 3,
    ) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.expected = len(header) + data_size
        self._release = release
        self._handle = open(self.tmp, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self._digest = hashlib.sha256()
        self._error: BaseException | None = None
        self._queue: queue.Queue[tuple[memoryview, int] | None] = queue.Queue(maxsize=depth)
        self.written = 0
        self._write(memoryview(header))
        self._thread = threading.Thread(target=self._run, name="mergejob-writer", daemon=True)
        self._thread.start()

    def _write(self, data: memoryview) -> None:
        view = data.cast("B") if data.format != "B" else data
        self._digest.update(view)
        done = 0
        while done < len(view):
            done += self._handle.write(view[done:])
        self.written += len(view)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, slot = item
            try:
                if self._error is None:
                    self._write(data)
            except BaseException as exc:  # reported by the next submit() or close()
                self._error = exc
            finally:
                if self._release is not None and slot >= 0:
                    self._release(slot)

    def submit(self, data: memoryview, slot: int = -1) -> None:
        """Queue ``data`` to be hashed and written; its ring ``slot`` is released after."""
        if self._error is not None:
            raise self._error
        self._queue.put((data, slot))

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> tuple[int, str]:
        """Finish the file; returns ``(size, sha256)``."""
        self._stop()
        if self._error is not None:
            self.abort()
            raise self._error
        if self.written != self.expected:
            self.abort()
            raise RuntimeError(
                f"{self.path}: wrote {self.written} bytes, expected {self.expected} (engine bug)"
            )
        # No fsync: a shard's record is trusted only once its checksum is verified again
        # (on resume, or by finalize for shards other machines wrote).
        self._handle.close()
        os.replace(self.tmp, self.path)
        return self.written, self._digest.hexdigest()

    def abort(self) -> None:
        """Stop writing and remove the temporary file."""
        self._error = self._error or RuntimeError("aborted")
        self._stop()
        if not self._handle.closed:
            self._handle.close()
        self.tmp.unlink(missing_ok=True)


def write_index(folder: Path, weight_map: Mapping[str, str], total_size: int, params: int) -> Path:
    """``model.safetensors.index.json`` as transformers writes it."""
    path = Path(folder) / settings.SAFETENSORS_INDEX_FILE
    data = {
        "metadata": {"total_parameters": params, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
