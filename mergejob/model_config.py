"""The output's ``config.json``: overrides, ``config_from``, and the checks before a merge.

A merge keeps the weights' shapes, so the output config is the base's (or, with
``config.config_from``, another model's of the same architecture and shapes) with the keys the
merge decides (dtype, tie_word_embeddings, vocab_size) taken from what the engine wrote, and
then the user's overrides on top. Everything is checked before any weight is read:

- ``config_from`` must describe the same architecture and shapes as the base (architectures,
  hidden size, layers, heads, KV heads, head dim, intermediate size) and the merged vocabulary;
- an override key must be one the model's config class knows (or already in config.json),
  else it is an error with the nearest key suggested, unless ``config.allow_unknown_keys``;
- an override may not change what the weights fix (shapes, dtype, tied embeddings);
- the final config must load with transformers and every override must read back with its
  value: transformers 5 reads ``rope_theta`` from ``rope_parameters``, so a ``rope_theta``
  override lands there (a top-level ``rope_theta`` next to ``rope_parameters`` is ignored).

Example::

    from mergejob.model_config import apply_overrides
    config = apply_overrides(base_config, {"rope_theta": 3580165449.0,
                                           "max_position_embeddings": 1048576})
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergejob import settings
from mergejob.errors import ModelError, SpecError
from mergejob.io.headers import read_tensors

log = logging.getLogger(__name__)

# Canonical shape keys and the spellings configs use for them.
SHAPE_KEYS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab_size": ("vocab_size",),
}
# Keys the merge decides; config_from and overrides may not change them.
MERGE_DECIDED = ("dtype", "torch_dtype", "tie_word_embeddings", "vocab_size")
FIXED_BY_WEIGHTS = frozenset(
    {alias for aliases in SHAPE_KEYS.values() for alias in aliases}
    | {"architectures", "model_type", "dtype", "torch_dtype", "tie_word_embeddings"}
    | {"quantization_config", "text_config", "vision_config"}
)
# Keys transformers 5 moved into ``rope_parameters``.
ROPE_LEGACY_KEYS = ("rope_theta", "partial_rotary_factor")
_NOT_COPIED_FROM_OTHER = ("_name_or_path", "transformers_version")


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict; errors name the file."""
    path = Path(folder) / settings.CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{path}: missing; is {folder} a model folder?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    """Write ``config.json`` the way transformers does (sorted keys, 2-space indent)."""
    Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def text_part(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language-model part of a config (multimodal configs nest it under text_config)."""
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


def shape_signature(config: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture and shapes a config describes, under canonical names."""
    text = text_part(config)
    signature: dict[str, Any] = {"architectures": config.get("architectures")}
    for canonical, aliases in SHAPE_KEYS.items():
        for alias in aliases:
            if text.get(alias) is not None:
                signature[canonical] = text[alias]
                break
    if "num_key_value_heads" not in signature and "num_attention_heads" in signature:
        signature["num_key_value_heads"] = signature["num_attention_heads"]
    if (
        "head_dim" not in signature
        and signature.get("hidden_size")
        and signature.get("num_attention_heads")
    ):
        signature["head_dim"] = signature["hidden_size"] // signature["num_attention_heads"]
    return signature


def check_config_from(
    base: Mapping[str, Any],
    other: Mapping[str, Any],
    *,
    other_name: str,
    vocab_size: int | None = None,
) -> None:
    """``other`` must describe the base's architecture and shapes (and the merged vocab)."""
    want = shape_signature(base)
    have = shape_signature(other)
    if vocab_size is not None:
        want["vocab_size"] = vocab_size
    problems = []
    for key, value in want.items():
        if value is None or key not in have or have[key] is None:
            continue
        if have[key] != value:
            problems.append(f"{key} {have[key]!r} (the merged model has {value!r})")
    if problems:
        raise SpecError(
            f"config.config_from {other_name}: describes another architecture or shape: "
            f"{'; '.join(problems)}; take the config of a model with the base's architecture "
            "(the fine-tuned model the adapter came from), or set single keys with "
            "config.overrides"
        )


def config_class(model_type: str | None) -> Any:
    """transformers' config class for ``model_type``, or None (custom code, unknown)."""
    if not model_type:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except KeyError:
        return None


def known_keys(config: Mapping[str, Any]) -> set[str]:
    """Keys a config may hold: those of its transformers class, plus those already there."""
    keys = set(config)
    cls = config_class(config.get("model_type"))
    if cls is None:
        return keys
    if dataclasses.is_dataclass(cls):
        keys |= {f.name for f in dataclasses.fields(cls)}
    else:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None:
                keys |= {
                    name
                    for name, param in inspect.signature(init).parameters.items()
                    if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
                }
        keys.discard("self")
    keys |= set(getattr(cls, "attribute_map", {}) or {})
    if "rope_parameters" in keys:
        keys |= {"rope_theta", "rope_scaling", "partial_rotary_factor"}
    return keys


def _target(config: dict[str, Any], key: str) -> dict[str, Any]:
    """Where a key lives: the top level, or text_config when only that knows it."""
    head = key.split(".", 1)[0]
    text = config.get("text_config")
    if isinstance(text, dict) and head not in config and head in known_keys(text):
        return text
    return config


def check_overrides(
    config: Mapping[str, Any], overrides: Mapping[str, Any], *, allow_unknown: bool
) -> None:
    """Refuse override keys that the weights fix, and (unless allowed) keys nobody knows."""
    for key in overrides:
        target = _target(dict(config), key)
        head = key.split(".", 1)[0]
        real = _real_key(target, head)
        if real in FIXED_BY_WEIGHTS or head in FIXED_BY_WEIGHTS:
            hint = {
                "dtype": "use output.dtype (--dtype)",
                "torch_dtype": "use output.dtype (--dtype)",
                "tie_word_embeddings": "the merge unties embeddings itself when an adapter "
                "changes one of them",
            }.get(real, "it must match the weights")
            raise SpecError(f"config.overrides.{key}: cannot be overridden: {hint}")
        known = known_keys(target)
        if head in known or allow_unknown:
            continue
        cls = config_class(target.get("model_type"))
        owner = cls.__name__ if cls else "the base's config.json"
        close = difflib.get_close_matches(head, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError(
            f"config.overrides.{key}: {owner} has no key {head!r}{hint} "
            "(set config.allow_unknown_keys: true to add it anyway)"
        )


def _real_key(config: Mapping[str, Any], key: str) -> str:
    """``max_position_embeddings`` -> ``n_positions`` for GPT-2 (the class's attribute_map)."""
    cls = config_class(config.get("model_type"))
    attribute_map = getattr(cls, "attribute_map", {}) or {}
    return attribute_map.get(key, key)


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``overrides`` set where transformers reads them.

    ``rope_theta`` (and ``partial_rotary_factor``) go into ``rope_parameters`` when the config
    has one; ``rope_scaling`` (the transformers 4 spelling) becomes ``rope_parameters`` there;
    a dotted key (``rope_parameters.factor``) sets a value inside a nested mapping.
    """
    result = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        target = _target(result, key)
        head, _, rest = key.partition(".")
        head = _real_key(target, head)
        rope = target.get("rope_parameters")
        if head in ROPE_LEGACY_KEYS and not rest and isinstance(rope, dict):
            if _is_nested_rope(target, rope):
                raise SpecError(
                    f"config.overrides.{key}: this config has RoPE parameters per layer type "
                    f"({', '.join(rope)}); set rope_parameters.<type>.{head} instead"
                )
            rope[head] = value
            target.pop(head, None)
        elif head == "rope_scaling" and not rest and "rope_parameters" in target:
            target["rope_parameters"] = _rope_parameters_from_scaling(target, value)
            target.pop("rope_scaling", None)
        elif rest:
            node = target.setdefault(head, {})
            parts = rest.split(".")
            for part in parts[:-1]:
                if not isinstance(node, dict):
                    raise SpecError(f"config.overrides.{key}: {part} is not a mapping")
                node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"config.overrides.{key}: not a mapping in the config")
            node[parts[-1]] = value
        else:
            target[head] = value
    return result


def _is_nested_rope(config: Mapping[str, Any], rope: Mapping[str, Any]) -> bool:
    layer_types = set(config.get("layer_types") or ())
    return (
        bool(rope)
        and all(isinstance(v, dict) for v in rope.values())
        and (not layer_types or bool(set(rope) & layer_types))
    )


def _rope_parameters_from_scaling(config: Mapping[str, Any], scaling: Any) -> dict[str, Any]:
    old = config.get("rope_parameters") or {}
    theta = old.get("rope_theta") if isinstance(old, dict) else None
    if scaling is None:
        new: dict[str, Any] = {"rope_type": "default"}
    elif isinstance(scaling, dict):
        new = dict(scaling)
        if "type" in new and "rope_type" not in new:
            new["rope_type"] = new.pop("type")
    else:
        raise SpecError("config.overrides.rope_scaling: must be a mapping or null")
    if theta is not None:
        new.setdefault("rope_theta", theta)
    return new


def merged_config(
    engine_config: Mapping[str, Any],
    *,
    config_from: Mapping[str, Any] | None,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """The output config: ``config_from`` (else what the engine wrote), then overrides."""
    if config_from is None:
        result = copy.deepcopy(dict(engine_config))
    else:
        result = {
            k: copy.deepcopy(v) for k, v in config_from.items() if k not in _NOT_COPIED_FROM_OTHER
        }
        for key in ("dtype", "torch_dtype"):
            result.pop(key, None)
        for key in MERGE_DECIDED:
            if key in engine_config:
                result[key] = engine_config[key]
        for key in _NOT_COPIED_FROM_OTHER:
            if key in engine_config:
                result[key] = engine_config[key]
        text_from, text_engine = text_part(result), text_part(engine_config)
        if text_from is not result and isinstance(text_from, dict):
            for key in ("vocab_size", "tie_word_embeddings"):
                if key in text_engine:
                    text_from[key] = text_engine[key]
    return apply_overrides(result, overrides)


def check_effective(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Load ``config`` with its transformers class; every override must read back as given."""
    cls = config_class(config.get("model_type"))
    if cls is None or not overrides:
        return
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = cls.from_dict(copy.deepcopy(dict(config)))
    except Exception as exc:
        raise SpecError(
            f"config.overrides: transformers cannot load the resulting config "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        ) from None
    for key, value in overrides.items():
        got = _read_back(loaded, key)
        if key == "rope_scaling" and hasattr(_owner(loaded, key), "rope_parameters"):
            want = _rope_parameters_from_scaling({}, value)
            ok = isinstance(got, dict) and all(got.get(k) == v for k, v in want.items())
        else:
            ok = _same(got, value)
        if not ok:
            raise SpecError(
                f"config.overrides.{key}: transformers reads {got!r} after the override, not "
                f"{value!r}; this config keeps the value elsewhere (check rope_parameters)"
            )


_MISSING = object()


def _owner(loaded: Any, key: str) -> Any:
    text = loaded.get_text_config() if hasattr(loaded, "get_text_config") else loaded
    head = key.split(".", 1)[0]
    return loaded if hasattr(loaded, head) or text is loaded else text


def _read_back(loaded: Any, key: str) -> Any:
    owner = _owner(loaded, key)
    head, _, rest = key.partition(".")
    if head in ROPE_LEGACY_KEYS and not rest:
        rope = getattr(owner, "rope_parameters", None)
        if isinstance(rope, dict) and head in rope:
            return rope[head]
    if head == "rope_scaling" and not rest and hasattr(owner, "rope_parameters"):
        return owner.rope_parameters
    node: Any = getattr(owner, head, _MISSING)
    for part in rest.split(".") if rest else []:
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    return node


def _same(got: Any, want: Any) -> bool:
    if isinstance(got, bool) or isinstance(want, bool):
        return got is want or got == want
    if isinstance(got, int | float) and isinstance(want, int | float):
        return float(got) == float(want)
    return bool(got == want)


def _meta_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes of the causal LM ``config`` describes (built on the meta device)."""
    cls = config_class(config.get("model_type"))
    if cls is None:
        return None
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = cls.from_dict(copy.deepcopy(dict(config)))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(loaded)
    except Exception as exc:  # not a causal LM transformers can build: nothing to compare
        log.debug("shape check skipped: %s", exc)
        return None
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_shapes_unchanged(reference: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """The model ``config`` describes must have the parameter shapes of the one
    ``reference`` (the config the merge would write without overrides) describes: an
    override such as GPT-2's n_positions would change the shape of a weight."""
    want = _meta_shapes(reference)
    have = _meta_shapes(config) if want is not None else None
    if want is None or have is None:
        return
    problems = [
        f"{name} {list(have[name])} (the weights are {list(shape)})"
        for name, shape in want.items()
        if name in have and have[name] != shape
    ]
    if problems:
        raise SpecError(
            "config: the resulting config changes the shape of weights the merge writes: "
            + "; ".join(problems[:5])
        )


def plan_output_config(
    base_config: Mapping[str, Any],
    *,
    config_from: Mapping[str, Any] | None,
    config_from_name: str | None,
    overrides: Mapping[str, Any],
    allow_unknown: bool,
    vocab_size: int | None,
    check_shapes: bool = True,
) -> dict[str, Any]:
    """Every check on the output config, before a merge; returns the config it will have
    (with the base's merge-decided keys, which the engine may still change)."""
    if config_from is not None:
        check_config_from(
            base_config, config_from, other_name=config_from_name or "?", vocab_size=vocab_size
        )
    start = config_from if config_from is not None else base_config
    check_overrides(start, overrides, allow_unknown=allow_unknown)
    engine_like = dict(base_config)
    if vocab_size is not None:
        engine_like["vocab_size"] = vocab_size
    final = merged_config(engine_like, config_from=config_from, overrides=overrides)
    check_effective(final, overrides)
    if check_shapes and (overrides or config_from is not None):
        check_shapes_unchanged(engine_like, final)
    return final


_EMBEDDING_TAGS = ("embed", "wte", "lm_head", "word_embeddings", "embed_in", "embed_out")


def saved_vocab_rows(adapter_dir: Path, hidden_size: int | None) -> int | None:
    """Rows of the embeddings (input or output) an adapter saves in full, if any: a resized
    vocabulary. Reads the safetensors header only. The one answer to "how many rows does
    this adapter give the vocabulary", used by the config checks, the stream plan's config
    and the peft engine's resize alike."""
    path = Path(adapter_dir) / settings.ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        return None
    rows = [
        int(ref.shape[0])
        for name, ref in read_tensors(path, check_size=False).items()
        if "lora_" not in name
        and not name.endswith("original_module.weight")
        and len(ref.shape) == 2
        and (hidden_size is None or ref.shape[1] == hidden_size)
        and any(tag in name for tag in _EMBEDDING_TAGS)
    ]
    return max(rows) if rows else None


def merged_vocab_size(base_config: Mapping[str, Any], adapter_dirs: list[Path]) -> int | None:
    """The vocabulary the output will have: the base's, or the rows of the last adapter that
    saves its embeddings in full (:func:`saved_vocab_rows`)."""
    vocab = text_part(base_config).get("vocab_size")
    hidden = shape_signature(base_config).get("hidden_size")
    for adapter_dir in adapter_dirs:
        rows = saved_vocab_rows(adapter_dir, hidden)
        if rows is not None:
            vocab = rows
    return int(vocab) if vocab is not None else None
