"""A PEFT adapter folder -> per-module factors the stream engine can apply.

``read_adapter`` reads ``adapter_config.json`` and the safetensors *header* (no weights) and
returns :class:`AdapterFactors`: for every LoRA module its A/B factors, rank, alpha and scale
(``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, with ``rank_pattern``/``alpha_pattern``
matched the way PEFT matches them), the DoRA magnitude vector, whether it is an embedding;
and every full tensor the adapter ships (``modules_to_save``, the ``base_layer`` copies PEFT
saves for targeted embeddings) with what PEFT does with it on load.

Every tensor of the file is accounted for: used, or ignored with the reason PEFT ignores it.
A config this module cannot express (LoHa, LoKr, IA3, VeRA, bias training, PiSSA-style
initialisations that rewrite the base, ...) raises :class:`UnsupportedAdapterError` naming
the feature and pointing to ``--engine peft``.

Example::

    from mergejob.adapters import read_adapter
    factors = read_adapter("./my-adapter")
    for lora in factors.loras:
        print(lora.module, lora.r, lora.scale)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mergejob import settings
from mergejob.adapter_config import adapter_weights_path, read_adapter_config
from mergejob.errors import AdapterError, IncompatibleAdapterError, UnsupportedAdapterError
from mergejob.io.headers import FLOAT_DTYPES, TensorRef, read_tensors

_PEFT_FALLBACK = "merge it with --engine peft"

# Config keys whose value the stream engine reads or that do not change a merge.
_HANDLED_KEYS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "megatron_core",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "use_dora",
        "qalora_group_size",
        "runtime_config",
        "lora_bias",
        "ensure_weight_tying",
        "loftq_config",
        "layer_replication",
        "use_qalora",
        "target_parameters",
        "trainable_token_indices",
        "megatron_config",
    }
)
# Features the stream engine does not express, by config key: a truthy value is refused.
_UNSUPPORTED_KEYS = {
    "use_qalora": "QA-LoRA (use_qalora)",
    "layer_replication": "layer replication (layer_replication)",
    "megatron_config": "Megatron parallel LoRA layers (megatron_config)",
    "ensure_weight_tying": "tied LoRA adapters on tied embeddings (ensure_weight_tying)",
    "loftq_config": "LoftQ (loftq_config)",
}
# Initialisations that rewrite the base weights: the adapter is relative to a changed base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


@dataclass(frozen=True)
class LoraFactors:
    """One module's low-rank update: ``delta = scale * (B @ A)``, transposed if ``transposed``."""

    module: str  # module name in the model, e.g. "model.layers.0.self_attn.q_proj"
    a: TensorRef
    b: TensorRef
    r: int
    alpha: float
    scale: float
    embedding: bool  # lora_embedding_A/B: the delta is (B @ A).T
    fan_in_fan_out: bool  # the config's flag (the plan decides per module from shapes)
    magnitude: TensorRef | None = None  # DoRA
    # A LoRA on a parameter (target_parameters: PEFT's ParamWrapper, e.g. fused MoE experts);
    # ``module`` is the wrapper's (``experts``, or ``experts.base_layer`` for the inner one of
    # several on one module); the plan finds the parameter from the factors' shapes.
    parameter: bool = False
    bias: TensorRef | None = None  # lora_B's bias (lora_bias): bias += scale * it, as PEFT

    @property
    def keys(self) -> list[str]:
        keys = [self.a.name, self.b.name]
        if self.magnitude is not None:
            keys.append(self.magnitude.name)
        if self.bias is not None:
            keys.append(self.bias.name)
        return keys


FullRole = Literal["base_layer", "modules_to_save", "plain"]


@dataclass(frozen=True)
class FullTensor:
    """A whole tensor the adapter ships; PEFT loads it over the base tensor ``target``.

    ``base_layer``: the base weight PEFT saves next to a LoRA on an embedding layer;
    ``modules_to_save``: a fully trained module; ``plain``: a base tensor saved as is
    (PEFT's ``save_embedding_layers`` for a resized vocabulary).
    """

    module: str
    param: str  # "weight" or "bias"
    ref: TensorRef
    role: FullRole

    @property
    def target(self) -> str:
        return f"{self.module}.{self.param}"


@dataclass(frozen=True)
class TokenRows:
    """Trained rows of an embedding (``trainable_token_indices``): PEFT's merge copies row
    ``i`` of ``ref`` over row ``indices[i]`` of ``module``'s weight (``index_copy``)."""

    module: str
    ref: TensorRef
    indices: tuple[int, ...]

    @property
    def target(self) -> str:
        return f"{self.module}.weight"


_TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"


