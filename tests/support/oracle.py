"""The reference merges the engines are tested against, both PEFT itself.

``seed_merge`` is the seed script's algorithm, the oracle of the peft engine:
``merge_adapters.py`` loads the base with transformers (``device_map="cpu"``) in a given
dtype, then for each adapter runs ``PeftModel.from_pretrained`` + ``merge_and_unload``.
Two things the seed did not handle are made explicit here, as the seed's users do by hand:
a resized vocabulary (``resize_token_embeddings`` before loading an adapter whose
embeddings have more rows) and, for a tied model whose embeddings an adapter changes,
untying first (PEFT 0.21 would otherwise merge an lm_head delta into the shared matrix).

``peft_merge`` is PEFT's merge as the peft engine runs it (untying and resizing with the
engine's own helpers), in a chosen load dtype: the oracle of the stream engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open


def seed_merge(
    base: Path, adapters: list[Path], dtype: torch.dtype, *, untie: bool = False
) -> tuple[dict[str, torch.Tensor], bool]:
    """State dict of the seed's merge and whether its embeddings stay tied."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, device_map="cpu")
    if untie:
        model.config.tie_word_embeddings = False
        emb = cast(torch.Tensor, model.get_input_embeddings().weight)
        model.get_output_embeddings().weight = torch.nn.Parameter(emb.detach().clone())
    for adapter in adapters:
        rows = _saved_embedding_rows(adapter, "embed_tokens")
        if rows is not None and rows != _input_rows(model):
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tied = bool(model.config.tie_word_embeddings)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, tied


def _saved_embedding_rows(adapter: Path, embed: str) -> int | None:
    """Rows of the ``embed`` module an adapter saves in full (a resized vocabulary), if any.

    Read here with safetensors itself, not with mergejob's readers: an oracle of its own.
    """
    path = adapter / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        rows = [
            handle.get_slice(k).get_shape()[0]
            for k in handle.keys()  # noqa: SIM118 - safe_open has no __iter__
            if k.endswith((f"{embed}.weight", f"{embed}.modules_to_save.weight"))
            and "lora_" not in k
        ]
    return max(rows) if rows else None


def peft_merge(
    base: Path, adapters: list[Path], load_dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], Any]:
    """PEFT's merge of ``adapters`` in order, the base loaded in ``load_dtype``.

    As the peft engine does: untie first when an adapter changes the embeddings, and resize
    the vocabulary before an adapter that saves larger embeddings.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergejob.engines.peft import _module_name, touches_embeddings, untie_embeddings

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=load_dtype)
    if any(touches_embeddings(model, a) for a in adapters):
        untie_embeddings(model)
    embed = _module_name(model, model.get_input_embeddings())
    for adapter in adapters:
        rows = _saved_embedding_rows(adapter, embed)
        if rows is not None and rows != _input_rows(model):
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, model.config


def _input_rows(model: Any) -> int:
    """Rows of the model's input embeddings (its vocabulary size as loaded)."""
    return int(cast(torch.Tensor, model.get_input_embeddings().weight).shape[0])


def peft_merge_saved(
    base: Path, adapters: list[Path], load_dtype: torch.dtype, out: Path
) -> dict[str, torch.Tensor]:
    """PEFT's merge (as :func:`peft_merge`) written with ``save_pretrained`` to ``out`` and
    read back: the tensors under their names on disk, which for a MoE base are one tensor per
    expert (transformers reverts its run-time fusion of the experts when it saves)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergejob.engines.peft import _module_name, touches_embeddings, untie_embeddings

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=load_dtype)
    if any(touches_embeddings(model, a) for a in adapters):
        untie_embeddings(model)
    embed = _module_name(model, model.get_input_embeddings())
    for adapter in adapters:
        rows = _saved_embedding_rows(adapter, embed)
        if rows is not None and rows != _input_rows(model):
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(str(out))
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(out).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = handle.get_tensor(key)
    return tensors
