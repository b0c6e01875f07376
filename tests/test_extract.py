"""`mergejob extract` end to end, on generated models whose fine-tune differs from the base by
a known low-rank update (tests/support/models.py: make_finetune).

What it must show: a rank-k update is recovered to fp32 rounding and merging the adapter
back gives the fine-tune within one rounding step of its dtype; below k every module's
error is the Eckart-Young optimum; --min-energy keeps what it promises with the smallest
rank; PEFT loads the adapter and its merge equals mergejob's; embeddings, lm_head, norms,
biases and a resized vocabulary are handled as documented; bad input exits 2 with one line.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergejob.io.checkpoint import CheckpointIndex

CLI = Callable[..., tuple[int, str, str]]


# ---------------------------------------------------------------------------------------
# Helpers


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (all its shards)."""
    index = CheckpointIndex.from_folder(folder)
    found: dict[str, torch.Tensor] = {}
    for shard in index.shards:
        found.update(load_file(str(folder / shard)))
    return found


def delta_of(base: Path, tuned: Path) -> dict[str, torch.Tensor]:
    b, t = tensors(base), tensors(tuned)
    return {name: t[name].double() - b[name].double() for name in b}


def adapter_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """module -> B @ A (as the stored weight: transposed for embeddings), from the files."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert config["lora_alpha"] == config["r"]
    assert config["alpha_pattern"] == config["rank_pattern"]  # every scale is 1
    result = {}
    for key, a in weights.items():
        for suffix, embedding in ((".lora_A.weight", False), (".lora_embedding_A", True)):
            if key.endswith(suffix):
                module = key.removeprefix("base_model.model.").removesuffix(suffix)
                b = weights[key.replace("_A", "_B")]
                product = b.double() @ a.double()
                result[module] = product.T if embedding else product
    return result


def report(adapter: Path) -> dict[str, Any]:
    return json.loads((adapter / "extraction.json").read_text())


def rows(adapter: Path) -> dict[str, dict[str, Any]]:
    return {r["module"]: r for r in report(adapter)["modules"]}


def optimum(delta: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return math.sqrt(float((s[rank:] ** 2).sum() / (s**2).sum()))


def extract(
    run_cli: CLI, base: Path, tuned: Path, out: Path, *flags: object
) -> tuple[int, str, str]:
    return run_cli(
        "extract",
        "--base_model_name_or_path", base,
        "--finetuned_model_name_or_path", tuned,
        "--output_dir", out,
        *flags,
    )  # fmt: skip


def error_line(err: str) -> str:
    """The one line of a refused job (and nothing after it)."""
    lines = err.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("mergejob: error:")]
    assert starts, err
    assert starts[-1] == len(lines) - 1, f"more than one line: {lines[starts[-1] :]}"
    return lines[-1]


def ulps(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor | None = None) -> float:
    """The largest difference, in ulps of the dtype at the weight's magnitude (the larger of
    |want| and |base|: mergejob verify's measure, which DESIGN.md's tolerances use)."""
    from mergejob.verify import weight_ulps

    assert got.dtype == want.dtype
    return float(weight_ulps(got, want, base).max()) if got.numel() else 0.0


# ---------------------------------------------------------------------------------------
# Models


@pytest.fixture(scope="module")
def fp32(models: Any) -> tuple[Path, Path]:
    """An fp32 base and a fine-tune: rank-4 updates of q/v/o/down, norms scaled."""
    base = models.base(dtype=torch.float32)
    return base, models.finetune(base, rank=4, norms=True)


@pytest.fixture(scope="module")
def fp32_rank8(models: Any) -> tuple[Path, Path]:
    """Wide enough (hidden 256) that the randomized SVD's blocks fit in half a module."""
    base = models.base(dtype=torch.float32, hidden_size=256, intermediate_size=512)
    return base, models.finetune(base, rank=8, ranks={"down_proj": 3}, seed=4)


@pytest.fixture(scope="module")
def bf16(models: Any) -> tuple[Path, Path]:
    """A bf16 base and a fine-tune that also moves embed_tokens and lm_head, whose stored
    ΔW has rank 4 exactly (4 rows of each weight: rounding keeps that rank)."""
    base = models.base()
    modules = ("q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head")
    return base, models.finetune(base, rank=4, norms=True, modules=modules, rows_only=True)


