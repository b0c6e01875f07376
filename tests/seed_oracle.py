"""The seed script's algorithm, written out in the tests as the oracle of the peft engine.

``merge_adapters.py`` loads the base with transformers (``device_map="cpu"``) in a given
dtype, then for each adapter runs ``PeftModel.from_pretrained`` + ``merge_and_unload``.
Two things the seed did not handle are made explicit here, as the seed's users do by hand:
a resized vocabulary (``resize_token_embeddings`` before loading an adapter whose
embeddings have more rows) and, for a tied model whose embeddings an adapter changes,
untying first (PEFT 0.21 would otherwise merge an lm_head delta into the shared matrix).
"""

from __future__ import annotations

from pathlib import Path

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
        emb = model.get_input_embeddings().weight
        model.get_output_embeddings().weight = torch.nn.Parameter(emb.detach().clone())
    for adapter in adapters:
        rows = _saved_embedding_rows(adapter)
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tied = bool(model.config.tie_word_embeddings)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, tied


def _saved_embedding_rows(adapter: Path) -> int | None:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        rows = [
            handle.get_slice(k).get_shape()[0]
            for k in handle.keys()  # noqa: SIM118 - safe_open has no __iter__
            if k.endswith("embed_tokens.weight")
            or k.endswith("embed_tokens.modules_to_save.weight")
        ]
    return max(rows) if rows else None


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``folder``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                assert key not in tensors, f"{key} is in two shards"
                tensors[key] = handle.get_tensor(key)
    return tensors
