"""What an extraction will do, from both checkpoints' headers and configs (no weight read).

Every tensor the base and the fine-tuned model share is given a role:

- ``lora``: the weight of a Linear (or GPT-2 Conv1D) layer: ΔW is decomposed into PEFT's
  ``lora_A``/``lora_B``; its bias (``ModuleWork.bias``), if it has one, is carried as
  ``lora_B``'s bias (PEFT's ``lora_bias``) when the engine finds that a bias changed and every
  changed LoRA layer has a bias to take it (:attr:`ExtractionPlan.lora_bias`); when one
  cannot, the layers whose bias changed are saved whole instead (``modules_to_save``, no
  factors: :attr:`ExtractionPlan.whole`) unless ``skip_undecomposable`` leaves the biases
  out;
- ``embedding``: the weight of an input embedding with ``embeddings: lora``: decomposed into
  ``lora_embedding_A``/``lora_embedding_B``;
- ``full``: a module PEFT can only take whole: norms, and the embeddings and ``lm_head`` with
  ``embeddings: full`` (the default, as mergekit) or a resized vocabulary; shipped as
  ``modules_to_save`` when the fine-tune changed it;
- ``check``: a tensor a LoRA cannot carry (a 3-D expert weight, a non-float buffer): it must
  be equal in both models, else it is refused unless ``skip_undecomposable``.

A tensor only one side has, a shape that differs (other than a resized vocabulary), other
architectures, or a ``max_rank`` above a module's smaller dimension are problems: the job
stops before reading a weight. Modules are grouped by layer (the unit of resumption) in the
order their bytes lie in the base's shards. ``plan_id`` fingerprints the layout, the
settings and the identity of every input file.

Module types come from the model's transformers class built on the meta device (no memory);
a model transformers cannot build falls back on names (``embed_tokens``, ``wte``... are
embeddings; other 2-D weights are Linear).

Example::

    plan = plan_extraction(spec.extract, base_dir, tuned_dir)
    plan.raise_problems()
    for module in plan.modules:
        print(module.module, module.kind, module.shape)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergejob import model_config
from mergejob.errors import ModelError
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.headers import FLOAT_DTYPES, TensorRef
from mergejob.plan.work import EmbeddingLayout, embedding_layout, file_identity
from mergejob.spec import ExtractSpec

log = logging.getLogger(__name__)

ModuleKind = Literal["lora", "embedding", "full"]
LayerType = Literal["linear", "conv1d", "embedding", "other"]

# Part of every plan id: bumped when what a plan makes changes, so no part file of an
# older layout is ever resumed.
PLAN_FORMAT = 3
_INPUT_EMBEDDING_RE = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)$"
)
_OUTPUT_EMBEDDING_RE = re.compile(r"(^|\.)(lm_head|embed_out|output)$")
_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ModuleWork:
    """One module of the extraction.

    ``weight`` is the decomposed tensor (``lora``/``embedding``), ``tensors`` every tensor of
    the module in both checkpoints (a ``full`` module ships them all), ``checks`` the ones a
    LoRA cannot carry, which must not differ. ``bias``: a ``lora`` module's bias (1-D, one
    entry per output), which ``lora_bias`` may carry. ``transposed``: ΔW is stored as
    (in, out) (Conv1D, embeddings), so the factors are taken from ΔWᵀ.
    """

    module: str
    kind: ModuleKind
    weight: str | None
    tensors: tuple[str, ...]
    checks: tuple[str, ...]
    shape: tuple[int, ...]
    transposed: bool
    group: int
    resized: bool = False
    # Tied embeddings: the output embedding (lm_head) this module's weight also is; shipped
    # whole under that name too, so a merge (which unties) keeps the fine-tune's head.
    mirror: str | None = None
    bias: str | None = None

    @property
    def lora_shape(self) -> tuple[int, int]:
        """(out, in) of the LoRA layer: B is out x r, A is r x in."""
        rows, cols = self.shape[0], self.shape[1]
        return (cols, rows) if self.transposed else (rows, cols)


@dataclass
class ExtractionPlan:
    """The extraction's modules, groups, notices and problems; see the module doc."""

    base_dir: Path
    tuned_dir: Path
    settings: ExtractSpec
    base: dict[str, TensorRef]
    tuned: dict[str, TensorRef]
    modules: list[ModuleWork] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # tensors outside every module's reach
    notices: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    task_type: str | None = None
    plan_id: str = ""
    # Whether the adapter carries the LoRA layers' biases (PEFT's lora_bias): decided by the
    # engine from the biases' bytes before any large read (None until then); a function of
    # the input files, so of plan_id.
    lora_bias: bool | None = None
    # Decided with it: the LoRA layers saved whole (modules_to_save) because their bias
    # changed and lora_bias cannot carry it (a changed LoRA layer, ``bias_blocker``, cannot
    # take a lora_B bias); empty with skip_undecomposable (the biases are left out then).
    whole: frozenset[str] = frozenset()
    bias_blocker: str | None = None

    @property
    def groups(self) -> list[list[ModuleWork]]:
        """The modules by group, in group order."""
        groups: dict[int, list[ModuleWork]] = {}
        for module in self.modules:
            groups.setdefault(module.group, []).append(module)
        return [groups[g] for g in sorted(groups)]

    def group_sizes(self) -> list[int]:
        """The bytes each group reads from both checkpoints, in group order (what the
        indices of an Indexed Job are balanced by)."""
        return [
            sum(self.base[n].nbytes + self.tuned[n].nbytes for m in group for n in m.tensors)
            for group in self.groups
        ]

    def group_files(self, group: Sequence[ModuleWork]) -> list[str]:
        """The files of both models a group reads, each once, in the order it reads them
        (each tensor: base, then fine-tuned)."""
        return list(
            dict.fromkeys(
                path
                for module in group
                for name in module.tensors
                for path in (self.base[name].path, self.tuned[name].path)
            )
        )

    @property
    def decomposed(self) -> list[ModuleWork]:
        return [m for m in self.modules if m.kind != "full"]

    @property
    def input_bytes(self) -> int:
        """Bytes read from both checkpoints (every shared tensor, once each)."""
        names = {n for m in self.modules for n in m.tensors} | set(self.checks)
        return sum(self.base[n].nbytes + self.tuned[n].nbytes for n in names if n in self.tuned)

    def raise_problems(self) -> None:
        """Raise :class:`ModelError` (exit 2) with every problem, on one line."""
        if self.problems:
            raise ModelError("; ".join(self.problems))


