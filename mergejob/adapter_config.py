"""Read and check an adapter folder's ``adapter_config.json``, and find its weights file."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mergejob import settings
from mergejob.errors import AdapterError


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's config as a dict; errors name the file and say what is wrong."""
    path = Path(adapter_dir) / settings.ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise AdapterError(
            f"{path}: missing; {adapter_dir} is not a PEFT adapter folder "
            "(save adapters with PeftModel.save_pretrained)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise AdapterError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    check_config_types(data, path)
    return data


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _pattern(value: Any) -> bool:
    return isinstance(value, dict) and all(_number(v) for v in value.values())


# Key -> (the check, what the value must be). PEFT reads these as they are (LoraConfig is a
# dataclass): "16" as lora_alpha fails deep inside its merge, "false" as use_dora is true.
_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "lora_alpha": (_number, "a number"),
    "lora_dropout": (_number, "a number"),
    "rank_pattern": (lambda v: v is None or _pattern(v), "a mapping of module pattern to rank"),
    "alpha_pattern": (lambda v: v is None or _pattern(v), "a mapping of module pattern to alpha"),
    "target_modules": (
        lambda v: v is None or isinstance(v, str) or _strings(v),
        "a list of module names, a regular expression or null",
    ),
    "exclude_modules": (
        lambda v: v is None or isinstance(v, str) or _strings(v),
        "a list of module names, a regular expression or null",
    ),
    "modules_to_save": (lambda v: v is None or _strings(v), "a list of module names or null"),
    "layers_to_transform": (
        lambda v: v is None or _integer(v) or (isinstance(v, list) and all(map(_integer, v))),
        "a layer index, a list of them or null",
    ),
    "layers_pattern": (
        lambda v: v is None or isinstance(v, str) or _strings(v),
        "a name, a list of names or null",
    ),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "peft_type": (lambda v: v is None or isinstance(v, str), "a PEFT method name, e.g. LORA"),
}


def check_config_types(config: Mapping[str, Any], path: Path | str) -> None:
    """Refuse values of the wrong type in an adapter config (``"lora_alpha": "16"``), naming
    the file and the key: no engine can merge them, and a retry cannot help."""
    for key, (check, expected) in _TYPES.items():
        if key in config and not check(config[key]):
            value = json.dumps(config[key])
            shown = value if len(value) <= 60 else f"{value[:57]}..."
            raise AdapterError(f"{path}: {key}: {shown} is not {expected}; fix the adapter config")


def adapter_weights_path(adapter_dir: Path) -> Path:
    """The adapter's safetensors weights; pickle weights or none at all are bad input."""
    path = Path(adapter_dir) / settings.ADAPTER_WEIGHTS_FILE
    if path.is_file():
        return path
    if (Path(adapter_dir) / settings.ADAPTER_PICKLE_FILE).is_file():
        raise AdapterError(
            f"{adapter_dir}/{settings.ADAPTER_PICKLE_FILE}: pickle weights are not read; "
            "re-save the adapter with safetensors "
            "(PeftModel.save_pretrained(..., safe_serialization=True))"
        )
    raise AdapterError(f"{adapter_dir}/{settings.ADAPTER_WEIGHTS_FILE}: missing")
