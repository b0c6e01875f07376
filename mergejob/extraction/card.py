"""The model card (``README.md``) of an extracted adapter.

Built with huggingface_hub's :class:`~huggingface_hub.ModelCard` as the merge's card is
(:mod:`mergejob.card`, whose helpers it shares): metadata with ``base_model`` (a Hub base),
``base_model_relation: adapter``, ``library_name: peft``, the tags ``mergejob``, ``lora``,
``peft``, ``extracted-lora``, and the fine-tuned model's license (its weights are what the
adapter carries; the base's when the fine-tune's card has none); text with the inputs, the
extraction settings, the summary and the per-module table of the report, how to load it,
and the resolved spec. Nothing in it changes from run to run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mergejob import settings
from mergejob.card import card_spec, hub_id, read_card_metadata
from mergejob.extraction.report import markdown_table
from mergejob.sources import ResolvedSource

RELATION = "adapter"
TAGS = ("mergejob", "lora", "peft", "extracted-lora")
_CARRIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag")


def _source_text(source: ResolvedSource) -> str:
    repo_id, commit = hub_id(source)
    if repo_id:
        return f"`{repo_id}` at `{commit[:12]}`" if commit else f"`{repo_id}`"
    return f"`{source.spec.path}` (local)"


def card_metadata(
    base: ResolvedSource, tuned: ResolvedSource, *, token: str | None = None
) -> dict[str, Any]:
    """The card's YAML metadata, as ModelCardData keyword arguments."""
    tuned_card = read_card_metadata(tuned, token=token)
    base_card = read_card_metadata(base, token=token)
    data: dict[str, Any] = {}
    base_id, _ = hub_id(base)
    if base_id:
        data["base_model"] = base_id
        data["base_model_relation"] = RELATION
    data["library_name"] = "peft"
    for key in _CARRIED_KEYS:
        value = tuned_card.get(key) or base_card.get(key)
        if value:
            data[key] = value
    data["tags"] = list(TAGS)
    return data


def build_card(
    *,
    base: ResolvedSource,
    tuned: ResolvedSource,
    report: Mapping[str, Any],
    resolved_spec: Mapping[str, Any],
    repo_id: str | None = None,
    token: str | None = None,
) -> str:
    """The card's text, metadata included."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**card_metadata(base, tuned, token=token))
    text = _text(base, tuned, report, resolved_spec, repo_id)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{text}"))


def write_card(folder: Path, **kwargs: Any) -> Path:
    """Build the card (:func:`build_card`) and write it as ``README.md`` in ``folder``."""
    path = Path(folder) / settings.CARD_FILE
    path.write_text(build_card(**kwargs), encoding="utf-8")
    return path


def _text(
    base: ResolvedSource,
    tuned: ResolvedSource,
    report: Mapping[str, Any],
    resolved_spec: Mapping[str, Any],
    repo_id: str | None,
) -> str:
    base_id, _ = hub_id(base)
    base_name = base_id or base.spec.path
    tuned_id, _ = hub_id(tuned)
    tuned_name = tuned_id or tuned.spec.path
    title = repo_id.split("/")[-1] if repo_id else f"{Path(tuned_name).name} as a LoRA adapter"
    summary = report.get("summary", {})
    extract = report.get("settings", {})
    lines = [
        f"# {title}",
        "",
        f"A LoRA adapter extracted by mergejob: for every weight that differs, ΔW = "
        f"`{tuned_name}` - `{base_name}` in fp32, truncated by SVD. Loaded onto "
        f"`{base_name}` (or merged into it) it approximates the fine-tuned model; the table "
        "below gives each module's error.",
        "",
        "## Inputs",
        "",
        f"- base: {_source_text(base)}",
        f"- fine-tuned: {_source_text(tuned)}",
        "",
        "## Extraction",
        "",
        f"- max rank: {extract.get('max_rank')}"
        + (f", min energy {extract['min_energy']}" if extract.get("min_energy") else "")
        + (f", sv epsilon {extract['sv_epsilon']}" if extract.get("sv_epsilon") else ""),
        f"- factors: {'B = U·sqrt(S), A = sqrt(S)·Vᵀ' if extract.get('distribute_scale') else 'B = U·S, A = Vᵀ'}"
        f" in {extract.get('dtype')}; `lora_alpha` = r for every module (scale 1)",
        f"- embeddings and lm_head: {extract.get('embeddings')}"
        + (" (modules_to_save)" if extract.get("embeddings") == "full" else ""),
        f"- SVD: {extract.get('svd')}",
        f"- modules: {summary.get('lora', 0)} LoRA, {summary.get('full', 0)} whole "
        f"(modules_to_save), {summary.get('identical', 0)} unchanged and left out",
        f"- ranks {summary.get('rank_min')}..{summary.get('rank_max')}; relative error "
        f"‖ΔW - BA‖/‖ΔW‖ at most {float(summary.get('error_max', 0.0)):.3g} "
        f"(mean {float(summary.get('error_mean', 0.0)):.3g})",
    ]
    if "kept_overall" in summary:
        lines.append(f"- kept over all LoRA modules: {summary['kept_overall']:.6g} of Σ‖ΔW‖²")
    if summary.get("biases"):
        lines.append(
            f"- biases: {summary['biases']} LoRA layer(s) whose bias changed carry Δb as "
            "`lora_B`'s bias (`lora_bias`; zeros on the other LoRA layers), which a merge adds "
            "to the layer's bias (the `bias` column below)"
        )
    whole = [r for r in report.get("modules", []) if r.get("status") == "full" and r.get("reason")]
    if whole:
        lines.append(
            f"- biases: {len(whole)} LoRA layer(s) whose bias changed saved whole "
            f"(`modules_to_save`, weight and bias; {whole[0]['reason']}: `lora_bias` is for "
            "every LoRA layer or none)"
        )
    if report.get("dropped"):
        lines.append(
            "- left out (changed, but no LoRA carries them): "
            + ", ".join(f"`{n}`" for n in report["dropped"])
        )
    where = repo_id or "path/to/this/folder"
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_name}")',
        f'model = PeftModel.from_pretrained(base, "{where}")',
        "```",
        "",
        f"or bake it in: `mergejob merge --base_model_name_or_path {base_name} "
        f"--peft_model_paths {where} --output_dir merged`.",
        "",
        "## Per module",
        "",
        "kept ‖ΔW‖²: the fraction of the module's squared norm the factors keep; relative "
        "error: ‖ΔW - BA‖_F / ‖ΔW‖_F with the factors as stored; optimum: the Eckart-Young "
        "bound at that rank (shown where the full SVD gave it); bias: Δb where the layer's "
        "changed bias is carried as `lora_B`'s bias, whole where the layer is saved whole for its "
        "bias. `extraction.json` holds the same.",
        "",
        markdown_table(report.get("modules", [])),
        "",
        "## Recipe",
        "",
        "The resolved spec of this extraction; `mergejob.yaml` beside this card holds it "
        "with the sha256 of every input and output file; `mergejob run --config "
        "mergejob.yaml --output_dir OTHER_DIR` extracts it again.",
        "",
        "```yaml",
        yaml.safe_dump(card_spec(resolved_spec), sort_keys=False, width=100).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
