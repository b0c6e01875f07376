"""The safetensors format at the byte level: where a tensor's bytes are, and a shard writer
that streams tensors to disk one by one.

The stream engine never holds a whole shard: it reads each tensor's bytes with ``pread``
into reused buffers and writes the output file sequentially, hashing what it writes. The
header of an output shard is known before any weight is read (shapes and dtypes come from
the plan), so it is written first and the data follows in one pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergejob.errors import ModelError
from mergejob.io.checkpoint import SAFETENSORS_DTYPES, read_header

TORCH_TO_SAFETENSORS = {name: code for code, name in SAFETENSORS_DTYPES.items()}
DTYPE_SIZES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie in a safetensors file (no data is held)."""

    path: str
    key: str
    offset: int  # absolute byte offset of the first data byte in the file
    nbytes: int
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place (for ``readinto``)."""
    return memoryview(tensor.numpy())  # type: ignore[arg-type]  # numpy's stubs lack Buffer


def read_tensor_refs(path: Path) -> dict[str, TensorRef]:
    """Every tensor of a safetensors file as a :class:`TensorRef`, in data order."""
    path = Path(path)
    header, _ = read_header(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    start = 8 + length
    refs: dict[str, TensorRef] = {}
    for key, info in header.items():
        code = str(info.get("dtype"))
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            raise ModelError(f"{path}: tensor {key} has unknown dtype {code}")
        shape = tuple(int(x) for x in info.get("shape", []))
        begin, end = (int(x) for x in info["data_offsets"])
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * DTYPE_SIZES[dtype]:
            raise ModelError(
                f"{path}: tensor {key} holds {end - begin} bytes, but {dtype} {list(shape)} "
                f"needs {numel * DTYPE_SIZES[dtype]} (broken safetensors header)"
            )
        refs[key] = TensorRef(
            path=str(path),
            key=key,
            offset=start + begin,
            nbytes=end - begin,
            dtype=dtype,
            shape=shape,
        )
    return dict(sorted(refs.items(), key=lambda item: item[1].offset))


class FileReader:
    """Reads byte ranges of files with ``pread``, keeping each file open once (thread-safe:
    ``pread`` has no shared file position)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                    self._fds[path] = fd
        return fd

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes of ``path`` starting at ``offset``."""
        fd = self._fd(path)
        done = 0
        total = len(out)
        while done < total:
            got = os.preadv(fd, [out[done:]], offset + done)
            if got <= 0:
                raise ModelError(f"{path}: file ends before byte {offset + total} (truncated?)")
            done += got

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """A fresh tensor holding ``ref`` (for small tensors: adapter factors)."""
        out = torch.empty(ref.nbytes, dtype=torch.uint8)
        self.read_into(ref.path, ref.offset, byte_view(out))
        return out.view(getattr(torch, ref.dtype)).reshape(ref.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def shard_header(entries: Sequence[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    """The header bytes of a shard holding ``(name, dtype, shape)`` in this data order.

    Returns the header (length prefix included, padded to 8 bytes with spaces as the
    safetensors library does) and each tensor's byte size.
    """
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    sizes: list[int] = []
    position = 0
    for name, dtype, shape in entries:
        numel = 1
        for dim in shape:
            numel *= dim
        size = numel * DTYPE_SIZES[dtype]
        meta[name] = {
            "dtype": TORCH_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [position, position + size],
        }
        sizes.append(size)
        position += size
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


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
    path = Path(folder) / "model.safetensors.index.json"
    data = {
        "metadata": {"total_parameters": params, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
