"""The stream engine's machinery: workers, resume after kill -9, finalize, errors, CUDA."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergejob
from mergejob.engines import stream_compute
from mergejob.engines.stream import finalize, merge_plan
from mergejob.engines.worker import run_worker
from mergejob.errors import (
    DtypeRangeError,
    IncompatibleAdapterError,
    MergeFailedError,
    UnsupportedAdapterError,
)
from mergejob.io.shards import RECORDS_DIR, assign_shards, read_record
from mergejob.output import partial_dir_for
from mergejob.plan.work import build_plan

ROOT = Path(__file__).resolve().parent.parent
# A model wide enough for LoRA products to be split into several blocks of 64 rows.
WIDE = {"hidden_size": 256, "intermediate_size": 320, "vocab_size": 300, "num_layers": 1}


@pytest.fixture(scope="module")
def job(models: Any) -> tuple[Path, list[Path]]:
    """A bf16 Llama base and two adapters (attention; all-linear rsLoRA)."""
    base = models.base(family="llama", dtype=torch.bfloat16, seed=7)
    adapters = [
        models.adapter(base, target_modules=["q_proj", "v_proj"], seed=21),
        models.adapter(base, target_modules="all-linear", use_rslora=True, r=8, seed=22),
    ]
    return base, adapters


def _plan(base: Path, adapters: list[Path], shard: int = 20_000) -> Any:
    return build_plan(base, [(a, 1.0) for a in adapters], max_shard_size=shard)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder but the recipe (which holds timings)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name != "mergejob.yaml"
    }


def _spec(base: Path, adapters: list[Path], out: Path, **engine: Any) -> mergejob.MergeSpec:
    return mergejob.MergeSpec.model_validate(
        {
            "base": str(base),
            "adapters": [str(a) for a in adapters],
            "output": {"dir": str(out), "max_shard_size": "20KB"},
            "engine": {"name": "stream", **engine},
        }
    )


def test_workers_1_2_3_write_identical_bytes(job: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, adapters = job
    plan = _plan(base, adapters)
    assert len(plan.shards) >= 6
    outputs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        seen: list[Path] = []
        report = merge_plan(plan, out, workers=workers, on_shard_done=seen.append)
        assert report.extra["workers"] == workers
        assert report.extra["shards_merged"] == len(plan.shards)
        # on_shard_done: every finished shard once, from whichever worker wrote it.
        assert sorted(p.name for p in seen) == [s.name for s in plan.shards]
        outputs[workers] = _files(out)
    assert outputs[1] == outputs[2] == outputs[3]
    assert not (tmp_path / "w1" / RECORDS_DIR).exists()


def test_pipeline_runs_workers_and_layout_does_not_depend_on_them(
    job: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, adapters = job
    one = mergejob.merge(_spec(base, adapters, tmp_path / "one"))
    two = mergejob.merge(_spec(base, adapters, tmp_path / "two", workers=2))
    assert one.engine.engine == two.engine.engine == "stream"
    assert two.engine.extra["workers"] == 2
    assert _files(one.output_dir) == _files(two.output_dir)
    assert "model.safetensors.index.json" in one.files


def test_compute_lanes_do_not_change_bytes(models: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """Blocks computed by 1 or 3 threads at once, in any order, give the same bytes."""
    base = models.base(family="llama", dtype=torch.bfloat16, seed=8, **WIDE)
    adapter = models.adapter(base, target_modules="all-linear", r=8, seed=27)
    plan = _plan(base, [adapter], shard=10**9)
    monkeypatch.setattr(stream_compute, "CHUNK_BYTES", 100)  # blocks of 64 rows
    assert any(len(stream_compute.row_blocks(*t.shape)) > 2 for t in plan.tensors if t.changed)
    for lanes in (1, 3):
        run_worker(plan, tmp_path / f"t{lanes}", threads=lanes)
    name = plan.shards[0].name
    assert (tmp_path / "t1" / name).read_bytes() == (tmp_path / "t3" / name).read_bytes()


@pytest.mark.parametrize(
    ("family", "targets"),
    [
        ("llama", ["q_proj", "down_proj", "embed_tokens"]),  # rows; embedding (transposed)
        ("gpt2", ["c_attn", "c_proj", "c_fc"]),  # Conv1D: fan_in_fan_out (transposed)
    ],
)
def test_row_blocks_give_the_bytes_of_whole_tensors(
    family: str, targets: list[str], models: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """LoRA is applied to row blocks; any block size gives the bytes of the whole product
    (which is PEFT's own call, see test_stream_fidelity)."""
    shape = dict(WIDE)
    if family == "gpt2":
        shape.pop("intermediate_size")
    base = models.base(family=family, dtype=torch.float16, seed=8, **shape)
    adapter = models.adapter(base, target_modules=targets, r=8, seed=23)
    plan = _plan(base, [adapter], shard=10**9)
    run_worker(plan, tmp_path / "whole")
    blocked = 0
    for tensor in plan.tensors:
        if tensor.changed:
            rows, cols = tensor.shape[0], tensor.shape[1]
            assert stream_compute.row_blocks(rows, cols) == [(0, rows)]  # one block by default
    monkeypatch.setattr(stream_compute, "CHUNK_BYTES", 100)  # the thinnest blocks allowed
    for tensor in plan.tensors:
        if tensor.changed:
            blocks = stream_compute.row_blocks(tensor.shape[0], tensor.shape[1])
            assert all(b - a >= stream_compute.MIN_BLOCK for a, b in blocks)
            blocked += len(blocks) > 1
    assert blocked >= 2
    run_worker(plan, tmp_path / "blocks")
    name = plan.shards[0].name
    assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "blocks" / name).read_bytes()


