"""Read tensors' bytes from safetensors files, given their :class:`TensorRef` descriptors.

:class:`FileReader` keeps each file open once and reads byte ranges with ``pread`` (no shared
file position, so threads share one reader), into buffers the caller reuses.
"""

from __future__ import annotations

import os
import threading

import torch

from mergejob.errors import ModelError
from mergejob.io.headers import TensorRef


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place (for ``readinto``)."""
    return memoryview(tensor.numpy())  # type: ignore[arg-type]  # numpy's stubs lack Buffer


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
