"""``mergejob verify``'s tolerances follow from the engine that made the output: a corruption
inside the ulp bound (a tensor scaled by 1.01) fails on the share of elements it moves, real
merges pass, and the logits check holds an untied base's own head."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergejob
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.verify import share_limit, verify_output

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCALED = "model.layers.1.mlp.down_proj.weight"  # every adapter changes it


def merge(base: Path, adapters: list[Path], out: Path, engine: str) -> Path:
    spec = {"base": str(base), "adapters": [str(a) for a in adapters],
            "output": {"dir": str(out)}, "engine": {"name": engine}}  # fmt: skip
    return mergejob.merge(mergejob.MergeSpec.model_validate(spec)).output_dir


@pytest.fixture(scope="module")
def five(models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five adapters on a bf16 base, merged by each engine."""
    base = models.base()
    adapters = [models.adapter(base, target_modules=TARGETS, seed=20 + i) for i in range(5)]
    root = tmp_path_factory.mktemp("five")
    return {engine: merge(base, adapters, root / engine, engine) for engine in ("stream", "peft")}


def altered(source: Path, dest: Path, name: str, change) -> Path:
    """A copy of ``source`` with ``change`` applied to tensor ``name``."""
    shutil.copytree(source, dest)
    shard = dest / CheckpointIndex.from_folder(dest).tensors[name].shard
    tensors = load_file(str(shard))
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return dest


def scale(factor: float):
    return lambda t: (t.float() * factor).to(t.dtype)


@pytest.mark.parametrize(("engine", "tolerance"), [("stream", 1), ("peft", 5)])
def test_a_real_merge_of_five_adapters_passes_with_the_engines_tolerance(
    five: dict[str, Path], engine: str, tolerance: int
) -> None:
    report = verify_output(five[engine], all_tensors=True, logits=False)
    assert report.ok, report.summary()
    assert report.tolerance_ulps == tolerance
    merged = [c for c in report.checks if c.kind == "merged"]
    assert merged and all(c.share_limit is not None for c in merged)
    assert all(0.0 <= c.share_off <= c.share_limit for c in merged)
    if engine == "stream":
        assert all(c.share_off == 0.0 for c in merged)  # on a CPU: the reference bit for bit


@pytest.mark.parametrize("engine", ["stream", "peft"])
def test_a_merged_tensor_scaled_by_1_01_fails(
    five: dict[str, Path], tmp_path: Path, run_cli, engine: str
) -> None:
    out = altered(five[engine], tmp_path / engine, SCALED, scale(1.01))
    report = verify_output(out, all_tensors=True, logits=False)
    failed = [c for c in report.checks if not c.ok]
    assert [c.name for c in failed] == [SCALED], report.summary()
    assert failed[0].share_off > 0.9  # nearly every element moved
    if engine == "peft":
        assert failed[0].max_ulps <= report.tolerance_ulps  # inside the ulp bound: the share
    code, stdout, _ = run_cli("verify", out, "--all", "--no-logits")
    assert code == 1
    first = stdout.splitlines()[0]
    assert first.startswith(f"FAILED: 1 of {len(report.checks)} tensors checked beyond tolerance")
    assert "logits: not run" in first
    assert f"  {SCALED}: " in stdout
    assert "of elements off by 1 ulp or more" in stdout


def test_a_slight_scaling_inside_one_ulp_fails_the_stream_engine_on_its_share(
    five: dict[str, Path], tmp_path: Path
) -> None:
    out = altered(five["stream"], tmp_path / "slight", SCALED, scale(1.003))
    report = verify_output(out, all_tensors=True, logits=False)
    failed = [c for c in report.checks if not c.ok]
    assert [c.name for c in failed] == [SCALED]
    assert failed[0].max_ulps <= 1 and failed[0].share_off > 0.2


def test_the_stream_engine_allows_one_ulp_whatever_the_number_of_adapters(
    five: dict[str, Path], tmp_path: Path
) -> None:
    def nudge(ulps: int):
        def change(t: torch.Tensor) -> torch.Tensor:
            t.view(torch.int16).view(-1)[5] += ulps
            return t

        return change

    one = altered(five["stream"], tmp_path / "one", SCALED, nudge(1))
    assert verify_output(one, all_tensors=True, logits=False).ok
    two = altered(five["stream"], tmp_path / "two", SCALED, nudge(2))
    report = verify_output(two, all_tensors=True, logits=False)
    assert [c.name for c in report.checks if not c.ok] == [SCALED]


def test_share_limits_follow_from_rounding() -> None:
    # The stream engine rounds once: 1 % (16-bit outputs), plus room for a small tensor.
    assert share_limit("stream", 5, torch.bfloat16, 1 << 20) == pytest.approx(0.01, abs=1e-3)
    assert share_limit("stream", 1, torch.bfloat16, 64) > 0.01
    assert share_limit("stream", 5, torch.float32, 1 << 20) is None
    # PEFT rounds once per adapter: sqrt(n / 12), none left to check from 12 adapters on.
    assert share_limit("peft", 5, torch.bfloat16, 1 << 20) == pytest.approx(0.645, abs=0.01)
    assert share_limit("peft", 12, torch.bfloat16, 1 << 20) is None


@pytest.mark.parametrize("tied", [False, True])
def test_logits_pass_for_a_head_lora_on_an_untied_and_a_tied_base(
    models, tmp_path: Path, tied: bool
) -> None:
    # mergekit-extract-lora adds a LoRA on lm_head; Llama-3-70B does not tie its head.
    base = models.base(tie_word_embeddings=tied)
    made = models.adapter(base, target_modules=["q_proj", "v_proj", "lm_head"], seed=7)
    # PEFT also saves the head it wrapped (lm_head.base_layer.weight), which would put the
    # base's head back over anything verify did to it; extracted adapters hold the LoRA only.
    adapter = shutil.copytree(made, tmp_path / "extracted")
    weights = adapter / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if "base_layer" not in k}
    assert any("lm_head.lora_B" in k for k in tensors)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    out = merge(base, [adapter], tmp_path / "out", "stream")
    report = verify_output(out, all_tensors=True)
    assert report.logits is not None and not report.logits.get("skipped"), report.logits
    assert report.ok, report.summary()
    assert report.summary().splitlines()[0].endswith("logits: ok")
