"""The seed's algorithm, kept exact: transformers + accelerate + PEFT ``merge_and_unload``.

The base is loaded with ``AutoModelForCausalLM.from_pretrained`` in the output dtype with a
big-model ``device_map`` (one device, ``auto`` over every GPU, ``max_memory`` limits, disk
offload), then every adapter in order is loaded with ``PeftModel.from_pretrained`` and
merged with ``merge_and_unload``, and the model is saved with ``save_pretrained``.
This engine is also the fallback for PEFT methods the stream engine cannot express.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, cast

import torch

from mergejob import model_config, settings
from mergejob.adapter_config import adapter_weights_path, read_adapter_config
from mergejob.errors import AdapterError, DtypeRangeError, MergeFailedError, SpecError
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.headers import FLOAT_DTYPES, TensorRef, read_tensors
from mergejob.io.reader import FileReader
from mergejob.io.values import holds, narrower, range_message, value_range
from mergejob.job import EngineReport, PreparedJob
from mergejob.sources import ResolvedSource
from mergejob.spec import EngineSpec, parse_max_memory

log = logging.getLogger(__name__)

NOTHING_WRITTEN = "; nothing was written"


def device_map_for(engine: EngineSpec) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the spec's device / memory options."""
    kwargs: dict[str, Any] = {}
    uses_auto = engine.device == "auto" or engine.max_memory or engine.offload_folder
    if uses_auto:
        kwargs["device_map"] = "auto"
        if engine.max_memory:
            max_memory = parse_max_memory(engine.max_memory)
            if engine.device == "cpu":
                # cpu + max_memory: accelerate may only use the CPU and the offload folder.
                max_memory = {k: v for k, v in max_memory.items() if not isinstance(k, int)}
            kwargs["max_memory"] = max_memory
        elif engine.device == "cpu":
            kwargs["device_map"] = {"": "cpu"}
        if engine.offload_folder:
            kwargs["offload_folder"] = engine.offload_folder
            kwargs["offload_state_dict"] = True
    elif engine.device == "cuda":
        kwargs["device_map"] = {"": "cuda:0"}
    else:
        kwargs["device_map"] = {"": engine.device}
    return kwargs


def merge_with_peft(job: PreparedJob, out_dir: Path) -> EngineReport:
    """Run the seed's merge and ``save_pretrained`` into ``out_dir``.

    With disk offload and several adapters, each adapter is merged in its own pass and the
    intermediate model saved in the output dtype under the offload folder: PEFT 0.21 cannot
    load a second adapter onto a disk-offloaded model it has merged (its offload index is
    renamed in place), and the intermediate save holds exactly the weights an in-memory
    sequential merge holds between adapters (both are rounded to the output dtype), so the
    result is bit-identical.
    """
    spec = job.spec
    for adapter in spec.adapters:
        if adapter.weight != 1.0:
            raise SpecError(
                f"adapters[{adapter.display()}].weight: the peft engine merges every adapter at "
                "weight 1.0; use the stream engine (--engine stream) for weighted merges"
            )
    load_kwargs = device_map_for(spec.engine)
    offload = spec.engine.offload_folder
    if offload or load_kwargs.get("device_map") == "auto":
        for resolved in job.adapters:
            if read_adapter_config(resolved.local_dir).get("use_dora"):
                raise SpecError(
                    f"adapter {resolved.display}: PEFT 0.21 cannot merge a DoRA adapter into "
                    "an offloaded model (accelerate has no offload entry for its magnitude "
                    "vector); use the stream engine, which needs about one shard of memory"
                )
    for resolved in job.adapters:
        check_adapter_finite(resolved.local_dir)
    try:
        _merge_all(job, out_dir, load_kwargs)
    finally:
        if offload:
            for staged in Path(offload).glob("mergejob-*"):
                shutil.rmtree(staged, ignore_errors=True)
    check_saved_values(out_dir, job.output_dtype, job.base.local_dir)
    return EngineReport(engine="peft")


