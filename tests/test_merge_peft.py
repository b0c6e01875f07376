"""The peft engine reproduces the seed script (PEFT merge_and_unload) bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mergejob
from tests.support.oracle import seed_merge
from tests.support.tensors import load_folder

ADAPTERS: dict[str, dict[str, Any]] = {
    "attn": {"target_modules": ["q_proj", "v_proj"], "seed": 11},
    "all_linear": {"target_modules": "all-linear", "r": 8, "lora_alpha": 16, "seed": 12},
    "rslora": {"target_modules": ["q_proj", "k_proj", "o_proj"], "use_rslora": True, "seed": 13},
    "dora": {"target_modules": ["q_proj", "v_proj", "up_proj"], "use_dora": True, "seed": 14},
    "lm_head": {"target_modules": ["q_proj", "lm_head"], "seed": 15},
    "resized_vocab": {
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["embed_tokens", "lm_head"],
        "resize_vocab_to": 112,
        "with_tokenizer": True,
        "seed": 16,
    },
}
BASES: dict[str, dict[str, Any]] = {
    "bf16": {"dtype": torch.bfloat16},
    "fp16": {"dtype": torch.float16, "seed": 1},
    "bf16_tied": {"dtype": torch.bfloat16, "tie_word_embeddings": True, "seed": 2},
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

CASES = [
    ("bf16", ["attn"], "float16"),
    ("bf16", ["attn"], "auto"),
    ("fp16", ["all_linear"], "auto"),
    ("bf16", ["rslora"], "float16"),
    ("bf16", ["dora"], "auto"),
    ("fp16", ["dora"], "float16"),
    ("bf16_tied", ["lm_head"], "auto"),
    ("bf16_tied", ["attn", "lm_head"], "float16"),
    ("bf16", ["resized_vocab"], "auto"),
    ("bf16", ["attn", "all_linear", "rslora", "dora"], "float16"),
    ("fp16", ["all_linear", "resized_vocab", "attn"], "auto"),
]


def _merge(base: Path, adapters: list[Path], out: Path, dtype: str, **engine: Any) -> Path:
    spec = mergejob.MergeSpec.model_validate(
        {
            "base": str(base),
            "adapters": [str(a) for a in adapters],
            "output": {"dir": str(out), "dtype": dtype, "max_shard_size": "60KB"},
            "engine": {"name": "peft", **engine},
        }
    )
    return mergejob.merge(spec).output_dir


@pytest.mark.parametrize(("base_kind", "adapter_kinds", "dtype"), CASES)
def test_peft_engine_equals_seed_algorithm_bit_for_bit(
    models: Any, tmp_path: Path, base_kind: str, adapter_kinds: list[str], dtype: str
) -> None:
    base = models.base(**BASES[base_kind])
    adapters = [models.adapter(base, **ADAPTERS[k]) for k in adapter_kinds]
    out = _merge(base, adapters, tmp_path / "out", dtype)

    stored = BASES[base_kind]["dtype"]
    torch_dtype = stored if dtype == "auto" else DTYPES[dtype]
    tied_base = BASES[base_kind].get("tie_word_embeddings", False)
    touches_embeddings = any(k in {"lm_head", "resized_vocab"} for k in adapter_kinds)
    expected, expected_tied = seed_merge(
        base, adapters, torch_dtype, untie=tied_base and touches_embeddings
    )
    got = load_folder(out)
    config = json.loads((out / "config.json").read_text())

    assert config["tie_word_embeddings"] == expected_tied
    missing = set(expected) - set(got)
    if expected_tied:
        assert missing == {"lm_head.weight"}
    else:
        assert missing == set()
    assert set(got) <= set(expected)
    for name, tensor in got.items():
        assert tensor.dtype == torch_dtype, name
        assert torch.equal(tensor, expected[name]), f"{name} differs from the seed's merge"


def _peft_adapter(base: Path, folder: Path, config: Any) -> Path:
    """An adapter of any PEFT method, its weights random (not the identity init)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    get_peft_model(model, config).save_pretrained(str(folder))
    return folder