def plan_extraction(
    settings: ExtractSpec,
    base_dir: Path,
    tuned_dir: Path,
    *,
    base_view: Path | None = None,
    tuned_view: Path | None = None,
    trust_remote_code: bool = False,
) -> ExtractionPlan:
    """The plan of extracting ``tuned_dir`` - ``base_dir`` under ``settings``.

    ``base_view``/``tuned_view``: header views standing for the folders (``mergejob plan`` of
    Hub inputs reads headers over HTTP); the configs are read from the folders themselves.
    Problems are collected in the plan (:meth:`ExtractionPlan.raise_problems` raises them).
    """
    base_index = CheckpointIndex.from_folder(base_view or base_dir)
    tuned_index = CheckpointIndex.from_folder(tuned_view or tuned_dir)
    plan = ExtractionPlan(
        base_dir=Path(base_dir),
        tuned_dir=Path(tuned_dir),
        settings=settings,
        base=base_index.tensors,
        tuned=tuned_index.tensors,
    )
    base_config = _config(base_dir)
    tuned_config = _config(tuned_dir)
    _check_architectures(plan, base_config, tuned_config)
    if not plan.problems:  # tensors of another architecture would only repeat it
        _check_tensor_sets(plan)
    if not plan.problems and _same_files(plan):
        plan.problems.append(
            f"{plan.tuned_dir}: holds the base's own weight files ({plan.base_dir}): the "
            "fine-tuned model is the base itself; nothing to extract"
        )
    if plan.problems:
        return plan
    types = layer_types(base_config, trust_remote_code=trust_remote_code)
    architectures = base_config.get("architectures") or []
    if any(str(a).endswith("ForCausalLM") for a in architectures):
        plan.task_type = "CAUSAL_LM"
    layout = embedding_layout(base_dir, base_config, plan.base, trust_remote_code=trust_remote_code)
    _classify(plan, types, layout)
    _check_ranks(plan)
    _note_dtypes(plan)
    plan.plan_id = _plan_id(plan)
    return plan


