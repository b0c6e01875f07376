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
- an override value must have the type its key takes (:func:`expected_type`: the config
  class's annotation, ``RopeParameters`` for RoPE values, else its default, else the value the
  config holds): ``rope_theta: "3,580,165,449"`` is refused naming key, value and type;
- the final config must load with transformers and every override must read back with its
  value: transformers 5 reads ``rope_theta`` from ``rope_parameters``, so a ``rope_theta``
  override lands there (a top-level ``rope_theta`` next to ``rope_parameters`` is ignored);
- the final config must build its causal LM on the meta device (no weights), with the
  weights' shapes; a failure names the override that causes it.

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
    """Refuse override keys that the weights fix, (unless allowed) keys nobody knows, and
    values of another type than the key takes (:func:`check_override_types`)."""
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
    check_override_types(config, overrides)


def _real_key(config: Mapping[str, Any], key: str) -> str:
    """``max_position_embeddings`` -> ``n_positions`` for GPT-2 (the class's attribute_map)."""
    cls = config_class(config.get("model_type"))
    attribute_map = getattr(cls, "attribute_map", {}) or {}
    return attribute_map.get(key, key)


# ---------------------------------------------------------------------------------------
# Types of override values: what the config class declares, else what the config holds

# JSON kinds of a value: bool, int, float, str, list, dict, null.
_KIND_WORDS = {
    "bool": "a boolean",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
    "null": "null",
}
_ANNOTATION_NAMES = {
    "bool": "bool",
    "int": "int",
    "float": "float",
    "str": "str",
    "None": "null",
    "NoneType": "null",
    "list": "list",
    "tuple": "list",
    "dict": "dict",
}


