"""The model card (``README.md``) of every output: what the model is, exactly.

The card is built with huggingface_hub's :class:`~huggingface_hub.ModelCard` and
:class:`~huggingface_hub.ModelCardData`. Its YAML metadata names the base (``base_model``,
``base_model_relation: finetune``), ``library_name: transformers``, the tags ``mergejob``,
``lora`` and ``merge`` plus the base card's own, and the base card's license; its text lists
the adapters in merge order (id, revision and commit, weight, method, rank, alpha, target
modules), the engine, the output dtype, config overrides, and the resolved spec of the merge.

``base_model_relation`` is ``finetune``: the output is one base model with fine-tuning deltas
baked in. The Hub's ``merge`` relation means several base models merged together (and
``base_model`` then lists them all), which is not what a LoRA merge is.

The card holds nothing that changes from run to run (no dates, timings, local output path or
worker count), so two merges of the same inputs write the same card; the recipe
(``mergejob.yaml``) keeps the record of each run. It never holds the Hub token.

Example::

    from mergejob.card import build_model_card
    card = build_model_card(job, report, resolved_spec=spec_dict, repo_id="org/merged")
    card.save("merged/README.md")
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergejob import settings
from mergejob.job import EngineReport, PreparedJob
from mergejob.sources import ResolvedSource

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

log = logging.getLogger(__name__)

CARD_FILE = settings.CARD_FILE
BASE_MODEL_RELATION = "finetune"
TAGS = ("mergejob", "lora", "merge")
# Metadata of the base's own card carried over to the merged model's card.
_CARRIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag")
# A Hub cache snapshot folder: .../models--org--name/snapshots/<commit>
_CACHE_SNAPSHOT = re.compile(r"models--(?P<id>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


@dataclass(frozen=True)
class AdapterSummary:
    """One adapter as the card shows it."""

    source: str
    revision: str | None
    commit: str | None
    weight: float
    method: str
    rank: str
    alpha: str
    target_modules: str


def hub_id(source: ResolvedSource) -> tuple[str | None, str | None]:
    """The Hub repo id and commit of a source: downloaded ones, and local folders that are
    snapshots of the Hub cache; ``(None, None)`` for any other local folder."""
    if source.repo_id:
        return source.repo_id, source.commit
    match = _CACHE_SNAPSHOT.search(str(source.local_dir).replace("\\", "/"))
    if match:
        return match["id"].replace("--", "/"), match["commit"]
    return None, None


def read_card_metadata(source: ResolvedSource, *, token: str | None = None) -> dict[str, Any]:
    """The YAML metadata of a source's own README.md (empty when it has none).

    A local folder's README.md is read if present; for a Hub source only README.md is
    fetched, at the commit the weights came from. Any failure (no card, offline, a card
    that does not parse) gives an empty dict: the card is information, not a requirement.
    """
    from huggingface_hub.repocard import metadata_load

    path = Path(source.local_dir) / CARD_FILE
    if not path.is_file() and source.repo_id:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(
                hf_hub_download(
                    source.repo_id,
                    CARD_FILE,
                    revision=source.commit or source.spec.revision,
                    token=token,
                )
            )
        except Exception as exc:  # no card, offline, gated: the merged card just lacks it
            log.debug("no model card for %s: %s", source.display, type(exc).__name__)
            return {}
    if not path.is_file():
        return {}
    try:
        return dict(metadata_load(path) or {})
    except Exception as exc:
        log.warning("%s: cannot read its YAML metadata (%s); not carried over", path, exc)
        return {}


def summarize_adapter(source: ResolvedSource, weight: float) -> AdapterSummary:
    """Method, rank, alpha and target modules from the adapter's ``adapter_config.json``."""
    from mergejob.adapter_config import read_adapter_config

    config = read_adapter_config(source.local_dir)
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type == "LORA":
        method = "DoRA" if config.get("use_dora") else "LoRA"
        if config.get("use_rslora"):
            method = f"{method} (rsLoRA scaling)"
    else:
        method = peft_type
    rank = _with_pattern(config.get("r"), config.get("rank_pattern"))
    alpha = _with_pattern(config.get("lora_alpha"), config.get("alpha_pattern"))
    targets = config.get("target_modules")
    if isinstance(targets, str):
        target_text = targets  # a regex
    elif isinstance(targets, Sequence):
        target_text = ", ".join(sorted(str(t) for t in targets))
    else:
        target_text = ""
    saved = config.get("modules_to_save")
    if isinstance(saved, Sequence) and not isinstance(saved, str) and saved:
        target_text += f" (full: {', '.join(str(s) for s in saved)})"
    repo_id, commit = hub_id(source)
    return AdapterSummary(
        source=repo_id or local_name(source),
        revision=source.spec.revision,
        commit=commit,
        weight=weight,
        method=method,
        rank=rank,
        alpha=alpha,
        target_modules=target_text,
    )