def test_methods_the_stream_engine_refuses_merge_here_as_peft_does(
    models: Any, tmp_path: Path
) -> None:
    """LoHa, LoKr and IA3: the stream engine sends them to --engine peft; that must work."""
    from peft import IA3Config, LoHaConfig, LoKrConfig

    base = models.base(dtype=torch.bfloat16, seed=5)
    configs = {
        "loha": LoHaConfig(target_modules=["q_proj", "v_proj"], r=4, init_weights=False),
        "lokr": LoKrConfig(target_modules=["o_proj"], r=4, init_weights=False),
        "ia3": IA3Config(
            target_modules=["q_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            init_ia3_weights=False,
        ),
    }
    before = load_folder(base)
    for name, config in configs.items():
        adapter = _peft_adapter(base, tmp_path / name, config)
        out = _merge(base, [adapter], tmp_path / f"out-{name}", "auto")
        expected, _ = seed_merge(base, [adapter], torch.bfloat16)
        got = load_folder(out)
        assert set(got) == set(expected), name
        changed = [k for k in got if not torch.equal(got[k], before[k])]
        assert changed, f"{name}: the merge changed nothing"
        for key, tensor in got.items():
            assert torch.equal(tensor, expected[key]), f"{name}: {key} differs from PEFT's merge"


def test_auto_dtype_keeps_bf16_where_seed_forced_fp16(models: Any, tmp_path: Path) -> None:
    base = models.base(**BASES["bf16"])
    adapter = models.adapter(base, **ADAPTERS["attn"])
    out = _merge(base, [adapter], tmp_path / "out", "auto")
    assert {t.dtype for t in load_folder(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_lm_head_adapter_unties_and_keeps_input_embeddings(
    models: Any, tmp_path: Path
) -> None:
    base = models.base(**BASES["bf16_tied"])
    adapter = models.adapter(base, **ADAPTERS["lm_head"])
    out = _merge(base, [adapter], tmp_path / "out", "auto")
    got = load_folder(out)
    base_tensors = load_folder(base)
    # The trained model read its input embeddings unchanged; only lm_head carries the delta.
    assert torch.equal(got["model.embed_tokens.weight"], base_tensors["model.embed_tokens.weight"])
    assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_disk_offload_gives_the_in_memory_result_and_leaves_the_base_untouched(
    models: Any, tmp_path: Path
) -> None:
    import hashlib

    base = models.base(**BASES["bf16"])
    adapters = [models.adapter(base, **ADAPTERS[k]) for k in ("attn", "all_linear", "rslora")]

    def sums() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in base.iterdir()}

    before = sums()
    in_memory = _merge(base, adapters, tmp_path / "mem", "auto")
    offload = tmp_path / "offload"
    offloaded = _merge(
        base, adapters, tmp_path / "disk", "auto", max_memory={"cpu": "40KB"},
        offload_folder=str(offload),
    )  # fmt: skip
    a, b = load_folder(in_memory), load_folder(offloaded)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert sums() == before, "PEFT's offload path must not rewrite the base's files"
    assert not any(offload.glob("mergejob-*")), "staging folders are cleaned up"


def test_dora_with_disk_offload_is_refused_before_loading(
    models: Any, tmp_path: Path, run_cli: Any
) -> None:
    base = models.base(**BASES["bf16"])
    adapter = models.adapter(base, **ADAPTERS["dora"])
    code, _, err = run_cli(
        "--base", base, "--peft_model_paths", adapter, "--output_dir", tmp_path / "out",
        "--engine", "peft", "--max-memory", "cpu=40KB", "--offload-folder", tmp_path / "off",
    )  # fmt: skip
    assert code == 2
    assert "DoRA" in err and "stream engine" in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*mergejob-partial"))


def test_output_loads_offline_and_generates(
    models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = models.base(**BASES["bf16"])
    adapters = [models.adapter(base, **ADAPTERS[k]) for k in ("attn", "resized_vocab")]
    out = _merge(base, adapters, tmp_path / "out", "auto")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not list(tmp_path.glob(".*mergejob-partial"))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == 112 == len(tokenizer)
    assert (out / "tokenizer.json").read_bytes() == (adapters[1] / "tokenizer.json").read_bytes()
    inputs = tokenizer("hello world", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 1
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["temperature"] == 0.6


def test_seed_flags_on_the_command_line(models: Any, tmp_path: Path, run_cli: Any) -> None:
    base = models.base(**BASES["bf16"])
    adapter = models.adapter(base, **ADAPTERS["attn"])
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        "--base_model_name_or_path", base, "--peft_model_paths", adapter,
        "--output_dir", out, "--device", "cpu", "--engine", "peft", "--dtype", "float16",
    )  # fmt: skip
    assert code == 0
    assert str(out) in stdout
    expected, _ = seed_merge(base, [adapter], torch.float16)
    for name, tensor in load_folder(out).items():
        assert torch.equal(tensor, expected[name]), name
