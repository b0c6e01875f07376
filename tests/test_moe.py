"""Mixture-of-experts bases (issue 17): LoRA on the fused expert parameters
(``target_parameters``), merged by both engines and checked against PEFT itself.

transformers 5 fuses a MoE layer's experts at run time into 3-D parameters
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) while the checkpoint keeps one
tensor per expert (``block_sparse_moe.experts.N.w1/w2/w3.weight`` for Mixtral,
``mlp.experts.N.gate_proj/up_proj/down_proj.weight`` for the Qwen and OLMoE families). PEFT
0.21 puts a LoRA on such a parameter with ``target_parameters``; ``merge_and_unload`` merges
it and ``save_pretrained`` writes the experts back one tensor each. That saved folder is the
oracle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mergejob
from tests.support.models import EXPERT_PARAMETERS
from tests.support.oracle import peft_merge_saved
from tests.support.tensors import bitwise_equal, load_folder, steps_apart

FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]
# Qwen2-MoE's shared expert is a plain MLP of Linear layers: targeted as modules.
EXPERT_MODULES = {"qwen2_moe": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}


def _base(models: Any, family: str) -> Path:
    return models.base(family=family, dtype=torch.bfloat16, max_shard_size="60KB", seed=7)


def _experts_adapter(models: Any, base: Path, family: str) -> Path:
    """Attention (and shared-expert) modules plus the fused expert parameters."""
    return models.adapter(
        base,
        target_modules=EXPERT_MODULES.get(family, ["q_proj", "v_proj"]),
        target_parameters=EXPERT_PARAMETERS,
        seed=21,
    )


def _plain_adapter(models: Any, base: Path) -> Path:
    return models.adapter(base, target_modules=["k_proj", "o_proj"], r=8, seed=22)


def _merge(base: Path, adapters: list[Path], out: Path, engine: str) -> Path:
    spec = mergejob.MergeSpec.model_validate(
        {
            "base": str(base),
            "adapters": [str(a) for a in adapters],
            "output": {"dir": str(out), "max_shard_size": "60KB"},
            "engine": {"name": engine},
        }
    )
    return mergejob.merge(spec).output_dir


def _expert_tensors(tensors: dict[str, Any]) -> list[str]:
    return [n for n in tensors if ".experts." in n and "shared" not in n]


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_engine_merges_expert_lora_bit_identical_to_peft(
    family: str, models: Any, tmp_path: Path
) -> None:
    base = _base(models, family)
    adapters = [_experts_adapter(models, base, family), _plain_adapter(models, base)]
    out = _merge(base, adapters, tmp_path / "out", "peft")
    expected = peft_merge_saved(base, adapters, torch.bfloat16, tmp_path / "oracle")
    got = load_folder(out)
    before = load_folder(base)
    assert set(got) == set(expected) == set(before)
    experts = _expert_tensors(before)
    assert experts and all(not bitwise_equal(got[n], before[n]) for n in experts)
    for name, tensor in got.items():
        assert bitwise_equal(tensor, expected[name]), f"{name} differs from PEFT's merge"


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_engine_merges_expert_lora_within_one_step_of_peft_fp32(
    family: str, models: Any, tmp_path: Path
) -> None:
    """The stream engine computes each expert's delta as PEFT's ParamWrapper does
    (``einsum("o r e, e r i -> e o i", B, A) * scale``) in fp32, one disk tensor at a time,
    and rounds once. PEFT in fp32 sums the same products over the rank in its own order
    (einsum against mm: a few fp32 ulps apart), so after rounding both to bf16 a value whose
    fp32 results straddle a rounding boundary may land one bf16 step apart: within one step,
    never more. Tensors no adapter touches are the base's bytes."""
    from transformers import AutoModelForCausalLM

    base = _base(models, family)
    adapters = [_experts_adapter(models, base, family), _plain_adapter(models, base)]
    out = _merge(base, adapters, tmp_path / "out", "stream")
    oracle = peft_merge_saved(base, adapters, torch.float32, tmp_path / "oracle")
    got = load_folder(out)
    before = load_folder(base)
    assert set(got) == set(before) == set(oracle)
    experts = _expert_tensors(before)
    assert experts and all(not bitwise_equal(got[n], before[n]) for n in experts)
    for name, tensor in got.items():
        expected = oracle[name].to(tensor.dtype)
        steps = int(steps_apart(tensor, expected).max())
        assert steps <= 1, f"{name}: {steps} steps from PEFT's fp32 merge rounded once"
        if bitwise_equal(oracle[name].to(before[name].dtype), before[name]):
            assert bitwise_equal(tensor, before[name]), f"{name}: untouched but not byte-equal"
    model = AutoModelForCausalLM.from_pretrained(str(out))
    loaded = dict(model.state_dict())
    assert any(".experts." in n for n in loaded)


