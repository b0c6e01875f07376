"""`mergejob verify` of an extracted adapter (mergejob/extraction/verify.py).

A fresh extraction verifies (lossy and exact ranks, fp32 and bf16 factors, embeddings as
LoRA, GPT-2's Conv1D with lora_B biases); a factor changed by a small amount, a saved
(modules_to_save) tensor changed by one ulp, an error edited in extraction.json, a scale
changed through alpha_pattern, a fine-tune whose left-out tensor differs: exit 1 with a line
naming the module or tensor; inputs missing or changed, or no recipe: exit 2.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from mergejob.extraction.verify import error_tolerance

CLI = Callable[..., tuple[int, str, str]]
PREFIX = "base_model.model."
Q_PROJ = "model.layers.0.self_attn.q_proj"


def extract(run_cli: CLI, base: Path, tuned: Path, out: Path, *flags: object) -> Path:
    code, _, err = run_cli(
        "extract", "--base", base, "--finetuned", tuned, "--output_dir", out, *flags
    )
    assert code == 0, err
    return out


def failed_lines(out: str) -> list[str]:
    """The lines after the verdict and the tolerance line: one per failed item."""
    return out.strip().splitlines()[2:]


def edit_tensor(path: Path, key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Rewrite one tensor of a safetensors file in place (its metadata kept)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, str(path), metadata=metadata)


def copy_of(adapter: Path, tmp_path: Path) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(adapter, target)
    return target


@pytest.fixture(scope="module")
def exact(models: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An fp32 base, a fine-tune by a rank-4 update with its norms scaled, and the adapter
    extracted at rank 4 (each module's error is fp32 rounding, ~1e-7)."""
    from mergejob.cli import main

    base = models.base(dtype=torch.float32)
    tuned = models.finetune(base, rank=4, norms=True)
    out = tmp_path_factory.mktemp("exact") / "adapter"
    assert (
        main(["extract", "--base", str(base), "--finetuned", str(tuned), "--output_dir", str(out)])
        == 0
    )
    return base, tuned, out


# ---------------------------------------------------------------------------------------
# A fresh extraction verifies