@dataclasses.dataclass(frozen=True)
class ExpectedType:
    """The JSON kinds a config key takes, and who says so (for the message)."""

    kinds: frozenset[str]
    where: str
    # The class declares a float (not an int): a JSON integer is taken and written as a
    # float, since transformers 5 refuses an int for a float field (rms_norm_eps=1).
    float_only: bool = False

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` has one of the kinds (an integer counts as a number)."""
        kind = _json_kind(value)
        return kind in self.kinds or (kind == "int" and "float" in self.kinds)

    def describe(self) -> str:
        """``a number or null``, ``an integer``, ``true or false``."""
        words = []
        if "float" in self.kinds:
            words.append("a number")
        elif "int" in self.kinds:
            words.append("an integer")
        words += [
            "true or false" if kind == "bool" else _KIND_WORDS[kind]
            for kind in ("str", "bool", "list", "dict")
            if kind in self.kinds
        ]
        if "null" in self.kinds:
            words.append("null")
        return " or ".join(words)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int in Python, not in JSON schemas
        return "bool"
    for kind, types in (("int", int), ("float", float), ("str", str), ("dict", Mapping)):
        if isinstance(value, types):
            return kind
    return "list" if isinstance(value, list | tuple) else type(value).__name__


def _annotation_kinds(annotation: Any) -> frozenset[str] | None:
    """JSON kinds of a type annotation (a type, a union, a string such as ``'int | None'``),
    or None where any part is something else (torch.dtype, Any): then nothing is checked."""
    import typing

    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.split("|")]
        if any("[" in p and not p.endswith("]") for p in parts):
            return None  # a | inside brackets: not the simple unions this reads
        kinds: set[str] = set()
        for part in parts:
            name = part.split("[", 1)[0].strip()
            if name in ("Literal", "typing.Literal"):
                values = part[part.index("[") + 1 : -1]
                kinds |= {"str"} if values.lstrip().startswith(("'", '"')) else {"int"}
            elif name in _ANNOTATION_NAMES:
                kinds.add(_ANNOTATION_NAMES[name])
            else:
                return None
        return frozenset(kinds)
    if annotation is type(None) or annotation is None:
        return frozenset({"null"})
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        found: set[str] = set()
        for arg in typing.get_args(annotation):
            arg_kinds = _annotation_kinds(arg)
            if arg_kinds is None:
                return None
            found |= arg_kinds
        return frozenset(found)
    if origin is typing.Literal:
        return frozenset(_json_kind(v) for v in typing.get_args(annotation))
    if origin is not None:
        annotation = origin
    if isinstance(annotation, type):
        for base in (bool, int, float, str):
            if issubclass(annotation, base):
                return frozenset({base.__name__})
        if issubclass(annotation, dict):  # dict, and TypedDicts such as RopeParameters
            return frozenset({"dict"})
        if issubclass(annotation, list | tuple):
            return frozenset({"list"})
    return None


def _value_kinds(value: Any) -> frozenset[str] | None:
    """Kinds a key takes, judged from a value it has (a default, the base's own): lenient,
    any number for a number (a config's 10000 may stand for a float), nothing for null."""
    kind = _json_kind(value)
    if kind in ("int", "float"):
        return frozenset({"int", "float"})
    return frozenset({kind}) if kind in _KIND_WORDS and kind != "null" else None


def _class_declared(cls: Any, key: str) -> tuple[Any, Any]:
    """(annotation, default) of ``key`` in a config class: its dataclass field
    (transformers 5), else its ``__init__`` parameter (transformers 4); _MISSING if none."""
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.name == key:
                default = f.default if f.default is not dataclasses.MISSING else _MISSING
                return f.type, default
    for klass in getattr(cls, "__mro__", ()):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            param = inspect.signature(init).parameters.get(key)
        except (TypeError, ValueError):
            continue
        if param is not None:
            annotation = param.annotation if param.annotation is not param.empty else _MISSING
            default = param.default if param.default is not param.empty else _MISSING
            return annotation, default
    return _MISSING, _MISSING


def _rope_annotations() -> dict[str, Any]:
    """transformers 5's ``RopeParameters`` fields (rope_theta: float | None, ...)."""
    try:
        import typing

        from transformers.modeling_rope_utils import RopeParameters

        return dict(typing.get_type_hints(RopeParameters))
    except Exception:  # transformers 4: no such class; the config's own values decide
        return {}


def _expected_from(annotation: Any, default: Any, current: Any, where: str) -> ExpectedType | None:
    if annotation is not _MISSING:
        kinds = _annotation_kinds(annotation)
        if kinds is not None:
            float_only = "float" in kinds and "int" not in kinds
            return ExpectedType(kinds, where, float_only)
    for value, source in ((default, f"{where} (by its default)"), (current, where)):
        if value is not _MISSING:
            kinds = _value_kinds(value)
            if kinds is not None:
                return ExpectedType(kinds, source)
    return None


def expected_type(config: Mapping[str, Any], key: str) -> ExpectedType | None:
    """What an override ``key`` (dotted for nested values) must be: the config class's
    annotation (``RopeParameters`` for RoPE values), else its default, else the value the
    config already holds; None where nothing says (a key only ``allow_unknown_keys`` adds)."""
    target = _target(dict(config), key)
    head, _, rest = key.partition(".")
    head = _real_key(target, head)
    rope = target.get("rope_parameters")
    cls = config_class(target.get("model_type"))
    owner = cls.__name__ if cls is not None else "config.json"
    if (head in ("rope_parameters", "rope_scaling") and rest) or (
        head in ROPE_LEGACY_KEYS and isinstance(rope, dict)
    ):
        leaf = rest.split(".")[-1] if rest else head
        node: Any = rope if isinstance(rope, dict) else target.get(head)
        for part in rest.split(".") if rest else [leaf]:
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        annotation = _rope_annotations().get(leaf, _MISSING)
        return _expected_from(annotation, _MISSING, node, f"rope_parameters {leaf!r}")
    if rest:
        node = target.get(head, _MISSING)
        for part in rest.split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        return _expected_from(_MISSING, _MISSING, node, f"{owner} {key!r}")
    if head == "rope_scaling" and "rope_parameters" in known_keys(target):
        head = "rope_parameters"  # transformers 5 reads the old spelling into this one
    annotation, default = _class_declared(cls, head) if cls is not None else (_MISSING, _MISSING)
    return _expected_from(annotation, default, target.get(head, _MISSING), f"{owner}.{head}")


def check_override_types(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Every override value must have the type its key takes (:func:`expected_type`); the
    values of a RoPE mapping (``rope_parameters: {factor: 4.0}``) are checked one by one."""
    for key, value in overrides.items():
        expected = expected_type(config, key)
        if expected is not None and not expected.accepts(value):
            raise SpecError(_type_message(key, value, expected))
        head = _real_key(_target(dict(config), key), key.split(".", 1)[0])
        if head in ("rope_parameters", "rope_scaling") and isinstance(value, Mapping):
            _check_rope_mapping(key, value)


def _check_rope_mapping(key: str, mapping: Mapping[str, Any]) -> None:
    annotations = _rope_annotations()
    for name, value in mapping.items():
        leaf = "rope_type" if name == "type" else name  # transformers 4's spelling
        if leaf in annotations:
            kinds = _annotation_kinds(annotations[leaf])
            expected = ExpectedType(kinds, f"rope_parameters {leaf!r}") if kinds else None
            if expected is not None and not expected.accepts(value):
                raise SpecError(_type_message(f"{key}.{name}", value, expected))
        elif isinstance(value, Mapping):  # RoPE parameters per layer type (Gemma 3)
            _check_rope_mapping(f"{key}.{name}", value)


def _type_message(key: str, value: Any, expected: ExpectedType) -> str:
    hint = ""
    if isinstance(value, str) and expected.kinds & {"int", "float"}:
        digits = value.replace(",", "").replace("_", "").replace(" ", "")
        try:
            float(digits)
        except ValueError:
            pass
        else:
            leaf = key.rsplit(".", 1)[-1]
            hint = (
                f"; write the number without quotes or separators, e.g. {leaf}={digits} "
                "(--set-config parses the value as JSON)"
            )
    kind = _json_kind(value)
    return (
        f"config.overrides.{key}: {value!r} is {_KIND_WORDS.get(kind, kind)}; "
        f"{expected.where} takes {expected.describe()}{hint}"
    )


def coerce_override(config: Mapping[str, Any], key: str, value: Any) -> Any:
    """``value`` as written to the config: a JSON integer for a key the class declares a
    float becomes a float (``rms_norm_eps=1`` -> 1.0); anything else as given."""
    if type(value) is not int:
        return value
    expected = expected_type(config, key)
    return float(value) if expected is not None and expected.float_only else value


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``overrides`` set where transformers reads them.

    ``rope_theta`` (and ``partial_rotary_factor``) go into ``rope_parameters`` when the config
    has one; ``rope_scaling`` (the transformers 4 spelling) becomes ``rope_parameters`` there;
    a dotted key (``rope_parameters.factor``) sets a value inside a nested mapping.
    """
    result = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        value = coerce_override(result, key, value)
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


def _meta_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | str | None:
    """Parameter shapes of the causal LM ``config`` describes, built on the meta device (no
    memory, no weights); the error as one line where transformers cannot build it; None
    where transformers has no class for its model_type (custom code: nothing to build)."""
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
    except Exception as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_shapes_unchanged(reference: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """The model ``config`` describes must build, with the parameter shapes of the one
    ``reference`` (the config the merge would write without overrides) describes: an
    override such as GPT-2's n_positions would change the shape of a weight. Where the
    reference itself does not build (not a causal LM this transformers knows) there is
    nothing to hold ``config`` to."""
    want = _meta_shapes(reference)
    if not isinstance(want, dict):
        log.debug("shape check skipped: the base's own config does not build: %s", want)
        return
    have = _meta_shapes(config)
    if isinstance(have, str):
        raise SpecError(
            f"config: transformers cannot build the model of the resulting config ({have})"
        )
    if have is None:
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


def _blame(
    engine_like: Mapping[str, Any],
    config_from: Mapping[str, Any] | None,
    config_from_name: str | None,
    overrides: Mapping[str, Any],
    error: SpecError,
) -> SpecError:
    """The same failure, named by the first override that alone causes it (else config_from,
    else every override together), so that the message says which key to fix."""
    reference = merged_config(engine_like, config_from=None, overrides={})

    def fails(config: Mapping[str, Any]) -> bool:
        try:
            check_shapes_unchanged(reference, config)
        except SpecError:
            return True
        return False

    detail = str(error).split(": ", 1)[1]
    for key, value in overrides.items():
        if fails(merged_config(engine_like, config_from=config_from, overrides={key: value})):
            return SpecError(f"config.overrides.{key}: with {value!r}, {detail}")
    if config_from is not None and fails(
        merged_config(engine_like, config_from=config_from, overrides={})
    ):
        return SpecError(f"config.config_from {config_from_name or '?'}: {detail}")
    return SpecError(f"config.overrides ({', '.join(overrides)} together): {detail}")


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
    (with the base's merge-decided keys, which the engine may still change): the overrides'
    keys and types, the config loads with its transformers class and reads the overrides
    back, and it builds its model (on the meta device) with the weights' shapes."""
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
    try:
        check_effective(final, overrides)
        if check_shapes and (overrides or config_from is not None):
            check_shapes_unchanged(engine_like, final)
    except SpecError as exc:
        if not str(exc).startswith(("config: ", "config.overrides: ")):
            raise  # names its key already
        raise _blame(engine_like, config_from, config_from_name, overrides, exc) from None
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
        # trainable_token_indices: rows of the chosen tokens only, never a whole vocabulary
        and "trainable_tokens_" not in name
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