def local_name(source: ResolvedSource) -> str:
    """A local input as the card names it: its folder's name, however the path was typed
    (relative or absolute: the same card), and never the local path (home folders)."""
    return Path(os.path.abspath(source.local_dir)).name


def _with_pattern(value: Any, pattern: Any) -> str:
    text = "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(pattern, Mapping) and pattern:
        text += " (per module: " + ", ".join(f"{k}={v}" for k, v in sorted(pattern.items())) + ")"
    return text


def card_metadata(
    base: ResolvedSource, base_card: Mapping[str, Any], adapters: Sequence[AdapterSummary]
) -> dict[str, Any]:
    """The YAML metadata of the merged model's card, as ModelCardData keyword arguments."""
    tags = list(TAGS)
    if any(a.method.startswith("DoRA") for a in adapters):
        tags.append("dora")
    base_tags = base_card.get("tags")
    if isinstance(base_tags, str):
        base_tags = [base_tags]
    if isinstance(base_tags, Sequence):
        tags += [str(t) for t in base_tags if str(t) not in tags]
    data: dict[str, Any] = {}
    base_id, _ = hub_id(base)
    if base_id:
        data["base_model"] = base_id
        data["base_model_relation"] = BASE_MODEL_RELATION
    data["library_name"] = "transformers"
    for key in _CARRIED_KEYS:
        if base_card.get(key):
            data[key] = base_card[key]
    data["tags"] = tags
    return data


def build_model_card(
    job: PreparedJob,
    report: EngineReport,
    *,
    resolved_spec: Mapping[str, Any],
    repo_id: str | None = None,
    token: str | None = None,
) -> ModelCard:
    """The card of the merge ``job`` made by ``report``'s engine.

    ``resolved_spec`` is the spec as the recipe records it (Hub inputs pinned to commits);
    its ``output.dir`` and ``publish`` sections are left out of the card. ``repo_id`` (when
    publishing) titles the card and goes in its usage example.
    """
    from huggingface_hub import ModelCard, ModelCardData

    adapters = [
        summarize_adapter(source, spec.weight)
        for source, spec in zip(job.adapters, job.spec.adapters, strict=True)
    ]
    metadata = card_metadata(job.base, read_card_metadata(job.base, token=token), adapters)
    data = ModelCardData(**metadata)
    text = _card_text(job, report, adapters, resolved_spec, repo_id)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


