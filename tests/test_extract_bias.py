"""`mergejob extract` of GPT-2 Conv1D layers and of changed biases (PEFT's ``lora_bias``).

What it must show: a rank-k update of GPT-2's Conv1D weights (stored in x out) is recovered to
fp32 rounding, PEFT loads the adapter (``fan_in_fan_out``) and its ``merge_and_unload``
equals ``mergejob merge`` of it, both the fine-tune within one rounding step; a changed bias
of a LoRA layer is carried as ``lora_B``'s bias (Δb; zeros on the LoRA layers whose bias did
not change; zero factors where only the bias changed) and both merges give the fine-tune's
bias back; where ``lora_bias`` cannot carry it (a changed LoRA layer without a bias, an
embedding LoRA: it is for every layer or none) the layers whose bias changed are saved whole
(``modules_to_save``), which both merges give back exactly and ``mergejob verify`` checks,
unless ``--skip-undecomposable`` leaves the biases out.
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
    run_cli: CLI,
    base: Path,
    tuned: Path,
    adapter: Path,
    out: Path,
    *,
    fp32_factors: bool = True,
    embed_ulps: int = 0,
) -> dict[str, torch.Tensor]:
    """mergejob's merge equals PEFT's bit for bit (one adapter: one rounding each, of the
    same fp32 sum; ``embed_ulps`` on an embedding LoRA, whose delta PEFT rounds first) and,
    with fp32 factors of an exact-rank ΔW, gives back the fine-tune within one rounding step
    (bf16 factors add their own rounding: see the caller)."""
    ours = merge(run_cli, base, adapter, out)
    oracle = peft_merge(base, adapter)
    want, start = tensors(tuned), tensors(base)
    assert set(ours) == set(want)
    for name, tensor in ours.items():
        assert tensor.dtype == want[name].dtype, name
        allowed = embed_ulps if "embed_tokens" in name else 0
        assert ulps(tensor, oracle[name], start[name]) <= allowed, name
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


QKV = ("q_proj", "k_proj", "v_proj")


def targeted(targets: list[str], module: str) -> bool:
    """Whether PEFT's ``target_modules`` (a list: names matched as ``m == t`` or
    ``m.endswith("." + t)``) takes ``module``."""
    return any(module == t or module.endswith(f".{t}") for t in targets)


def one_ulp_up(path: Path, key: str) -> None:
    """Move the first element of the tensor ``key`` of ``path`` one ulp up (metadata kept)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        stored = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    t = stored[key].clone()
    t.view(-1)[0] = torch.nextafter(t.view(-1)[0], torch.tensor(float("inf"), dtype=t.dtype))
    stored[key] = t
    save_file(stored, str(path), metadata=metadata)


