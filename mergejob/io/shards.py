"""Output shards: how tensors are packed into files, which worker writes which file, and the
record each finished file leaves behind.

Everything here is a pure function of its arguments, so every process of a job (local
workers, the pods of an Indexed Job, the finalising step) computes the same answers.

Example::

    from mergejob.io.shards import assign_shards, pack_shards
    files = pack_shards([4_000, 3_000, 3_000, 500], max_bytes=6_000)  # [[0], [1, 2], [3]]
    assign_shards([4_000, 6_000, 500], workers=2)                    # [[1], [0, 2]]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mergejob import settings

RECORDS_DIR = ".mergejob-records"


def pack_shards(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Split tensors (given in file order by byte size) into files of at most ``max_bytes``.

    Greedy and in order, as transformers' ``save_pretrained`` does: a file is closed when the
    next tensor would overflow it; a tensor larger than ``max_bytes`` gets a file of its own.
    Returns the tensor indices of each file.
    """
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    files: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, size in enumerate(sizes):
        if current and filled + size > max_bytes:
            files.append(current)
            current, filled = [], 0
        current.append(i)
        filled += size
    if current:
        files.append(current)
    return files


def shard_file_names(count: int) -> list[str]:
    """The standard names: ``model.safetensors`` alone, else ``model-0000i-of-0000N``."""
    if count == 1:
        return [settings.SINGLE_SAFETENSORS_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def assign_shards(shard_sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Which shards each of ``workers`` workers writes: balanced by bytes, deterministic.

    Largest shard first to the least-loaded worker (ties go to the lower worker index, and
    equal sizes keep file order), so the result depends only on the sizes and the count.
    Every shard is assigned exactly once; each worker's list is in file order. With more
    workers than shards, the extra workers get empty lists.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    loads = [0] * workers
    assigned: list[list[int]] = [[] for _ in range(workers)]
    for shard in sorted(range(len(shard_sizes)), key=lambda i: (-shard_sizes[i], i)):
        worker = min(range(workers), key=lambda w: (loads[w], w))
        assigned[worker].append(shard)
        loads[worker] += shard_sizes[shard]
    return [sorted(shards) for shards in assigned]


def assign_runs(shard_sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Like :func:`assign_shards`, but each worker takes a run of consecutive shards where
    that balances as well: output shards follow the base's tensor order, so consecutive
    output shards read the same input shards, and the indices of an Indexed Job then fetch
    (nearly) disjoint parts of a Hub base. The runs minimise the largest load (binary
    search over it, greedy cuts); when they leave two workers further apart than the
    largest shard, the balance :func:`assign_shards` guarantees, its assignment is taken.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    sizes = list(shard_sizes)
    if not sizes or workers == 1:
        return assign_shards(sizes, workers)

    def cuts(limit: int) -> list[list[int]] | None:
        runs: list[list[int]] = [[]]
        load = 0
        for i, size in enumerate(sizes):
            if runs[-1] and load + size > limit:
                runs.append([])
                load = 0
            runs[-1].append(i)
            load += size
        return runs if len(runs) <= workers else None

    low, high = max(sizes), sum(sizes)
    while low < high:
        middle = (low + high) // 2
        if cuts(middle) is None:
            low = middle + 1
        else:
            high = middle
    runs = cuts(low) or []
    runs += [[] for _ in range(workers - len(runs))]
    loads = [sum(sizes[i] for i in run) for run in runs]
    if max(loads) - min(loads) > max(sizes):
        return assign_shards(sizes, workers)
    return runs


@dataclass(frozen=True)
class ShardRecord:
    """Proof that an output shard is finished: its name, size and sha256, for one plan, and
    the sha256 of every input file it was made from (``inputs``: label -> sha256, labels as
    :meth:`mergejob.plan.work.Plan.shard_inputs` gives them; empty until they are known).

    The plan id names inputs by name, size and mtime only; ``inputs`` ties the shard to
    their bytes, so a rerun redoes a shard whose inputs changed in place.
    """

    name: str
    size: int
    sha256: str
    plan_id: str
    inputs: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["inputs"] = dict(self.inputs)
        return json.dumps(data, sort_keys=True)

    def with_inputs(self, inputs: Mapping[str, str]) -> ShardRecord:
        """This record with the sha256 of its shard's input files."""
        return ShardRecord(self.name, self.size, self.sha256, self.plan_id, dict(inputs))


def record_path(partial_dir: Path, name: str) -> Path:
    return Path(partial_dir) / RECORDS_DIR / f"{name}.json"


def write_record(partial_dir: Path, record: ShardRecord) -> Path:
    """Write the record atomically (temporary file, rename)."""
    path = record_path(partial_dir, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(record.to_json())
    os.replace(tmp, path)
    return path


def drop_record(partial_dir: Path, name: str) -> None:
    """Forget that shard ``name`` is finished: the next run merges it again."""
    record_path(partial_dir, name).unlink(missing_ok=True)


def read_record(partial_dir: Path, name: str) -> ShardRecord | None:
    """The record of shard ``name``, or None if there is none (or it is unreadable)."""
    path = record_path(partial_dir, name)
    try:
        data = json.loads(path.read_text())
        return ShardRecord(
            name=str(data["name"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            plan_id=str(data["plan_id"]),
            inputs={str(k): str(v) for k, v in dict(data.get("inputs") or {}).items()},
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sha256_of(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def record_holds(partial_dir: Path, record: ShardRecord | None, plan_id: str) -> bool:
    """Whether ``record`` belongs to this plan and its file is there with that checksum."""
    if record is None or record.plan_id != plan_id:
        return False
    path = Path(partial_dir) / record.name
    try:
        stat = path.stat()
    except OSError:
        return False
    if stat.st_size != record.size:
        return False
    # A file this process hashed already and nobody touched since (same inode, size, mtime
    # and ctime) is not hashed again: a Hub rerun asks once to plan its downloads and once
    # more in the worker. (A same-size rewrite within one tick of the kernel's coarse file
    # clock after the hash would go unseen: not something a partial folder sees.)
    seen = (str(path.absolute()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    digest = _HASHED.get(seen)
    if digest is None:
        digest = sha256_of(path)
        if len(_HASHED) >= _HASHED_MAX:
            _HASHED.clear()
        _HASHED[seen] = digest
    return digest == record.sha256


# The digests record_holds computed in this process, by what the file was when hashed.
_HASHED: dict[tuple[str, int, int, int, int], str] = {}
_HASHED_MAX = 4096
