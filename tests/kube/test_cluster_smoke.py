"""Proves the real-Kubernetes test infrastructure: no mocks, a real API server,
the real Job controller, and the fake kubelet running Pods as local processes."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from tests.kube.cluster import LocalCluster
from tests.kube.kubelet import FakeKubelet

pytestmark = pytest.mark.kube

# Reads a file of the ConfigMap volume two ways (argv path and the directory
# the rewriter exports as MERGEJOB_CONFIG), and env from a Secret/ConfigMap.
HELLO_PROGRAM = """
import os, sys, time
arg = open(sys.argv[1]).read().strip()
via_env = open(os.path.join(os.environ["MERGEJOB_CONFIG"], "greeting.txt")).read().strip()
print(arg, flush=True)
time.sleep(0.3)
print("same", arg == via_env, "token", os.environ["HF_TOKEN"], "mode", os.environ["MODE"], flush=True)
print("index", os.environ.get("JOB_COMPLETION_INDEX"), flush=True)
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


def job_manifest(name: str, exit_code: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": "3"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "merge",
                            "image": "mergejob:test",
                            "command": ["python", "-c", HELLO_PROGRAM],
                            "args": ["/etc/mergejob/greeting.txt"],
                            "env": [
                                {"name": "EXIT_CODE", "value": str(exit_code)},
                                {
                                    "name": "HF_TOKEN",
                                    "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
                                },
                                {
                                    "name": "MODE",
                                    "valueFrom": {
                                        "configMapKeyRef": {"name": "cfg", "key": "mode"}
                                    },
                                },
                            ],
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/mergejob"}],
                        }
                    ],
                    "volumes": [{"name": "config", "configMap": {"name": "cfg"}}],
                },
            },
        },
    }


def create_inputs(core: k8s.CoreV1Api, ns: str) -> None:
    core.create_namespaced_config_map(
        ns,
        k8s.V1ConfigMap(
            metadata=k8s.V1ObjectMeta(name="cfg"),
            data={"greeting.txt": "hello\n", "mode": "fast"},
        ),
    )
    core.create_namespaced_secret(
        ns,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="hf"),
            data={"token": base64.b64encode(b"s3cret").decode()},
        ),
    )