def test_expert_lora_that_fits_no_expert_parameter_is_refused_by_both_engines(
    models: Any, tmp_path: Path
) -> None:
    """An expert adapter of a base with other expert sizes: both engines name the factors."""
    from mergejob.errors import IncompatibleAdapterError

    adapter = _experts_adapter(models, _base(models, "mixtral"), "mixtral")
    other = models.base(family="mixtral", dtype=torch.bfloat16, intermediate_size=256, seed=8)
    for engine in ("peft", "stream"):
        with pytest.raises(IncompatibleAdapterError) as error:
            _merge(other, [adapter], tmp_path / f"out-{engine}", engine)
        assert "target_parameters" in str(error.value), engine
        assert "mlp.experts" in str(error.value), engine
        assert not (tmp_path / f"out-{engine}").exists()


LORA_BIAS = (
    {"family": "qwen2", "dtype": torch.bfloat16, "seed": 9},
    {"target_modules": ["q_proj", "v_proj"], "lora_bias": True, "seed": 23},
)
TRAINABLE_TOKENS = (
    {"family": "llama", "dtype": torch.bfloat16, "seed": 10},
    {"target_modules": ["q_proj"], "trainable_token_indices": [5, 7, 11], "seed": 24},
)
VARIANTS = {"lora_bias": LORA_BIAS, "trainable_token_indices": TRAINABLE_TOKENS}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_variants_merge_with_engine_peft_bit_identical_to_peft(
    variant: str, models: Any, tmp_path: Path
) -> None:
    """lora_bias (on a biased base) and trainable_token_indices: PEFT merges them, and so
    does the peft engine, bit for bit (the trainable token rows were once taken for a
    resized vocabulary of 3 rows)."""
    from tests.support.oracle import seed_merge

    base_args, adapter_args = VARIANTS[variant]
    base = models.base(**base_args)
    adapter = models.adapter(base, **adapter_args)
    out = _merge(base, [adapter], tmp_path / "out", "peft")
    expected, _ = seed_merge(base, [adapter], torch.bfloat16)
    got = load_folder(out)
    before = load_folder(base)
    assert set(got) == set(expected)
    assert any(not bitwise_equal(got[n], before[n]) for n in got)
    for name, tensor in got.items():
        assert bitwise_equal(tensor, expected[name]), f"{name} differs from PEFT's merge"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_variants_merge_with_the_stream_engine_as_peft_in_fp32(
    variant: str, models: Any, tmp_path: Path
) -> None:
    """The stream engine computes PEFT's expressions in fp32 (for lora_bias
    ``bias + lora_B.bias * scale``; for trainable tokens the trained rows copied over the
    embedding's) and rounds once: bit for bit PEFT's fp32 merge rounded once, with a second
    plain adapter too; untouched tensors byte-equal."""
    from tests.support.oracle import peft_merge

    base_args, adapter_args = VARIANTS[variant]
    base = models.base(**base_args)
    adapters = [models.adapter(base, **adapter_args), _plain_adapter(models, base)]
    out = _merge(base, adapters, tmp_path / "out", "stream")
    oracle, _ = peft_merge(base, adapters, torch.float32)
    got = load_folder(out)
    before = load_folder(base)
    changed = [n for n in got if not bitwise_equal(got[n], before[n])]
    touched = ".bias" if variant == "lora_bias" else "embed_tokens.weight"
    assert any(n.endswith(touched) for n in changed), changed
    for name, tensor in got.items():
        expected = oracle[name].to(tensor.dtype)
        assert bitwise_equal(tensor, expected), (
            f"{name}: {int(steps_apart(tensor, expected).max())} steps from PEFT fp32"
        )
        if bitwise_equal(expected, before[name]):
            assert bitwise_equal(tensor, before[name]), name


