"""The Indexed Job of `mergejob submit --workers N`: its objects against the Kubernetes 1.33
schemas (strict), the `indexed` kustomize overlay against render, and the whole flow on the
real 1.20 API server with the kubelet stand-in (which gives each pod its index: 1.20 drops
completionMode and the per-index fields, so the Job runs as a plain Job of N completions)."""

from __future__ import annotations

import filecmp
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s

from mergejob.launch.manifests import to_dict
from tests.support.kube.cluster import LocalCluster
from tests.support.kube.kubelet import FakeKubelet, IndicesInOrder
from tests.support.kustomize import RBAC_KINDS, differences, kustomize, normalise, render_command
from tests.support.models import ModelFactory

ROOT = Path(__file__).resolve().parents[1]
RunCli = Callable[..., tuple[int, str, str]]


def render(run_cli: RunCli, *extra: Any) -> list[dict[str, Any]]:
    code, out, err = run_cli(
        "render", "--base", "org/base", "--adapters", "org/adapter",
        "--output_dir", "/cache/merged", "--name", "split", *extra,
    )  # fmt: skip
    assert code == 0, err
    return list(yaml.safe_load_all(out))


def test_submit_workers_builds_an_indexed_job_valid_against_current_schemas(
    run_cli: RunCli,
) -> None:
    docs = render(run_cli, "--workers", "3", "--cache-pvc", "shared", "--backoff-limit", "2")
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)
    job = next(d for d in docs if d["kind"] == "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimitPerIndex"] == 2 and spec["maxFailedIndexes"] == 0
    assert "backoffLimit" not in spec
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == ["mergejob", "run"]
    assert container["args"] == ["--index-count", "3"]
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["cache"] == {"name": "cache", "persistentVolumeClaim": {"claimName": "shared"}}
    # The spec's engine.workers is untouched: --workers counts pods here.
    config = yaml.safe_load(
        next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    )
    assert "workers" not in (config.get("engine") or {})


def test_submit_workers_needs_shared_storage_and_the_stream_engine(run_cli: RunCli) -> None:
    code, _, err = run_cli("render", "--base", "b", "--adapters", "a", "--output_dir",
                           "/cache/m", "--workers", "2")  # fmt: skip
    assert code == 2 and "--cache-pvc" in err
    code, _, err = run_cli("render", "--base", "b", "--adapters", "a", "--output_dir",
                           "/cache/m", "--workers", "2", "--cache-pvc", "s", "--engine", "peft")  # fmt: skip
    assert code == 2 and "stream engine" in err


@pytest.mark.kube
def test_indexed_overlay_builds_the_objects_render_prints(
    kubectl: Path,
    run_cli: RunCli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = kustomize(kubectl, "overlays/indexed")
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    monkeypatch.chdir(ROOT)
    code, out, err = run_cli(*render_command("overlays/indexed"))
    assert code == 0, err
    rendered = {d["kind"]: d for d in yaml.safe_load_all(out)}
    built = {d["kind"]: d for d in docs if d["kind"] not in RBAC_KINDS | {"PersistentVolumeClaim"}}
    assert sorted(built) == sorted(rendered)
    for kind, doc in rendered.items():
        assert differences(normalise(built[kind]), normalise(doc)) == [], kind
    claim = rendered["Job"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "mergejob-shared"}} in claim


@pytest.mark.kube
def test_indexed_job_runs_end_to_end_on_a_real_api_server(
    run_cli: RunCli,
    kubelet: FakeKubelet,
    kube_cluster: LocalCluster,
    models: ModelFactory,
    tmp_path: Path,
) -> None:
    ns = kubelet.namespace
    base = models.base()
    adapter = models.adapter(base)
    # 1.20 has no Indexed Jobs: the stand-in hands out indices in the order pods appear.
    indices = IndicesInOrder()
    kubelet.completion_index = indices
    seen = indices.seen
    out = tmp_path / "out"
    cluster = ["--kubeconfig", str(kube_cluster.kubeconfig_path), "-n", ns]
    code, stdout, stderr = run_cli(
        "submit", "--base", base, "--adapters", adapter, "--output_dir", out,
        "--max-shard-size", "20KB", "--name", "split", "--workers", "3",
        "--cache-pvc", "shared", "--no-secret", "--follow", "--timeout", "240", *cluster,
    )  # fmt: skip
    assert code == 0, stderr + stdout + "\n".join(kubelet.errors)
    assert "phase    Succeeded" in stdout
    assert sorted(seen.values()) == [0, 1, 2]

    # --follow printed the three pods' logs at once, each line under its pod's prefix: the
    # other indices' shards appear before index 0, which waits for them, finalises.
    lines = stdout.splitlines()
    pods = {name: f"[{name}] " for name in seen}
    for name, prefix in pods.items():
        found = any(line.startswith(prefix) and "phase merge start" in line for line in lines)
        assert found, f"{name}: no prefixed log line in --follow's output:\n{stdout}"
    log_lines = [line for line in lines if line.startswith("[")]
    assert all(any(line.startswith(p) for p in pods.values()) for line in log_lines)
    for i in (1, 2):
        assert any(f"index {i}/3: shard" in line for line in lines), i
    committed = next(n for n, line in enumerate(lines) if "checked and committed" in line)
    others_done = [
        n
        for n, line in enumerate(lines)
        if "index 1/3: shard" in line or "index 2/3: shard" in line
    ]
    assert max(others_done) < committed

    # The stored Job: 1.20 kept completions and parallelism, dropped the Indexed fields.
    job = to_dict(k8s.BatchV1Api(kube_cluster.api_client()).read_namespaced_job("split", ns))
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert "completionMode" not in job["spec"]

    # Every pod merged its own share; index 0 waited and finalised.
    runs = [kubelet.wait_for_run(name) for name in seen]
    assert sorted(int(r.env["JOB_COMPLETION_INDEX"]) for r in runs) == [0, 1, 2]
    assert all(r.argv[1:] == ["run", "--index-count", "3"] for r in runs)
    code, status, err = run_cli("status", "split", *cluster)
    assert code == 0, err
    assert "3 indices" in status
    for i in range(3):
        assert f"  {i}  Succeeded" in status
    assert "finalised: merged model written to" in status

    import mergejob

    reference = tmp_path / "reference"
    mergejob.merge(
        mergejob.MergeSpec.model_validate(
            {"base": str(base), "adapters": [str(adapter)],
             "output": {"dir": str(reference), "max_shard_size": "20KB"}}
        )
    )  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in reference.iterdir())
    for name in names:
        if name != "mergejob.yaml":
            assert filecmp.cmp(out / name, reference / name, shallow=False), name