# ---------------------------------------------------------------------------------------
# Against the optimum


def test_a_rank_k_update_is_recovered_to_fp32_rounding(
    fp32: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned = fp32
    out = tmp_path / "adapter"
    code, stdout, err = extract(run_cli, base, tuned, out)
    assert code == 0, err
    assert "extracted 8 LoRA module(s) (rank 4..4" in stdout
    truth = delta_of(base, tuned)
    found = adapter_deltas(out)
    assert sorted(found) == sorted(
        f"model.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")
    )  # the unchanged k_proj, gate_proj, up_proj are left out
    for module, product in found.items():
        delta = truth[f"{module}.weight"]
        relative = float((product - delta).norm() / delta.norm())
        assert relative < 1e-5, module
        row = rows(out)[module]
        assert row["rank"] == 4 and row["error"] < 1e-5 and row["method"] == "exact"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {}
    assert sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    assert "model.norm" in config["modules_to_save"]  # norms changed: taken whole
    assert config["base_model_name_or_path"] == str(base)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    assert {"mergejob.yaml", "extraction.json", "tokenizer.json"} <= names
    assert not any(n.startswith(".") for n in names)  # no parts or records left


@pytest.mark.parametrize("embeddings", ["full", "lora"])
def test_merging_the_extracted_adapter_gives_back_the_finetune_within_one_rounding_step(
    bf16: tuple[Path, Path], run_cli: CLI, tmp_path: Path, embeddings: str
) -> None:
    base, tuned = bf16
    adapter = tmp_path / "adapter"
    code, _, err = extract(run_cli, base, tuned, adapter, "--embeddings", embeddings)
    assert code == 0, err
    kinds = {
        r["module"]: r["kind"] for r in report(adapter)["modules"] if r["status"] != "identical"
    }
    if embeddings == "lora":
        assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "lora"
    else:
        assert kinds["model.embed_tokens"] == "full" and kinds["lm_head"] == "full"
    merged = tmp_path / "merged"
    code, _, err = run_cli(
        "merge", "--base_model_name_or_path", base, "--peft_model_paths", adapter,
        "--output_dir", merged,
    )  # fmt: skip
    assert code == 0, err
    want, got, start = tensors(tuned), tensors(merged), tensors(base)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype == torch.bfloat16
        assert ulps(got[name], want[name], start[name]) <= 1, name


