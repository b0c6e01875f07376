"""The checks a job passes before any weight is read: one set, used by every entry point.

``mergejob merge``, ``mergejob run`` and each index of an Indexed Job call :func:`check_job`
in raising mode (the first problem stops the job, exit code 2); ``mergejob plan`` and
``run --dry-run`` call the same checks in collecting mode (:class:`Problems`), so that the
report lists every problem it can find, not only the first, and the two can never disagree
about what is a problem.

Example::

    problems = Problems(collect=True)
    checked = check_job(spec, base_dir, adapter_dirs, config_from_dir, problems=problems)
    print(problems.found)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergejob import model_config, settings
from mergejob.adapter_config import adapter_weights_path, read_adapter_config
from mergejob.errors import IncompatibleAdapterError, InputError, ModelError, SpecError, listing
from mergejob.experts import (
    FusedParameter,
    fused_parameters,
    renamed_tensors,
    strip_base_layer,
    wrapper_target,
)
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.headers import TensorRef, read_tensors
from mergejob.sources import looks_like_repo_id
from mergejob.spec import MergeSpec, SourceSpec

OUTPUT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class Problems:
    """Where checks report: raise the first (``collect=False``) or list them all."""

    collect: bool = False
    found: list[str] = field(default_factory=list)

    @contextmanager
    def check(self) -> Iterator[None]:
        """Run one check; in collecting mode its bad-input error becomes a listed problem."""
        try:
            yield
        except InputError as exc:
            if not self.collect:
                raise
            self.found.append(str(exc))


@dataclass
class CheckedJob:
    """What the checks learned: the base's tensor index and the output dtype (None where
    a check that decides them failed, in collecting mode)."""

    index: CheckpointIndex | None = None
    output_dtype: str | None = None


def check_job(
    spec: MergeSpec,
    base_dir: Path,
    adapter_dirs: Sequence[Path],
    config_from_dir: Path | None,
    *,
    config_from_name: str | None = None,
    problems: Problems | None = None,
    index: CheckpointIndex | None = None,
) -> CheckedJob:
    """Every check of the job's inputs that reads headers and configs only: the base is a
    model folder with readable safetensors headers, the output dtype is a float type, the
    adapters fit the base as the chosen engine needs (the stream engine's own, fuller check
    is its plan: :func:`mergejob.plan.work.plan_for_job`), and the output config
    (config_from, overrides) loads and keeps the weights' shapes."""
    problems = problems or Problems()
    checked = CheckedJob()
    with problems.check():
        if not (Path(base_dir) / settings.CONFIG_FILE).is_file():
            raise ModelError(f"{base_dir}/{settings.CONFIG_FILE}: missing; is this a model folder?")
        # A Hub base streamed by the stream engine: its layout from the shards' headers.
        checked.index = index if index is not None else CheckpointIndex.from_folder(base_dir)
    if checked.index is None:
        return checked
    with problems.check():
        check_not_quantized(base_dir)
    with problems.check():
        checked.output_dtype = output_dtype(spec, checked.index, base_dir)
    if spec.engine.name != "stream":
        for adapter_dir in adapter_dirs:
            with problems.check():
                check_lora_shapes(checked.index, adapter_dir)
    with problems.check():
        check_output_config(
            spec, base_dir, adapter_dirs, config_from_dir, config_from_name=config_from_name
        )
    return checked


def check_not_quantized(base_dir: Path) -> None:
    """Refuse a quantized base (``quantization_config`` in its config: FP8 with block scales,
    MXFP4 experts, bitsandbytes, ...): both engines merge into float weights, and writing
    such a merge back in the quantized format is not supported yet."""
    quantization = model_config.read_config(base_dir).get("quantization_config")
    if not quantization:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    raise ModelError(
        f"{base_dir}/{settings.CONFIG_FILE}: quantization_config (quant_method "
        f"{method or '?'}): the base is quantized, and mergejob merges into float weights "
        "only; dequantize it and save it in bfloat16 first (transformers: from_pretrained "
        "with dequantize=True in its quantization config, then save_pretrained), then merge "
        "into that"
    )


def input_folders(spec: MergeSpec) -> list[tuple[str, Path]]:
    """Every folder the job reads, named for messages: the local sources, the offload folder,
    and the Hub cache where any source comes from the Hub (``HF_HUB_CACHE``). A source that
    is neither a folder nor a repo id is left out (resolving it fails with its own message)."""
    sources: list[tuple[str, SourceSpec]] = [("the base model", spec.base)]
    sources += [("the adapter", adapter) for adapter in spec.adapters]
    if spec.config.config_from is not None:
        sources.append(("config_from", spec.config.config_from))
    if spec.extract is not None:
        sources.append(("the fine-tuned model", spec.extract.finetuned))
    found: list[tuple[str, Path]] = []
    hub: list[str] = []
    for role, source in sources:
        local = Path(source.path).expanduser()
        if local.exists():
            found.append((f"{role} {source.path}", local))
        elif looks_like_repo_id(source.path):
            hub.append(source.path)
    if spec.engine.offload_folder:
        folder = spec.engine.offload_folder
        found.append((f"engine.offload_folder {folder}", Path(folder).expanduser()))
    if hub:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
        found.append((f"the Hub cache {cache} (holding {', '.join(hub)})", Path(cache)))
    return found