def test_lora_bias_on_a_layer_without_bias_is_refused_as_peft_refuses_it(
    models: Any, tmp_path: Path
) -> None:
    from mergejob.errors import IncompatibleAdapterError

    base = models.base(**LORA_BIAS[0])
    adapter = models.adapter(base, target_modules=["q_proj", "o_proj"], lora_bias=True, seed=25)
    for engine in ("stream", "peft"):
        with pytest.raises(IncompatibleAdapterError) as error:
            _merge(base, [adapter], tmp_path / engine, engine)
        assert "o_proj has no bias" in str(error.value), engine
        assert not (tmp_path / engine).exists()


def test_trainable_tokens_on_tied_embeddings_change_both_as_peft_does(
    models: Any, tmp_path: Path
) -> None:
    """PEFT ties lm_head's token adapter to embed_tokens' on a tied base: the merge changes
    the one shared matrix and the model stays tied. The peft engine gives exactly that (it
    once untied first and kept lm_head unchanged); the stream engine, whose untying cannot
    express it, refuses naming --engine peft."""
    from mergejob.errors import UnsupportedAdapterError
    from tests.support.oracle import seed_merge

    base = models.base(dtype=torch.bfloat16, tie_word_embeddings=True, seed=12)
    adapter = models.adapter(
        base, target_modules=["q_proj"], trainable_token_indices=[5, 7], seed=26
    )
    with pytest.raises(UnsupportedAdapterError) as error:
        _merge(base, [adapter], tmp_path / "stream", "stream")
    assert "--engine peft" in str(error.value)
    out = _merge(base, [adapter], tmp_path / "out", "peft")
    expected, tied = seed_merge(base, [adapter], torch.bfloat16)
    got = load_folder(out)
    config = json.loads((out / "config.json").read_text())
    assert tied and config["tie_word_embeddings"] is True
    for name, tensor in got.items():
        assert bitwise_equal(tensor, expected[name]), f"{name} differs from PEFT's merge"
    assert not bitwise_equal(
        got["model.embed_tokens.weight"], load_folder(base)["model.embed_tokens.weight"]
    )


