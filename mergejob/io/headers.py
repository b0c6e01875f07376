"""Safetensors headers: the one tensor descriptor, and every place a header is parsed.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, data offsets relative to the end of the header, plus ``__metadata__``), then
the data. :func:`read_header` parses a local file's header (no tensor data is read);
:func:`read_tensors` turns it into :class:`TensorRef` descriptors, checked against their
dtypes and shapes; :func:`hub_headers` and :func:`read_remote_header` read the headers of a
Hub repo's shards with HTTP range requests (:func:`hub_range_reader`: exact byte ranges of
a Hub file, also a tensor's alone). No torch: planning and the launcher stay light.

Example::

    from mergejob.io.headers import read_tensors
    for name, ref in read_tensors("adapter/adapter_model.safetensors").items():
        print(name, ref.dtype, ref.shape, ref.nbytes)
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergejob.errors import ModelError

log = logging.getLogger(__name__)

# Safetensors dtype codes -> torch dtype names (the names mergejob uses everywhere).
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
# The dtypes a merge computes in (and may convert between).
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
LENGTH_BYTES = 8  # the header length prefix
_MAX_HEADER = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a safetensors file: what it is and where its bytes lie (no data held)."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    path: str  # the file holding it
    offset: int  # absolute byte offset of the first data byte in the file
    nbytes: int

    @property
    def shard(self) -> str:
        """The file's name (the shard name in a checkpoint's index)."""
        return Path(self.path).name


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: its entries as stored, its metadata, and where the data starts."""

    path: Path
    entries: dict[str, dict[str, Any]]  # tensor name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    length: int  # bytes of JSON after the length prefix
    file_size: int

    @property
    def data_start(self) -> int:
        return LENGTH_BYTES + self.length

    @property
    def data_held(self) -> int:
        """Data bytes the file holds (less than :attr:`data_declared` when truncated)."""
        return self.file_size - self.data_start

    @property
    def data_declared(self) -> int:
        return data_length(self.entries)

    def as_dict(self) -> dict[str, Any]:
        """The header as JSON would hold it (``__metadata__`` included when present)."""
        result: dict[str, Any] = dict(self.entries)
        if self.metadata:
            result[METADATA_KEY] = self.metadata
        return result

    def tensors(self) -> dict[str, TensorRef]:
        """Every tensor as a :class:`TensorRef`, in data order; a dtype this module does not
        know, or a byte range that does not fit the dtype and shape, is a broken header."""
        refs: dict[str, TensorRef] = {}
        for name, info in self.entries.items():
            code = str(info.get("dtype"))
            dtype = SAFETENSORS_DTYPES.get(code)
            if dtype is None:
                raise ModelError(f"{self.path}: tensor {name} has unknown dtype {code}")
            shape = tuple(int(x) for x in info.get("shape", []))
            begin, end = (int(x) for x in info["data_offsets"])
            need = math.prod(shape) * DTYPE_SIZES[dtype]
            if end - begin != need:
                raise ModelError(
                    f"{self.path}: tensor {name} holds {end - begin} bytes, but {dtype} "
                    f"{list(shape)} needs {need} (broken safetensors header)"
                )
            refs[name] = TensorRef(
                name=name,
                dtype=dtype,
                shape=shape,
                path=str(self.path),
                offset=self.data_start + begin,
                nbytes=end - begin,
            )
        return dict(sorted(refs.items(), key=lambda item: item[1].offset))