# ---------------------------------------------------------------------------------------
# The checks


def _config(folder: Path) -> dict[str, Any]:
    try:
        return model_config.read_config(folder)
    except ModelError:
        return {}


def _check_architectures(
    plan: ExtractionPlan, base: Mapping[str, Any], tuned: Mapping[str, Any]
) -> None:
    differs = [
        f"{key} {tuned.get(key)!r} (the base's: {base.get(key)!r})"
        for key in ("model_type", "architectures")
        if base.get(key) and tuned.get(key) and base.get(key) != tuned.get(key)
    ]
    if differs:
        plan.problems.append(
            f"{plan.tuned_dir}: {' and '.join(differs)} differ from the base's: a fine-tune "
            "has its base's architecture; give the base it was trained from"
        )


def _check_tensor_sets(plan: ExtractionPlan) -> None:
    only_base = sorted(set(plan.base) - set(plan.tuned))
    only_tuned = sorted(set(plan.tuned) - set(plan.base))
    for names, side, other in (
        (only_base, "the base", plan.tuned_dir),
        (only_tuned, "the fine-tuned model", plan.base_dir),
    ):
        if names:
            plan.problems.append(
                f"{other}: lacks {len(names)} tensor(s) that {side} has ({few(names)}): "
                "not a fine-tune of this base (or a checkpoint saved differently)"
            )
    misfit = []
    for name in sorted(set(plan.base) & set(plan.tuned)):
        b, t = plan.base[name], plan.tuned[name]
        if b.shape == t.shape:
            continue
        module = name.rpartition(".")[0]
        resized = (
            len(b.shape) == len(t.shape) == 2
            and b.shape[1] == t.shape[1]
            and bool(_INPUT_EMBEDDING_RE.search(module) or _OUTPUT_EMBEDDING_RE.search(module))
        )
        if not resized:
            misfit.append(f"{name} {list(b.shape)} vs {list(t.shape)}")
    if misfit:
        plan.problems.append(
            f"{plan.tuned_dir}: {len(misfit)} tensor(s) differ in shape from the base's "
            f"({few(misfit)}): not a fine-tune of this base"
        )


def _same_files(plan: ExtractionPlan) -> bool:
    """Whether both sides are the same files (one folder, or the same Hub blobs): known
    without reading a weight (copies with other names are found when read)."""
    base = {ref.path for ref in plan.base.values()}
    tuned = {ref.path for ref in plan.tuned.values()}
    if {Path(p).resolve() for p in base} == {Path(p).resolve() for p in tuned}:
        return True
    blobs = {file_identity(p) for p in base}
    return all(i.startswith("blob:") for i in blobs) and blobs == {file_identity(p) for p in tuned}


def _check_ranks(plan: ExtractionPlan) -> None:
    max_rank = plan.settings.max_rank
    small = [m for m in plan.decomposed if min(m.shape) < max_rank]
    if small:
        smallest = min(min(m.shape) for m in small)
        shown = [f"{m.module} {list(m.shape)}" for m in small]
        plan.problems.append(
            f"extract.max_rank (--max-rank) {max_rank}: larger than the smaller dimension of "
            f"{len(small)} module(s) ({few(shown)}); use --max-rank {smallest} or less, or "
            "leave them out with --exclude"
        )


