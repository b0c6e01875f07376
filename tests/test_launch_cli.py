"""The launcher's commands when there is no cluster to talk to, and its status report."""

from __future__ import annotations

import datetime as dt
import io
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client as k8s

from mergejob.launch.follow import _PrefixedLines
from mergejob.launch.status import JobStatus, PodReport, progress_from_log, summarize

RunCli = Callable[..., tuple[int, str, str]]
T0 = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def kubeconfig_for(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "ctx",
            }
        )
    )
    return path


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("command", [["status", "j"], ["list"], ["cancel", "j"], ["wait", "j"]])
def test_unreachable_cluster_is_a_clear_message_not_a_traceback(
    run_cli: RunCli, tmp_path: Path, command: list[str]
) -> None:
    server = f"https://127.0.0.1:{closed_port()}"
    code, _, err = run_cli(*command, "--kubeconfig", kubeconfig_for(tmp_path, server))
    assert code == 1
    assert f"cannot reach the Kubernetes API server at {server}: Connection refused" in err
    assert "--local" in err
    assert "Traceback" not in err and "MaxRetryError" not in err


def test_submit_to_an_unreachable_cluster_creates_nothing_and_says_so(
    run_cli: RunCli, tmp_path: Path
) -> None:
    server = f"https://127.0.0.1:{closed_port()}"
    code, _, err = run_cli(
        "submit", "--base", "org/b", "--adapters", "org/a", "--output_dir", "/o",
        "--kubeconfig", kubeconfig_for(tmp_path, server),
    )  # fmt: skip
    assert code == 1
    assert "cannot reach the Kubernetes API server" in err and "Traceback" not in err


def test_no_kubeconfig_at_all_says_what_to_do(
    run_cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = run_cli("status", "j")
    assert code == 2
    assert "no kubeconfig" in err and "mergejob render" in err and "--local" in err


def test_unknown_context_is_named(run_cli: RunCli, tmp_path: Path) -> None:
    config = kubeconfig_for(tmp_path, "https://127.0.0.1:1")
    code, _, err = run_cli("list", "--kubeconfig", config, "--context", "nope")
    assert code == 2
    assert f"kubeconfig {config}:" in err and "nope" in err


def test_local_has_nothing_to_dry_run(run_cli: RunCli) -> None:
    code, _, err = run_cli(
        "submit", "--local", "--dry-run", "--base", "b", "--adapters", "a", "--output_dir", "o"
    )
    assert code == 2 and "mergejob plan" in err


# ---------------------------------------------------------------------------------------
# Progress and status, from the objects the API server returns


def test_progress_follows_the_jobs_own_log_lines() -> None:
    lines = [
        "2025-01-02T03:04:05 INFO phase resolve start",
        "2025-01-02T03:04:05 INFO phase resolve done in 0.1s",
        "2025-01-02T03:04:05 INFO phase merge start engine=stream",
        "2025-01-02T03:04:09 INFO shard 3/30 done: model-00003-of-00030.safetensors (4.0s elapsed)",
    ]
    assert progress_from_log(lines) == "phase merge running, shard 3/30 done"
    assert progress_from_log([*lines, "... INFO phase merge failed after 5.0s"]) == (
        "phase merge failed"
    )
    assert progress_from_log([*lines, "merged model written to /cache/out in 9.0s"]) == (
        "done: merged model written to /cache/out"
    )
    assert progress_from_log([]) is None
    as_json = [
        json.dumps({"message": "phase write start", "phase": "write", "event": "start"}),
        "not json {",
    ]
    assert progress_from_log(as_json) == "phase write running"


def test_followed_pods_share_the_output_in_whole_prefixed_lines() -> None:
    out = io.BytesIO()
    lock = threading.Lock()
    a = _PrefixedLines(out, "[index 0] ", lock)
    b = _PrefixedLines(out, "[index 1] ", lock)
    a.write(b"phase merge st")  # a chunk of the stream ends mid-line
    b.write(b"index 1/2: shard 1/3 done\nindex 1/2: sha")
    a.write(b"art\n")
    b.write(b"rd 2/3 done\n")
    a.write(b"no newline at the end")
    a.close()
    b.close()
    assert out.getvalue().decode().splitlines() == [
        "[index 1] index 1/2: shard 1/3 done",
        "[index 0] phase merge start",
        "[index 1] index 1/2: shard 2/3 done",
        "[index 0] no newline at the end",
    ]


def make_job(**status: object) -> k8s.V1Job:
    return k8s.V1Job(
        metadata=k8s.V1ObjectMeta(
            name="j", namespace="ns", annotations={"mergejob.dev/spec-sha256": "ab" * 32}
        ),
        spec=k8s.V1JobSpec(
            backoff_limit=3, template=k8s.V1PodTemplateSpec(spec=k8s.V1PodSpec(containers=[]))
        ),
        status=k8s.V1JobStatus(start_time=T0, **status),
    )


def make_pod(
    name: str, phase: str, state: k8s.V1ContainerState | None = None, **status: object
) -> k8s.V1Pod:
    statuses = (
        [k8s.V1ContainerStatus(name="merge", image="i", image_id="", ready=False, restart_count=0, state=state)]
        if state
        else None
    )  # fmt: skip
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, creation_timestamp=T0),
        spec=k8s.V1PodSpec(containers=[], node_name="node"),
        status=k8s.V1PodStatus(phase=phase, container_statuses=statuses, **status),
    )