def test_blas_sums_blocks_of_64_as_the_whole_product() -> None:
    """The assumption under MIN_BLOCK, on shapes LoRA merges meet (ranks 1 to 128)."""
    generator = torch.Generator().manual_seed(0)
    for rank in (1, 3, 8, 16, 64, 128):
        for out_f, in_f in ((64, 300), (300, 64), (1000, 777), (192, 2048)):
            a = torch.randn(rank, in_f, generator=generator)
            b = torch.randn(out_f, rank, generator=generator)
            full = b @ a
            for lo, hi in ((0, 64), (out_f - 64, out_f), (7, 7 + 70)):
                if hi <= out_f:
                    assert torch.equal(torch.mm(b[lo:hi], a), full[lo:hi])
            for lo, hi in ((0, 64), (in_f - 64, in_f), (13, 13 + 65)):
                assert torch.equal(torch.mm(b, a[:, lo:hi]), full[:, lo:hi])


def test_on_shard_done_sees_every_finished_shard_in_order(
    job: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, adapters = job
    plan = _plan(base, adapters)
    seen: list[tuple[str, bool]] = []
    merge_plan(plan, tmp_path / "out", on_shard_done=lambda p: seen.append((p.name, p.is_file())))
    assert seen == [(s.name, True) for s in plan.shards]


def test_indexed_workers_then_finalize(job: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """Pods of an Indexed Job: each runs its index; one step finalizes, checking records."""
    base, adapters = job
    plan = _plan(base, adapters)
    partial = tmp_path / "partial"
    count = 3
    run_worker(plan, partial, index=0, count=count)
    with pytest.raises(MergeFailedError, match="shards are not finished") as missing:
        finalize(plan, partial)
    unfinished = {plan.shards[i].name for i in assign_shards(plan.shard_sizes(), count)[1]}
    assert all(name in str(missing.value) for name in unfinished)
    for index in range(1, count):
        report = run_worker(plan, partial, index=index, count=count)
        assert report.merged  # each index writes only its shards
    records = finalize(plan, partial, verify_checksums=True)
    assert [r.name for r in records] == [s.name for s in plan.shards]
    merge_plan(plan, tmp_path / "local")
    assert _files(partial) == _files(tmp_path / "local")


def test_finalize_refuses_a_shard_that_differs_from_its_record(
    job: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, adapters = job
    plan = _plan(base, adapters)
    partial = tmp_path / "partial"
    run_worker(plan, partial)
    victim = partial / plan.shards[1].name
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(MergeFailedError, match="checksum differs"):
        finalize(plan, partial, verify_checksums=True)
    # A rerun redoes exactly that shard.
    report = run_worker(plan, partial)
    assert report.merged == [victim.name]
    finalize(plan, partial, verify_checksums=True)


def test_records_of_another_plan_are_not_trusted(
    job: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, adapters = job
    partial = tmp_path / "partial"
    run_worker(_plan(base, adapters), partial)
    weighted = build_plan(base, [(adapters[0], 0.5), (adapters[1], 1.0)], max_shard_size=20_000)
    report = merge_plan(weighted, partial)
    assert report.extra["shards_resumed"] == 0
    plain = _plan(base, adapters)
    assert weighted.plan_id != plain.plan_id


_KILL_SCRIPT = """
import os, signal, sys
import mergejob
from mergejob.io import writer as safetensors_io

kill_after = int(sys.argv[3])
finished = []
close, submit = safetensors_io.ShardWriter.close, safetensors_io.ShardWriter.submit

def counting_close(self):
    result = close(self)
    finished.append(self.path.name)
    return result

def killing_submit(self, data, slot=-1):
    if len(finished) >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)  # in the middle of the next shard
    return submit(self, data, slot)

safetensors_io.ShardWriter.close = counting_close
safetensors_io.ShardWriter.submit = killing_submit
spec = mergejob.MergeSpec.model_validate({
    "base": sys.argv[1],
    "adapters": sys.argv[4:],
    "output": {"dir": sys.argv[2], "max_shard_size": "20KB"},
})
mergejob.merge(spec)
"""


def test_kill_9_mid_merge_then_rerun_redoes_only_unfinished_shards(
    job: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, adapters = job
    reference = mergejob.merge(_spec(base, adapters, tmp_path / "reference"))
    total = reference.engine.extra["shards"]
    kill_after = 3
    out = tmp_path / "out"
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT))
    env = {**os.environ, "MERGEJOB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(base), str(out), str(kill_after), *map(str, adapters)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    partial = partial_dir_for(out)
    assert not out.exists() and partial.is_dir()
    plan = _plan(base, adapters)
    recorded = [s.name for s in plan.shards if read_record(partial, s.name) is not None]
    assert len(recorded) == kill_after
    result = mergejob.merge(_spec(base, adapters, out))
    assert result.engine.extra["shards_resumed"] == kill_after
    assert result.engine.extra["shards_merged"] == total - kill_after
    assert _files(result.output_dir) == _files(reference.output_dir)
    assert not partial.exists()
    assert not any(p.name.startswith(".") for p in result.output_dir.iterdir())


def test_a_crash_keeps_finished_shards_for_the_rerun(
    job: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: Any
) -> None:
    """A failure that is not bad input (here an I/O error) keeps the partial folder."""
    base, adapters = job
    out = tmp_path / "out"
    from mergejob.engines import worker as stream

    calls = {"n": 0}
    original = stream.write_shard

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(stream, "write_shard", failing)
    with pytest.raises(OSError, match="No space"):
        mergejob.merge(_spec(base, adapters, out))
    assert partial_dir_for(out).is_dir() and not out.exists()
    monkeypatch.setattr(stream, "write_shard", original)
    result = mergejob.merge(_spec(base, adapters, out))
    assert result.engine.extra["shards_resumed"] == 3


# ---------------------------------------------------------------------------------------
# Errors: clear, early, and nothing left behind


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not partial_dir_for(out).exists()


def test_adapter_tensor_mapping_to_no_base_tensor_stops_the_merge(
    models: Any, tmp_path: Path
) -> None:
    deeper = models.base(family="llama", dtype=torch.bfloat16, num_layers=3, seed=9)
    base = models.base(family="llama", dtype=torch.bfloat16, seed=9)
    adapter = models.adapter(deeper, target_modules=["q_proj"], seed=24)
    out = tmp_path / "out"
    with pytest.raises(IncompatibleAdapterError) as error:
        mergejob.merge(_spec(base, [adapter], out))
    message = str(error.value)
    assert "maps to no base tensor" in message
    assert "model.layers.2.self_attn.q_proj.lora_A.weight" in message
    assert "model.layers.2.self_attn.q_proj.lora_B.weight" in message
    _assert_nothing_left(out)


def test_shape_mismatch_stops_the_merge(models: Any, tmp_path: Path) -> None:
    wider = models.base(family="llama", dtype=torch.bfloat16, intermediate_size=96, seed=9)
    base = models.base(family="llama", dtype=torch.bfloat16, seed=9)
    adapter = models.adapter(wider, target_modules=["up_proj"], seed=25)
    out = tmp_path / "out"
    with pytest.raises(
        IncompatibleAdapterError, match=r"do not fit model\.layers\.0\.mlp\.up_proj"
    ):
        mergejob.merge(_spec(base, [adapter], out))
    _assert_nothing_left(out)


def _poisoned(adapter: Path, dest: Path, value: float, scale: float = 1.0) -> Path:
    import shutil

    shutil.copytree(adapter, dest)
    path = dest / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key] * scale
    tensors[key][0, 0] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dest


def test_nan_in_adapter_factors_is_bad_input_naming_the_file_and_tensor(
    job: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from mergejob.errors import AdapterError

    base, adapters = job
    bad = _poisoned(adapters[0], tmp_path / "bad", float("nan"))
    out = tmp_path / "out"
    # Checked as the factors are read: bad input (exit 2), not a merge failure to retry.
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: tensor \S+lora_B"):
        mergejob.merge(_spec(base, [adapters[1], bad], out))
    _assert_nothing_left(out)


def test_fp16_overflow_stops_the_merge(models: Any, tmp_path: Path) -> None:
    """A merged tensor float16 cannot hold is bad input (exit 2: a retry overflows again),
    named with the dtype that holds it. A converted one: tests/test_output_range.py."""
    base = models.base(family="llama", dtype=torch.float16, seed=10)
    adapter = models.adapter(base, target_modules=["q_proj"], seed=26)
    bad = _poisoned(adapter, tmp_path / "big", 1e6, scale=1.0)
    out = tmp_path / "out"
    with pytest.raises(DtypeRangeError, match="beyond what float16 holds") as caught:
        mergejob.merge(_spec(base, [bad], out))
    assert caught.value.exit_code == 2
    assert "q_proj.weight" in str(caught.value) and "--dtype bfloat16" in str(caught.value)
    _assert_nothing_left(out)


def test_unsupported_peft_methods_point_to_the_peft_engine(models: Any, tmp_path: Path) -> None:
    from peft import IA3Config, LoHaConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = models.base(family="llama", dtype=torch.bfloat16, seed=9)
    configs = {
        "loha": LoHaConfig(target_modules=["q_proj"], r=4),
        "ia3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "bias": LoraConfig(target_modules=["q_proj"], bias="all"),
    }
    for name, config in configs.items():
        model = AutoModelForCausalLM.from_pretrained(str(base))
        folder = tmp_path / name
        get_peft_model(model, config).save_pretrained(str(folder))
        out = tmp_path / f"out-{name}"
        with pytest.raises(UnsupportedAdapterError, match="--engine peft"):
            mergejob.merge(_spec(base, [folder], out))
        _assert_nothing_left(out)


def test_progress_is_logged_per_shard_without_a_terminal(
    job: tuple[Path, list[Path]], tmp_path: Path, caplog: Any
) -> None:
    base, adapters = job
    plan = _plan(base, adapters)
    with caplog.at_level(logging.INFO, logger="mergejob.engines.stream"):
        merge_plan(plan, tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records if "done:" in r.getMessage()]
    assert len(lines) == len(plan.shards)
    assert lines[-1].startswith(f"shard {len(plan.shards)}/{len(plan.shards)} done")


# ---------------------------------------------------------------------------------------
# GPUs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.cuda
@needs_cuda
def test_cuda_matches_cpu_within_one_step(job: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """cuBLAS sums B @ A in another order than the CPU's BLAS (TF32 off), which can move a
    rounding by one step; tensors without LoRA are byte-identical."""
    from tests.support.tensors import load_folder, steps_apart

    torch.backends.cuda.matmul.allow_tf32 = False
    base, adapters = job
    plan = _plan(base, adapters)
    merge_plan(plan, tmp_path / "cpu")
    merge_plan(plan, tmp_path / "gpu", device="cuda:0")
    cpu, gpu = load_folder(tmp_path / "cpu"), load_folder(tmp_path / "gpu")
    for tensor in plan.tensors:
        if tensor.changed:
            assert int(steps_apart(cpu[tensor.name], gpu[tensor.name]).max()) <= 1
        else:
            assert torch.equal(
                cpu[tensor.name].view(torch.int16), gpu[tensor.name].view(torch.int16)
            )


@pytest.mark.cuda
@needs_cuda
def test_every_visible_gpu_gets_a_worker(job: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, adapters = job
    plan = _plan(base, adapters)
    report = merge_plan(plan, tmp_path / "all", device="cuda")
    assert report.extra["workers"] == torch.cuda.device_count()
    one = merge_plan(plan, tmp_path / "one", device="cuda:0")
    assert one.extra["workers"] == 1
    assert _files(tmp_path / "all") == _files(tmp_path / "one")