def check_saved_values(out_dir: Path, dtype: str, base_dir: Path) -> None:
    """Refuse a saved output with a tensor that is not finite where the base's is.

    transformers loads the whole base in the output dtype and PEFT merges in it, so
    ``--dtype float16`` turns a bf16 weight beyond 65504 into inf silently, in a tensor
    an adapter changed or not. Every saved tensor is scanned (streamed, once: cheap next to
    the merge); a NaN or inf the base itself holds there is kept, as the stream engine keeps
    it. Raises :class:`DtypeRangeError` (the output dtype is too narrow) or
    :class:`MergeFailedError` (the merge itself made NaN or inf in float32).
    """
    started = time.monotonic()
    saved = CheckpointIndex.from_folder(out_dir).tensors
    base: dict[str, TensorRef] | None = None
    reader = FileReader()
    try:
        for ref in saved.values():
            if ref.dtype not in FLOAT_DTYPES or not value_range(reader, ref).nonfinite:
                continue
            if base is None:
                base = CheckpointIndex.from_folder(base_dir).tensors
            own = value_range(reader, base[ref.name]) if ref.name in base else None
            if own is not None and own.nonfinite:
                continue  # the base's own NaN/inf, written as the base has it
            if not narrower(dtype, "float32"):
                raise MergeFailedError(
                    f"{ref.name}: the merged tensor holds NaN or inf: an adapter's factors hold "
                    f"NaN/inf or make the weights explode{NOTHING_WRITTEN}"
                )
            # The base's largest value says how far, when the base alone is beyond the dtype.
            beyond = own is not None and not holds(dtype, own.magnitude)
            raise DtypeRangeError(
                range_message(
                    ref.name,
                    dtype,
                    own.magnitude if own is not None and beyond else None,
                    what="the merged model's tensor",
                )
                + NOTHING_WRITTEN
            )
    finally:
        reader.close()
    log.info(
        "checked that %d saved tensors are finite in %s (%.1fs)",
        len(saved),
        dtype,
        time.monotonic() - started,
    )


def check_adapter_finite(adapter_dir: Path) -> None:
    """Refuse an adapter whose tensors hold NaN or inf before anything is merged (PEFT would
    merge them into the weights), naming the file and the tensor: bad input, exit 2."""
    from safetensors import safe_open

    path = adapter_weights_path(adapter_dir)
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = handle.get_tensor(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterError(
                    f"{path}: tensor {name} holds NaN or inf; the adapter is broken (a "
                    "diverged training run?): retrain or re-save it; nothing was written"
                )


def _merge_all(job: PreparedJob, out_dir: Path, load_kwargs: dict[str, Any]) -> None:
    spec = job.spec
    offload = spec.engine.offload_folder
    if offload and len(job.adapters) > 1:
        source = job.base.local_dir
        for i, adapter in enumerate(job.adapters):
            last = i == len(job.adapters) - 1
            target = out_dir if last else Path(offload) / f"mergejob-step-{i + 1}"
            model = _load_and_merge(job, source, [adapter], load_kwargs)
            _save(model, target, spec.output.max_shard_size)
            del model
            if i > 0:
                shutil.rmtree(source, ignore_errors=True)
            source = target
    else:
        model = _load_and_merge(job, job.base.local_dir, job.adapters, load_kwargs)
        _save(model, out_dir, spec.output.max_shard_size)


def _save(model: Any, out_dir: Path, max_shard_size: str) -> None:
    log.info("saving to %s", out_dir)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)