def failed_condition(reason: str, message: str) -> k8s.V1JobCondition:
    return k8s.V1JobCondition(
        type="Failed",
        status="True",
        reason=reason,
        message=message,
        last_transition_time=T0 + dt.timedelta(minutes=3),
    )


def test_status_of_a_job_failed_by_the_pod_failure_policy() -> None:
    job = make_job(
        failed=1,
        conditions=[
            failed_condition(
                "PodFailurePolicy",
                "Container merge for pod ns/j-abc failed with exit code 2 matching FailJob rule at index 0",
            )
        ],
    )
    terminated = k8s.V1ContainerStateTerminated(exit_code=2, reason="Error")
    pod = make_pod("j-abc", "Failed", k8s.V1ContainerState(terminated=terminated))
    logs = {"j-abc": ["INFO phase resolve start", "mergejob: error: adapter x: no such folder"]}
    status = summarize(job, [pod], logs)
    assert status.phase == "Failed" and status.exit_code == 2
    assert status.failed_pod == PodReport(
        name="j-abc",
        phase="Failed",
        exit_code=2,
        reason="Error",
        meaning="bad input: fix the spec or its inputs and resubmit (a retry cannot help)",
    )
    text = status.render()
    assert "finished 2025-01-02T03:07:05Z (after 3m00s)" in text
    assert (
        "reason   PodFailurePolicy: Container merge for pod ns/j-abc failed with exit code 2"
        in text
    )
    assert "  mergejob: error: adapter x: no such folder" in text


def test_status_of_an_out_of_memory_pod_uses_the_termination_message() -> None:
    job = make_job(failed=4, conditions=[failed_condition("BackoffLimitExceeded", "limit")])
    terminated = k8s.V1ContainerStateTerminated(
        exit_code=137, reason="OOMKilled", message="line 1\nshard 2/9 done\n"
    )
    pods = [
        make_pod(f"j-{i}", "Failed", k8s.V1ContainerState(terminated=terminated)) for i in range(4)
    ]
    status = summarize(job, pods, {})
    assert status.exit_code == 1
    assert status.failed_pod is not None and status.failed_pod.name == "j-3"
    assert "out of memory: raise --memory" in str(status.failed_pod.meaning)
    assert status.last_log_lines == ["line 1", "shard 2/9 done"]  # kept by FallbackToLogsOnError
    assert "(retries 3 of 3)" in status.render()


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (
            make_pod("j-a", "Pending", k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(
                reason="CreateContainerConfigError", message='secret "hf-token" not found'))),
            'CreateContainerConfigError: secret "hf-token" not found',
        ),
        (
            make_pod("j-a", "Pending", conditions=[k8s.V1PodCondition(
                type="PodScheduled", status="False", reason="Unschedulable",
                message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")]),
            "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        ),
        (
            make_pod("j-a", "Pending", k8s.V1ContainerState(waiting=k8s.V1ContainerStateWaiting(
                reason="ImagePullBackOff", message="Back-off pulling image"))),
            "ImagePullBackOff: Back-off pulling image",
        ),
    ],
)  # fmt: skip
def test_status_says_why_a_pod_is_not_running_yet(pod: k8s.V1Pod, expected: str) -> None:
    status = summarize(make_job(active=1), [pod], {})
    assert status.phase == "Pending" and status.exit_code is None
    assert status.pending == expected
    assert f"waiting  {expected}" in status.render()


def test_status_of_a_running_job_shows_its_progress() -> None:
    running = make_pod(
        "j-a", "Running", k8s.V1ContainerState(running=k8s.V1ContainerStateRunning(started_at=T0))
    )
    logs = {"j-a": ["phase merge start engine=stream", "shard 7/30 done: x (1.0s elapsed)"]}
    status = summarize(make_job(active=1), [running], logs)
    assert status.phase == "Running"
    assert status.progress == "phase merge running, shard 7/30 done"
    assert status.pending is None and status.failed_pod is None


def test_status_json_is_the_report() -> None:
    status = JobStatus(name="j", namespace="ns", phase="Succeeded", succeeded=1)
    data = status.to_dict()
    assert data["phase"] == "Succeeded" and data["failed_pod"] is None
    assert json.loads(json.dumps(data)) == data
    assert status.exit_code == 0
