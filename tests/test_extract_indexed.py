"""An extraction split over the indices of an Indexed Job (mergejob/extraction/split.py):
each index's share of the groups, `submit --local --workers N`, index 0 waiting for the
others' markers, an index killed half-way resuming, Hub inputs fetched per index, `render`
and `plan` of a split extraction, and the whole flow on the real API server with the
kubelet stand-in. The adapter is byte for byte that of one pod (`mergejob extract`)."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import HfApi

import mergejob
from mergejob import output, settings
from mergejob.extraction.plan import plan_extraction
from mergejob.extraction.split import index_groups, run_extract_index
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.shards import RECORDS_DIR
from tests.support.hubserver.fixtures import SeededHubServer
from tests.support.kube.cluster import LocalCluster
from tests.support.kube.kubelet import FakeKubelet, IndicesInOrder
from tests.support.models import ModelFactory

RunCli = Callable[..., tuple[int, str, str]]
LAYERS = 6  # groups: the embeddings, 6 layers, the norm, lm_head

# `mergejob` in a subprocess whose groups each sleep first: slow enough to kill mid-way.
SLOW_MERGEJOB = (
    "import sys, time\n"
    "import mergejob.extraction.engine as engine\n"
    "real = engine.write_group\n"
    "def slow(*a, **k):\n"
    "    time.sleep(0.5)\n"
    "    return real(*a, **k)\n"
    "engine.write_group = slow\n"
    "from mergejob.cli import main\n"
    "sys.exit(main())\n"
)
MERGEJOB = "import sys\nfrom mergejob.cli import main\nsys.exit(main())\n"


@pytest.fixture(scope="module")
def pair(models: ModelFactory) -> tuple[Path, Path]:
    base = models.base(dtype=torch.float32, num_layers=LAYERS)
    return base, models.finetune(base, rank=4, norms=True)


def spec_data(pair: tuple[Path, Path], out: Path | str) -> dict[str, Any]:
    return {
        "base": str(pair[0]),
        "extract": {"finetuned": str(pair[1]), "max_rank": 8},
        "output": {"dir": str(out)},
    }


def write_spec(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def reference(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same extraction in one process (`mergejob extract`)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    mergejob.extract(mergejob.MergeSpec.model_validate(spec_data(pair, out)))
    return out


def recipe_core(folder: Path) -> dict[str, Any]:
    """mergejob.yaml less what differs between runs (where, when, how long, what resumed)."""
    document = yaml.safe_load((folder / "mergejob.yaml").read_text())
    document["output"].pop("dir", None)
    document["recipe"].pop("created", None)
    document["recipe"].pop("timings", None)
    document["recipe"]["engine"].pop("resumed_groups", None)
    return document


def assert_same_adapter(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert "adapter_model.safetensors" in names
    for name in names:
        if name != "mergejob.yaml":
            assert filecmp.cmp(a / name, b / name, shallow=False), name
    assert recipe_core(a) == recipe_core(b)


def _run(code: str, config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, "run", "--config", str(config), *args],
        env={**os.environ, "MERGEJOB_LOG_FORMAT": "text"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# ---------------------------------------------------------------------------------------
# The shares


def test_the_indices_share_the_groups_in_runs_balanced_by_bytes(pair: tuple[Path, Path]) -> None:
    spec = mergejob.MergeSpec.model_validate(spec_data(pair, "o"))
    assert spec.extract is not None
    plan = plan_extraction(spec.extract, pair[0], pair[1])
    sizes = plan.group_sizes()
    assert len(sizes) == len(plan.groups) >= LAYERS
    for count in (1, 2, 3, 4):
        shares = [index_groups(plan, count, i) for i in range(count)]
        assert sorted(g for share in shares for g in share) == list(range(len(sizes)))
        for share in shares:  # each a run of consecutive groups: its own stretch of shards
            assert share == list(range(share[0], share[-1] + 1)) if share else True
        loads = [sum(sizes[g] for g in share) for share in shares]
        assert max(loads) - min(loads) <= max(sizes)
        assert shares == [index_groups(plan, count, i) for i in range(count)]


# ---------------------------------------------------------------------------------------
# Indices as processes here


def test_submit_local_workers_gives_the_one_pod_adapter_byte_for_byte(
    pair: tuple[Path, Path], reference: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from mergejob.cli import main

    out = tmp_path / "out"
    config = write_spec(tmp_path / "spec.yaml", spec_data(pair, out))
    code = main(["submit", "--local", "--workers", "2", "--config", str(config)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert_same_adapter(out, reference)
    for i in range(2):  # each index extracted its own share; index 0 finished the adapter
        assert f"index {i}/2 done" in captured.out
    assert captured.out.count("adapter written to") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("out", "spec.yaml")] == []


def test_index_0_waits_for_the_marker_of_index_1_then_finishes_the_adapter(
    pair: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    partial = output.partial_dir_for(out)
    config = write_spec(tmp_path / "spec.yaml", spec_data(pair, out))
    first = _run(MERGEJOB, config, "--index", "0", "--index-count", "2")
    markers = partial / settings.INDEXES_DIR
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (markers / "2-0.json").is_file():
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.05)
    time.sleep(1.0)  # index 0 is done with its share: it waits, writes nothing more
    assert first.poll() is None, first.communicate()[0]
    assert not out.exists() and not (partial / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in markers.iterdir()) == ["2-0.json"]

    second = _run(MERGEJOB, config, "--index", "1", "--index-count", "2")
    log, _ = second.communicate(timeout=300)
    assert second.returncode == 0, log
    assert "index 1/2 done" in log and "adapter written to" not in log
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log
    assert "finaliser: waiting for index(es) [1] of 2" in log
    assert "index 0/2 done" in log and "adapter written to" in log
    assert not partial.exists()
    assert_same_adapter(out, reference)


def test_an_index_killed_midway_redoes_only_its_unfinished_groups(
    pair: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    partial = output.partial_dir_for(out)
    config = write_spec(tmp_path / "spec.yaml", spec_data(pair, out))
    args = ["--index", "1", "--index-count", "2"]
    spec = mergejob.MergeSpec.model_validate(spec_data(pair, out))
    assert spec.extract is not None
    share = len(index_groups(plan_extraction(spec.extract, pair[0], pair[1]), 2, 1))
    assert share >= 3
    worker = _run(SLOW_MERGEJOB, config, *args)
    records = partial / RECORDS_DIR
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.poll() is None:
        if records.is_dir() and len(list(records.rglob("*.json"))) >= 1:
            break
        time.sleep(0.02)
    assert worker.poll() is None, worker.communicate()[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.communicate()
    finished = len(list(records.rglob("*.json")))
    assert 1 <= finished < share
    assert not (partial / settings.INDEXES_DIR).exists()  # no marker: the index is not done

    again = _run(MERGEJOB, config, *args)
    log, _ = again.communicate(timeout=300)
    assert again.returncode == 0, log
    assert f"index 1/2 done: {share} group(s), {share - finished} extracted, {finished} " in log

    first = _run(MERGEJOB, config, "--index", "0", "--index-count", "2")
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log
    assert "adapter written to" in log
    assert not partial.exists()
    assert_same_adapter(out, reference)

    # Index 0 again, and the finaliser alone: the same adapter, nothing done again.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for extra in (["--index", "0", "--index-count", "2"], ["--finalize"]):
        rerun = _run(MERGEJOB, config, *extra)
        log, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, log
        assert "already finalised" in log or "already holds this extraction" in log, log
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_index_0_extracts_again_a_part_lost_after_its_index_finished(
    pair: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = mergejob.MergeSpec.model_validate(spec_data(pair, out))
    report = run_extract_index(spec, index=1, count=2)
    assert report.result is None and report.merged == report.shards
    lost = output.partial_dir_for(out) / report.shards[-1]
    lost.write_bytes(lost.read_bytes()[:-7] + b"damaged")  # its record no longer holds
    report = run_extract_index(spec, index=0, count=2, poll_seconds=0.05)
    assert report.result is not None and report.result.output_dir == out.absolute()
    assert_same_adapter(out, reference)


def test_run_with_the_finalize_flag_finishes_what_the_indices_left(
    pair: tuple[Path, Path], reference: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    out = tmp_path / "out"
    config = write_spec(tmp_path / "spec.yaml", spec_data(pair, out))
    code, stdout, err = run_cli("run", "--config", config, "--index", "1", "--index-count", "2")
    assert code == 0, err
    assert "index 1/2 done" in stdout and not out.exists()
    code, stdout, err = run_cli("run", "--config", config, "--finalize")
    assert code == 0, err
    assert "adapter written to" in stdout
    assert_same_adapter(out, reference)


# ---------------------------------------------------------------------------------------
# Hub inputs: each index fetches the shards of its own groups


def test_each_index_downloads_only_the_shards_its_groups_read(
    hub_env: SeededHubServer, models: ModelFactory, tmp_path: Path
) -> None:
    shard = "30KB"
    base = models.base(max_shard_size=shard, num_layers=LAYERS)
    tuned = models.finetune(base, rank=4, norms=True, rows_only=True, max_shard_size=shard)
    api = HfApi(token=hub_env.alice_token)
    for name, folder in (("base", base), ("tuned", tuned)):
        api.create_repo(f"org/{name}")
        api.upload_folder(repo_id=f"org/{name}", folder_path=folder)
    every = {
        f"org/{side}/{name}"
        for side, folder in (("base", base), ("tuned", tuned))
        for name in CheckpointIndex.from_folder(folder).shards
    }
    assert len(every) >= 8

    def data(b: str, t: str, out: Path) -> dict[str, Any]:
        return {"base": b, "extract": {"finetuned": t, "max_rank": 8}, "output": {"dir": str(out)}}

    local = tmp_path / "local"
    mergejob.extract(mergejob.MergeSpec.model_validate(data(str(base), str(tuned), local)))
    spec = mergejob.MergeSpec.model_validate(data("org/base", "org/tuned", tmp_path / "hub"))
    assert spec.extract is not None
    plan = plan_extraction(spec.extract, base, tuned)  # the Hub plan's groups, from the files

    def reads(index: int) -> set[str]:
        return {
            f"org/{side}/{Path(refs[n].path).name}"
            for g in index_groups(plan, 2, index)
            for m in plan.groups[g]
            for n in m.tensors
            for side, refs in (("base", plan.base), ("tuned", plan.tuned))
        }

    downloads = {}
    for index in (1, 0):  # each index in a fresh pod: its own, empty HF cache
        from huggingface_hub import constants

        hub_env.clear_requests()
        run_extract_index(spec, index=index, count=2, poll_seconds=0.05)
        downloads[index] = {
            f"{'org/base' if '/org/base/' in r.path else 'org/tuned'}/{r.path.rsplit('/', 1)[-1]}"
            for r in hub_env.requests
            if r.method == "GET" and r.status == 200 and r.path.endswith(".safetensors")
        }
        import shutil

        shutil.rmtree(constants.HF_HUB_CACHE, ignore_errors=True)
    for index in (0, 1):
        assert downloads[index] == reads(index), index
        assert len(downloads[index]) < len(every)
    assert downloads[0] | downloads[1] == every
    for name in ("adapter_model.safetensors", "extraction.json"):
        assert filecmp.cmp(local / name, tmp_path / "hub" / name, shallow=False), name


# ---------------------------------------------------------------------------------------
# The launcher: render, plan


def test_render_makes_an_indexed_job_of_an_extraction(
    pair: tuple[Path, Path], tmp_path: Path, run_cli: RunCli
) -> None:
    config = write_spec(tmp_path / "spec.yaml", spec_data(pair, "/cache/adapter"))
    code, out, err = run_cli("render", "--config", config, "--workers", 2, "--cache-pvc", "c")
    assert code == 0, err
    job = next(d for d in yaml.safe_load_all(out) if d["kind"] == "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mergejob", "run"]
    assert container["args"] == ["--index-count", "2"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "c"}
    # The pods write one output together: storage they share, as for a merge.
    code, _, err = run_cli("render", "--config", config, "--workers", 2)
    assert code == 2 and "--cache-pvc" in err


def test_plan_shows_each_index_share_of_an_extraction(
    pair: tuple[Path, Path], tmp_path: Path, run_cli: RunCli
) -> None:
    config = write_spec(tmp_path / "spec.yaml", spec_data(pair, tmp_path / "o"))
    code, out, err = run_cli("plan", "--config", config, "--index-count", 2)
    assert code == 0, err
    spec = mergejob.MergeSpec.model_validate(spec_data(pair, "o"))
    assert spec.extract is not None
    plan = plan_extraction(spec.extract, pair[0], pair[1])
    for i in range(2):
        share = index_groups(plan, 2, i)
        assert f"index {i}/2: groups {share[0]}-{share[-1]} ({len(share)}), reads " in out


# ---------------------------------------------------------------------------------------
# On the real API server


@pytest.mark.kube
def test_an_extraction_over_two_pods_runs_end_to_end_on_a_real_api_server(
    run_cli: RunCli,
    kubelet: FakeKubelet,
    kube_cluster: LocalCluster,
    pair: tuple[Path, Path],
    reference: Path,
    tmp_path: Path,
) -> None:
    ns = kubelet.namespace
    indices = IndicesInOrder()  # 1.20 has no Indexed Jobs: the stand-in hands them out
    kubelet.completion_index = indices
    seen = indices.seen
    out = tmp_path / "out"
    config = write_spec(tmp_path / "spec.yaml", spec_data(pair, out))
    cluster = ["--kubeconfig", str(kube_cluster.kubeconfig_path), "-n", ns]
    code, stdout, stderr = run_cli(
        "submit", "--config", config, "--name", "split-extract", "--workers", "2",
        "--cache-pvc", "shared", "--no-secret", *cluster,
    )  # fmt: skip
    assert code == 0, stderr + stdout + "\n".join(kubelet.errors)
    code, stdout, stderr = run_cli("wait", "split-extract", "--timeout", "240", *cluster)
    assert code == 0, stderr + stdout + "\n".join(kubelet.errors)
    assert sorted(seen.values()) == [0, 1]
    runs = [kubelet.wait_for_run(name) for name in seen]
    assert all(r.argv[1:] == ["run", "--index-count", "2"] for r in runs)
    assert_same_adapter(out, reference)
