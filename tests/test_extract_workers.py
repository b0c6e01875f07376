"""`mergejob extract --workers N` (engine.workers): N processes extracting the groups in
plan order, and the input gate of `run_extraction` (a streamed Hub model's hook).

What it must show: the adapter is byte for byte the one workers=1 writes (full SVD and
randomized); a killed worker stops the job and the rerun resumes from the finished groups;
a worker's error stops the job as that error (bad input stays exit 2) with the finished
groups kept; the gate is called in plan order with each group's files before they are read
(the files are not there until the gate puts them back); workers come from the spec, the
environment and the flag, and are refused with a GPU device.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mergejob.errors import InputError, MergeFailedError, ModelError
from mergejob.extraction.engine import run_extraction
from mergejob.extraction.plan import ExtractionPlan, plan_extraction
from mergejob.extraction.writer import part_name
from mergejob.io.shards import read_record, record_holds
from mergejob.spec import ExtractSpec, build_spec
from tests.test_extract import CLI, extract


@pytest.fixture(scope="module")
def pair(models: Any) -> tuple[Path, Path]:
    """Wide enough (hidden 256) for the randomized SVD; 5 groups (embed, 2 layers, norm,
    lm_head), no bias and nothing to check before the groups."""
    base = models.base(dtype=torch.float32, hidden_size=256, intermediate_size=512)
    return base, models.finetune(base, rank=8, ranks={"down_proj": 3}, seed=4)


@pytest.fixture(scope="module")
def qwen(models: Any) -> tuple[Path, Path]:
    """q/k/v with biases: the gate is first asked for the biases' files (compared first)."""
    base = models.base(family="qwen2", dtype=torch.float32)
    return base, models.finetune(base, rank=4)


def plan_of(base: Path, tuned: Path, **settings: Any) -> ExtractionPlan:
    spec = ExtractSpec.model_validate({"finetuned": str(tuned), **settings})
    return plan_extraction(spec, base, tuned)


def finished(plan: ExtractionPlan, partial: Path, group: int) -> bool:
    return record_holds(partial, read_record(partial, part_name(group)), plan.plan_id)


def wait_until(condition: Callable[[], bool], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def extraction_workers() -> list[Any]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("mergejob-extract")]


def part_bytes(plan: ExtractionPlan, partial: Path) -> list[bytes]:
    return [(partial / part_name(i)).read_bytes() for i in range(len(plan.groups))]


def no_checks(plan: ExtractionPlan) -> bool:
    """Nothing is compared before the groups: every gate call is a group's."""
    return not plan.checks and all(not m.checks and m.bias is None for m in plan.modules)


# ---------------------------------------------------------------------------------------
# The same bytes


