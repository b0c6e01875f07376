"""``mergejob verify``: recompute tensors from base + adapters and compare in ulps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergejob
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.verify import (
    expected_tensor,
    load_adapter,
    ulp_of,
    verify_output,
    weight_ulps,
)

# name -> (base kwargs, [(adapter kwargs, weight)], spec extras): a fidelity matrix in small.
MATRIX = {
    "lora": ({}, [({}, 1.0)], {}),
    "two-weighted": (
        {},
        [({}, 0.5), ({"target_modules": ["q_proj", "gate_proj", "down_proj"], "seed": 3}, -1.0)],
        {},
    ),
    "rslora-patterns": (
        {},
        [
            (
                {
                    "use_rslora": True,
                    "target_modules": ["q_proj", "k_proj", "o_proj"],
                    "rank_pattern": {"k_proj": 2},
                    "alpha_pattern": {"o_proj": 16},
                },
                1.0,
            )
        ],
        {},
    ),
    "gpt2-conv1d": ({"family": "gpt2"}, [({}, 1.0)], {}),
    "tied-embeddings": (
        {"tie_word_embeddings": True},
        [({"target_modules": ["q_proj", "embed_tokens", "lm_head"]}, 1.0)],
        {},
    ),
    "resized-vocab": (
        {"tie_word_embeddings": True},
        [
            (
                {
                    "modules_to_save": ["lm_head", "embed_tokens"],
                    "resize_vocab_to": 100,
                    "with_tokenizer": True,
                },
                1.0,
            )
        ],
        {},
    ),
    "dora-then-lora": ({}, [({"use_dora": True}, 1.0), ({"seed": 5}, 1.0)], {}),
    "float16-out": ({}, [({}, 1.0)], {"output": {"dtype": "float16"}}),
    "qwen2-bias": ({"family": "qwen2"}, [({}, 1.0)], {}),
    "peft-engine": ({}, [({}, 1.0), ({"seed": 6}, 1.0)], {"engine": {"name": "peft"}}),
}


def build(models, root: Path, name: str) -> tuple[Path, Path, list[Path]]:
    base_kwargs, adapters, extra = MATRIX[name]
    base = models.base(**base_kwargs)
    adapter_dirs = [models.adapter(base, **kwargs) for kwargs, _ in adapters]
    out = root / name
    spec = {
        "base": str(base),
        "adapters": [
            {"path": str(a), "weight": w} for a, (_, w) in zip(adapter_dirs, adapters, strict=True)
        ],
        "output": {"dir": str(out), **extra.get("output", {})},
        **{k: v for k, v in extra.items() if k != "output"},
    }
    mergejob.merge(mergejob.MergeSpec.model_validate(spec))
    return out, base, adapter_dirs


@pytest.fixture(scope="module")
def outputs(models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    return {name: build(models, root, name)[0] for name in MATRIX}


@pytest.mark.parametrize("name", list(MATRIX))
def test_verify_passes_on_every_matrix_output(outputs: dict[str, Path], name: str) -> None:
    report = verify_output(
        outputs[name], all_tensors=True, logits=name in ("lora", "resized-vocab")
    )
    assert report.ok, report.summary()
    assert len(report.checks) == report.tensors_total
    merged = [c for c in report.checks if c.kind == "merged"]
    assert merged, "the matrix output changes some tensors"
    if name != "peft-engine":
        assert report.tolerance_ulps == 1  # the stream engine rounds once, whatever it merges
        assert all(c.max_ulps == 0 and c.share_off == 0 for c in merged)  # bit-exact on a CPU
    if report.logits is not None:
        assert report.logits["ok"] and not report.logits.get("skipped"), report.logits


def alter(folder: Path, name: str, change) -> None:
    """Rewrite the shard holding ``name`` with ``change(tensor)`` applied."""
    index = CheckpointIndex.from_folder(folder)
    shard = folder / index.tensors[name].shard
    tensors = load_file(str(shard))
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, str(shard), metadata={"format": "pt"})


def step(tensor: torch.Tensor, index: int, ulps: int) -> torch.Tensor:
    """Move one element ``ulps`` representable values away from zero."""
    bits = tensor.view(torch.int16).view(-1)
    bits[index] += ulps
    return tensor


def test_one_ulp_beyond_the_tolerance_fails(
    outputs: dict[str, Path], tmp_path: Path, run_cli
) -> None:
    out = tmp_path / "lora"
    shutil.copytree(outputs["lora"], out)
    name = "model.layers.1.self_attn.v_proj.weight"
    alter(out, name, lambda t: step(t, 7, 2))
    code, stdout, _ = run_cli("verify", out, "--all", "--no-logits")
    assert code == 1
    assert "FAILED" in stdout
    assert f"{name}: 2 ulp (tolerance 1)" in stdout


def test_beyond_the_tolerance_of_several_adapters_fails(
    models, outputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "two"
    shutil.copytree(outputs["peft-engine"], out)  # PEFT rounds after each adapter
    _, adapters, _ = MATRIX["peft-engine"]
    base = models.base()
    name = "model.layers.0.self_attn.q_proj.weight"  # both adapters change it
    weights = [load_adapter(models.adapter(base, **kw), weight=w) for kw, w in adapters]
    base_tensor = load_file(str(base / CheckpointIndex.from_folder(base).tensors[name].shard))[name]
    expected = expected_tensor(name, base_tensor, weights)
    assert expected is not None
    want = expected.value.to(torch.bfloat16)
    got = load_file(str(out / CheckpointIndex.from_folder(out).tensors[name].shard))[name]
    # An element whose scale is its own magnitude: k representable steps there are k ulps;
    # and one PEFT's rounding left on the reference's value.
    own = ulp_of(expected.scale, torch.bfloat16) == ulp_of(want.float(), torch.bfloat16)
    own &= got == want
    index = int(torch.where(own.view(-1), want.float().abs().view(-1), -1).argmax())
    tolerance = verify_output(out, logits=False).tolerance_ulps
    assert tolerance == 2

    alter(out, name, lambda t: step(t, index, int(tolerance)))
    assert verify_output(out, all_tensors=True, logits=False).ok  # at the tolerance: passes
    alter(out, name, lambda t: step(t, index, 1))
    report = verify_output(out, all_tensors=True, logits=False)
    assert not report.ok
    failed = [c for c in report.checks if not c.ok]
    assert [c.name for c in failed] == [name]
    assert failed[0].max_ulps == pytest.approx(3.0)


def test_an_untouched_tensor_must_be_the_base_bytes(
    outputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "two"
    shutil.copytree(outputs["two-weighted"], out)
    name = "model.norm.weight"
    alter(out, name, lambda t: step(t, 0, 1))
    report = verify_output(out, all_tensors=True, logits=False)
    failed = [c for c in report.checks if not c.ok]
    assert [(c.name, c.kind) for c in failed] == [(name, "untouched")]
    assert "not byte-identical" in failed[0].note


def test_a_sample_covers_changed_untouched_and_embedding_tensors(outputs: dict[str, Path]) -> None:
    report = verify_output(outputs["tied-embeddings"], sample=6, logits=False)
    names = {c.name for c in report.checks}
    kinds = {c.kind for c in report.checks}
    assert kinds == {"merged", "untouched"}
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= names
    assert len(report.checks) < report.tensors_total


def test_verify_with_inputs_given_and_json(models, outputs, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "no-recipe"
    shutil.copytree(outputs["lora"], out)
    (out / "mergejob.yaml").unlink()
    code, _, err = run_cli("verify", out, "--no-logits")
    assert code == 2
    assert "mergejob.yaml: missing" in err
    base = models.base()
    code, stdout, err = run_cli(
        "verify", out, "--base", base, "--adapters", models.adapter(base), "--json", "--no-logits"
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["ok"] is True
    assert report["tolerance_ulps"] == 1  # the engine is unknown without a recipe
    assert all("max_ulps" in t for t in report["tensors"])


def test_weight_ulps_measure_at_the_weight_scale() -> None:
    want = torch.tensor([1.0, 1e-3, -2.0], dtype=torch.bfloat16)
    got = want.clone()
    got.view(torch.int16)[0] += 1
    assert weight_ulps(got, want).tolist() == [1.0, 0.0, 0.0]
    # A result near zero from a large weight: differences count in the weight's ulps.
    scale = torch.tensor([1.0, 1.0, 2.0])
    got2 = want.clone()
    got2[1] = got2[1] + 2**-8  # one bf16 ulp at 1.0 is 2**-7
    assert weight_ulps(got2, want, scale)[1].item() == pytest.approx(0.5, abs=0.01)
