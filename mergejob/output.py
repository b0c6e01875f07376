"""The output folder: atomic, complete, and self-describing. Its one owner.

Everything is written into a temporary folder beside the output (``.NAME.mergejob-partial``)
and renamed into place only when complete, so nothing half-written is ever found where a
finished model is expected. The engine writes the weights there (the stream engine keeps
its per-shard records beside them so a rerun after a crash resumes); this module writes the
rest, once: ``config.json`` (:func:`write_config`: the keys the merge decided, then
config_from and the overrides), the tokenizer, ``generation_config.json`` and the chat
template (:func:`write_extras`). The card and the recipe are written into it by
:mod:`mergejob.card` and :mod:`mergejob.recipe` through the pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergejob import model_config, settings
from mergejob.errors import OutputExistsError
from mergejob.io.shards import RECORDS_DIR
from mergejob.sources import choose_tokenizer_source

log = logging.getLogger(__name__)


def partial_dir_for(output_dir: Path) -> Path:
    """The temporary folder beside ``output_dir`` that becomes it when complete."""
    output_dir = Path(output_dir).absolute()
    return output_dir.parent / f".{output_dir.name}{settings.PARTIAL_SUFFIX}"


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
    """Remove the engine's bookkeeping from a finished partial folder: the per-shard records,
    the markers the indices of an Indexed Job leave, an extraction's group parts."""
    shutil.rmtree(Path(partial) / RECORDS_DIR, ignore_errors=True)
    shutil.rmtree(Path(partial) / settings.INDEXES_DIR, ignore_errors=True)
    shutil.rmtree(Path(partial) / settings.EXTRACT_PARTS_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Is this merge already done? (a rerun after a crash that came after the last step)


def _published_marker(output_dir: Path) -> Path:
    output_dir = Path(output_dir).absolute()
    return output_dir.parent / f".{output_dir.name}{settings.PUBLISHED_SUFFIX}"


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def finished_recipe(folder: Path) -> dict[str, Any] | None:
    """The recipe of ``folder`` if the folder agrees with it, else None: every file its
    ``outputs`` name is there with the size its ``sizes`` record (a recipe without sizes
    proves nothing).

    Names and sizes, not a re-hash: every rerun looks, and reading a 140 GB output again
    would cost it minutes. What a rerun must not take for finished is a folder a crash or a
    person left incomplete (a missing or cut file), which sizes catch; the files were hashed
    as they were written (the recipe holds their sha256, ``mergejob verify`` re-reads them).
    """
    import yaml

    try:
        document = yaml.safe_load((Path(folder) / settings.RECIPE_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    record = document.get("recipe") if isinstance(document, dict) else None
    outputs = record.get("outputs") if isinstance(record, dict) else None
    sizes = record.get("sizes") if isinstance(record, dict) else None
    if not isinstance(outputs, dict) or not isinstance(sizes, dict) or set(outputs) != set(sizes):
        return None
    for name, size in sizes.items():
        path = Path(folder) / str(name)
        try:
            if not path.is_file() or path.stat().st_size != size:
                return None
        except OSError:
            return None
    return document


def recipe_plan_id(document: Mapping[str, Any]) -> str | None:
    """The plan id a recipe (as read by :func:`finished_recipe`) records, if any."""
    section = document.get("recipe")
    engine = section.get("engine") if isinstance(section, dict) else None
    plan_id = engine.get("plan_id") if isinstance(engine, dict) else None
    return str(plan_id) if plan_id else None


def may_hold_finished(output_dir: Path, *, temporary: bool) -> bool:
    """Cheap: whether ``output_dir`` may hold a finished merge (a recipe, or for a
    publish-only job the published marker), to be confirmed by the pipeline (the recipe
    agrees with the files and describes this very job)."""
    if temporary:
        return _published_marker(output_dir).is_file()
    return (Path(output_dir) / settings.RECIPE_FILE).is_file()


def published_for(output_dir: Path, plan_id: str | None) -> bool:
    """Whether this plan's output was already committed to the Hub (by a run that died
    before it could remove its local copy)."""
    if plan_id is None:
        return False
    marker = _read_json_object(_published_marker(output_dir))
    return marker.get("plan_id") == plan_id and bool(marker.get("published"))


def mark_published(output_dir: Path, plan_id: str, commit_url: str) -> None:
    """Remember that this plan's output is on the Hub (read by :func:`published_for`)."""
    path = _published_marker(output_dir)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"plan_id": plan_id, "published": commit_url}, sort_keys=True))
    os.replace(tmp, path)