@pytest.mark.parametrize("case", ["no_bias", "embedding"])
def test_a_layer_whose_bias_lora_bias_cannot_carry_is_saved_whole(
    models: Any, run_cli: CLI, tmp_path: Path, case: str
) -> None:
    """Qwen2 (q/k/v biases, o_proj and the MLP none): q/k/v biases changed, and a changed
    LoRA layer cannot take a lora_B bias (a bias-less down_proj, or an embedding LoRA):
    lora_bias (every LoRA layer or none) is out, so the six layers whose bias changed are
    saved whole (modules_to_save: the fine-tune's weight and bias, no factors), never
    matched by target_modules; both merges give the fine-tune's q/k/v back exactly, and
    ``mergejob verify`` passes it and fails a whole-saved tensor one ulp off."""
    base = models.base(family="qwen2")
    if case == "no_bias":
        # q/k/v/down weights (rank 4 as stored) and q/k/v biases
        tuned = models.finetune(base, modules=(*QKV, "down_proj"), biases=True, rows_only=True)
        flags: list[object] = []
        blocker = "model.layers.0.mlp.down_proj"
    else:
        tuned = models.finetune(
            base, modules=("q_proj", "embed_tokens"), biases=True, rows_only=True
        )
        flags = ["--embed-lora"]
        blocker = "model.embed_tokens"
    adapter = tmp_path / "adapter"
    code, _, err = extract(run_cli, base, tuned, adapter, *flags)
    assert code == 0, err
    whole = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in QKV]
    assert "6 LoRA layer(s) whose bias changed saved whole (modules_to_save, " in err
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    want = tensors(tuned)
    for module in whole:
        assert not any(k.startswith(f"{PREFIX}{module}.lora_") for k in weights), module
        for name in (f"{module}.weight", f"{module}.bias"):
            stored = weights[f"{PREFIX}{name}"]
            assert stored.dtype == want[name].dtype and torch.equal(stored, want[name]), name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["lora_bias"] is False
    assert set(whole) <= set(config["modules_to_save"])
    assert not [m for m in whole if targeted(config["target_modules"], m)]
    assert targeted(config["target_modules"], blocker)
    assert not any(k.endswith(".lora_B.bias") for k in weights)
    found = rows(adapter)
    for module in whole:
        row = found[module]
        assert row["kind"] == "full" and row["status"] == "full", row
        assert row["reason"] == f"bias changed; lora_bias blocked by {blocker}", row
    assert report(adapter)["dropped"] == []
    card = (adapter / "README.md").read_text()
    assert "- biases: 6 LoRA layer(s) whose bias changed saved whole" in card
    assert f"| `{whole[0]}` | full (modules_to_save) | " in card
    # PEFT rounds an embedding LoRA's delta to the base's dtype before adding it (mergejob
    # adds in fp32): one ulp there, as in tests/test_extract.py.
    embed = 1 if case == "embedding" else 0
    ours = check_merges(run_cli, base, tuned, adapter, tmp_path / "merged", embed_ulps=embed)
    oracle = peft_merge(base, adapter)
    for module in whole:
        for name in (f"{module}.weight", f"{module}.bias"):
            assert torch.equal(ours[name], want[name]), name
            assert torch.equal(oracle[name], want[name]), name
    code, out, err = run_cli("verify", adapter)
    assert code == 0, out + err
    one_ulp_up(adapter / "adapter_model.safetensors", f"{PREFIX}{whole[1]}.bias")
    code, out, err = run_cli("verify", adapter)
    assert code == 1, out + err
    failed = [line for line in out.splitlines() if line.startswith(f"  {whole[1]}.bias: ")]
    assert failed and "not the fine-tune's bytes" in failed[0], out


def test_with_skip_undecomposable_the_biases_are_left_out_and_the_layers_keep_their_lora(
    models: Any, run_cli: CLI, tmp_path: Path
) -> None:
    base = models.base(family="qwen2")
    tuned = models.finetune(base, biases=True)  # a changed bias-less down_proj blocks
    out = tmp_path / "skipped"
    code, _, err = extract(run_cli, base, tuned, out, "--skip-undecomposable")
    assert code == 0, err
    dropped = report(out)["dropped"]
    assert len(dropped) == 6 and all(name.endswith(".bias") for name in dropped)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is False
    assert not any("self_attn" in m for m in config.get("modules_to_save") or [])
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert not any(k.endswith(".lora_B.bias") for k in weights)
    assert f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    assert not any(r.get("bias") or r.get("reason") for r in report(out)["modules"])
    assert "left out (changed, but no LoRA carries them)" in (out / "README.md").read_text()


def test_with_the_embeddings_whole_an_embedding_does_not_block_lora_bias(
    models: Any, run_cli: CLI, tmp_path: Path
) -> None:
    base = models.base(family="qwen2")
    tuned = models.finetune(base, modules=("q_proj", "embed_tokens"), biases=True, rows_only=True)
    carried = tmp_path / "carried"
    code, _, err = extract(run_cli, base, tuned, carried)
    assert code == 0, err
    assert report(carried)["summary"]["biases"] == 6
    check_merges(run_cli, base, tuned, carried, tmp_path / "merged")