def _token_indices(config: Mapping[str, Any], module: str) -> list[int] | None:
    """The token indices PEFT trains on ``module``: the config's list (for the input
    embeddings) or the entry of its dict whose layer name ends ``module``."""
    indices = config.get("trainable_token_indices")
    if isinstance(indices, Mapping):
        for layer, value in indices.items():
            if module == layer or module.endswith(f".{layer}"):
                return [int(i) for i in value]
        return None
    return [int(i) for i in indices] if indices else None


@dataclass(frozen=True)
class IgnoredTensor:
    """A tensor of the adapter file that PEFT does not use for a merge, and why."""

    key: str
    reason: str


@dataclass(frozen=True)
class AdapterFactors:
    """Everything the stream engine needs from one adapter folder (no weights held)."""

    path: str
    weights_file: str
    weight: float
    loras: tuple[LoraFactors, ...]
    full: tuple[FullTensor, ...]
    ignored: tuple[IgnoredTensor, ...]
    modules_to_save: tuple[str, ...]
    use_dora: bool
    use_rslora: bool
    config: Mapping[str, Any]
    tokens: tuple[TokenRows, ...] = ()

    @property
    def name(self) -> str:
        return Path(self.path).name


def check_supported(config: Mapping[str, Any], where: str) -> None:
    """Refuse configs the stream engine cannot express, naming the feature."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{where}: PEFT method {peft_type} is not a LoRA adapter; the stream engine merges "
            f"LoRA (with rsLoRA, DoRA, embeddings and modules_to_save) only; {_PEFT_FALLBACK}"
        )
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise UnsupportedAdapterError(
            f"{where}: bias training (bias={bias!r}) is not expressed by the stream engine; "
            f"{_PEFT_FALLBACK}"
        )
    for key, feature in _UNSUPPORTED_KEYS.items():
        if config.get(key):
            raise UnsupportedAdapterError(
                f"{where}: {feature} is not expressed by the stream engine; {_PEFT_FALLBACK}"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights, so the adapter is "
            "relative to a changed base; convert it to plain LoRA when saving "
            "(path_initial_model_for_weight_conversion) or " + _PEFT_FALLBACK
        )
    unknown = sorted(k for k, v in config.items() if k not in _HANDLED_KEYS and v)
    if unknown:
        raise UnsupportedAdapterError(
            f"{where}: config keys {', '.join(unknown)} are set and the stream engine does not "
            f"know what they change (a newer PEFT variant?); {_PEFT_FALLBACK}"
        )


def pattern_key(pattern_keys: Sequence[str], module: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of ``module``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def is_targeted(config: Mapping[str, Any], module: str) -> bool:
    """PEFT's ``check_target_module_exists``: would PEFT put a LoRA layer on ``module``?"""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
            return False
    for saved in config.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){saved}($|\..*)", module):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        if targets == "all-linear":
            return True  # expanded by PEFT at training time; only Linear layers have factors
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    found = any(module.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        pattern = config.get("layers_pattern")
        match = None
        if not pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers
    return found


def targets_parameter(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT would wrap a parameter of ``module`` (``target_parameters``): one entry
    names a parameter of the module (its name without PEFT's ``.base_layer`` nesting)."""
    owner = module.replace(".base_layer", "")
    for target in config.get("target_parameters") or ():
        target_module = str(target).rpartition(".")[0]
        if owner == target_module or owner.endswith(f".{target_module}"):
            return True
    return False


def _is_saved_module(module: str, modules_to_save: Sequence[str]) -> bool:
    return any(module == m or module.endswith(f".{m}") for m in modules_to_save)


_LORA_PARTS = {
    "lora_A.weight": ("a", False),
    "lora_B.weight": ("b", False),
    "lora_B.bias": ("bias", None),
    "lora_embedding_A": ("a", True),
    "lora_embedding_B": ("b", True),
    "lora_magnitude_vector": ("m", None),
    "lora_magnitude_vector.weight": ("m", None),
}


def default_target_modules(model_type: str | None) -> list[str] | str | None:
    """PEFT's default LoRA targets for a base of ``model_type`` (what it targets when an
    adapter's config says ``target_modules: null``), or None where it has none."""
    if not model_type:
        return None
    # PEFT's own table, imported only for such an adapter (peft imports transformers).
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(model_type)
    if targets is None or isinstance(targets, str):
        return targets
    return sorted(targets)


def with_default_targets(
    config: Mapping[str, Any], model_type: str | None, where: str
) -> dict[str, Any]:
    """``config`` with ``target_modules: null`` replaced as PEFT 0.21 replaces it when it
    loads the adapter (``LoraModel._prepare_adapter_config``): by its default targets for the
    base's ``model_type``. Without such defaults PEFT refuses the adapter, and so does this."""
    config = dict(config)
    if config.get("target_modules") is not None or config.get("target_parameters"):
        return config
    targets = default_target_modules(model_type)
    if targets is None:
        kind = f"model type {model_type!r}" if model_type else "this base (no model_type)"
        raise IncompatibleAdapterError(
            f"{where}: target_modules is null and PEFT has no default target modules for "
            f"{kind}, so PEFT cannot load this adapter either; set target_modules to the "
            "modules it was trained on"
        )
    config["target_modules"] = targets
    return config


def read_adapter(
    adapter_dir: Path | str, *, weight: float = 1.0, model_type: str | None = None
) -> AdapterFactors:
    """Read an adapter folder's config and tensor layout into :class:`AdapterFactors`.

    ``model_type`` is the base's (its config.json): an adapter whose ``target_modules`` is
    null targets PEFT's defaults for it, as PEFT does (:func:`with_default_targets`).
    Raises :class:`UnsupportedAdapterError` for configs the stream engine cannot express and
    :class:`AdapterError` for files whose tensors do not fit their config.
    """
    adapter_dir = Path(adapter_dir)
    where = str(adapter_dir / settings.ADAPTER_CONFIG_FILE)
    config = read_adapter_config(adapter_dir)
    weights_file = adapter_weights_path(adapter_dir)
    check_supported(config, where)
    config = with_default_targets(config, model_type, where)
    refs = read_tensors(weights_file)
    modules_to_save = tuple(config.get("modules_to_save") or ())
    use_dora = bool(config.get("use_dora", False))
    use_rslora = bool(config.get("use_rslora", False))

    parts: dict[str, dict[str, TensorRef]] = {}
    kinds: dict[str, bool] = {}
    plain: list[tuple[str, TensorRef]] = []
    problems: list[str] = []
    for key, ref in refs.items():
        if ref.dtype not in FLOAT_DTYPES:
            problems.append(f"{key}: dtype {ref.dtype} is not a float type")
            continue
        name = key.removeprefix(settings.PEFT_PREFIX)
        for suffix, (part, embedding) in _LORA_PARTS.items():
            if name.endswith(f".{suffix}"):
                module = name[: -len(suffix) - 1]
                if part in parts.setdefault(module, {}):
                    problems.append(f"{key}: a second {part} factor for module {module}")
                parts[module][part] = ref
                if embedding is not None:
                    kinds[module] = embedding
                break
        else:
            if ".lora_" in name:
                problems.append(f"{key}: unknown LoRA tensor (a PEFT variant this engine lacks)")
            else:
                plain.append((name, ref))

    loras: list[LoraFactors] = []
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    for module, found in parts.items():
        a, b, magnitude = found.get("a"), found.get("b"), found.get("m")
        bias = found.get("bias")
        if bias is not None and not config.get("lora_bias"):
            problems.append(f"{bias.name}: a lora_B bias in an adapter without lora_bias")
        if bias is not None and b is not None and tuple(bias.shape) != (b.shape[0],):
            problems.append(f"{bias.name}: shape {list(bias.shape)} does not fit B {list(b.shape)}")
        if a is None or b is None:
            missing = "A" if a is None else "B"
            problems.append(f"{module}: LoRA factor {missing} is missing")
            continue
        if magnitude is not None and not use_dora:
            problems.append(f"{magnitude.name}: DoRA magnitude in an adapter without use_dora")
        if magnitude is None and use_dora:
            problems.append(f"{module}: use_dora is set but the DoRA magnitude vector is missing")
        parameter = not is_targeted(config, module) and targets_parameter(config, module)
        if not parameter and not is_targeted(config, module):
            problems.append(
                f"{module}: has LoRA factors but is outside target_modules/layers_to_transform "
                "(PEFT would not load them)"
            )
        rank_key = pattern_key(list(rank_pattern), module)
        r = int(rank_pattern.get(rank_key, config.get("r", 8)))
        alpha = alpha_pattern.get(
            pattern_key(list(alpha_pattern), module), config.get("lora_alpha", 8)
        )
        if parameter and bias is not None:
            problems.append(
                f"{bias.name}: a lora_B bias on a parameter LoRA, which PEFT's merge leaves out"
            )
            continue
        if parameter and magnitude is not None:
            problems.append(f"{module}: DoRA on a parameter LoRA, which PEFT does not build")
            continue
        # A parameter LoRA on E experts has rank r * E (PEFT's layout); the plan checks E.
        rank_fits = a.shape[0] % r == 0 if parameter else a.shape[0] == r
        if len(a.shape) != 2 or len(b.shape) != 2 or not rank_fits or b.shape[1] != a.shape[0]:
            source = f"rank_pattern {rank_key!r}" if rank_key in rank_pattern else "r"
            problems.append(
                f"{module}: factors A {list(a.shape)} and B {list(b.shape)} do not have rank "
                f"{r} from the config's {source}"
            )
            continue
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        loras.append(
            LoraFactors(
                module=module,
                a=a,
                b=b,
                r=r,
                alpha=alpha,
                scale=scale,
                embedding=kinds.get(module, False),
                fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
                magnitude=magnitude,
                parameter=parameter,
                bias=bias,
            )
        )

    lora_modules = {lora.module for lora in loras}
    full: list[FullTensor] = []
    ignored: list[IgnoredTensor] = []
    plain_names = {name for name, _ in plain}
    tokens: list[TokenRows] = []
    for name, ref in plain:
        if name.endswith(_TOKEN_DELTA):
            owner = name.removesuffix(_TOKEN_DELTA)
            indices = _token_indices(config, owner)
            if indices is None:
                problems.append(f"{ref.name}: trainable tokens of {owner}, not in the config")
            elif len(ref.shape) != 2 or ref.shape[0] != len(indices):
                problems.append(
                    f"{ref.name}: shape {list(ref.shape)} does not hold the {len(indices)} rows "
                    "of trainable_token_indices"
                )
            else:
                tokens.append(TokenRows(owner, ref, tuple(indices)))
            continue
        if name.endswith(".token_adapter.trainable_tokens_original"):
            ignored.append(IgnoredTensor(ref.name, "the base's rows, which a merge overwrites"))
            continue
        module, _, param = name.rpartition(".")
        if module.endswith(".base_layer"):
            owner = module.removesuffix(".base_layer")
            if owner in lora_modules:
                full.append(FullTensor(owner, param, ref, "base_layer"))
            else:
                problems.append(f"{ref.name}: base_layer tensor of {owner}, which has no LoRA")
        elif module.endswith((".modules_to_save", ".original_module")):
            owner, _, wrapper = module.rpartition(".")
            if not _is_saved_module(owner, modules_to_save):
                problems.append(f"{ref.name}: {wrapper} tensor of {owner}, not in modules_to_save")
            elif wrapper == "original_module":
                ignored.append(
                    IgnoredTensor(
                        ref.name,
                        "the wrapped original module, which merge_and_unload replaces by "
                        "modules_to_save",
                    )
                )
            elif f"{owner}.{param}" in plain_names:
                ignored.append(
                    IgnoredTensor(
                        ref.name,
                        f"a second copy of {owner}.{param} written by save_embedding_layers; "
                        "PEFT does not load it",
                    )
                )
            else:
                problems.append(f"{ref.name}: {owner}.{param} itself is missing")
        elif not param:
            problems.append(f"{ref.name}: not a module parameter")
        else:
            role: FullRole = (
                "modules_to_save" if _is_saved_module(module, modules_to_save) else "plain"
            )
            full.append(FullTensor(module, param, ref, role))
    if problems:
        raise IncompatibleAdapterError(
            _listing(f"{weights_file}: tensors that do not fit", problems)
        )
    if weight != 1.0 and use_dora:
        raise UnsupportedAdapterError(
            f"{adapter_dir}: a weight ({weight}) is not defined for a DoRA adapter (its "
            "magnitude rescales the whole weight); merge it at weight 1.0"
        )
    if weight != 1.0 and (tokens or any(f.role != "base_layer" for f in full)):
        names = ", ".join(
            sorted({f.target for f in full if f.role != "base_layer"} | {t.target for t in tokens})
        )
        raise UnsupportedAdapterError(
            f"{adapter_dir}: a weight ({weight}) applies to LoRA deltas; this adapter replaces "
            f"whole tensors ({names}), which a weight does not scale; merge it at weight 1.0"
        )
    return AdapterFactors(
        path=str(adapter_dir),
        weights_file=str(weights_file),
        weight=float(weight),
        loras=tuple(sorted(loras, key=lambda lora: lora.module)),
        full=tuple(full),
        ignored=tuple(ignored),
        modules_to_save=modules_to_save,
        use_dora=use_dora,
        use_rslora=use_rslora,
        config=dict(config),
        tokens=tuple(tokens),
    )


def _listing(title: str, items: Sequence[str], limit: int = 20) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title}:\n  {shown}{more}"


__all__ = [
    "AdapterError",
    "AdapterFactors",
    "FullTensor",
    "IgnoredTensor",
    "LoraFactors",
    "TokenRows",
    "check_supported",
    "default_target_modules",
    "is_targeted",
    "pattern_key",
    "read_adapter",
    "with_default_targets",
]
