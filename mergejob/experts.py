"""Mixture-of-experts checkpoints: run-time fused expert parameters -> tensors on disk.

transformers 5 fuses a MoE layer's experts at run time into 3-D parameters of layout
``(experts, out_features, in_features)`` (``mlp.experts.gate_up_proj``: gate and up of every
expert; ``mlp.experts.down_proj``), while the checkpoint keeps one tensor per expert
(``block_sparse_moe.experts.N.w1.weight`` for Mixtral, ``mlp.experts.N.gate_proj.weight``
for Qwen2/3-MoE and OLMoE). transformers holds the mapping between the two
(``transformers.conversion_mapping.get_checkpoint_conversion_mapping(model_type)``:
renamings, and converters that stack the experts and concatenate gate and up). This module
reads that mapping, not hand-written per-family rules: each fused run-time parameter becomes
a :class:`FusedParameter` listing, for every expert, the rows of the fused matrix that each
disk tensor holds. A converter whose operations are not a stack of experts
(``MergeModulelist(dim=0)``) optionally followed by a concatenation of the per-expert
matrices' rows (``Concatenate(dim=1)``) is not mapped; neither is a base whose
``model_type`` has no mapping (names are then taken as they are).

Example::

    fused = fused_parameters("mixtral", {name: ref.shape for name, ref in tensors.items()})
    gate_up = fused["model.layers.0.mlp.experts.gate_up_proj"]
    for part in gate_up.parts:
        print(part.disk, part.expert, part.rows)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPart:
    """One tensor on disk: rows ``rows[0]:rows[1]`` of expert ``expert``'s matrix in the
    fused run-time parameter (``fused[expert, rows[0]:rows[1], :]``)."""

    disk: str
    expert: int
    rows: tuple[int, int]


@dataclass(frozen=True)
class FusedParameter:
    """A run-time parameter of shape ``(experts, out_features, in_features)`` made by
    transformers from the tensors ``parts`` on disk."""

    name: str
    experts: int
    out_features: int
    in_features: int
    parts: tuple[ExpertPart, ...]


def _supported_operations(converter: object) -> bool:
    """Whether a converter only stacks experts (dim 0) and concatenates rows (dim 1)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    operations = list(getattr(converter, "operations", []))
    if not operations or type(operations[0]) is not MergeModulelist:
        return False
    if getattr(operations[0], "dim", None) != 0:
        return False
    rest = operations[1:]
    if not rest:
        return len(converter.source_patterns) == 1  # type: ignore[attr-defined]
    return len(rest) == 1 and type(rest[0]) is Concatenate and getattr(rest[0], "dim", None) == 1


