"""Check a job against the base's safetensors headers and the adapters' configs.

No weights are read. This first version checks that every LoRA factor fits the base tensor
it targets; the stream engine's plan extends it.
"""

from __future__ import annotations

from pathlib import Path

from mergejob.adapter_config import adapter_weights_path, read_adapter_config
from mergejob.checkpoint import CheckpointIndex, read_header
from mergejob.errors import IncompatibleAdapterError

PEFT_PREFIX = "base_model.model."


def check_lora_shapes(base: CheckpointIndex, adapter_dir: Path) -> None:
    """Every ``lora_A``/``lora_B`` pair must fit the base weight of the module it targets."""
    config = read_adapter_config(adapter_dir)
    weights = adapter_weights_path(adapter_dir)
    header, _ = read_header(weights)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    problems: list[str] = []
    for key, info in header.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.split(".lora_", 1)[0]
        module = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        target = base.tensors.get(f"{module}.weight")
        if target is None:
            problems.append(f"{key}: the base has no tensor {module}.weight")
            continue
        shape = [int(x) for x in info["shape"]]  # type: ignore[index, union-attr]
        out_features, in_features = target.shape[0], target.shape[-1]
        if fan_in_fan_out:
            out_features, in_features = in_features, out_features
        if ".lora_A." in key and shape[-1] != in_features:
            problems.append(
                f"{key}: shape {shape} does not fit {module}.weight {list(target.shape)}"
            )
        if ".lora_B." in key and shape[0] != out_features:
            problems.append(
                f"{key}: shape {shape} does not fit {module}.weight {list(target.shape)}"
            )
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise IncompatibleAdapterError(
            f"{weights}: adapter does not fit base {base.folder} (was it trained on another "
            f"model?):\n  {listed}{more}"
        )