def write_model_card(
    out_dir: Path,
    job: PreparedJob,
    report: EngineReport,
    *,
    resolved_spec: Mapping[str, Any],
    repo_id: str | None = None,
    token: str | None = None,
) -> Path:
    """Build the card and write it as ``README.md`` in ``out_dir``; returns its path."""
    card = build_model_card(job, report, resolved_spec=resolved_spec, repo_id=repo_id, token=token)
    path = Path(out_dir) / CARD_FILE
    path.write_text(str(card), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# The text


def _card_text(
    job: PreparedJob,
    report: EngineReport,
    adapters: Sequence[AdapterSummary],
    resolved_spec: Mapping[str, Any],
    repo_id: str | None,
) -> str:
    base_id, base_commit = hub_id(job.base)
    base_name = base_id or local_name(job.base)
    count = len(adapters)
    plural = "adapter" if count == 1 else "adapters"
    title = repo_id.split("/")[-1] if repo_id else f"{Path(base_name).name} + {count} {plural}"
    lines = [
        f"# {title}",
        "",
        f"`{base_name}` with {count} PEFT {plural} merged into its weights by "
        "mergejob. It loads like any transformers model: no PEFT and no adapter files are "
        "needed.",
        "",
        "## Adapters",
        "",
        "Merged in this order:",
        "",
        "| # | adapter | revision | weight | method | rank | alpha | target modules |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, adapter in enumerate(adapters, 1):
        lines.append(
            f"| {i} | `{adapter.source}` | {_revision_text(adapter.revision, adapter.commit)} "
            f"| {adapter.weight:g} | {adapter.method} | {adapter.rank} | {adapter.alpha} "
            f"| {_cell(adapter.target_modules)} |"
        )
    lines += ["", "## How it was merged", ""]
    base_line = f"- base: `{base_name}`"
    if base_commit or job.base.spec.revision:
        base_line += f", {_revision_text(job.base.spec.revision, base_commit)}"
    lines.append(base_line)
    engine = f"- engine: {report.engine} (device {job.spec.engine.device})"
    lines.append(engine)
    lines.append(f"- output dtype: {job.output_dtype}")
    if report.tensors_changed is not None:
        lines.append(f"- tensors changed: {report.tensors_changed}")
    if job.config_from is not None:
        config_id, _ = hub_id(job.config_from)
        config_name = config_id or local_name(job.config_from)
        lines.append(f"- config.json taken from: `{config_name}`")
    overrides = job.spec.config.overrides
    if overrides:
        lines.append("- config overrides:")
        lines += [f"  - `{key}` = `{value!r}`" for key, value in sorted(overrides.items())]
    else:
        lines.append("- config overrides: none")
    where = repo_id or "path/to/this/folder"
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
        "## Recipe",
        "",
        "The resolved spec of this merge. `mergejob.yaml`, next to this card, holds it too, "
        "with the sha256 of every input and output file and the versions used; "
        "`mergejob run --config mergejob.yaml --output_dir OTHER_DIR` merges it again. "
        "Local inputs are named by their folder name only (the card never holds a local "
        "path); a published recipe names them so too: rerun it beside those folders.",
        "",
        "```yaml",
        yaml.safe_dump(card_spec(resolved_spec), sort_keys=False, width=100).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def card_spec(resolved_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as the card shows it: without the local output folder, the publish target
    and the worker count, which say where and how fast this copy was made, not what it is."""
    spec = {k: v for k, v in resolved_spec.items() if k not in {"publish", "recipe"}}
    output = spec.get("output")
    if isinstance(output, Mapping):
        spec["output"] = {k: v for k, v in output.items() if k not in {"dir", "overwrite"}}
    engine = spec.get("engine")
    if isinstance(engine, Mapping):
        # How many workers merged it, and where it offloaded, do not change a byte of it.
        spec["engine"] = {k: v for k, v in engine.items() if k not in {"workers", "offload_folder"}}
    # Local inputs by folder name: the card never holds a local path (a home folder).
    spec["base"] = _named_locally(spec.get("base"))
    if isinstance(spec.get("adapters"), list):
        spec["adapters"] = [_named_locally(entry) for entry in spec["adapters"]]
    config = spec.get("config")
    if isinstance(config, Mapping) and config.get("config_from") is not None:
        spec["config"] = {**config, "config_from": _named_locally(config["config_from"])}
    return spec


def _named_locally(entry: Any) -> Any:
    """A spec source entry with an absolute local path as that folder's name (a Hub id is
    never absolute)."""
    if isinstance(entry, Mapping) and isinstance(entry.get("path"), str):
        path = entry["path"]
        if os.path.isabs(path):
            return {**entry, "path": Path(path).name}
    return entry


def _revision_text(revision: str | None, commit: str | None) -> str:
    # The commit alone, not the branch that was asked for: a rerun from the recipe (pinned to
    # the commit) then writes the same card.
    if commit:
        return f"`{commit[:12]}`"
    return f"`{revision}`" if revision else "local"


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "-"
