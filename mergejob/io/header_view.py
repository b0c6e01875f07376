"""A checkpoint folder without its weights: the real headers, each followed by a sparse hole.

Every reader of headers (:class:`~mergejob.io.checkpoint.CheckpointIndex`, the plan) sees the
view as the base itself, while the view uses no disk for the data. Shards that are not local
(a Hub base planned from HTTP range reads) come in as header dicts; a local shard shorter than
its header says is reported, not raised, so every other check can still run.

Example::

    from mergejob.io.header_view import header_view
    with header_view(base_dir) as view:
        index = CheckpointIndex.from_folder(view.folder)
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergejob.errors import MergeJobError
from mergejob.io.headers import data_length, encode_header, read_header


@dataclass
class HeaderView:
    """A folder that looks like the base to a header reader, without its weights."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    shard_bytes: dict[str, int] = field(default_factory=dict)  # full file sizes
    remote: bool = False


def write_sparse_copy(header: Mapping[str, Any], dest: Path) -> int:
    """Write ``header`` to ``dest`` followed by a hole as long as its data; returns the size."""
    prefix = encode_header(header)
    size = len(prefix) + data_length(header)
    with open(dest, "wb") as handle:
        handle.write(prefix)
        handle.truncate(size)
    return size


@contextmanager
def header_view(
    base_dir: Path, *, remote_headers: Mapping[str, dict[str, Any]] | None = None
) -> Iterator[HeaderView]:
    """A temporary header view of ``base_dir`` (other files are linked, not copied).

    ``remote_headers`` (file name -> header dict) stands in for shards that are not local.
    A local shard shorter than its header says is reported in ``problems``, not raised.
    """
    tmp = Path(tempfile.mkdtemp(prefix="mergejob-plan-"))
    view = HeaderView(folder=tmp, remote=remote_headers is not None)
    try:
        for path in sorted(Path(base_dir).iterdir()):
            if not path.is_file() or path.suffix == ".safetensors":
                continue
            (tmp / path.name).symlink_to(path.resolve())
        headers: dict[str, Mapping[str, Any]] = dict(remote_headers or {})
        for path in sorted(Path(base_dir).glob("*.safetensors")):
            if path.name in headers:
                continue
            try:
                local = read_header(path, check_size=False)
            except MergeJobError as exc:
                view.problems.append(str(exc))
                continue
            headers[path.name] = local.as_dict()
            if local.data_held < local.data_declared:
                view.problems.append(
                    f"{path}: truncated: holds {local.data_held} of the {local.data_declared} "
                    "data bytes its header declares (incomplete download?); delete it and "
                    "fetch it again"
                )
        for name, header in headers.items():
            view.shard_bytes[name] = write_sparse_copy(header, tmp / name)
        yield view
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