def forget_published(output_dir: Path) -> None:
    """The folder is in place: its recipe says what it is; the marker goes."""
    _published_marker(output_dir).unlink(missing_ok=True)


def _replaced_dir(output_dir: Path) -> Path:
    output_dir = Path(output_dir).absolute()
    return output_dir.parent / f".{output_dir.name}{settings.OLD_SUFFIX}"


def commit_partial(output_dir: Path) -> Path:
    """Rename the finished temporary folder into place (replacing an old output: the old one
    is renamed aside first, then removed; :func:`recover_replaced` finishes a crash between)."""
    output_dir = Path(output_dir).absolute()
    partial = partial_dir_for(output_dir)
    if output_dir.exists():
        old = _replaced_dir(output_dir)
        if old.exists():
            shutil.rmtree(old)
        output_dir.rename(old)
        settings.kill_point("between-renames")
        partial.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(output_dir)
    return output_dir


def recover_replaced(output_dir: Path) -> None:
    """Finish what a crash inside :func:`commit_partial` left: the old output renamed aside
    (``.NAME.mergejob-old``, a whole model) goes if the new one is in place, and is put back
    if nothing is (the new one is still the partial folder, which the rerun finishes)."""
    output_dir = Path(output_dir).absolute()
    old = _replaced_dir(output_dir)
    if not old.exists():
        return
    if output_dir.exists():
        log.info("removing %s, the output a finished run replaced", old)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        old.rename(output_dir)
        log.warning("%s: put back the old output (a run died while replacing it)", output_dir)
    except FileNotFoundError:
        pass  # another index of the same Indexed Job put it back first


def copy_tokenizer(source: Path | None, dest: Path) -> list[str]:
    """Copy the tokenizer files of ``source`` byte for byte; returns the names copied."""
    if source is None:
        return []
    copied = []
    for name in settings.TOKENIZER_FILES:
        src = Path(source) / name
        if src.is_file():
            shutil.copyfile(src, Path(dest) / name)
            copied.append(name)
    for src in sorted(Path(source).glob("*.tiktoken")):
        shutil.copyfile(src, Path(dest) / src.name)
        copied.append(src.name)
    return copied


def copy_generation_config(base_dir: Path, dest: Path) -> bool:
    """The base's ``generation_config.json``, unless an engine wrote one already."""
    src = Path(base_dir) / settings.GENERATION_CONFIG_FILE
    target = Path(dest) / settings.GENERATION_CONFIG_FILE
    if src.is_file() and not target.is_file():
        shutil.copyfile(src, target)
        return True
    return False


def write_extras(out_dir: Path, base_dir: Path, adapter_dirs: Sequence[Path]) -> None:
    """Tokenizer (from the last adapter that ships one, else the base), generation_config
    and chat template next to the weights."""
    source = choose_tokenizer_source(base_dir, adapter_dirs)
    copied = copy_tokenizer(source, out_dir)
    if copied:
        log.info("tokenizer from %s: %s", source, ", ".join(copied))
    else:
        log.warning("no tokenizer found in the base or any adapter; the output has none")
    copy_generation_config(base_dir, out_dir)


def write_config(
    out_dir: Path,
    base_dir: Path,
    *,
    updates: Mapping[str, Any] | None,
    config_from: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> bool:
    """Write ``out_dir/config.json`` once: the base's config with the keys the merge decided
    (``updates``: tying, vocab_size, dtype; None where the engine saved its own config.json,
    which is then the start), then ``config_from`` and the ``overrides``. Returns whether
    config_from or overrides changed it."""
    path = Path(out_dir) / settings.CONFIG_FILE
    if updates is None and path.is_file():
        config = model_config.read_config(out_dir)
    else:
        config = _with_updates(model_config.read_config(base_dir), updates or {})
    changed = config_from is not None or bool(overrides)
    if updates is None and path.is_file() and not changed:
        return False  # the engine's own config.json stays byte for byte
    if changed:
        config = model_config.merged_config(
            config, config_from=config_from, overrides=overrides or {}
        )
    write_json(path, config)
    return changed


def _with_updates(config: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """``updates`` applied where transformers reads them (a multimodal config's text part
    for the text keys; ``dtype`` replacing the old ``torch_dtype``)."""
    text = config.get("text_config")
    for key, value in updates.items():
        if key == "dtype":
            config.pop("torch_dtype", None)
            config["dtype"] = value
            continue
        if isinstance(text, dict) and (key in text or key not in config):
            text[key] = value
        if key in config or not isinstance(text, dict):
            config[key] = value
    return config


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON the way transformers does (sorted keys, 2-space indent, newline)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
