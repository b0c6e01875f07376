"""The recipe: ``mergejob.yaml`` in every output folder, the resolved spec plus a record.

The file is a spec (base, adapters, output, engine, config, publish) resolved so that it
names exactly what was merged: every Hub input pinned to the commit it was downloaded at,
local inputs as absolute paths, the output dtype as chosen (never ``auto``). Below it, a
``recipe:`` section records the sha256 of every input and output file (and each output's
size), the engine, the versions of mergejob, torch, transformers, peft and friends, and the
duration of each phase.
``mergejob run --config OUT/mergejob.yaml --output_dir OTHER`` reproduces the output byte for
byte (the recipe itself differs only in its timings); spec loading drops the ``recipe:``
section.

Example::

    from mergejob.recipe import read_recipe
    recipe = read_recipe("merged")
    print(recipe["recipe"]["outputs"]["model-00001-of-00002.safetensors"])
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from mergejob import settings
from mergejob.errors import InputError
from mergejob.logs import phase
from mergejob.sources import ResolvedSource
from mergejob.spec import RECIPE_KEY

log = logging.getLogger(__name__)

RECIPE_FILE = settings.RECIPE_FILE
RECIPE_FORMAT = 1
_CHUNK = 8 * 1024 * 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
VERSIONED_PACKAGES = (
    "mergejob",
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "accelerate",
    "huggingface_hub",
)


class Timings:
    """Durations of the job's phases, logged as they happen and kept for the recipe."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str, **fields: Any) -> Iterator[None]:
        """``logs.phase`` (start, end, duration lines) that also records the duration."""
        started = time.monotonic()
        try:
            with phase(name, **fields):
                yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - started, 3)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _known_sha256(path: Path) -> str | None:
    """A Hub cache file is a link to ``blobs/<sha256>`` for LFS files: no need to read it."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    if target.parent.name == "blobs" and _SHA256_RE.match(target.name):
        return target.name
    return None


def file_digests(
    folder: Path,
    names: Iterable[str] | None = None,
    *,
    known: Mapping[str, str] | None = None,
    workers: int = 4,
    digest: Callable[[Path], str] | None = None,
) -> dict[str, str]:
    """``{file name: sha256}`` for ``names`` (default: every file) in ``folder``, sorted.

    ``known`` digests (the stream engine hashes every shard as it writes it) are trusted
    and not recomputed; Hub cache files are named by their sha256 already. ``digest``
    hashes one file instead of reading it here (a job's shared
    :class:`~mergejob.io.digests.FileDigests`, so each input is read once).
    """
    folder = Path(folder)
    if names is None:
        names = [p.name for p in folder.iterdir() if p.is_file()]
    names = sorted(names)
    known = dict(known or {})

    def one(name: str) -> str:
        path = folder / name
        if name in known:
            return known[name]
        if digest is not None:
            return digest(path)
        return _known_sha256(path) or sha256_file(path)

    if workers <= 1:  # no pool: safe on a daemon thread a failing job does not wait for
        return {name: one(name) for name in names}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def input_files(folder: Path, patterns: Iterable[str]) -> list[str]:
    """The top-level files of a source folder that a merge reads (by download pattern)."""
    patterns = list(patterns)
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    )


def versions() -> dict[str, str]:
    """Versions of Python and the packages that decide the output's bytes."""
    found = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def pinned_source(source: ResolvedSource, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A spec entry that names exactly what was used: Hub commit, or absolute local path."""
    rest = {k: v for k, v in spec.items() if k not in ("path", "revision")}
    if source.commit:
        pinned: dict[str, Any] = {"path": spec["path"], "revision": source.commit}
    else:
        pinned = {"path": str(Path(source.local_dir).absolute())}
    # Keys in the spec's field order, so that a rerun's recipe and card match byte for byte.
    return {**pinned, **rest}


def source_record(
    role: str,
    source: ResolvedSource,
    patterns: Iterable[str],
    *,
    workers: int = 4,
    digest: Callable[[Path], str] | None = None,
    also: Iterable[str] = (),
) -> dict[str, Any]:
    """What one input was: where it came from, at which commit, with its files' sha256.
    ``also``: files of the source not (or no longer) on disk whose sha256 ``digest`` knows
    (the shards of a Hub base streamed during the merge)."""
    record: dict[str, Any] = {"role": role, "source": source.spec.path}
    if source.spec.revision:
        record["revision"] = source.spec.revision
    if source.commit:
        record["commit"] = source.commit
    else:
        record["local_dir"] = str(Path(source.local_dir).absolute())
    names = sorted(set(input_files(source.local_dir, patterns)) | set(also))
    record["files"] = file_digests(source.local_dir, names, workers=workers, digest=digest)
    return record


def build_recipe(
    *,
    spec: Mapping[str, Any],
    inputs: list[dict[str, Any]],
    output_dir: Path,
    engine: Mapping[str, Any],
    timings: Mapping[str, float],
    known_digests: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The full ``mergejob.yaml`` document: the resolved spec and its ``recipe:`` record."""
    names = [n for n in _output_names(output_dir) if n != RECIPE_FILE]
    outputs = file_digests(output_dir, names, known=known_digests)
    # Sizes too: a rerun takes the folder for finished when its files have them, without
    # reading them again (mergejob.output.finished_recipe).
    sizes = {name: (Path(output_dir) / name).stat().st_size for name in outputs}
    record = {
        "format": RECIPE_FORMAT,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "engine": dict(engine),
        "versions": versions(),
        "inputs": inputs,
        "outputs": outputs,
        "sizes": sizes,
        "timings": dict(timings),
    }
    return {**spec, RECIPE_KEY: record}


def _output_names(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).iterdir() if p.is_file()]