def read_header(path: Path | str, *, check_size: bool = True) -> SafetensorsHeader:
    """Parse the header of the safetensors file at ``path``; reads no tensor data.

    ``check_size`` also checks that the file holds every data byte the header declares
    (a truncated download). Errors are :class:`ModelError` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw_len = handle.read(LENGTH_BYTES)
            if len(raw_len) != LENGTH_BYTES:
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
    header = parse_header(path, raw, file_size=file_size)
    for name, info in header.entries.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not offsets or len(offsets) != 2:
            raise ModelError(f"{path}: broken safetensors header entry for {name}")
        if check_size and offsets[1] > header.data_held:
            raise ModelError(
                f"{path}: tensor {name} ends at byte {offsets[1]} but the file holds only "
                f"{header.data_held} bytes of data (truncated download?)"
            )
    return header


def parse_header(path: Path, raw: bytes, *, file_size: int) -> SafetensorsHeader:
    """The header whose JSON bytes are ``raw``, of a file of ``file_size`` bytes at ``path``
    (which need not exist yet: a Hub shard still to be downloaded)."""
    try:
        entries = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{path}: broken safetensors header (not JSON)") from None
    if not isinstance(entries, dict):
        raise ModelError(f"{path}: broken safetensors header")
    metadata = entries.pop(METADATA_KEY, None) or {}
    return SafetensorsHeader(
        path=path, entries=entries, metadata=metadata, length=len(raw), file_size=file_size
    )


def read_remote_header(
    repo_id: str,
    filename: str,
    *,
    commit: str,
    file_size: int,
    local_path: Path,
    token: str | None = None,
) -> SafetensorsHeader:
    """The exact header of a Hub repo's safetensors file at ``commit``, read with two HTTP
    range requests (its length, then its bytes), as it will be read from ``local_path`` once
    downloaded: the byte offsets are those of the real file (the header's own length, not a
    re-encoding)."""
    read = hub_range_reader(repo_id, filename, commit=commit, token=token)
    # Two exact reads (the length, then the header): the shard's data is never touched.
    prefix = read(0, LENGTH_BYTES - 1)
    if len(prefix) < LENGTH_BYTES:
        raise ModelError(f"{repo_id}/{filename}@{commit[:12]}: not a safetensors file")
    (length,) = struct.unpack("<Q", prefix[:LENGTH_BYTES])
    if length > _MAX_HEADER or LENGTH_BYTES + length > file_size:
        raise ModelError(f"{repo_id}/{filename}: not a safetensors file (header length {length})")
    raw = read(LENGTH_BYTES, LENGTH_BYTES + length - 1)
    if len(raw) != length:
        raise ModelError(f"{repo_id}/{filename}: truncated safetensors header")
    header = parse_header(local_path, raw, file_size=file_size)
    for name, info in header.entries.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not offsets or len(offsets) != 2 or offsets[1] > header.data_held:
            raise ModelError(f"{repo_id}/{filename}: broken safetensors header entry for {name}")
    return header


RangeRead = Callable[[int, int], bytes]


def hub_range_reader(
    repo_id: str, filename: str, *, commit: str, token: str | None = None, attempts: int = 1
) -> RangeRead:
    """``read(first, last)``: bytes ``first`` to ``last`` (inclusive) of a Hub repo's file at
    ``commit``, one HTTP range request each (the client's URL for the file at the commit,
    its session, the token's headers). ``attempts`` > 1: a request that fails (a broken
    connection, an HTTP error) is tried again, as :class:`~mergejob.fetch.ShardFetcher`
    tries a download again (``attempts`` in all, a second more before each). Returns what
    the Hub answered: the caller checks its length."""
    from huggingface_hub import constants, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=commit, endpoint=constants.ENDPOINT)
    headers = build_hf_headers(token=token)

    def request(first: int, last: int) -> bytes:
        reply = get_session().get(url, headers={**headers, "range": f"bytes={first}-{last}"})
        hf_raise_for_status(reply)
        return bytes(reply.content)

    if attempts <= 1:
        return request

    def read(first: int, last: int) -> bytes:
        import httpx2

        for attempt in range(1, attempts + 1):
            try:
                return request(first, last)
            except (OSError, httpx2.TransportError) as exc:
                if attempt == attempts:
                    raise
                log.warning(
                    "range read of %s/%s (bytes %d-%d) failed (%s); trying again",
                    repo_id, filename, first, last, exc,
                )  # fmt: skip
                time.sleep(attempt)
        raise AssertionError("unreachable")

    return read


def read_tensors(path: Path | str, *, check_size: bool = True) -> dict[str, TensorRef]:
    """Every tensor of a safetensors file as a :class:`TensorRef`, in data order."""
    return read_header(path, check_size=check_size).tensors()


def data_length(header: Mapping[str, Any]) -> int:
    """The data bytes a header (as a dict, ``__metadata__`` allowed) declares."""
    ends = [
        int(info["data_offsets"][1])
        for key, info in header.items()
        if key != METADATA_KEY and isinstance(info, dict) and info.get("data_offsets")
    ]
    return max(ends, default=0)


def encode_header(header: Mapping[str, Any], *, align: int = 1) -> bytes:
    """A header dict as the bytes that open a safetensors file: the length prefix and compact
    JSON, padded with spaces to a multiple of ``align`` bytes (the safetensors library pads
    to 8, so that the data that follows is aligned)."""
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-len(data) % align)
    return struct.pack("<Q", len(data)) + data


def file_size(header: Mapping[str, Any]) -> int:
    """The size of a file with this header and the data it declares."""
    return len(encode_header(header)) + data_length(header)


def hub_headers(repo_id: str, revision: str | None, token: str | None) -> dict[str, dict[str, Any]]:
    """Every safetensors header of a Hub repo (file name -> header dict), read with HTTP
    range requests (``get_safetensors_metadata``): kilobytes, whatever the model's size."""
    from huggingface_hub import HfApi

    meta = HfApi().get_safetensors_metadata(repo_id, revision=revision, token=token)
    headers: dict[str, dict[str, Any]] = {}
    for filename, file_meta in meta.files_metadata.items():
        header: dict[str, Any] = {
            name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
            for name, t in file_meta.tensors.items()
        }
        if file_meta.metadata:
            header[METADATA_KEY] = dict(file_meta.metadata)
        headers[Path(filename).name] = header
    return headers