def test_workers_and_the_indices_of_a_split_reach_the_same_whole_layers(
    models: Any, run_cli: CLI, tmp_path: Path
) -> None:
    """The decision to save a layer whole depends on the inputs only: two worker processes,
    and two indices of a split extraction (each deciding for itself before its own groups),
    write the one-process adapter byte for byte."""
    import mergejob
    from mergejob.extraction.split import run_extract_index

    base = models.base(family="qwen2")
    tuned = models.finetune(base, modules=(*QKV, "down_proj"), biases=True, rows_only=True)
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = extract(run_cli, base, tuned, one)
    assert code == 0, err
    assert report(one)["summary"]["full"] >= 6
    code, _, err = extract(run_cli, base, tuned, two, "--workers", 2)
    assert code == 0, err
    files = ("adapter_model.safetensors", "adapter_config.json", "extraction.json")
    for name in files:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name

    def spec(out: Path) -> Any:
        return mergejob.MergeSpec.model_validate(
            {"base": str(base), "extract": {"finetuned": str(tuned)}, "output": {"dir": str(out)}}
        )

    alone, split = tmp_path / "alone", tmp_path / "split"
    mergejob.extract(spec(alone))
    run_extract_index(spec(split), index=1, count=2)
    run_extract_index(spec(split), index=0, count=2, wait_timeout=60)
    for name in files:
        assert (split / name).read_bytes() == (alone / name).read_bytes(), name
    assert json.loads((split / "extraction.json").read_text())["summary"]["full"] >= 6


def test_the_plans_adapter_bound_counts_a_biased_layer_saved_whole(
    models: Any, run_cli: CLI, tmp_path: Path
) -> None:
    """``mergejob plan``'s adapter size is an upper bound: a LoRA layer with a bias counts
    at the larger of its factors and bias and its whole weight and bias (at rank 2 the
    whole q/k/v are larger than their factors)."""
    from mergejob.extraction.plan import plan_extraction
    from mergejob.extraction.report import plan_report_for
    from mergejob.io.headers import read_header
    from mergejob.spec import ExtractSpec

    base = models.base(family="qwen2")
    tuned = models.finetune(base, modules=(*QKV, "down_proj"), biases=True, rows_only=True)
    adapter = tmp_path / "adapter"
    only = r"(q|k|v|down)_proj$"  # the layers saved whole and the one that blocks
    code, _, err = extract(run_cli, base, tuned, adapter, "--max-rank", 2, "--include", only)
    assert code == 0, err
    stored = sum(
        ref.nbytes for ref in read_header(adapter / "adapter_model.safetensors").tensors().values()
    )
    settings = ExtractSpec.model_validate(
        {"finetuned": str(tuned), "max_rank": 2, "include": [only]}
    )
    plan = plan_extraction(settings, base, tuned)
    bound = plan_report_for(
        plan, base=str(base), finetuned=str(tuned), output_dir=None, device="cpu"
    ).adapter_bytes_max
    assert report(adapter)["summary"]["full"] == 6
    assert stored <= bound, (stored, bound)


def with_extra_tensor(folder: Path, dest: Path, name: str, tensor: torch.Tensor) -> Path:
    """A copy of the model in ``folder`` with one more tensor (in the norm's shard)."""
    shutil.copytree(folder, dest)
    index = CheckpointIndex.from_folder(dest)
    shard = index.tensors["model.norm.weight"].shard
    stored = load_file(str(dest / shard))
    stored[name] = tensor
    save_file(stored, str(dest / shard), metadata={"format": "pt"})
    index_file = dest / "model.safetensors.index.json"
    if index_file.is_file():
        data = json.loads(index_file.read_text())
        data["weight_map"][name] = shard
        index_file.write_text(json.dumps(data))
    return dest


def test_a_changed_tensor_no_lora_carries_is_refused_or_left_out(
    models: Any, run_cli: CLI, tmp_path: Path
) -> None:
    """A 3-D weight (an expert bank no LoRA layer holds) that changed: one line, exit 2,
    nothing written; with --skip-undecomposable it is left out and listed."""
    base = models.base()
    tuned = models.finetune(base, rank=4)
    name = "model.layers.0.mlp.bank"
    bank = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3))
    base = with_extra_tensor(base, tmp_path / "base", name, bank.to(torch.bfloat16))
    tuned = with_extra_tensor(tuned, tmp_path / "tuned", name, (bank + 0.5).to(torch.bfloat16))
    out = tmp_path / "refused"
    code, _, err = extract(run_cli, base, tuned, out)
    assert code == 2, err
    line = error_line(err)
    assert name in line and "--skip-undecomposable" in line
    assert not out.exists() and not list(tmp_path.glob(".refused*"))
    kept = tmp_path / "kept"
    code, _, err = extract(run_cli, base, tuned, kept, "--skip-undecomposable")
    assert code == 0, err
    assert report(kept)["dropped"] == [name]
    assert not any(name in k for k in load_file(str(kept / "adapter_model.safetensors")))
