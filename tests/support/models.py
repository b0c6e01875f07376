"""Tiny models and adapters made locally, for the tests, the demo, the benchmarks and the image
test's fixture.

Nothing is downloaded: a base is a randomly initialised transformers model of a real
architecture (Llama, Qwen2, GPT-2) saved as sharded safetensors, with a small tokenizer
built by the ``tokenizers`` library; an adapter is made with ``peft.get_peft_model`` and its
``lora_B`` set to small non-zero values (PEFT initialises it to zero, which would make every
merge an identity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

WORDS = [
    "the",
    "a",
    "an",
    "model",
    "merge",
    "adapter",
    "weight",
    "base",
    "layer",
    "token",
    "hub",
    "job",
    "pod",
    "cluster",
    "shard",
    "tensor",
    "rank",
    "alpha",
    "scale",
    "vocab",
    "config",
    "rope",
    "theta",
    "context",
    "long",
    "short",
    "fast",
    "slow",
    "bit",
    "exact",
    "hello",
    "world",
    "data",
    "train",
    "tune",
    "fine",
    "lora",
    "dora",
    "embed",
    "head",
    "attention",
    "mlp",
    "gate",
    "up",
    "down",
]


def make_tokenizer(dest: Path, vocab_size: int) -> Any:
    """A word-level fast tokenizer with exactly ``vocab_size`` entries, saved to ``dest``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = list(WORDS) + [f"w{i}" for i in range(max(0, vocab_size))]
    vocab_list = (specials + words)[:vocab_size]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    Path(dest).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(dest))
    return fast


def build_config(
    family: str = "llama",
    *,
    vocab_size: int = 96,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
) -> Any:
    """A transformers config of ``family`` (llama, qwen2, gpt2, or a MoE family of
    :data:`MOE_FAMILIES`) with tiny shapes."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=256,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=256,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    if family in MOE_FAMILIES:
        return moe_config(
            family,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            tie_word_embeddings=tie_word_embeddings,
        )
    raise ValueError(f"unknown family {family!r}")


# Mixture-of-experts families whose checkpoints keep one tensor per expert on disk while
# transformers fuses them at run time (its conversion mapping), with the config class.
MOE_FAMILIES = {
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "olmoe": "OlmoeConfig",
}
# The fused expert parameters a LoRA on experts targets (target_parameters), the same names
# in every family above (transformers' modeling code: ``mlp.experts.gate_up_proj`` holds
# gate and up of every expert, ``mlp.experts.down_proj`` the down projections).
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_config(
    family: str,
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    tie_word_embeddings: bool,
    num_experts: int = 4,
) -> Any:
    """A tiny config of a MoE ``family`` (see :data:`MOE_FAMILIES`): ``num_experts`` experts
    of ``intermediate_size // 4`` each, two per token; Qwen2-MoE with its shared expert."""
    import transformers

    config_class = getattr(transformers, MOE_FAMILIES[family])
    expert_size = max(8, intermediate_size // 4)
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "num_experts_per_tok": 2,
    }
    if family == "mixtral":
        return config_class(**common, intermediate_size=expert_size, num_local_experts=num_experts)
    extra: dict[str, Any] = {"num_experts": num_experts, "moe_intermediate_size": expert_size}
    if family == "olmoe":
        extra = {"num_experts": num_experts, "intermediate_size": expert_size}
    elif family == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = intermediate_size // 2
        extra["intermediate_size"] = intermediate_size
    else:
        extra["intermediate_size"] = intermediate_size
    return config_class(**common, **extra)


def make_base(
    dest: Path,
    *,
    family: str = "llama",
    dtype: torch.dtype = torch.bfloat16,
    tie_word_embeddings: bool = False,
    max_shard_size: str = "100KB",
    seed: int = 0,
    with_tokenizer: bool = True,
    **shape: Any,
) -> Path:
    """Save a randomly initialised tiny model of ``family`` in ``dtype`` to ``dest``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    config = build_config(family, tie_word_embeddings=tie_word_embeddings, **shape)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            # Weights of a trained model's size: non-trivial, some large enough to need bf16 range.
            param.copy_(torch.randn_like(param) * 0.05)
    model = model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=True, temperature=0.6, top_p=0.9
    )
    dest = Path(dest)
    model.save_pretrained(str(dest), max_shard_size=max_shard_size)
    if with_tokenizer:
        make_tokenizer(dest, config.vocab_size)
    return dest


DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn"],
}


def make_adapter(
    base_dir: Path,
    dest: Path,
    *,
    target_modules: Sequence[str] | str | None = None,
    r: int = 4,
    lora_alpha: int = 8,
    use_rslora: bool = False,
    use_dora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    layers_to_transform: list[int] | None = None,
    modules_to_save: list[str] | None = None,
    resize_vocab_to: int | None = None,
    with_tokenizer: bool = False,
    seed: int = 1,
    b_scale: float = 0.02,
    adapter_dtype: torch.dtype = torch.float32,
    target_parameters: Sequence[str] | None = None,
    lora_bias: bool = False,
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
) -> Path:
    """Make a LoRA adapter for the model in ``base_dir`` and save it to ``dest``.

    ``target_parameters`` puts LoRA on parameters (PEFT's ParamWrapper: the fused experts of
    a MoE model, :data:`EXPERT_PARAMETERS`); ``lora_bias`` trains a bias on every lora_B;
    ``trainable_token_indices`` trains those rows of the embeddings. Each is set non-zero.

    ``resize_vocab_to`` grows the vocabulary (new rows random) and saves the embeddings as
    modules_to_save, with a tokenizer of that size, as fine-tunes that add tokens do.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=adapter_dtype)
    family = model.config.model_type
    if resize_vocab_to is not None:
        model.resize_token_embeddings(resize_vocab_to, mean_resizing=False)
        with torch.no_grad():
            emb = cast(torch.Tensor, model.get_input_embeddings().weight)
            emb.copy_(torch.randn(emb.shape, generator=generator) * 0.05)
            out = model.get_output_embeddings()
            if out is not None and out.weight is not emb:
                out.weight.copy_(torch.randn(out.weight.shape, generator=generator) * 0.05)
    if target_modules is None:
        target_modules = DEFAULT_TARGETS.get(family, ["q_proj", "v_proj"])
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        use_rslora=use_rslora,
        use_dora=use_dora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        layers_to_transform=layers_to_transform,
        modules_to_save=modules_to_save,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=family == "gpt2",
        target_parameters=list(target_parameters) if target_parameters else None,
        lora_bias=lora_bias,
        trainable_token_indices=trainable_token_indices,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
            elif "lora_A" in name or "lora_embedding_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.05 * torch.randn(param.shape, generator=generator))
            elif "trainable_tokens_delta" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    dest = Path(dest)
    peft_model.save_pretrained(str(dest))
    if with_tokenizer:
        vocab = resize_vocab_to or model.config.vocab_size
        make_tokenizer(dest, vocab)
    return dest