def _note_dtypes(plan: ExtractionPlan) -> None:
    pairs = sorted(
        {
            (plan.base[n].dtype, plan.tuned[n].dtype)
            for m in plan.modules
            for n in m.tensors
            if plan.base[n].dtype != plan.tuned[n].dtype
        }
    )
    for base_dtype, tuned_dtype in pairs:
        plan.notices.append(
            f"the base stores {base_dtype} where the fine-tuned model stores {tuned_dtype}: "
            "the difference is taken in fp32 (full modules ship the fine-tune's own tensors)"
        )


# ---------------------------------------------------------------------------------------
# Roles


def layer_types(
    config: Mapping[str, Any], *, trust_remote_code: bool = False
) -> dict[str, LayerType]:
    """Module name -> layer type of the model ``config`` describes, built on the meta device;
    empty when transformers cannot build it (names decide then)."""
    if not config.get("model_type"):
        return {}
    import warnings

    import torch
    from torch import nn

    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = AutoConfig.for_model(**dict(config))
            with torch.device("meta"):
                try:
                    model = AutoModelForCausalLM.from_config(
                        loaded, trust_remote_code=trust_remote_code
                    )
                except ValueError:
                    model = AutoModel.from_config(loaded, trust_remote_code=trust_remote_code)
    except Exception as exc:  # custom code, a config transformers does not know
        log.debug("module types from names: %s", exc)
        return {}
    types: dict[str, LayerType] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            types[name] = "embedding"
        elif isinstance(module, Conv1D):
            types[name] = "conv1d"
        elif isinstance(module, nn.Linear):
            types[name] = "linear"
        else:
            types[name] = "other"
    return types


def _layer_type(module: str, weight: TensorRef | None, types: Mapping[str, LayerType]) -> LayerType:
    if module in types:
        return types[module]
    if _INPUT_EMBEDDING_RE.search(module):
        return "embedding"
    if weight is not None and len(weight.shape) == 2:
        return "linear"
    return "other"


def included(module: str, settings: ExtractSpec) -> bool:
    """Whether ``include``/``exclude`` keep ``module`` (``re.search`` on its name)."""
    if settings.include and not any(re.search(p, module) for p in settings.include):
        return False
    return not any(re.search(p, module) for p in settings.exclude)


def _group_key(module: str) -> tuple[str, int]:
    match = _LAYER_RE.search(module)
    if match is None:
        return (module, -1)
    return (module[: match.end(1)], int(match.group(1)))