@pytest.mark.parametrize(
    "flags",
    [(), ("--svd", "randomized", "--max-rank", 4, "--embed-lora")],
    ids=["full-svd", "randomized"],
)
def test_two_workers_write_the_adapter_of_one_byte_for_byte(
    pair: tuple[Path, Path], run_cli: CLI, tmp_path: Path, flags: Sequence[object]
) -> None:
    """The parent runs torch on every core, each worker on half of them: LAPACK's results
    depend on the thread count, so the engine runs it on one thread everywhere."""
    base, tuned = pair
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = extract(run_cli, base, tuned, one, *flags)
    assert code == 0, err
    code, _, err = extract(run_cli, base, tuned, two, "--workers", 2, *flags)
    assert code == 0, err
    assert "5/5" in err  # the parent's progress lines
    for name in ("adapter_model.safetensors", "adapter_config.json", "extraction.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert (two / "README.md").read_bytes() == (one / "README.md").read_bytes()  # the card
    recipe = yaml.safe_load((two / "mergejob.yaml").read_text())
    assert recipe["engine"]["workers"] == 2  # recorded, as a merge's recipe has it


# ---------------------------------------------------------------------------------------
# Failures and resume


def test_killed_workers_stop_the_job_and_the_rerun_resumes_from_the_finished_groups(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base, tuned = pair
    plan = plan_of(base, tuned)
    assert no_checks(plan) and len(plan.groups) == 5
    clean = tmp_path / "clean"
    run_extraction(plan, clean)
    partial = tmp_path / "partial"
    calls: list[list[Path]] = []

    def killing(paths: Sequence[Path]) -> None:
        calls.append(list(paths))
        if len(calls) == 3:  # before the third group: once two are done, kill every worker
            wait_until(lambda: finished(plan, partial, 0) and finished(plan, partial, 1))
            for worker in extraction_workers():
                os.kill(worker.pid, signal.SIGKILL)

    with pytest.raises(MergeFailedError, match=r"extraction worker \d died .*rerun to resume"):
        run_extraction(plan, partial, workers=2, gate=killing)
    assert not extraction_workers()  # none left behind
    calls.clear()
    outcome = run_extraction(plan, partial, workers=2, gate=lambda p: calls.append(list(p)))
    assert outcome.resumed == 2 and len(calls) == 3  # only the three unfinished groups
    assert part_bytes(plan, partial) == part_bytes(plan, clean)


@pytest.mark.parametrize("failure", ["truncated input", "unwritable part"])
def test_a_worker_error_stops_the_job_as_that_error_keeping_the_finished_groups(
    pair: tuple[Path, Path], tmp_path: Path, failure: str
) -> None:
    base, tuned = pair
    tuned = Path(shutil.copytree(tuned, tmp_path / "tuned"))  # truncated below
    plan = plan_of(base, tuned)
    assert no_checks(plan)
    partial = tmp_path / "partial"
    calls: list[list[Path]] = []

    def breaking(paths: Sequence[Path]) -> None:
        calls.append(list(paths))
        if len(calls) == 3:  # the third group fails in its worker once two are done
            wait_until(lambda: finished(plan, partial, 0) and finished(plan, partial, 1))
            if failure == "truncated input":
                for path in paths:
                    if path.is_relative_to(tuned):
                        os.truncate(path, 0)
            else:  # its part cannot be renamed into place
                (partial / part_name(2)).mkdir(parents=True)

    error: type[Exception] = ModelError if failure == "truncated input" else MergeFailedError
    with pytest.raises(error) as caught:
        run_extraction(plan, partial, workers=2, gate=breaking)
    if failure == "truncated input":  # the worker's own error: bad input, exit 2
        assert isinstance(caught.value, InputError) and caught.value.exit_code == 2
        assert "file ends before byte" in str(caught.value) and str(tuned) in str(caught.value)
    else:  # anything else: exit 1, naming the worker and the group
        assert caught.value.exit_code == 1
        label = plan.groups[2][0].module.rpartition(".")[0].rpartition(".")[0]
        assert f"(group 2, {label}): IsADirectoryError" in str(caught.value)
    assert finished(plan, partial, 0) and finished(plan, partial, 1)  # kept for the rerun
    assert not extraction_workers()


# ---------------------------------------------------------------------------------------
# The gate


@pytest.mark.parametrize("workers", [1, 2])
def test_the_gate_holds_each_group_in_plan_order_until_its_files_are_on_disk(
    qwen: tuple[Path, Path], tmp_path: Path, workers: int
) -> None:
    """Every shard of both models is taken away after planning; the gate puts back the
    files it is asked for (after a delay, as a download would): a read before the gate
    would find no file."""
    base = Path(shutil.copytree(qwen[0], tmp_path / "base"))
    tuned = Path(shutil.copytree(qwen[1], tmp_path / "tuned"))
    plan = plan_of(base, tuned)
    clean = tmp_path / "clean"
    run_extraction(plan, clean)
    away = tmp_path / "away"
    for folder in (base, tuned):
        for shard in folder.glob("*.safetensors"):
            (away / folder.name).mkdir(parents=True, exist_ok=True)
            shard.rename(away / folder.name / shard.name)
    partial = tmp_path / "partial"
    groups = plan.groups
    calls: list[tuple[set[Path], list[int], int]] = []

    def gate(paths: Sequence[Path]) -> None:
        done = [i for i in range(len(groups)) if (partial / part_name(i)).exists()]
        calls.append(({Path(p) for p in paths}, done, len(extraction_workers())))
        time.sleep(0.05)
        for path in paths:
            path = Path(path)
            if not path.exists():
                (away / path.parent.name / path.name).rename(path)

    outcome = run_extraction(plan, partial, workers=workers, gate=gate)
    assert part_bytes(plan, partial) == part_bytes(plan, clean)
    assert outcome.resumed == 0

    def files(names: Sequence[str]) -> set[Path]:
        return {Path(ref.path) for n in names for ref in (plan.base[n], plan.tuned[n])}

    biases = [n for n in plan.base if n.endswith(".bias")]
    assert biases  # q/k/v
    assert calls[0][0] == files(biases)  # before they are compared
    assert len(calls) == 1 + len(groups)
    for k, group in enumerate(groups):
        paths, done, _ = calls[1 + k]
        modules = {m.module for m in group}
        assert paths == files([n for n in plan.base if n.rpartition(".")[0] in modules]), k
        assert k not in done  # before it is read (and written)
    if workers == 2:
        assert max(live for _, _, live in calls[2:]) == 2  # two processes at work


def test_the_bias_decision_gates_the_weights_it_reads_beyond_the_biases(
    qwen: tuple[Path, Path], tmp_path: Path
) -> None:
    """A changed q bias makes the engine look for a changed LoRA layer without a bias (it
    would forbid lora_bias): each such weight it reads is gated first, so a streamed model
    is never read before its file is there."""
    from safetensors.torch import load_file, save_file

    from mergejob.io.checkpoint import CheckpointIndex

    base = Path(shutil.copytree(qwen[0], tmp_path / "base"))
    tuned = Path(shutil.copytree(qwen[1], tmp_path / "tuned"))
    bias = "model.layers.0.self_attn.q_proj.bias"
    shard = tuned / CheckpointIndex.from_folder(tuned).tensors[bias].shard
    stored = load_file(str(shard))
    stored[bias] = stored[bias] + 0.25
    save_file(stored, str(shard), metadata={"format": "pt"})
    plan = plan_of(base, tuned, skip_undecomposable=True)
    blocker = next(m for m in plan.decomposed if m.bias is None and m.weight is not None)
    away = tmp_path / "away"
    for folder in (base, tuned):
        for path in folder.glob("*.safetensors"):
            (away / folder.name).mkdir(parents=True, exist_ok=True)
            path.rename(away / folder.name / path.name)
    calls: list[set[Path]] = []

    def gate(paths: Sequence[Path]) -> None:
        calls.append({Path(p) for p in paths})
        for path in map(Path, paths):
            if not path.exists():
                (away / path.parent.name / path.name).rename(path)

    outcome = run_extraction(plan, tmp_path / "partial", gate=gate)
    assert plan.lora_bias is False  # o_proj / the MLP changed and cannot take a bias
    assert bias in outcome.dropped
    weight = blocker.weight
    assert weight is not None
    assert calls[1] == {Path(plan.base[weight].path), Path(plan.tuned[weight].path)}


def test_a_failing_gate_stops_the_job_with_its_error(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base, tuned = pair
    plan = plan_of(base, tuned)
    calls: list[list[Path]] = []

    def failing(paths: Sequence[Path]) -> None:
        calls.append(list(paths))
        if len(calls) == 3:
            raise MergeFailedError("download of model-00003.safetensors failed: 503")

    partial = tmp_path / "partial"
    with pytest.raises(MergeFailedError, match="download of model-00003"):
        run_extraction(plan, partial, workers=2, gate=failing)
    assert len(calls) == 3 and not extraction_workers()
    assert not finished(plan, partial, 2)


# ---------------------------------------------------------------------------------------
# Spec, environment, flags, plan


def test_workers_come_from_the_spec_the_environment_and_the_flag(tmp_path: Path) -> None:
    from mergejob.cli import build_parser
    from mergejob.cli.extract import spec_of
    from mergejob.cli.job import spec_for_run

    data = {"base": "b", "extract": {"finetuned": "t"}, "output": {"dir": "o"}}
    assert build_spec({**data, "engine": {"workers": 3}}).engine.workers == 3
    auto = build_spec({**data, "engine": {"workers": 3, "device": "auto"}})
    assert auto.engine.workers == 3  # the GPUs when there are some (one thread each)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    environ = {"MERGEJOB_CONFIG": str(path), "MERGEJOB_WORKERS": "4"}
    assert spec_for_run(build_parser().parse_args(["run"]), environ).engine.workers == 4
    args = build_parser().parse_args(["run", "--workers", "2"])
    assert spec_for_run(args, environ).engine.workers == 2  # flag over environment
    args = build_parser().parse_args(
        ["extract", "--base", "b", "--finetuned", "t", "--output_dir", "o", "--workers", "5"]
    )
    assert spec_of(args).engine.workers == 5


def test_workers_with_a_gpu_device_are_refused_in_one_line(
    pair: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned = pair
    out = tmp_path / "out"
    code, _, err = extract(run_cli, base, tuned, out, "--device", "cuda", "--workers", 2)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("mergejob: error: --workers: engine.workers: 2 processes are for")
    assert "each GPU gets one thread" in line
    assert not out.exists() and not (tmp_path / ".out.mergejob-partial").exists()


def test_the_plan_counts_each_workers_memory(
    pair: tuple[Path, Path], run_cli: CLI, tmp_path: Path
) -> None:
    base, tuned = pair
    plans = []
    for workers in (1, 3):
        code, out, err = extract(
            run_cli, base, tuned, tmp_path / "o", "--dry-run", "--json", "--workers", workers
        )
        assert code == 0, err
        plans.append(json.loads(out))
    one, three = plans
    assert (one["workers"], three["workers"]) == (1, 3)
    from mergejob.extraction.report import THROUGHPUT

    per_worker = one["memory_bytes"] - THROUGHPUT.base_rss  # the largest module
    assert three["memory_bytes"] == THROUGHPUT.base_rss + 3 * (THROUGHPUT.worker_rss + per_worker)
    code, out, _ = extract(run_cli, base, tuned, tmp_path / "o", "--dry-run", "--workers", 3)
    assert code == 0 and "(device cpu, 3 workers)" in out and "each of 3 workers" in out
