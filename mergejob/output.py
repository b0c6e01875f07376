"""The output folder: atomic, complete, and self-describing.

Everything is written into a temporary folder beside the output (``.NAME.mergejob-partial``)
and renamed into place only when complete, so nothing half-written is ever found where a
finished model is expected. The stream engine keeps its per-shard records in that folder so
a rerun after a crash resumes.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mergejob.errors import OutputExistsError
from mergejob.io.shards import RECORDS_DIR

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
PARTIAL_SUFFIX = ".mergejob-partial"


def partial_dir_for(output_dir: Path) -> Path:
    """The temporary folder beside ``output_dir`` that becomes it when complete."""
    output_dir = Path(output_dir).absolute()
    return output_dir.parent / f".{output_dir.name}{PARTIAL_SUFFIX}"


def check_output_dir(output_dir: Path, *, overwrite: bool) -> None:
    """Refuse an output folder that already holds something, unless ``overwrite``."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"--output_dir {output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"--output_dir {output_dir}: folder is not empty; choose another folder "
            "or pass --overwrite to replace it"
        )


def open_partial(output_dir: Path, *, resume: bool) -> Path:
    """Create (or, with ``resume``, reuse) the temporary folder for ``output_dir``."""
    partial = partial_dir_for(output_dir)
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def discard_partial(output_dir: Path) -> None:
    partial = partial_dir_for(output_dir)
    if partial.exists():
        shutil.rmtree(partial, ignore_errors=True)


def remove_all_but(folder: Path, keep: set[str]) -> None:
    """Remove every entry of ``folder`` (files and folders) whose name is not in ``keep``."""
    for path in Path(folder).iterdir():
        if path.name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def drop_records(partial: Path) -> None:
    """Remove the stream engine's per-shard records from a finished partial folder."""
    shutil.rmtree(Path(partial) / RECORDS_DIR, ignore_errors=True)


def commit_partial(output_dir: Path) -> Path:
    """Rename the finished temporary folder into place (replacing an old output)."""
    output_dir = Path(output_dir).absolute()
    partial = partial_dir_for(output_dir)
    if output_dir.exists():
        trash = output_dir.parent / f".{output_dir.name}.mergejob-old"
        if trash.exists():
            shutil.rmtree(trash)
        output_dir.rename(trash)
        partial.rename(output_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        partial.rename(output_dir)
    return output_dir


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_MARKERS)


def choose_tokenizer_source(base_dir: Path, adapter_dirs: Iterable[Path]) -> Path | None:
    """The last adapter that ships a tokenizer, else the base (None if neither has one)."""
    chosen: Path | None = None
    for adapter_dir in adapter_dirs:
        if has_tokenizer(adapter_dir):
            chosen = Path(adapter_dir)
    if chosen is None and has_tokenizer(base_dir):
        chosen = Path(base_dir)
    return chosen


def copy_tokenizer(source: Path | None, dest: Path) -> list[str]:
    """Copy the tokenizer files of ``source`` byte for byte; returns the names copied."""
    if source is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(source) / name
        if src.is_file():
            shutil.copyfile(src, Path(dest) / name)
            copied.append(name)
    for src in sorted(Path(source).glob("*.tiktoken")):
        shutil.copyfile(src, Path(dest) / src.name)
        copied.append(src.name)
    return copied


def copy_generation_config(base_dir: Path, dest: Path) -> bool:
    src = Path(base_dir) / "generation_config.json"
    if src.is_file():
        shutil.copyfile(src, Path(dest) / "generation_config.json")
        return True
    return False


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON the way transformers does (sorted keys, 2-space indent, newline)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_type_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The text part of a config (multimodal configs nest it under text_config)."""
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config