def _classify(
    plan: ExtractionPlan, types: Mapping[str, LayerType], layout: EmbeddingLayout
) -> None:
    settings = plan.settings
    tied_input: str | None = None
    if layout.tied and layout.input and layout.output and layout.output not in plan.base:
        tied_input = layout.input.removesuffix(".weight")
    by_module: dict[str, list[str]] = {}
    for name in plan.base:  # data order of the base's shards
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    group_ids: dict[str, int] = {}
    for module, names in by_module.items():
        if not included(module, settings):
            plan.excluded.append(module)
            continue
        weight_name = f"{module}.weight"
        weight = plan.base.get(weight_name)
        kind_of_layer = _layer_type(module, weight, types)
        resized = any(plan.base[n].shape != plan.tuned[n].shape for n in names)
        floats = all(
            plan.base[n].dtype in FLOAT_DTYPES and plan.tuned[n].dtype in FLOAT_DTYPES
            for n in names
        )
        decomposable = weight is not None and len(weight.shape) == 2 and floats and not resized
        output_embedding = bool(_OUTPUT_EMBEDDING_RE.search(module)) and kind_of_layer != "other"
        kind: ModuleKind | None
        checks: tuple[str, ...] = ()
        bias: str | None = None
        if kind_of_layer == "embedding":
            kind = "embedding" if settings.embeddings == "lora" and decomposable else "full"
        elif kind_of_layer in ("linear", "conv1d") and decomposable:
            kind = "full" if output_embedding and settings.embeddings == "full" else "lora"
            bias = _lora_bias(plan, module, names, weight_name, kind_of_layer)
            checks = tuple(n for n in names if n not in (weight_name, bias))
        elif kind_of_layer in ("linear", "conv1d") and resized and output_embedding:
            kind = "full"
        elif all(len(plan.base[n].shape) <= 1 for n in names) or resized:
            kind = "full"  # norms (and a resized head): PEFT's modules_to_save takes them whole
        else:
            kind = None  # a 3-D expert weight, a non-float buffer: no LoRA carries it
        if kind is None:
            plan.checks.extend(names)
            continue
        mirror = None
        if module == tied_input and layout.output is not None:
            kind, checks = "full", ()
            mirror = layout.output.removesuffix(".weight")
            plan.notices.append(
                f"tied embeddings: {module} is saved whole, and as {mirror} too "
                "(modules_to_save both), so a merge, which unties them, keeps the fine-tune's "
                "head"
            )
        key, _ = _group_key(module)
        group = group_ids.setdefault(key, len(group_ids))
        plan.modules.append(
            ModuleWork(
                module=module,
                kind=kind,
                weight=weight_name if kind != "full" else None,
                tensors=tuple(names),
                checks=checks if kind != "full" else (),
                shape=tuple(weight.shape) if weight is not None else (),
                transposed=kind == "embedding" or kind_of_layer == "conv1d",
                group=group,
                resized=resized,
                mirror=mirror,
                bias=bias if kind == "lora" else None,
            )
        )
    if resized_modules := [m.module for m in plan.modules if m.resized]:
        plan.notices.append(
            f"the vocabulary was resized ({', '.join(resized_modules)}): these modules are "
            "saved whole (modules_to_save), with the fine-tune's tokenizer"
        )
    if plan.excluded:
        plan.notices.append(
            f"{len(plan.excluded)} module(s) left out by include/exclude ({few(plan.excluded)})"
        )


def _lora_bias(
    plan: ExtractionPlan,
    module: str,
    names: Sequence[str],
    weight_name: str,
    layer: LayerType,
) -> str | None:
    """The bias of a Linear/Conv1D layer that ``lora_B``'s bias can stand for: 1-D, one
    entry per output (a Linear's rows, a Conv1D's columns)."""
    name = f"{module}.bias"
    if name not in names:
        return None
    out = plan.base[weight_name].shape[1 if layer == "conv1d" else 0]
    return name if tuple(plan.base[name].shape) == (out,) else None


def _plan_id(plan: ExtractionPlan) -> str:
    """The layout, the settings and every input file's identity (Hub blob, or size+mtime)."""
    paths = sorted({ref.path for ref in (*plan.base.values(), *plan.tuned.values())})
    ids = {p: file_identity(p) for p in paths}

    def ref_id(ref: TensorRef) -> list[Any]:
        return [ids[ref.path], ref.name, ref.dtype, list(ref.shape)]

    settings = plan.settings.model_dump(mode="json", exclude={"finetuned"})
    content = {
        "format": PLAN_FORMAT,
        "settings": settings,
        "modules": [
            [
                m.module,
                m.kind,
                m.weight,
                m.mirror,
                m.transposed,
                m.group,
                [ref_id(plan.base[n]) for n in m.tensors],
                [ref_id(plan.tuned[n]) for n in m.tensors],
                list(m.checks),
                m.bias,
            ]
            for m in plan.modules
        ],
        "checks": [[ref_id(plan.base[n]), ref_id(plan.tuned[n])] for n in plan.checks],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def few(items: Sequence[str], limit: int = 3) -> str:
    """The first ``limit`` items and how many more, for a one-line message."""
    shown = ", ".join(items[:limit])
    return f"{shown}, ... {len(items) - limit} more" if len(items) > limit else shown