def write_recipe(output_dir: Path, recipe: Mapping[str, Any]) -> Path:
    """Write ``mergejob.yaml`` with a header that says how to rerun it."""
    path = Path(output_dir) / RECIPE_FILE
    header = (
        "# mergejob recipe: the resolved spec of this merge and a record of how it was made.\n"
        "# Rerun: mergejob run --config mergejob.yaml --output_dir OTHER_DIR\n"
    )
    path.write_text(header + yaml.safe_dump(dict(recipe), sort_keys=False, width=100))
    return path


def recorded_inputs(spec_file: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The ``recipe.inputs`` of a spec file that is a recipe (``mergejob.yaml``), else None."""
    try:
        data = yaml.safe_load(Path(spec_file).read_text())
    except (OSError, yaml.YAMLError):
        return None  # the spec loader reports what is wrong with the file
    record = data.get(RECIPE_KEY) if isinstance(data, dict) else None
    inputs = record.get("inputs") if isinstance(record, dict) else None
    if not isinstance(inputs, list):
        return None
    return [entry for entry in inputs if isinstance(entry, dict)]


def _input_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """Which input a record is about: a Hub repo at a commit, or a local folder."""
    if record.get("commit"):
        return (record.get("role"), record.get("source"), record.get("commit"))
    return (record.get("role"), record.get("local_dir"))


def input_changes(
    recorded: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]
) -> list[str]:
    """The files of this job's inputs that differ from what a recipe recorded for the same
    input (same Hub commit, or same local folder). Inputs the recipe does not name (a flag
    replaced one) are not compared: that change is the user's, not the files'."""
    by_key = {_input_key(r): r for r in recorded}
    changes: list[str] = []
    for record in current:
        old = by_key.get(_input_key(record))
        if old is None and record.get("local_dir"):
            # A published recipe names a local input by its folder name only.
            old = by_key.get((record.get("role"), Path(str(record["local_dir"])).name))
        if old is None:
            continue
        where = record.get("local_dir") or f"{record.get('source')}@{record.get('commit')}"
        before = old.get("files") or {}
        now = record.get("files") or {}
        for name in sorted(set(before) | set(now)):
            if name not in now:
                changes.append(f"{where}/{name}: missing (the recipe recorded it)")
            elif name not in before:
                changes.append(f"{where}/{name}: new (the recipe did not record it)")
            elif before[name] != now[name]:
                changes.append(
                    f"{where}/{name}: sha256 {str(now[name])[:12]}... differs from the "
                    f"recipe's {str(before[name])[:12]}..."
                )
    return changes


def read_recipe(folder: Path) -> dict[str, Any]:
    """The ``mergejob.yaml`` of an output folder as a dict (spec keys and ``recipe``)."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        raise InputError(
            f"{path}: missing; {folder} was not written by mergejob (give --base and "
            "--adapters to verify it anyway)"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a mergejob recipe")
    return data


def without_local_paths(document: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe to publish: every local path (the inputs, the output and offload folders)
    as its folder name only, so no home folder reaches the Hub. A rerun from it runs beside
    those folders; its inputs are still checked against the recorded sha256, by name."""

    def name(path: Any) -> Any:
        return Path(path).name if isinstance(path, str) and os.path.isabs(path) else path

    def source(entry: Any) -> Any:
        if isinstance(entry, Mapping) and not entry.get("revision"):
            return {**entry, "path": name(entry.get("path"))}
        return entry

    result = dict(document)
    result["base"] = source(result.get("base"))
    if isinstance(result.get("adapters"), list):
        result["adapters"] = [source(entry) for entry in result["adapters"]]
    for section, key in (("output", "dir"), ("engine", "offload_folder")):
        part = result.get(section)
        if isinstance(part, Mapping) and part.get(key):
            result[section] = {**part, key: name(part[key])}
    config = result.get("config")
    if isinstance(config, Mapping) and config.get("config_from") is not None:
        result["config"] = {**config, "config_from": source(config["config_from"])}
    extract = result.get("extract")
    if isinstance(extract, Mapping) and extract.get("finetuned") is not None:
        result["extract"] = {**extract, "finetuned": source(extract["finetuned"])}
    record = result.get(RECIPE_KEY)
    if isinstance(record, Mapping) and isinstance(record.get("inputs"), list):
        inputs = [
            {
                **entry,
                "source": Path(entry["local_dir"]).name,
                "local_dir": name(entry["local_dir"]),
            }
            if isinstance(entry, Mapping) and entry.get("local_dir")
            else entry
            for entry in record["inputs"]
        ]
        result[RECIPE_KEY] = {**record, "inputs": inputs}
    return result