def test_below_the_update_rank_every_module_error_equals_the_optimum(
    fp32_rank8: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned = fp32_rank8
    truth = delta_of(base, tuned)
    for method in ("exact", "randomized"):
        out = tmp_path / method
        code, _, err = extract(run_cli, base, tuned, out, "--max-rank", 3, "--svd", method)
        assert code == 0, err
        found = adapter_deltas(out)
        assert found
        for module, product in found.items():
            delta = truth[f"{module}.weight"]
            best = optimum(delta, 3)
            error = float((product - delta).norm() / delta.norm())
            assert abs(error - best) < 1e-4, (method, module, error, best)
            row = rows(out)[module]
            assert row["rank"] == 3 and row["method"] == method
            assert abs(row["error"] - error) < 1e-5
            if method == "exact":
                assert abs(row["optimal_error"] - best) < 1e-5


def test_min_energy_keeps_at_least_the_fraction_with_the_smallest_rank(
    fp32_rank8: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned = fp32_rank8
    out = tmp_path / "adapter"
    code, _, err = extract(run_cli, base, tuned, out, "--min-energy", 0.8)
    assert code == 0, err
    truth = delta_of(base, tuned)
    found = adapter_deltas(out)
    ranks = set()
    for module, product in found.items():
        delta = truth[f"{module}.weight"]
        energy = (torch.linalg.svdvals(delta) ** 2).tolist()
        total = sum(energy)
        rank = rows(out)[module]["rank"]
        ranks.add(rank)
        kept = 1 - float((product - delta).norm() ** 2 / delta.norm() ** 2)
        assert kept >= 0.8 - 1e-9
        assert sum(energy[: rank - 1]) / total < 0.8  # one less would not do
        assert rows(out)[module]["kept"] >= 0.8
    config = json.loads((out / "adapter_config.json").read_text())
    assert len(ranks) > 1 and set(config["rank_pattern"].values()) <= ranks


# ---------------------------------------------------------------------------------------
# PEFT


def test_peft_loads_the_adapter_and_its_merge_equals_mergejobs(
    bf16: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tuned = bf16
    adapter = tmp_path / "adapter"
    code, _, err = extract(run_cli, base, tuned, adapter, "--embed-lora", "--max-rank", 8)
    assert code == 0, err
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    peft_merged = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    merged = tmp_path / "merged"
    code, _, err = run_cli(
        "merge", "--base_model_name_or_path", base, "--peft_model_paths", adapter,
        "--output_dir", merged,
    )  # fmt: skip
    assert code == 0, err
    ours, start = tensors(merged), tensors(base)
    for name, tensor in ours.items():
        # One adapter: bit for bit, except where PEFT rounds the embedding delta to bf16
        # before adding it (the stream engine is the more exact one there: one ulp).
        allowed = 1 if "embed_tokens" in name else 0
        assert ulps(tensor, peft_merged[name], start[name]) <= allowed, name


# ---------------------------------------------------------------------------------------
# Norms, biases, a resized vocabulary


def test_a_changed_bias_lora_bias_cannot_carry_saves_its_layer_whole(
    models: Any, run_cli: CLI, tmp_path: Path
) -> None:
    base = models.base(family="qwen2")  # q/k/v carry biases
    # o_proj and down_proj change too and have no bias: lora_bias (all or nothing) cannot
    # carry q/k/v's, so q/k/v are saved whole (tests/test_extract_bias.py: the merges, the
    # --skip-undecomposable case, and lora_bias where it can carry them).
    tuned = models.finetune(base, biases=True)
    out = tmp_path / "whole"
    code, _, err = extract(run_cli, base, tuned, out)
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    q_proj = "model.layers.0.self_attn.q_proj"
    assert q_proj in config["modules_to_save"] and "q_proj" not in config["target_modules"]
    assert rows(out)[q_proj]["status"] == "full" and report(out)["dropped"] == []


def test_a_resized_vocabulary_is_saved_whole_with_the_finetunes_tokenizer(
    models: Any, run_cli: CLI, tmp_path: Path
) -> None:
    base = models.base()
    tuned = models.finetune(base, resize_vocab_to=112)
    adapter = tmp_path / "adapter"
    code, _, err = extract(run_cli, base, tuned, adapter, "--embed-lora")
    assert code == 0, err
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head"} <= set(config["modules_to_save"])
    tokenizer = json.loads((adapter / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) == 112
    merged = tmp_path / "merged"
    code, _, err = run_cli(
        "merge", "--base_model_name_or_path", base, "--peft_model_paths", adapter,
        "--output_dir", merged,
    )  # fmt: skip
    assert code == 0, err
    want, got = tensors(tuned), tensors(merged)
    assert torch.equal(got["model.embed_tokens.weight"], want["model.embed_tokens.weight"])
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == 112


def test_tied_embeddings_are_saved_whole_under_both_names_so_a_merge_keeps_the_head(
    models: Any, run_cli: CLI, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = models.base(dtype=torch.float32, tie_word_embeddings=True)
    tuned = models.finetune(base, modules=("q_proj", "embed_tokens"), rows_only=True)
    adapter = tmp_path / "adapter"
    code, _, err = extract(run_cli, base, tuned, adapter, "--embed-lora")
    assert code == 0, err
    assert "tied embeddings: model.embed_tokens is saved whole, and as lm_head too" in err
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens"]
    merged = tmp_path / "merged"
    code, _, err = run_cli(
        "merge", "--base_model_name_or_path", base, "--peft_model_paths", adapter,
        "--output_dir", merged,
    )  # fmt: skip
    assert code == 0, err
    want, got = tensors(tuned), tensors(merged)
    assert torch.equal(got["lm_head.weight"], want["model.embed_tokens.weight"])
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)
    ).merge_and_unload()
    reference = AutoModelForCausalLM.from_pretrained(str(tuned), dtype=torch.float32)
    tokens = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(peft(tokens).logits, reference(tokens).logits)


# ---------------------------------------------------------------------------------------
# Bad input


def _without_tensor(folder: Path, dest: Path, name: str) -> Path:
    shutil.copytree(folder, dest)
    index = CheckpointIndex.from_folder(dest)
    shard = dest / index.tensors[name].shard
    kept = {k: v for k, v in load_file(str(shard)).items() if k != name}
    save_file(kept, str(shard), metadata={"format": "pt"})
    index_file = dest / "model.safetensors.index.json"
    data = json.loads(index_file.read_text())
    del data["weight_map"][name]
    index_file.write_text(json.dumps(data))
    return dest


@pytest.mark.parametrize(
    "case",
    ["architecture", "shape", "missing", "identical", "identical_copy", "max_rank", "no_gpu"],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    models: Any, run_cli: CLI, tmp_path: Path, case: str
) -> None:
    base = models.base()
    flags: list[object] = []
    if case == "architecture":
        tuned, expected = models.base(family="qwen2"), "model_type 'qwen2' (the base's: 'llama')"
    elif case == "shape":
        tuned, expected = models.base(intermediate_size=96), "differ in shape"
    elif case == "missing":
        finetune = models.finetune(base)
        tuned = _without_tensor(finetune, tmp_path / "cut", "model.layers.1.mlp.up_proj.weight")
        expected = "lacks 1 tensor(s) that the base has (model.layers.1.mlp.up_proj.weight)"
    elif case == "identical":
        tuned, expected = base, "is the base itself; nothing to extract"
    elif case == "identical_copy":  # other files, same weights: found once read
        tuned = Path(shutil.copytree(base, tmp_path / "copy"))
        expected = "every extracted tensor equals the base's"
    elif case == "no_gpu":
        tuned, expected = models.finetune(base), "--device) cuda: no CUDA GPU is visible here"
        flags = ["--device", "cuda"]
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible here")
    else:
        tuned, expected = models.finetune(base), "larger than the smaller dimension"
        flags = ["--max-rank", 48]  # k_proj is 32 x 64
    out = tmp_path / "out"
    code, _, err = extract(run_cli, base, tuned, out, *flags)
    assert code == 2, err
    assert expected in error_line(err)
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no partial left


def test_different_dtypes_are_allowed_the_difference_taken_in_fp32(
    models: Any, run_cli: CLI, tmp_path: Path
) -> None:
    base = models.base(dtype=torch.float32)
    tuned = models.finetune(base, dtype=torch.bfloat16)
    out = tmp_path / "adapter"
    code, _, err = extract(run_cli, base, tuned, out, "--max-rank", 8)
    assert code == 0, err
    assert "the base stores float32 where the fine-tuned model stores bfloat16" in err
    assert "the difference is taken in fp32" in err
    truth = delta_of(base, tuned)
    for module, product in adapter_deltas(out).items():
        delta = truth[f"{module}.weight"]
        assert abs(float((product - delta).norm() / delta.norm()) - optimum(delta, 8)) < 1e-4


# ---------------------------------------------------------------------------------------
# Resume, rerun, recipe


def test_an_interrupted_extraction_resumes_from_its_finished_groups(
    fp32: tuple[Path, Path], run_cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergejob.extraction import engine

    base, tuned = fp32
    clean = tmp_path / "clean"
    assert extract(run_cli, base, tuned, clean)[0] == 0
    real = engine._extract_group
    calls: list[str] = []
    fail = [True]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1][0].module)
        if len(calls) == 3 and fail:
            fail.clear()
            raise OSError(5, "Input/output error", "disk")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_extract_group", failing)
    out = tmp_path / "out"
    code, _, err = extract(run_cli, base, tuned, out)
    assert code == 1, err
    assert (tmp_path / ".out.mergejob-partial").is_dir()  # kept for the rerun
    calls.clear()
    code, _, err = extract(run_cli, base, tuned, out)
    assert code == 0, err
    assert len(calls) == 3  # 5 groups (embed, 2 layers, norm, lm_head): 2 were done
    for name in ("adapter_model.safetensors", "adapter_config.json", "extraction.json"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_the_recipe_reruns_the_extraction_byte_for_byte_and_a_rerun_does_nothing(
    fp32: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned = fp32
    out = tmp_path / "adapter"
    assert extract(run_cli, base, tuned, out, "--max-rank", 3)[0] == 0
    code, stdout, err = extract(run_cli, base, tuned, out, "--max-rank", 3)
    assert code == 0, err
    assert "already holds this extraction" in stdout
    again = tmp_path / "again"
    code, _, err = run_cli("run", "--config", out / "mergejob.yaml", "--output_dir", again)
    assert code == 0, err
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "extraction.json",
        "README.md",
    ):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
