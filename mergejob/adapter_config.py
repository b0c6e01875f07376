"""Read and check an adapter folder's ``adapter_config.json``, and find its weights file."""

from __future__ import annotations

import json
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
    return data


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
