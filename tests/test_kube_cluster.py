"""Proves the real-Kubernetes test infrastructure: no mocks, a real API server,
the real Job controller, and the fake kubelet running Pods as local processes."""

from __future__ import annotations

import base64
import sys
import time
import uuid
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tests.support.kube.cluster import LocalCluster
from tests.support.kube.kubelet import FakeKubelet

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


def as_job(manifest: dict[str, Any]) -> k8s.V1Job:
    return k8s.V1Job.model_validate(manifest)


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
    batch.create_namespaced_job(ns, as_job(job_manifest("hello")))

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
    assert run.argv[0] == sys.executable
    assert run.argv[-1] == run.mounts["/etc/mergejob"] + "/greeting.txt"
    assert run.mounts["/etc/mergejob"] == run.process_env["MERGEJOB_CONFIG"]


def test_failing_job_fails(kube_cluster: LocalCluster, kubelet: FakeKubelet) -> None:
    ns = kubelet.namespace
    api = kube_cluster.api_client()
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    create_inputs(core, ns)
    batch.create_namespaced_job(ns, as_job(job_manifest("boom", exit_code=2)))

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


def test_missing_secret_waits_like_a_kubelet(
    kube_cluster: LocalCluster, kubelet: FakeKubelet
) -> None:
    ns = kubelet.namespace
    api = kube_cluster.api_client()
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    core.create_namespaced_config_map(
        ns,
        k8s.V1ConfigMap(
            metadata=k8s.V1ObjectMeta(name="cfg"),
            data={"greeting.txt": "hello\n", "mode": "fast"},
        ),
    )
    batch.create_namespaced_job(ns, as_job(job_manifest("late")))

    # As on a real node: Pending, container waiting with CreateContainerConfigError.
    deadline = time.monotonic() + 20
    waiting = None
    while time.monotonic() < deadline and waiting is None:
        pods = core.list_namespaced_pod(ns, label_selector="job-name=late").items
        statuses = (pods[0].status.container_statuses if pods and pods[0].status else None) or []
        if statuses and statuses[0].state and statuses[0].state.waiting:
            waiting = statuses[0].state.waiting
        else:
            time.sleep(0.05)
    assert waiting is not None
    assert waiting.reason == "CreateContainerConfigError"
    assert waiting.message == 'secret "hf" not found'
    assert pods[0].status and pods[0].status.phase == "Pending"
    events = core.list_namespaced_event(ns).items
    assert any(e.reason == "Failed" and 'secret "hf" not found' in str(e.message) for e in events)

    # The kubelet retries: once the Secret exists the Job completes.
    core.create_namespaced_secret(
        ns,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="hf"),
            data={"token": base64.b64encode(b"late").decode()},
        ),
    )
    assert wait_job_finished(batch, ns, "late") == "Complete"
    assert "token late" in kubelet.wait_for_run("late").output


def test_user_without_rights_gets_403(kube_cluster: LocalCluster, kube_namespace: str) -> None:
    core = k8s.CoreV1Api(kube_cluster.noperm_api_client())
    with pytest.raises(ApiException) as err:
        core.list_namespaced_config_map(kube_namespace)
    assert err.value.status == 403
    batch = k8s.BatchV1Api(kube_cluster.noperm_api_client())
    with pytest.raises(ApiException) as err:
        batch.create_namespaced_job(kube_namespace, as_job(job_manifest("nope")))
    assert err.value.status == 403


def test_server_side_dry_run(kube_cluster: LocalCluster, kube_namespace: str) -> None:
    api = kube_cluster.api_client()
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    name = f"dry-{uuid.uuid4().hex[:6]}"
    job = batch.create_namespaced_job(kube_namespace, as_job(job_manifest(name)), dry_run="All")
    assert job.metadata and job.metadata.name == name
    assert job.spec and job.spec.template.spec.containers[0].name == "merge"  # type: ignore[union-attr]
    with pytest.raises(ApiException) as err:
        batch.read_namespaced_job(name, kube_namespace)
    assert err.value.status == 404
    bad = job_manifest("Bad_Name")
    with pytest.raises(ApiException) as err:
        batch.create_namespaced_job(kube_namespace, as_job(bad), dry_run="All")
    assert err.value.status == 422
    assert core.list_namespaced_pod(kube_namespace).items == []


def test_on_failure_restarts_in_place(kube_cluster: LocalCluster, kubelet: FakeKubelet) -> None:
    """restartPolicy OnFailure: the container is restarted in the same Pod."""
    ns = kubelet.namespace
    api = kube_cluster.api_client()
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    program = (
        "import os, sys\n"
        "marker = os.path.join(sys.argv[1], 'tried')\n"
        "first = not os.path.exists(marker)\n"
        "open(marker, 'w').close()\n"
        "print('attempt', 'first' if first else 'again', flush=True)\n"
        "sys.exit(3 if first else 0)\n"
    )
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "retry"},
        "spec": {
            "backoffLimit": 2,
            "template": {
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [
                        {
                            "name": "main",
                            "image": "mergejob:test",
                            "command": ["python", "-c", program, "/scratch"],
                            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                        }
                    ],
                    "volumes": [{"name": "scratch", "emptyDir": {}}],
                }
            },
        },
    }
    batch.create_namespaced_job(ns, as_job(job))
    assert wait_job_finished(batch, ns, "retry") == "Complete"
    pod = job_pod(core, ns, "retry")
    status = pod.status.container_statuses[0]  # type: ignore[index,union-attr]
    assert status.restart_count == 1
    assert pod.status and pod.status.phase == "Succeeded"
    assert kubelet.wait_for_run("retry").output == "attempt first\nattempt again\n"


def test_deleting_a_running_job_kills_its_process(
    kube_cluster: LocalCluster, kubelet: FakeKubelet
) -> None:
    ns = kubelet.namespace
    api = kube_cluster.api_client()
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    kubelet.completion_index = lambda pod: 7  # as if the Job were Indexed (1.20 has none)
    program = "import os, time; print('index', os.environ['JOB_COMPLETION_INDEX'], flush=True); time.sleep(120)"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "sleeper"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "mergejob:test",
                            "command": ["python", "-c", program],
                        }
                    ],
                }
            },
        },
    }
    batch.create_namespaced_job(ns, as_job(job))
    deadline = time.monotonic() + 20
    run = None
    while time.monotonic() < deadline and (run is None or "index" not in run.output):
        run = next((r for r in kubelet.runs.values() if r.pod.startswith("sleeper")), None)
        time.sleep(0.05)
    assert run is not None and run.output == "index 7\n"
    pod = job_pod(core, ns, "sleeper")
    assert pod.status and pod.status.phase == "Running"

    batch.delete_namespaced_job("sleeper", ns, propagation_policy="Foreground")
    while time.monotonic() < deadline:
        if not core.list_namespaced_pod(ns).items and not batch.list_namespaced_job(ns).items:
            break
        time.sleep(0.1)
    assert core.list_namespaced_pod(ns).items == []
    assert batch.list_namespaced_job(ns).items == []
    assert run.exit_code is not None and run.exit_code != 0  # killed by SIGTERM