def make_finetune(
    base_dir: Path,
    dest: Path,
    *,
    modules: Sequence[str] = ("q_proj", "v_proj", "o_proj", "down_proj"),
    rank: int = 4,
    ranks: Mapping[str, int] | None = None,
    scale: float = 0.02,
    norms: bool = False,
    biases: bool = False,
    resize_vocab_to: int | None = None,
    rows_only: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "100KB",
    seed: int = 2,
) -> Path:
    """A "fine-tune" of the model in ``base_dir`` whose difference from it is known: every
    2-D weight of a module whose name ends with one of ``modules`` gets ``U @ V.T`` of rank
    ``rank`` added (``ranks`` gives other ranks by module suffix; entries about ``scale``;
    for ``embed_tokens``/``lm_head`` too), then the
    model is rounded to its dtype (``dtype``, default the base's) and saved with
    ``save_pretrained``. Rounding makes ΔW full rank (noise of half an ulp everywhere) unless
    ``rows_only``: the update then touches ``rank`` rows of each weight only, so the stored
    ΔW has rank ``rank`` exactly, whatever the dtype (a fine-tune that moved a few tokens'
    embeddings is such a case). ``norms`` scales every norm weight, ``biases`` shifts every bias;
    ``resize_vocab_to`` grows the vocabulary (new rows random) and saves a tokenizer of that
    size, as fine-tunes that add tokens do.
    """
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    stored = dtype or next(
        p.dtype
        for p in AutoModelForCausalLM.from_pretrained(str(base_dir)).parameters()
        if p.is_floating_point()
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            module, _, kind = name.rpartition(".")
            if kind == "weight" and param.dim() == 2 and module.endswith(tuple(modules)):
                rows, cols = param.shape
                k = next((r for s, r in (ranks or {}).items() if module.endswith(s)), rank)
                u = torch.randn(rows, k, generator=generator)
                if rows_only:
                    keep = torch.randperm(rows, generator=generator)[:k]
                    u = torch.zeros_like(u).index_copy_(0, keep, u[keep])
                v = torch.randn(cols, k, generator=generator)
                param.add_(u @ v.T * (scale / k**0.5))
            elif norms and kind == "weight" and param.dim() == 1:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif biases and kind == "bias":
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
        if resize_vocab_to is not None:
            model.resize_token_embeddings(resize_vocab_to, mean_resizing=False)
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None:
                    weight = cast(torch.Tensor, emb.weight)
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    model = cast(Any, model).to(stored)
    dest = Path(dest)
    model.save_pretrained(str(dest), max_shard_size=max_shard_size)
    make_tokenizer(dest, resize_vocab_to or model.config.vocab_size)
    return dest


class ModelFactory:
    """Builds tiny bases and adapters once per test session, keyed by their arguments."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, Path] = {}

    def _key(self, kind: str, args: dict[str, Any]) -> str:
        parts = [kind] + [f"{k}={args[k]}" for k in sorted(args)]
        return "_".join(parts).replace("/", "-").replace(" ", "").replace("'", "")[:200]

    def base(self, **kwargs: Any) -> Path:
        """A base made by ``make_base(**kwargs)``, made on the first call with these arguments."""
        key = self._key("base", kwargs)
        if key not in self._made:
            self._made[key] = make_base(self.root / key, **kwargs)
        return self._made[key]

    def finetune(self, base: Path, **kwargs: Any) -> Path:
        """A fine-tune of ``base`` made by ``make_finetune(base, ..., **kwargs)``, made once."""
        key = self._key(f"finetune-{base.name}", kwargs)
        if key not in self._made:
            self._made[key] = make_finetune(base, self.root / key, **kwargs)
        return self._made[key]

    def adapter(self, base: Path, **kwargs: Any) -> Path:
        """An adapter of ``base`` made by ``make_adapter(base, ..., **kwargs)``, made once."""
        key = self._key(f"adapter-{base.name}", kwargs)
        if key not in self._made:
            self._made[key] = make_adapter(base, self.root / key, **kwargs)
        return self._made[key]