def check_output_apart(spec: MergeSpec, output_dir: str | os.PathLike[str] | None) -> None:
    """Refuse an output folder that is, contains or lies inside any input folder (compared
    as real paths: symlinks and ``..`` resolved), whatever the flags: the output is replaced
    as a whole when written (``--overwrite`` too), which would delete the input."""
    if output_dir is None:
        return
    out = Path(os.path.realpath(Path(output_dir).expanduser()))
    for label, folder in input_folders(spec):
        inside = Path(os.path.realpath(folder))
        if out == inside:
            relation = "is"
        elif inside in out.parents:
            relation = "lies inside"
        elif out in inside.parents:
            relation = "contains"
        else:
            continue
        raise SpecError(
            f"--output_dir {output_dir}: {relation} {label}; the output folder is replaced as a "
            "whole when written, which would delete that input: choose a folder apart from "
            "every input"
        )


def output_dtype(spec: MergeSpec, index: CheckpointIndex, base_dir: Path) -> str:
    """The output dtype: the spec's, or ``auto``, the base's stored float dtype."""
    dtype = spec.output.dtype if spec.output.dtype != "auto" else index.stored_dtype()
    if dtype not in OUTPUT_DTYPES:
        raise ModelError(
            f"{base_dir}: weights are stored as {dtype}; pass --dtype bfloat16, float16 or float32"
        )
    return dtype


def check_output_config(
    spec: MergeSpec,
    base_dir: Path,
    adapter_dirs: Sequence[Path],
    config_from_dir: Path | None,
    *,
    config_from_name: str | None = None,
) -> dict[str, Any] | None:
    """config_from and overrides: the config the output will have (None without either),
    checked to load with its transformers class and to keep every weight's shape."""
    if config_from_dir is None and not spec.config.overrides:
        return None
    base_config = model_config.read_config(base_dir)
    return model_config.plan_output_config(
        base_config,
        config_from=model_config.read_config(config_from_dir) if config_from_dir else None,
        config_from_name=config_from_name,
        overrides=spec.config.overrides,
        allow_unknown=spec.config.allow_unknown_keys,
        vocab_size=model_config.merged_vocab_size(base_config, list(adapter_dirs)),
    )


def check_lora_shapes(base: CheckpointIndex, adapter_dir: Path) -> None:
    """The peft engine's check (PEFT decides the rest itself): every ``lora_A``/``lora_B``
    pair must fit the base weight of the module it targets."""
    config = read_adapter_config(adapter_dir)
    weights = adapter_weights_path(adapter_dir)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    prefix = settings.PEFT_PREFIX
    problems: list[str] = []
    wrappers, renamed = _parameter_wrappers(base, config, read_tensors(weights))
    for key, ref in read_tensors(weights).items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.split(".lora_", 1)[0]
        module = module[len(prefix) :] if module.startswith(prefix) else module
        if key.endswith(".lora_B.bias") and f"{module}.bias" not in base.tensors:
            problems.append(
                f"{key}: {module} has no bias in the base, so PEFT cannot merge its lora_bias "
                "(retrain without lora_bias on it)"
            )
            continue
        if module in wrappers:
            if wrappers[module] is None:
                problems.append(
                    f"{key}: target_parameters {config.get('target_parameters')} name no "
                    f"parameter of the base's {strip_base_layer(module)} that its LoRA factors fit"
                )
            continue
        target = base.tensors.get(renamed.get(f"{module}.weight", f"{module}.weight"))
        if target is None and module.split(".")[-1] in {"lm_head", "embed_out"}:
            # A tied model stores only the input embeddings; the head shares them.
            target = next(
                (t for n, t in base.tensors.items() if n.endswith("embed_tokens.weight")), None
            )
        if target is None:
            problems.append(f"{key}: the base has no tensor {module}.weight")
            continue
        shape = list(ref.shape)
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
        raise IncompatibleAdapterError(
            f"{weights}: adapter does not fit base {base.folder} (was it trained on another "
            f"model?):{listing(problems)}"
        )


def _parameter_wrappers(
    base: CheckpointIndex, config: dict[str, Any], refs: dict[str, TensorRef]
) -> tuple[dict[str, FusedParameter | None], dict[str, str]]:
    """The adapter's parameter LoRAs (``target_parameters``, PEFT's ParamWrapper), by module:
    the fused run-time parameter of the base each one fits (transformers' conversion mapping
    for the base's ``model_type``), or None where none fits; and the run-time -> disk names
    of the tensors that mapping only renames. Modules whose ``weight`` the base holds (under
    its own or a renamed name) are plain LoRA modules and not listed."""
    if not config.get("target_parameters"):
        return {}, {}
    try:
        model_type = model_config.read_config(base.folder).get("model_type")
    except InputError:
        model_type = None  # no config to read: names as they are, as without a mapping
    renamed = renamed_tensors(model_type, list(base.tensors))
    shapes: dict[str, dict[str, list[int]]] = {}
    for key, ref in refs.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}.weight" in key or key.endswith(f".{part}"):
                module = key.split(".lora_", 1)[0].removeprefix(settings.PEFT_PREFIX)
                weight = f"{module}.weight"
                if weight not in base.tensors and weight not in renamed:
                    shapes.setdefault(module, {})[part] = list(ref.shape)
    if not shapes:
        return {}, renamed
    fused = fused_parameters(model_type, {n: t.shape for n, t in base.tensors.items()})
    wrappers = {
        module: wrapper_target(
            config, module, fused, found.get("lora_A", []), found.get("lora_B", [])
        )
        for module, found in shapes.items()
    }
    return wrappers, renamed