@pytest.mark.parametrize(
    ("family", "flags"),
    [
        ("llama-exact", ()),
        ("llama-exact", ("--max-rank", 2)),  # lossy: errors ~0.57
        ("llama-bf16", ("--embeddings", "lora", "--dtype", "bfloat16", "--max-rank", 3)),
        ("gpt2", ("--max-rank", 3, "--svd", "randomized")),
    ],
)  # fmt: skip
def test_a_fresh_extraction_verifies(
    family: str, flags: tuple[object, ...], models: Any, run_cli: CLI, tmp_path: Path
) -> None:
    if family == "llama-exact":
        base = models.base(dtype=torch.float32)
        tuned = models.finetune(base, rank=4, norms=True)
    elif family == "llama-bf16":
        base = models.base()
        modules = ("q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head")
        tuned = models.finetune(base, rank=4, norms=True, modules=modules, rows_only=True)
    else:  # Conv1D layers (fan_in_fan_out), every bias shifted: lora_B biases, norms saved
        base = models.base(family="gpt2")
        tuned = models.finetune(
            base, modules=("c_attn", "c_proj", "c_fc"), rank=4, rows_only=True, biases=True
        )
    adapter = extract(run_cli, base, tuned, tmp_path / "adapter", *flags)
    code, out, err = run_cli("verify", adapter)
    assert code == 0, out + err
    verdict = out.splitlines()[0]
    assert verdict.startswith("OK: ") and "all agree" in verdict, out
    report = json.loads((adapter / "extraction.json").read_text())
    lora = sum(r["status"] == "extracted" for r in report["modules"])
    saved = len(json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] or [])
    assert f"lora: {lora} ok" in verdict and saved > 0 and "saved: " in verdict
    assert "config: 1 ok" in verdict and "file: 3 ok" in verdict
    code, out, _ = run_cli("verify", adapter, "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["task"] == "extract"
    for item in data["items"]:
        if item["kind"] == "lora":  # the bound holds with room: not a loose tolerance
            assert abs(item["error"] - item["reported"]) <= item["tolerance"] / 10, item
    if family == "gpt2":
        with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
            assert any(k.endswith(".lora_B.bias") for k in handle.keys())  # noqa: SIM118


def test_a_sample_recomputes_that_many_lora_modules(
    exact: tuple[Path, Path, Path], run_cli: CLI
) -> None:
    code, out, err = run_cli("verify", exact[2], "--sample", 3)
    assert code == 0, out + err
    assert "a sample of 3 of the 8 LoRA modules; lora: 3 ok" in out.splitlines()[0]


def test_the_tolerance_is_the_fp32_rounding_bound() -> None:
    # rank 32, ‖B‖‖A‖ = ‖ΔW‖ (one direction), no residual, 1e6 elements: γ_32 (1 + u) + γ_64.
    tolerance = error_tolerance(32, 1.0, 0.0, 1.0, 10**6)
    gamma = 32 * 2.0**-24 / (1 - 32 * 2.0**-24)
    assert gamma * (1 + 2.0**-24) < tolerance < gamma * (1 + 1e-6)
    assert error_tolerance(4, 2.0, 0.0, 0.0, 100) == 0.0  # ΔW = 0: the error must be 0


# ---------------------------------------------------------------------------------------
# Tampered adapters: exit 1, naming what is wrong


def test_a_factor_changed_by_a_small_amount_fails_naming_the_module(
    exact: tuple[Path, Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    adapter = copy_of(exact[2], tmp_path)

    def nudge(a: torch.Tensor) -> torch.Tensor:
        a[0] *= 1 + 1e-4  # one row of lora_A, by 0.01 %
        return a

    edit_tensor(adapter / "adapter_model.safetensors", f"{PREFIX}{Q_PROJ}.lora_A.weight", nudge)
    code, out, err = run_cli("verify", adapter)
    assert code == 1, out + err
    assert out.startswith("FAILED: ")
    lines = failed_lines(out)
    module_line = next(line for line in lines if line.startswith(f"  {Q_PROJ}: relative error"))
    assert "extraction.json reports" in module_line and "> tolerance" in module_line
    assert "  adapter_model.safetensors: sha256 differs from the recipe's" in lines
    # Every other module still agrees: only q_proj of layer 0 (and the file) is named.
    assert len([line for line in lines if "relative error" in line]) == 1


def test_a_saved_tensor_changed_by_one_ulp_fails_naming_it(
    exact: tuple[Path, Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    adapter = copy_of(exact[2], tmp_path)
    name = "model.norm.weight"

    def one_ulp(t: torch.Tensor) -> torch.Tensor:
        t[0] = torch.nextafter(t[0], torch.tensor(float("inf"), dtype=t.dtype))
        return t

    edit_tensor(adapter / "adapter_model.safetensors", PREFIX + name, one_ulp)
    code, out, err = run_cli("verify", adapter)
    assert code == 1, out + err
    line = next(line for line in failed_lines(out) if line.startswith(f"  {name}: "))
    assert "not the fine-tune's bytes" in line and "1 element(s) differ" in line


def test_an_edited_report_error_fails_naming_the_module(
    exact: tuple[Path, Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    adapter = copy_of(exact[2], tmp_path)
    path = adapter / "extraction.json"
    report = json.loads(path.read_text())
    row = next(r for r in report["modules"] if r["module"] == Q_PROJ)
    row["error"] += 1e-5  # ~50 x the module's rounding bound
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    code, out, err = run_cli("verify", adapter)
    assert code == 1, out + err
    line = next(line for line in failed_lines(out) if line.startswith(f"  {Q_PROJ}: "))
    assert f"extraction.json reports {row['error']:.6g}" in line
    assert "  extraction.json: sha256 differs from the recipe's" in failed_lines(out)


def test_a_scale_changed_in_alpha_pattern_fails_naming_the_module(
    exact: tuple[Path, Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    """PEFT applies lora_alpha / r of the module (alpha_pattern): verify does too."""
    adapter = copy_of(exact[2], tmp_path)
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["alpha_pattern"] = {Q_PROJ: config["r"] * 1.001}
    path.write_text(json.dumps(config, indent=2))
    code, out, _ = run_cli("verify", adapter)
    assert code == 1
    line = next(line for line in failed_lines(out) if line.startswith(f"  {Q_PROJ}: "))
    assert "relative error" in line
    other = "model.layers.1.self_attn.q_proj"  # the pattern is the full name: not this one
    assert not any(line.startswith(f"  {other}: ") for line in failed_lines(out))


def test_a_config_that_misses_a_saved_module_fails(
    exact: tuple[Path, Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    adapter = copy_of(exact[2], tmp_path)
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["modules_to_save"].remove("model.norm")
    config["target_modules"] = [t for t in config["target_modules"] if t != "o_proj"]
    path.write_text(json.dumps(config, indent=2))
    code, out, _ = run_cli("verify", adapter)
    assert code == 1
    lines = [line for line in failed_lines(out) if line.startswith("  adapter_config.json: ")]
    assert lines[1] == "  adapter_config.json: sha256 differs from the recipe's"
    line = lines[0]
    assert "target_modules misses 2 module(s) the adapter has factors for" in line
    assert "model.layers.0.self_attn.o_proj" in line
    assert "modules_to_save lists" in line


def test_a_left_out_tensor_that_differs_fails_naming_it(
    exact: tuple[Path, Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    """k_proj is equal in both models, so the adapter leaves it out; against a fine-tune
    whose k_proj differs (given with --finetuned), that is named."""
    base, tuned, adapter = exact
    other = tmp_path / "other-tuned"
    shutil.copytree(tuned, other)
    name = "model.layers.1.self_attn.k_proj.weight"
    index = json.loads((other / "model.safetensors.index.json").read_text())
    edit_tensor(other / index["weight_map"][name], name, lambda t: t * 1.01)
    code, out, err = run_cli("verify", adapter, "--finetuned", other)
    assert code == 1, out + err
    lines = failed_lines(out)
    assert any(
        line.startswith(f"  {name}: differs between the base and the fine-tune") for line in lines
    ), out
    assert len(lines) == 1  # everything else matches the other copy
    code, out, _ = run_cli("verify", adapter, "--finetuned", tuned, "--base", base)
    assert code == 0, out


# ---------------------------------------------------------------------------------------
# Bad input: exit 2


def test_a_missing_input_exits_2(
    exact: tuple[Path, Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    adapter = copy_of(exact[2], tmp_path)
    path = adapter / "mergejob.yaml"
    recipe = yaml.safe_load(path.read_text())
    gone = tmp_path / "gone"
    recipe["extract"]["finetuned"]["path"] = str(gone)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, out, err = run_cli("verify", adapter)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == (
        f"mergejob: error: fine-tuned model {gone}: no such folder, and it is not a Hub repo "
        "id; check the path"
    )


def test_an_input_that_changed_since_the_recipe_exits_2(
    exact: tuple[Path, Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    adapter = copy_of(exact[2], tmp_path)
    path = adapter / "mergejob.yaml"
    recipe = yaml.safe_load(path.read_text())
    record = next(i for i in recipe["recipe"]["inputs"] if i["role"] == "base")
    first = sorted(record["files"])[0]
    record["files"][first] = "0" * 64  # as if the file had changed since
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, out, err = run_cli("verify", adapter)
    assert code == 2 and out == ""
    assert "the inputs differ from those" in err and f"/{first}: sha256" in err


def test_no_recipe_needs_both_inputs(
    exact: tuple[Path, Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned, _ = exact
    adapter = copy_of(exact[2], tmp_path)
    (adapter / "mergejob.yaml").unlink()
    code, _, err = run_cli("verify", adapter)
    assert code == 2
    assert "mergejob.yaml: missing; give --base and --finetuned to verify" in err
    code, out, err = run_cli("verify", adapter, "--base", base, "--finetuned", tuned)
    assert code == 0, out + err
    assert "file:" not in out.splitlines()[0]  # no recipe: no recorded sha256 to compare


def test_merge_flags_on_an_extracted_adapter_exit_2(
    exact: tuple[Path, Path, Path], run_cli: CLI
) -> None:
    code, _, err = run_cli("verify", exact[2], "--adapters", "x")
    assert code == 2
    assert "--adapters: " in err and "is an extracted adapter" in err