def test_an_indexed_job_of_two_indices_writes_the_same_bytes(
    models: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Expert tensors are planned per disk tensor, so the indices' shares of the shards
    merge them apart: two local indices give the one-process merge's bytes."""
    import filecmp

    from mergejob.cli import main

    base = _base(models, "qwen3_moe")
    adapters = [_experts_adapter(models, base, "qwen3_moe"), _plain_adapter(models, base)]
    single = _merge(base, adapters, tmp_path / "single", "stream")
    out = tmp_path / "indexed"
    argv = ["submit", "--local", "--workers", "2", "--base", str(base), "--adapters"]
    argv += [str(a) for a in adapters]
    argv += ["--output_dir", str(out), "--max-shard-size", "60KB"]
    code = main(argv)
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "index 1/2 done" in captured.out
    shards = sorted(p.name for p in single.glob("*.safetensors"))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in [*shards, "model.safetensors.index.json", "config.json"]:
        assert filecmp.cmp(single / name, out / name, shallow=False), name


@pytest.mark.parametrize("engine", ["stream", "peft"])
def test_verify_recomputes_the_expert_tensors(engine: str, models: Any, tmp_path: Path) -> None:
    """verify maps the adapter's expert LoRA to the tensors on disk as the plan does and
    checks them as merged tensors (it once took them for untouched ones and failed)."""
    from mergejob.verify import verify_output

    base = _base(models, "mixtral")
    adapters = [_experts_adapter(models, base, "mixtral"), _plain_adapter(models, base)]
    out = _merge(base, adapters, tmp_path / "out", engine)
    report = verify_output(out, all_tensors=True)
    assert report.ok, report.summary()
    # The output's logits against PEFT's (the base with the adapters applied, unmerged).
    assert report.logits is not None and report.logits["ok"], report.logits
    merged = {c.name for c in report.checks if c.kind == "merged"}
    assert set(_expert_tensors(load_folder(base))) <= merged


def test_plan_shows_experts_per_layer_and_the_expert_tensors_each_adapter_changes(
    models: Any, run_cli: Any
) -> None:
    base = _base(models, "olmoe")
    adapters = [_experts_adapter(models, base, "olmoe"), _plain_adapter(models, base)]
    code, out, err = run_cli("plan", "--json", "--base", base, "--adapters", *adapters)
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"], report["problems"]
    # 2 layers of 4 experts; gate, up and down of each expert changed by the first adapter.
    assert report["experts"] == {"layers": 2, "experts": 4, "changed": [2 * 4 * 3, 0]}
    assert {"gate_up_proj", "down_proj", "q_proj"} <= set(report["adapters"][0]["targets"])
    code, text, _ = run_cli("plan", "--base", base, "--adapters", *adapters)
    assert "experts: 2 MoE layers of 4 experts each" in text
    assert "adapter 0 changes 24 expert tensors" in text


def test_router_lora_on_a_tensor_transformers_renames_merges_in_both_engines(
    models: Any, tmp_path: Path
) -> None:
    """Mixtral's router is ``mlp.gate.weight`` at run time and ``block_sparse_moe.gate.weight``
    on disk (a renaming of transformers' conversion mapping, no per-family rule here): a
    parameter LoRA on it lands on the disk tensor, in both engines, as PEFT merges it."""
    base = _base(models, "mixtral")
    adapter = models.adapter(
        base,
        target_modules=["q_proj"],
        target_parameters=[*EXPERT_PARAMETERS, "mlp.gate.weight"],
        seed=27,
    )
    router = "model.layers.0.block_sparse_moe.gate.weight"
    before = load_folder(base)
    for engine, dtype in (("peft", torch.bfloat16), ("stream", torch.float32)):
        got = load_folder(_merge(base, [adapter], tmp_path / engine, engine))
        oracle = peft_merge_saved(base, [adapter], dtype, tmp_path / f"oracle-{engine}")
        assert not bitwise_equal(got[router], before[router]), engine
        for name, tensor in got.items():
            expected = oracle[name].to(tensor.dtype)
            assert int(steps_apart(tensor, expected).max()) <= (engine == "stream"), name


def test_expert_factors_are_read_once_per_layer_not_once_per_expert_tensor(
    models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every expert tensor of a layer reads the same A and B (all experts' ranks): the
    engine keeps the last few across tensors instead of reading them for each expert (for
    128 experts, 384 reads of the layer's factors)."""
    from collections import Counter

    from mergejob.io.reader import FileReader

    base = _base(models, "qwen3_moe")
    adapter = _experts_adapter(models, base, "qwen3_moe")
    reads: Counter[str] = Counter()
    original = FileReader.tensor

    def counting(self: FileReader, ref: Any) -> Any:
        reads[ref.name] += 1
        return original(self, ref)

    monkeypatch.setattr(FileReader, "tensor", counting)
    _merge(base, [adapter], tmp_path / "out", "stream")
    experts = {name: n for name, n in reads.items() if ".mlp.experts." in name}
    assert len(experts) == 2 * 2 * 2  # 2 layers x (gate_up, down) x (A, B)
    assert set(experts.values()) == {1}, experts


@pytest.mark.parametrize("method", ["fp8", "mxfp4"])
def test_a_quantized_expert_checkpoint_is_refused_by_both_engines_naming_the_config(
    method: str, models: Any, tmp_path: Path
) -> None:
    """FP8 with block scales, MXFP4 experts: not merged yet; refused before any weight is
    read, naming config.json's quantization_config and what to do (exit code 2)."""
    import shutil

    from mergejob.errors import ModelError

    source = _base(models, "mixtral")
    base = tmp_path / "quantized"
    shutil.copytree(source, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "weight_block_size": [128, 128]}
    (base / "config.json").write_text(json.dumps(config))
    adapter = _experts_adapter(models, source, "mixtral")
    for engine in ("stream", "peft"):
        with pytest.raises(ModelError) as error:
            _merge(base, [adapter], tmp_path / engine, engine)
        message = str(error.value)
        assert "config.json: quantization_config" in message and method in message, engine
        assert "dequantize" in message and error.value.exit_code == 2
        assert not (tmp_path / engine).exists()