def _expert_index(pattern: str, key: str) -> int | None:
    """The expert number a converter's source pattern (``.experts.*.w1.weight``) matched."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    found = re.search(regex, key)
    return int(found.group(1)) if found else None


def fused_parameters(
    model_type: str | None, shapes: Mapping[str, Sequence[int]]
) -> dict[str, FusedParameter]:
    """The fused run-time expert parameters of a checkpoint whose tensors have ``shapes``
    (disk name -> shape), by run-time name; empty where transformers has no mapping for
    ``model_type`` or no converter of the supported kind matches."""
    if not model_type:
        return {}
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    mapping = get_checkpoint_conversion_mapping(model_type)
    if not mapping:
        return {}
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
    usable = {id(c): _supported_operations(c) for c in converters}
    # run-time name -> source pattern index -> expert -> (disk name, shape)
    found: dict[str, dict[int, dict[int, tuple[str, Sequence[int]]]]] = {}
    for disk, shape in shapes.items():
        renamed = disk
        for converter in converters:
            # transformers' own renaming: all renamings, then at most one converter.
            renamed, pattern = rename_source_key(disk, renamings, [converter])
            if pattern is None:
                continue
            if not usable[id(converter)] or len(shape) != 2:
                break
            source = converter.source_patterns.index(pattern)
            original = converter._original_source_patterns[source]
            expert = _expert_index(original, renamed_source(disk, renamings))
            if expert is None:
                break
            found.setdefault(renamed, {}).setdefault(source, {})[expert] = (disk, shape)
            break
    fused: dict[str, FusedParameter] = {}
    for name, sources in found.items():
        counts = {len(experts) for experts in sources.values()}
        if len(counts) != 1:
            continue
        experts = counts.pop()
        if any(sorted(e) != list(range(experts)) for e in sources.values()):
            continue  # not experts 0..N-1: not a stack transformers would build either
        parts: list[ExpertPart] = []
        offset = 0
        in_features = None
        for source in sorted(sources):
            rows = {shape[0] for _, shape in sources[source].values()}
            cols = {shape[1] for _, shape in sources[source].values()}
            if len(rows) != 1 or len(cols) != 1 or in_features not in (None, *cols):
                break
            height, in_features = rows.pop(), cols.pop()
            for expert, (disk, _) in sorted(sources[source].items()):
                parts.append(ExpertPart(disk, expert, (offset, offset + height)))
            offset += height
        else:
            assert in_features is not None
            fused[name] = FusedParameter(name, experts, offset, in_features, tuple(parts))
    return fused


def renamed_source(disk: str, renamings: Sequence[object]) -> str:
    """``disk`` after transformers' renamings only (e.g. ``block_sparse_moe`` -> ``mlp``)."""
    from transformers.core_model_loading import apply_renamings

    return apply_renamings(disk, list(renamings))  # type: ignore[arg-type]


def strip_base_layer(module: str) -> str:
    """PEFT's ``strip_base_layer_from_name``: the module name without its ``.base_layer``
    parts (PEFT nests one ParamWrapper per targeted parameter of a module)."""
    return module.replace(".base_layer", "")


def wrapper_target(
    config: Mapping[str, object],
    module: str,
    fused: Mapping[str, FusedParameter],
    a_shape: Sequence[int],
    b_shape: Sequence[int],
) -> FusedParameter | None:
    """The fused parameter an adapter's ParamWrapper ``module`` (with factors of shapes
    ``a_shape``/``b_shape``) puts its LoRA on, or None if it is not a parameter LoRA.

    PEFT nests the wrappers of several parameters of one module (``experts.base_layer`` is
    the inner one); the parameter each wrapper targets is the one of ``target_parameters``
    on this module whose shape fits its factors: ``A`` is ``(r * experts, in_features)``,
    ``B`` is ``(out_features, r * experts)`` (gate_up and down always differ in shape).
    """
    targets = config.get("target_parameters") or []
    owner = strip_base_layer(module)
    fitting = []
    for target in targets:  # type: ignore[attr-defined]
        for name, param in fused.items():
            owner_name, _, param_name = name.rpartition(".")
            key = f"{owner}.{param_name}"
            if owner_name != owner or not (key == target or key.endswith(f".{target}")):
                continue
            if (
                len(a_shape) == 2
                and len(b_shape) == 2
                and a_shape[1] == param.in_features
                and b_shape[0] == param.out_features
                and a_shape[0] == b_shape[1]
                and a_shape[0] % param.experts == 0
            ):
                fitting.append(param)
    unique = {p.name: p for p in fitting}
    return next(iter(unique.values())) if len(unique) == 1 else None


def renamed_tensors(model_type: str | None, names: Sequence[str]) -> dict[str, str]:
    """Run-time name -> disk name for the tensors transformers only renames when it loads
    (``block_sparse_moe.gate.weight`` -> ``mlp.gate.weight`` for Mixtral): those whose name
    its renamings change and no converter takes. Empty without a mapping."""
    if not model_type or not any(True for _ in names):
        return {}
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    mapping = get_checkpoint_conversion_mapping(model_type)
    if not mapping:
        return {}
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
    found: dict[str, str] = {}
    for disk in names:
        runtime, pattern = rename_source_key(disk, renamings, converters)
        if pattern is None and runtime != disk:
            found[runtime] = disk
    return found
