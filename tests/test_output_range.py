"""An output dtype that cannot hold a tensor stops the job (issue 14, item 3).

``--dtype float16`` on a bf16 base whose weights go beyond 65504 used to write ``inf`` and
exit 0. Now a merged or converted tensor that is not finite in the output dtype stops the
merge (exit 2, naming the tensor and the dtype that holds it) with nothing left where the
output goes, in both engines, and ``mergejob plan`` reports it as a problem.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergejob.io.checkpoint import CheckpointIndex
from mergejob.output import partial_dir_for
from tests.support.models import ModelFactory

RunCli = Callable[..., tuple[int, str, str]]
BIG = 70144.0  # beyond float16's 65504, well within bfloat16's range
HUGE_NAME = "model.norm.weight"  # no adapter touches it: converted, never merged


@pytest.fixture(scope="module")
def big_base(models: ModelFactory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 base with one weight float16 cannot hold, in a tensor adapters leave alone."""
    base = tmp_path_factory.mktemp("big") / "base"
    shutil.copytree(models.base(dtype=torch.bfloat16, seed=3), base)
    ref = CheckpointIndex.from_folder(base).tensors[HUGE_NAME]
    path = Path(ref.path)
    tensors = load_file(str(path))
    tensors[HUGE_NAME][3] = BIG
    save_file(tensors, str(path), metadata={"format": "pt"})
    return base


@pytest.fixture(scope="module")
def adapter(models: ModelFactory) -> Path:
    return models.adapter(models.base(dtype=torch.bfloat16, seed=3), target_modules=["q_proj"])


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not partial_dir_for(out).exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_converted_tensor_float16_cannot_hold_stops_the_merge_with_exit_2(
    big_base: Path, adapter: Path, tmp_path: Path, run_cli: RunCli, workers: int
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        "merge", "--base", big_base, "--adapters", adapter, "--output_dir", out,
        "--dtype", "float16", "--workers", str(workers), "--max-shard-size", "20KB",
    )  # fmt: skip
    assert code == 2, err
    assert HUGE_NAME in err and "7.014e+04" in err
    assert "beyond what float16 holds" in err and "--dtype bfloat16" in err
    assert "Traceback" not in err
    _assert_nothing_left(out)


def test_the_same_merge_in_bfloat16_keeps_the_weight(
    big_base: Path, adapter: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        "merge", "--base", big_base, "--adapters", adapter, "--output_dir", out,
        "--dtype", "bfloat16",
    )  # fmt: skip
    assert code == 0, err
    ref = CheckpointIndex.from_folder(out).tensors[HUGE_NAME]
    assert float(load_file(ref.path)[HUGE_NAME][3]) == BIG


def test_plan_reports_the_base_tensors_float16_cannot_hold(
    big_base: Path, adapter: Path, run_cli: RunCli
) -> None:
    job = ("--base", big_base, "--adapters", adapter)
    code, out, err = run_cli("plan", "--json", *job, "--dtype", "float16")
    plan = json.loads(out)
    assert code == 2, err
    found = [p for p in plan["problems"] if HUGE_NAME in p]
    assert found and "beyond what float16 holds" in found[0] and "bfloat16" in found[0]
    assert plan["ranges"]["dtype"] == "float16" and plan["ranges"]["bytes_read"] > 0
    assert not plan["ranges"]["unread"]
    code, text, _ = run_cli("plan", *job, "--dtype", "float16")
    assert code == 2 and "to check that float16 holds them" in text
    # The stored dtype (auto) holds every weight, and the plan reads no weight for it.
    code, out, err = run_cli("plan", "--json", *job)
    plan = json.loads(out)
    assert code == 0, plan["problems"]
    assert not any(HUGE_NAME in p for p in plan["problems"])
    assert plan["ranges"] == {}


def test_the_peft_engine_refuses_an_output_float16_cannot_hold(
    big_base: Path, adapter: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        "merge", "--base", big_base, "--adapters", adapter, "--output_dir", out,
        "--dtype", "float16", "--engine", "peft",
    )  # fmt: skip
    assert code == 2, err
    assert HUGE_NAME in err and "float16" in err and "--dtype bfloat16" in err
    assert "Traceback" not in err
    _assert_nothing_left(out)