def wait_job_finished(batch: k8s.BatchV1Api, ns: str, name: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = batch.read_namespaced_job_status(name, ns)
        for cond in (job.status.conditions if job.status else None) or []:
            if cond.type in ("Complete", "Failed") and cond.status == "True":
                return str(cond.type)
        time.sleep(0.1)
    raise TimeoutError(f"job {ns}/{name} did not finish in {timeout}s")


def job_pod(core: k8s.CoreV1Api, ns: str, name: str) -> k8s.V1Pod:
    pods = core.list_namespaced_pod(ns, label_selector=f"job-name={name}").items
    assert len(pods) == 1, [p.metadata.name for p in pods if p.metadata]
    return pods[0]


def test_job_runs_to_completion_with_logs(kube_cluster: LocalCluster, kubelet: FakeKubelet) -> None:
    ns = kubelet.namespace
    api = kube_cluster.api_client()
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    create_inputs(core, ns)
    batch.create_namespaced_job(ns, job_manifest("hello"))

    # Follow the logs while the container runs, through the API server.
    deadline = time.monotonic() + 20
    pod_name = ""
    while time.monotonic() < deadline and not pod_name:
        pods = core.list_namespaced_pod(ns, label_selector="job-name=hello").items
        if pods and pods[0].spec and pods[0].spec.node_name and pods[0].metadata:
            pod_name = str(pods[0].metadata.name)
        else:
            time.sleep(0.05)
    assert pod_name, "the Job controller created no Pod, or it was not bound"
    followed = ""
    while time.monotonic() < deadline:
        try:
            followed = core.read_namespaced_pod_log(pod_name, ns, container="merge", follow=True)
            break
        except ApiException as e:  # 400 "waiting to start" until the process runs
            assert e.status == 400, e
            time.sleep(0.05)

    assert wait_job_finished(batch, ns, "hello") == "Complete"
    pod = job_pod(core, ns, "hello")
    assert pod.spec and pod.spec.node_name == kubelet.node_name
    assert pod.status and pod.status.phase == "Succeeded"
    term = pod.status.container_statuses[0].state.terminated  # type: ignore[index,union-attr]
    assert term is not None and term.exit_code == 0 and term.reason == "Completed"

    logs = core.read_namespaced_pod_log(pod_name, ns)
    assert logs.splitlines() == ["hello", "same True token s3cret mode fast", "index 3"]
    assert followed == logs
    assert core.read_namespaced_pod_log(pod_name, ns, tail_lines=1) == "index 3\n"

    run = kubelet.runs[(pod_name, "merge")]
    assert run.argv[0].endswith("python") and run.argv[-1].endswith("/greeting.txt")
    assert run.mounts["/etc/mergejob"] == run.process_env["MERGEJOB_CONFIG"]


def test_failing_job_fails(kube_cluster: LocalCluster, kubelet: FakeKubelet) -> None:
    ns = kubelet.namespace
    api = kube_cluster.api_client()
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    create_inputs(core, ns)
    batch.create_namespaced_job(ns, job_manifest("boom", exit_code=2))

    assert wait_job_finished(batch, ns, "boom") == "Failed"
    job = batch.read_namespaced_job_status("boom", ns)
    assert job.status and job.status.failed == 1 and not job.status.succeeded
    failed = [c for c in job.status.conditions or [] if c.type == "Failed"]
    assert failed[0].reason == "BackoffLimitExceeded"
    pod = job_pod(core, ns, "boom")
    assert pod.status and pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated  # type: ignore[index,union-attr]
    assert term is not None and term.exit_code == 2 and term.reason == "Error"
    assert "hello" in core.read_namespaced_pod_log(str(pod.metadata.name), ns)  # type: ignore[union-attr]


def test_missing_secret_fails_the_pod(kube_cluster: LocalCluster, kubelet: FakeKubelet) -> None:
    ns = kubelet.namespace
    batch = k8s.BatchV1Api(kube_cluster.api_client())
    batch.create_namespaced_job(ns, job_manifest("nosecret"))
    assert wait_job_finished(batch, ns, "nosecret") == "Failed"
    assert any("not found" in e for e in kubelet.errors)


def test_user_without_rights_gets_403(kube_cluster: LocalCluster, kube_namespace: str) -> None:
    core = k8s.CoreV1Api(kube_cluster.noperm_api_client())
    with pytest.raises(ApiException) as err:
        core.list_namespaced_config_map(kube_namespace)
    assert err.value.status == 403
    batch = k8s.BatchV1Api(kube_cluster.noperm_api_client())
    with pytest.raises(ApiException) as err:
        batch.create_namespaced_job(kube_namespace, job_manifest("nope"))
    assert err.value.status == 403


def test_server_side_dry_run(kube_cluster: LocalCluster, kube_namespace: str) -> None:
    api = kube_cluster.api_client()
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    name = f"dry-{uuid.uuid4().hex[:6]}"
    job = batch.create_namespaced_job(kube_namespace, job_manifest(name), dry_run="All")
    assert job.metadata and job.metadata.name == name
    assert job.spec and job.spec.template.spec.containers[0].name == "merge"  # type: ignore[union-attr]
    with pytest.raises(ApiException) as err:
        batch.read_namespaced_job(name, kube_namespace)
    assert err.value.status == 404
    bad = job_manifest("Bad_Name")
    with pytest.raises(ApiException) as err:
        batch.create_namespaced_job(kube_namespace, bad, dry_run="All")
    assert err.value.status == 422
    assert core.list_namespaced_pod(kube_namespace).items == []