def _load_and_merge(
    job: PreparedJob, source: Path, adapters: list[ResolvedSource], load_kwargs: dict[str, Any]
) -> Any:
    """Load ``source`` with the big-model device_map and merge ``adapters`` in order."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if job.spec.engine.offload_folder:
        source = stage_for_offload(source, Path(job.spec.engine.offload_folder))
    log.info("loading %s as %s (%s)", source, job.output_dtype, load_kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        str(source),
        dtype=getattr(torch, job.output_dtype),
        trust_remote_code=job.spec.base.trust_remote_code,
        **load_kwargs,
    )
    if any(touches_embeddings(model, a.local_dir) for a in adapters):
        untie_embeddings(model)
    hidden = int(cast(torch.Tensor, model.get_input_embeddings().weight).shape[1])
    for resolved in adapters:
        rows = model_config.saved_vocab_rows(resolved.local_dir, hidden)
        vocab = int(cast(torch.Tensor, model.get_input_embeddings().weight).shape[0])
        if rows is not None and rows != vocab:
            log.info("resizing the vocabulary %d -> %d for %s", vocab, rows, resolved.display)
            model.resize_token_embeddings(rows, mean_resizing=False)
        log.info("merging adapter %s", resolved.display)
        peft_model = PeftModel.from_pretrained(
            model, str(resolved.local_dir), **_peft_offload_kwargs(load_kwargs)
        )
        model = peft_model.merge_and_unload()
    return model


def stage_for_offload(source: Path, offload_folder: Path) -> Path:
    """A folder of links to ``source``'s files, for PEFT's disk-offload path to read.

    When PEFT 0.21 loads an adapter onto a disk-offloaded model it rewrites the base's
    safetensors files with renamed keys: into ``NAME-peft`` if a path component holds ``--``
    (the Hub cache layout), otherwise *over the original files*, which corrupts a local base.
    Loading through ``<offload>/mergejob--NAME`` sends those rewrites into the offload folder.
    """
    offload_folder = Path(offload_folder).absolute()
    if any("--" in part for part in offload_folder.parts):
        raise SpecError(
            f"--offload-folder {offload_folder}: must not contain '--' in its path (PEFT writes "
            "rewritten copies of the base next to the first such path component)"
        )
    staged = offload_folder / f"mergejob--{Path(source).name}"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    for item in Path(source).iterdir():
        if item.is_file():
            (staged / item.name).symlink_to(item.resolve())
    return staged


def _peft_offload_kwargs(load_kwargs: dict[str, Any]) -> dict[str, Any]:
    """PEFT re-dispatches an offloaded model when it loads an adapter: same limits again."""
    if load_kwargs.get("device_map") != "auto":
        return {}
    keys = ("device_map", "max_memory", "offload_folder")
    return {k: load_kwargs[k] for k in keys if k in load_kwargs}


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return "embed_tokens"


def touches_embeddings(model: Any, adapter_dir: Path) -> bool:
    """Whether an adapter changes the input or output embeddings (LoRA or full copy)."""
    path = Path(adapter_dir) / settings.ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        return False
    names = {_module_name(model, model.get_input_embeddings())}
    out = model.get_output_embeddings()
    if out is not None:
        names.add(_module_name(model, out))
    for key in read_tensors(path):
        if ".token_adapter." in key:
            # trainable_token_indices: PEFT ties lm_head's token adapter to embed_tokens' on
            # a tied model (both change); untying first would leave lm_head unchanged.
            continue
        module = key.removeprefix(settings.PEFT_PREFIX)
        if any(module == n or module.startswith(f"{n}.") for n in names):
            return True
    return False


def untie_embeddings(model: Any) -> None:
    """Give the output embeddings their own copy before a merge changes one of the two.

    PEFT merges a LoRA on ``lm_head`` of a tied model into the one shared matrix, which
    also changes the input embeddings: the model then differs from the one that was trained
    (input embeddings unchanged, output embeddings with the delta). mergejob unties first,
    writes both matrices and sets ``tie_word_embeddings`` to false.
    """
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if not getattr(text_config, "tie_word_embeddings", False) or out is None:
        return
    log.info("an adapter changes tied embeddings: untying them (both matrices are written)")
    text_config.tie_word_embeddings = False
    config.tie_word_embeddings = False
    out.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
