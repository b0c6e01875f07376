"""`mergejob extract` of GPT-2 Conv1D layers and of changed biases (PEFT's ``lora_bias``).

What it must show: a rank-k update of GPT-2's Conv1D weights (stored in x out) is recovered to
fp32 rounding, PEFT loads the adapter (``fan_in_fan_out``) and its ``merge_and_unload``
equals ``mergejob merge`` of it, both the fine-tune within one rounding step; a changed bias
of a LoRA layer is carried as ``lora_B``'s bias (Δb; zeros on the LoRA layers whose bias did
not change; zero factors where only the bias changed) and both merges give the fine-tune's
bias back; where PEFT cannot carry it (a changed LoRA layer without a bias, an embedding
LoRA: ``lora_bias`` is for every layer or none) it is refused, one line, exit 2, unless
``--skip-undecomposable``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergejob.io.checkpoint import CheckpointIndex
from tests.test_extract import CLI, error_line, extract, report, rows, tensors, ulps

PREFIX = "base_model.model."
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def edited(folder: Path, dest: Path, replaced: dict[str, torch.Tensor]) -> Path:
    """A copy of the model in ``folder`` with the tensors ``replaced`` (same shards)."""
    shutil.copytree(folder, dest)
    index = CheckpointIndex.from_folder(dest)
    for shard in sorted({index.tensors[n].shard for n in replaced}):
        stored = load_file(str(dest / shard))
        stored.update({n: t for n, t in replaced.items() if n in stored})
        save_file(stored, str(dest / shard), metadata={"format": "pt"})
    return dest


def shift(tensor: torch.Tensor, size: float) -> torch.Tensor:
    """``tensor`` moved by a ramp of about ``size``, rounded to its dtype."""
    ramp = torch.linspace(-1.0, 1.0, tensor.numel()).reshape(tensor.shape)
    return (tensor.float() + size * ramp).to(tensor.dtype)


def merge(run_cli: CLI, base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    code, _, err = run_cli(
        "merge", "--base_model_name_or_path", base, "--peft_model_paths", adapter,
        "--output_dir", out,
    )  # fmt: skip
    assert code == 0, err
    return tensors(out)


def peft_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of the adapter (the oracle), in the base's dtype."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def check_merges(
    run_cli: CLI, base: Path, tuned: Path, adapter: Path, out: Path, *, fp32_factors: bool = True
) -> dict[str, torch.Tensor]:
    """mergejob's merge equals PEFT's bit for bit (one adapter: one rounding each, of the
    same fp32 sum) and, with fp32 factors of an exact-rank ΔW, gives back the fine-tune
    within one rounding step (bf16 factors add their own rounding: see the caller)."""
    ours = merge(run_cli, base, adapter, out)
    oracle = peft_merge(base, adapter)
    want, start = tensors(tuned), tensors(base)
    assert set(ours) == set(want)
    for name, tensor in ours.items():
        assert tensor.dtype == want[name].dtype, name
        assert ulps(tensor, oracle[name], start[name]) == 0, name
        if fp32_factors:
            assert ulps(tensor, want[name], start[name]) <= 1, name
    return ours


def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at |x| (fp64): the most one rounding to it moves x."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))
    return torch.pow(2.0, exponent) * (info.eps / 2)


# ---------------------------------------------------------------------------------------
# GPT-2: Conv1D layers


@pytest.fixture(scope="module")
def gpt2(models: Any) -> tuple[Path, Path]:
    """A bf16 GPT-2 and a fine-tune with a rank-4 update of every Conv1D weight (4 rows of
    each stored in x out weight, so the stored ΔW has rank 4 exactly); biases unchanged."""
    base = models.base(family="gpt2")
    tuned = models.finetune(base, modules=("c_attn", "c_proj", "c_fc"), rank=4, rows_only=True)
    return base, tuned


@pytest.mark.parametrize("max_rank", [4, 8])
def test_a_rank_k_update_of_conv1d_weights_is_recovered_and_merges_back(
    gpt2: tuple[Path, Path], run_cli: CLI, tmp_path: Path, max_rank: int
) -> None:
    base, tuned = gpt2
    adapter = tmp_path / "adapter"
    code, _, err = extract(run_cli, base, tuned, adapter, "--max-rank", max_rank)
    assert code == 0, err
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    b_side, t_side = tensors(base), tensors(tuned)
    modules = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in CONV1D]
    for module in modules:
        a = weights[f"{PREFIX}{module}.lora_A.weight"].double()
        b = weights[f"{PREFIX}{module}.lora_B.weight"].double()
        delta = t_side[f"{module}.weight"].double() - b_side[f"{module}.weight"].double()
        fan_in, fan_out = delta.shape  # Conv1D stores (in, out); B is out x r, A is r x in
        assert b.shape == (fan_out, 4) and a.shape == (4, fan_in), module
        relative = float(((b @ a).T - delta).norm() / delta.norm())
        assert relative < 1e-5, (module, relative)
        assert rows(adapter)[module]["rank"] == 4
    assert not any(k.endswith(".lora_B.bias") for k in weights)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["lora_bias"] is False
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    check_merges(run_cli, base, tuned, adapter, tmp_path / "merged")


# ---------------------------------------------------------------------------------------
# Biases carried as lora_B's bias


def test_a_changed_bias_of_a_lora_layer_is_carried_as_lora_bias(
    gpt2: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, finetune = gpt2
    # Layer 0's c_fc: only its bias changed; layer 1's c_attn: weight and bias; the other
    # LoRA layers: weight only (their lora_B bias is zeros).
    start = tensors(base)
    fc, attn = "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn"
    changes = {
        f"{fc}.weight": start[f"{fc}.weight"],
        f"{fc}.bias": shift(start[f"{fc}.bias"], 0.01),
        f"{attn}.bias": shift(start[f"{attn}.bias"], 0.02),
    }
    tuned = edited(finetune, tmp_path / "tuned", changes)
    moved_biases = {f"{fc}.bias", f"{attn}.bias"}
    adapter = tmp_path / "adapter"
    code, _, err = extract(run_cli, base, tuned, adapter)
    assert code == 0, err
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["fan_in_fan_out"] is True
    b_side, t_side = tensors(base), tensors(tuned)
    found = rows(adapter)
    targets = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in CONV1D]
    for module in targets:  # every LoRA layer has a lora_B bias: Δb, or zeros
        bias = weights[f"{PREFIX}{module}.lora_B.bias"]
        assert bias.dtype == torch.float32  # the factors' dtype
        want = t_side[f"{module}.bias"].float() - b_side[f"{module}.bias"].float()
        assert torch.equal(bias, want), module  # bf16 - bf16 is exact in fp32
        assert found[module].get("bias", False) is (f"{module}.bias" in moved_biases), module
    assert found[fc]["rank"] == 1 and found[fc]["method"] == "none"
    assert not weights[f"{PREFIX}{fc}.lora_B.weight"].any()
    assert report(adapter)["summary"]["biases"] == 2 and report(adapter)["dropped"] == []
    card = (adapter / "README.md").read_text()
    assert "- biases: 2 LoRA layer(s) whose bias changed carry Δb" in card
    assert "| `transformer.h.0.mlp.c_fc` | lora | 64x256 | 1 |" in card
    ours = check_merges(run_cli, base, tuned, adapter, tmp_path / "merged")
    for name in moved_biases:  # fp32 Δb: base + Δb rounds to the fine-tune's bias exactly
        assert torch.equal(ours[name], t_side[name]), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_biases_of_the_layers_that_have_them_are_carried_in_the_factors_dtype(
    models: Any, run_cli: CLI, tmp_path: Path, dtype: str
) -> None:
    """Qwen2 (biases on q/k/v only): a fine-tune of q/k/v and their biases is carried; the
    bias-less layers are unchanged, so no LoRA layer lacks a bias."""
    base = models.base(family="qwen2")
    modules = ("q_proj", "k_proj", "v_proj")
    tuned = models.finetune(base, modules=modules, biases=True, rows_only=True)
    adapter = tmp_path / "adapter"
    code, _, err = extract(run_cli, base, tuned, adapter, "--dtype", dtype)
    assert code == 0, err
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and sorted(config["target_modules"]) == sorted(modules)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    biases = {k: v for k, v in weights.items() if k.endswith(".lora_B.bias")}
    assert len(biases) == 6 and {v.dtype for v in biases.values()} == {getattr(torch, dtype)}
    assert report(adapter)["summary"]["biases"] == 6
    fp32 = dtype == "float32"
    ours = check_merges(run_cli, base, tuned, adapter, tmp_path / "merged", fp32_factors=fp32)
    start, want = tensors(base), tensors(tuned)
    for key, stored in biases.items():
        name = key.removeprefix(PREFIX).replace(".lora_B.bias", ".bias")
        b, t, got = start[name].double(), want[name].double(), ours[name].double()
        delta = t - b  # exact: a difference of two bf16 numbers
        # Δb is rounded once to the factors' dtype, base + Δb once to bf16 (PEFT alike).
        assert torch.equal(got, (b + stored.double()).to(torch.bfloat16).double()), name
        assert ((stored.double() - delta).abs() <= half_ulp(delta, stored.dtype)).all(), name
        bound = half_ulp(delta, stored.dtype) + half_ulp(t, torch.bfloat16)
        assert ((got - t).abs() <= bound).all(), name
        if fp32:
            assert torch.equal(got, t), name


# ---------------------------------------------------------------------------------------
# What lora_bias cannot carry


@pytest.mark.parametrize("case", ["no_bias", "embedding"])
def test_a_bias_lora_bias_cannot_carry_is_refused_unless_skip_undecomposable(
    models: Any, run_cli: CLI, tmp_path: Path, case: str
) -> None:
    base = models.base(family="qwen2")  # q/k/v carry biases, o_proj and the MLP do not
    if case == "no_bias":
        tuned = models.finetune(base, biases=True)  # q/v/o/down weights and q/k/v biases
        flags: list[object] = []
        blocker, why = "model.layers.0.mlp.down_proj", "it has no bias in the base"
    else:
        tuned = models.finetune(
            base, modules=("q_proj", "embed_tokens"), biases=True, rows_only=True
        )
        flags = ["--embed-lora"]
        why = "PEFT has no lora_bias for an embedding; --embeddings full takes it whole"
        blocker = "model.embed_tokens"
    code, _, err = extract(run_cli, base, tuned, tmp_path / "refused", *flags)
    assert code == 2, err
    line = error_line(err)
    assert "6 bias(es) of LoRA layers changed (model.layers.0.self_attn.k_proj.bias" in line
    assert "PEFT's lora_bias is for every LoRA layer or none" in line
    assert f"the changed LoRA layer {blocker} cannot take one ({why})" in line
    assert "--skip-undecomposable" in line
    assert not (tmp_path / "refused").exists()
    assert not any(p.name.startswith(".refused") for p in tmp_path.iterdir())

    out = tmp_path / "skipped"
    code, _, err = extract(run_cli, base, tuned, out, "--skip-undecomposable", *flags)
    assert code == 0, err
    dropped = report(out)["dropped"]
    assert len(dropped) == 6 and all(name.endswith(".bias") for name in dropped)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is False
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert not any(k.endswith(".lora_B.bias") for k in weights)
    assert not any(r.get("bias") for r in report(out)["modules"])
    if case == "embedding":  # with the embeddings whole, nothing stands in the way
        carried = tmp_path / "carried"
        code, _, err = extract(run_cli, base, tuned, carried)
        assert code == 0, err
        assert report(carried)["summary"]["biases"] == 6
        check_merges(run_cli, base, tuned, carried, tmp_path / "merged")
