"""The launcher against a real API server (kube-apiserver + Job controller 1.20.2 on loopback,
tests/support/kube/) with a kubelet stand-in that runs each Pod's container here: `mergejob submit`
creates the objects, the controller makes the Pod, the stand-in runs the image's
`mergejob run` (mapped to this virtualenv) with the Pod's environment and its ConfigMap
mounted, and streams its output as the Pod's log.

Kubernetes 1.20 silently drops the fields added after it (podFailurePolicy, completionMode,
backoffLimitPerIndex...): the failure tests use backoffLimit 0 to fail at once as the
podFailurePolicy does on a current cluster, and the dry-run comparison lists exactly which
fields the server dropped and which it defaulted. tests/test_manifests*.py check those
fields against the 1.33 schemas.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from mergejob.launch.manifests import SPEC_SHA_ANNOTATION, to_dict
from tests.support.kube.cluster import LocalCluster
from tests.support.kube.kubelet import FakeKubelet
from tests.support.models import ModelFactory

pytestmark = pytest.mark.kube

ROOT = Path(__file__).resolve().parents[1]
RunCli = Callable[..., tuple[int, str, str]]
Kube = Callable[..., tuple[int, str, str]]


@pytest.fixture
def kube(run_cli: RunCli, kube_cluster: LocalCluster, kube_namespace: str) -> Kube:
    """``mergejob COMMAND ...`` against the test cluster's namespace, as its admin."""

    def run(command: str, *args: Any, kubeconfig: Path | None = None) -> tuple[int, str, str]:
        config = kubeconfig or kube_cluster.kubeconfig_path
        return run_cli(command, *args, "--kubeconfig", config, "-n", kube_namespace)

    return run


def job_flags(base: Path, adapters: list[Path] | list[str], output: Path) -> list[str]:
    return ["--base", str(base), "--adapters", *map(str, adapters), "--output_dir", str(output)]


def every_object(api: k8s.ApiClient, namespace: str) -> list[dict[str, Any]]:
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    found = {
        "ConfigMap": core.list_namespaced_config_map(namespace).items,
        "Job": batch.list_namespaced_job(namespace).items,
        "Pod": core.list_namespaced_pod(namespace).items,
    }
    # Items of a list come without their kind.
    return [{**to_dict(obj), "kind": kind} for kind, items in found.items() for obj in items]


def recipe_without_run_details(folder: Path) -> dict[str, Any]:
    """mergejob.yaml less what differs between two runs of one merge (where, when, how long)."""
    recipe = yaml.safe_load((folder / "mergejob.yaml").read_text())
    recipe["output"].pop("dir", None)
    run = recipe["recipe"]
    for key in ("created", "timings"):
        run.pop(key, None)
    run["engine"].pop("seconds", None)
    return recipe


def test_submit_runs_the_merge_in_the_cluster_like_a_local_merge(
    kube: Kube,
    kubelet: FakeKubelet,
    kube_cluster: LocalCluster,
    models: ModelFactory,
    tmp_path: Path,
    run_cli: RunCli,
) -> None:
    ns = kubelet.namespace
    base = models.base()
    adapter = models.adapter(base)
    canary = "hf_CANARY_k8s_do_not_leak_5f2b9c"
    api = kube_cluster.api_client()
    k8s.CoreV1Api(api).create_namespaced_secret(
        ns,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name="hub-token"),
            data={"write": base64.b64encode(canary.encode()).decode()},
        ),
    )
    out = tmp_path / "cluster-out"

    code, stdout, stderr = kube(
        "submit", *job_flags(base, [adapter], out), "--name", "e2e",
        "--secret", "hub-token", "--secret-key", "write", "--secret-required", "--follow",
    )  # fmt: skip
    assert code == 0, stderr + "\n".join(kubelet.errors)
    assert f"job {ns}/e2e submitted" in stdout
    assert "merged model written to" in stdout  # followed the pod's log
    assert "phase    Succeeded" in stdout

    code, stdout, stderr = kube("wait", "e2e")
    assert code == 0, stderr
    code, logs, stderr = kube("logs", "e2e")
    assert code == 0, stderr
    assert "phase merge start" in logs and f"merged model written to {out}" in logs
    code, status, _ = kube("status", "e2e")
    assert "phase    Succeeded" in status
    assert f"progress done: merged model written to {out}" in status
    code, listing, _ = kube("list")
    assert "e2e" in listing and "Succeeded" in listing

    # The pod ran the image's command with the Job's environment: the token resolved from
    # the Secret through the API, the spec from the ConfigMap mounted where MERGEJOB_CONFIG says.
    run = kubelet.wait_for_run("e2e")
    assert Path(run.argv[0]).name == "mergejob" and run.argv[1:] == ["run"]
    assert run.env["HF_TOKEN"] == canary
    config = Path(run.env["MERGEJOB_CONFIG"])
    assert config == Path(run.mounts["/etc/mergejob"]) / "config.yaml"
    assert yaml.safe_load(config.read_text())["output"]["dir"] == str(out)

    # The token is in no object: ConfigMap data, Job and Pod args, env, annotations, labels.
    objects = every_object(api, ns)
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Job", "Pod"}
    for obj in objects:
        assert canary not in json.dumps(obj), f"{obj['kind']} {obj['metadata']['name']}"
    assert canary not in logs
    # ... and nothing in the job names a token other than by reference to the Secret.
    job = next(o for o in objects if o["kind"] == "Job")
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "hub-token", "key": "write", "optional": False}}} in env  # fmt: skip

    # The ConfigMap belongs to the Job (deleted with it, TTL included).
    cm = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "e2e-spec"
    )
    assert cm["metadata"]["ownerReferences"][0]["name"] == "e2e"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]

    # The same job run here (--local) writes the same model.
    local = tmp_path / "local-out"
    code, _, stderr = run_cli("submit", "--local", *job_flags(base, [adapter], local))
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local.iterdir())
    for file in out.iterdir():
        if file.name != "mergejob.yaml":
            assert file.read_bytes() == (local / file.name).read_bytes(), file.name
    assert recipe_without_run_details(out) == recipe_without_run_details(local)


def test_bad_input_fails_the_job_and_status_says_why_with_only_the_launcher_role(
    kube: Kube,
    kubelet: FakeKubelet,
    kube_cluster: LocalCluster,
    models: ModelFactory,
    tmp_path: Path,
) -> None:
    """The failure path, run as the ServiceAccount that k8s/base binds to the launcher Role:
    those rights are enough for submit, wait, status, logs, list and cancel."""
    ns = kubelet.namespace
    api = kube_cluster.api_client()
    rbac = k8s.RbacAuthorizationV1Api(api)
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "k8s/base/rbac.yaml").read_text())}
    k8s.CoreV1Api(api).create_namespaced_service_account(ns, docs["ServiceAccount"])
    rbac.create_namespaced_role(ns, docs["Role"])
    docs["RoleBinding"]["subjects"][0]["namespace"] = ns
    rbac.create_namespaced_role_binding(ns, docs["RoleBinding"])
    launcher = ("--as", f"system:serviceaccount:{ns}:mergejob-launcher")

    missing = tmp_path / "no-such-adapter"
    code, stdout, stderr = kube(
        "submit", *job_flags(models.base(), [missing], tmp_path / "out"), "--name", "bad",
        # 1.20 drops podFailurePolicy (FailJob on exit 2): no retries, as it would do.
        "--backoff-limit", "0", *launcher,
    )  # fmt: skip
    assert code == 0, stderr

    code, stdout, stderr = kube("wait", "bad", *launcher)
    assert code == 2, stdout + stderr  # the pod's bad-input exit code, passed on
    assert "phase    Failed" in stderr

    code, status, stderr = kube("status", "bad", *launcher)
    assert code == 0, stderr
    assert "phase    Failed" in status
    assert "reason   BackoffLimitExceeded" in status
    assert "exit code 2 (Error): bad input: fix the spec or its inputs" in status
    assert "progress phase resolve failed" in status
    assert "last log lines of bad-" in status
    assert f"mergejob: error: adapter {missing}: no such folder" in status

    code, as_json, _ = kube("status", "bad", "--json", *launcher)
    report = json.loads(as_json)
    assert report["phase"] == "Failed" and report["failed_pod"]["exit_code"] == 2
    assert any("no such folder" in line for line in report["last_log_lines"])

    code, logs, _ = kube("logs", "bad", *launcher)
    assert "phase resolve failed" in logs
    code, listing, _ = kube("list", *launcher)
    assert "bad" in listing and "Failed" in listing

    code, stdout, stderr = kube("cancel", "bad", "--wait", *launcher)
    assert code == 0, stderr
    assert "deleted job" in stdout and "configmap bad-spec" in stdout
    assert every_object(api, ns) == []


def test_render_equals_what_the_server_would_create(
    kube: Kube, run_cli: RunCli, kube_cluster: LocalCluster, kube_namespace: str
) -> None:
    """render vs a server-side dry run of submit: every rendered field comes back unchanged,
    except the fields 1.20 drops; the server only adds its bookkeeping and defaults."""
    api = kube_cluster.api_client()
    try:
        k8s.SchedulingV1Api(api).create_priority_class(
            k8s.V1PriorityClass(metadata=k8s.V1ObjectMeta(name="mergejob-test"), value=1000)
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
    flags = [
        *job_flags(Path("/models/base"), ["org/adapter@v2"], Path("/cache/out")),
        "--device", "auto", "--name", "dry", "-n", kube_namespace, "--gpus", "8", "--cpu", "32",
        "--memory", "320Gi", "--ephemeral-storage", "400Gi", "--cache-pvc", "merge-cache",
        "--shm-size", "32Gi", "--toleration", "dedicated=ml:NoSchedule",
        "--node-selector", "pool=gpu", "--image-pull-secret", "regcred",
        "--priority-class", "mergejob-test", "--service-account", "merge-pod",
        "--active-deadline", "86400", "--label", "team=llm", "--env", "MERGEJOB_LOG_FORMAT=json",
    ]  # fmt: skip
    code, rendered_yaml, stderr = run_cli("render", *flags)
    assert code == 0, stderr
    code, server_yaml, stderr = run_cli(
        "submit", "--dry-run", "--kubeconfig", kube_cluster.kubeconfig_path, *flags
    )
    assert code == 0, stderr
    assert "nothing was created" in stderr
    assert k8s.BatchV1Api(api).list_namespaced_job(kube_namespace).items == []
    assert k8s.CoreV1Api(api).list_namespaced_config_map(kube_namespace).items == []

    rendered = list(yaml.safe_load_all(rendered_yaml))
    server = list(yaml.safe_load_all(server_yaml))
    assert [d["kind"] for d in server] == ["ConfigMap", "Job"]
    dropped_by_1_20 = {"spec.podFailurePolicy"}
    server_defaults = {
        "metadata.creationTimestamp",
        "metadata.uid",
        "metadata.resourceVersion",
        "spec.completions",
        "spec.parallelism",
        "spec.selector",
        "spec.template.metadata.labels.controller-uid",
        "spec.template.metadata.labels.job-name",
        "spec.template.spec.containers[0].terminationMessagePath",
        "spec.template.spec.dnsPolicy",
        "spec.template.spec.schedulerName",
        "spec.template.spec.terminationGracePeriodSeconds",
        "spec.template.spec.priority",
        "spec.template.spec.volumes[0].configMap.defaultMode",
        "spec.template.spec.serviceAccount",  # the deprecated alias of serviceAccountName
        "status",  # empty: a Job that does not exist yet
    }
    for mine, theirs in zip(rendered, server, strict=True):
        only_mine, only_theirs, changed = compare(flatten(mine), flatten(theirs))
        assert changed == {}, mine["kind"]
        assert {p for p in only_mine if not p.startswith(tuple(dropped_by_1_20))} == set()
        assert {p for p in only_theirs if not p.startswith(tuple(server_defaults))} == set()
    assert "spec.podFailurePolicy" in flatten(rendered[1]).__str__()


def flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` -> ``{"a.b[0]": 1}``."""
    if isinstance(doc, dict) and doc:
        return {
            path: value
            for key, item in doc.items()
            for path, value in flatten(item, f"{prefix}.{key}" if prefix else str(key)).items()
        }
    if isinstance(doc, list) and doc:
        return {
            path: value
            for i, item in enumerate(doc)
            for path, value in flatten(item, f"{prefix}[{i}]").items()
        }
    return {prefix: doc}


def compare(
    mine: dict[str, Any], theirs: dict[str, Any]
) -> tuple[set[str], set[str], dict[str, tuple[Any, Any]]]:
    changed = {p: (mine[p], theirs[p]) for p in mine.keys() & theirs.keys() if mine[p] != theirs[p]}
    return mine.keys() - theirs.keys(), theirs.keys() - mine.keys(), changed


def test_resubmitting_is_refused_clearly_and_replace_starts_over(
    kube: Kube, kube_cluster: LocalCluster, kube_namespace: str, tmp_path: Path
) -> None:
    """No kubelet here: the Pods stay Pending, which is all this needs."""
    ns = kube_namespace
    flags = job_flags(Path("/models/base"), ["org/a"], Path("/cache/out"))
    code, _, stderr = kube("submit", *flags, "--name", "twice")
    assert code == 0, stderr
    batch = k8s.BatchV1Api(kube_cluster.api_client())
    first = batch.read_namespaced_job("twice", ns)

    code, _, stderr = kube("submit", *flags, "--name", "twice")
    assert code == 2
    assert f"job {ns}/twice already exists with this same spec (active)" in stderr
    assert "--replace" in stderr and "Traceback" not in stderr

    other = job_flags(Path("/models/base"), ["org/b"], Path("/cache/out"))
    code, _, stderr = kube("submit", *other, "--name", "twice")
    assert code == 2
    assert "already exists (active) with a different spec" in stderr

    code, _, stderr = kube("submit", *other, "--name", "twice", "--replace")
    assert code == 0, stderr
    second = batch.read_namespaced_job("twice", ns)
    assert second.metadata.uid != first.metadata.uid
    assert (
        second.metadata.annotations[SPEC_SHA_ANNOTATION]
        != first.metadata.annotations[SPEC_SHA_ANNOTATION]
    )
    cm = k8s.CoreV1Api(kube_cluster.api_client()).read_namespaced_config_map("twice-spec", ns)
    assert "org/b" in cm.data["config.yaml"]

    code, status, _ = kube("status", "twice")
    assert "phase    Pending" in status

    # The same spec without --name gets the same (derived) name: caught as well.
    code, _, stderr = kube("submit", *flags)
    assert code == 0, stderr
    code, _, stderr = kube("submit", *flags)
    assert code == 2 and "already exists with this same spec" in stderr

    code, _, stderr = kube("status", "nope")
    assert code == 2 and f"no job 'nope' in namespace {ns}" in stderr


@pytest.mark.parametrize("cut_after", [300, 5])
def test_follow_survives_a_cut_log_stream_without_losing_or_repeating_a_line(
    kube: Kube, kubelet: FakeKubelet, models: ModelFactory, tmp_path: Path, cut_after: int
) -> None:
    """The pod's log stream ends early (a proxy, a kubelet restart): `logs -f` reads on from
    where it was, so its output holds the container's log once, whole, in order. (The job
    is finished first, so that the cut stream is certainly opened: a merge this small can end
    between two looks of a follower started with it.)"""
    base = models.base()
    adapter = models.adapter(base)
    name = f"cut{cut_after}"
    code, _, stderr = kube(
        "submit", *job_flags(base, [adapter], tmp_path / "out"), "--name", name,
        "--no-secret", "--wait",
    )  # fmt: skip
    assert code == 0, stderr + "\n".join(kubelet.errors)
    kubelet.cut_log_streams = 1
    kubelet.cut_after_bytes = cut_after
    code, stdout, stderr = kube("logs", name, "--follow")
    assert code == 0, stderr
    assert kubelet.log_streams_cut == 1
    log = kubelet.wait_for_run(name).output
    assert "merged model written to" in log
    assert log in stdout
    assert stdout.count("phase merge start") == 1


def test_user_without_rights_gets_a_403_naming_the_missing_permission(
    kube: Kube, kube_cluster: LocalCluster, kube_namespace: str
) -> None:
    noperm = kube_cluster.noperm_kubeconfig_path
    flags = job_flags(Path("/models/base"), ["org/a"], Path("/cache/out"))
    code, _, stderr = kube("submit", *flags, "--name", "j", kubeconfig=noperm)
    assert code == 2
    assert f"permission denied: you may not get jobs in namespace {kube_namespace}" in stderr
    assert 'User \\"mergejob-noperm\\" cannot get resource \\"jobs\\"' in stderr or (
        'User "mergejob-noperm" cannot get resource "jobs"' in stderr
    )
    assert "k8s/base/rbac.yaml" in stderr
    assert "Traceback" not in stderr
    code, _, stderr = kube("status", "j", kubeconfig=noperm)
    assert code == 2 and "you may not get jobs" in stderr
    code, _, stderr = kube("cancel", "j", kubeconfig=noperm)
    assert code == 2 and "you may not get jobs" in stderr


def test_status_and_follow_say_why_a_pod_waits(
    kube: Kube, kubelet: FakeKubelet, tmp_path: Path
) -> None:
    """A job whose token Secret is missing: the kubelet keeps its pod waiting, and the
    launcher says why instead of showing nothing."""
    flags = [*job_flags(Path("/models/base"), ["org/a"], tmp_path / "out"), "--secret-required"]
    code, _, stderr = kube("submit", *flags, "--name", "nosecret")
    assert code == 0, stderr
    core = k8s.CoreV1Api(kubelet.api_client)

    def waiting_reason() -> str | None:
        for pod in core.list_namespaced_pod(kubelet.namespace).items:
            for status in pod.status.container_statuses or []:
                if status.state and status.state.waiting:
                    return str(status.state.waiting.reason)
        return None

    deadline = time.monotonic() + 60  # the kubelet stand-in says why once it has tried
    while waiting_reason() != "CreateContainerConfigError" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert waiting_reason() == "CreateContainerConfigError", kubelet.errors

    code, _, stderr = kube("logs", "nosecret", "--follow", "--timeout", "3")
    assert code == 0, stderr
    assert "pod nosecret-" in stderr
    assert 'CreateContainerConfigError: secret "hf-token" not found' in stderr
    code, _, stderr = kube("wait", "nosecret", "--timeout", "2")
    assert code == 1
    assert (
        f"job {kubelet.namespace}/nosecret is still pending (CreateContainerConfigError" in stderr
    )
    assert "gave up waiting (--timeout)" in stderr

    code, status, _ = kube("status", "nosecret")
    assert code == 0
    assert "phase    Pending" in status
    assert 'waiting  CreateContainerConfigError: secret "hf-token" not found' in status


def test_follow_waits_for_a_pod_no_node_has_taken_yet(
    kube_cluster: LocalCluster, kube_namespace: str
) -> None:
    """The API server answers an unscheduled pod's log with an empty 200, not an error:
    the follower must take that for "not started yet" (and look again), not for a finished
    container with nothing to say, else that pod's whole log is lost. (Seen in a split
    merge's `submit --follow`: one index's pod was looked at before the kubelet bound it.)"""
    import io
    import threading

    from mergejob.launch import follow
    from mergejob.launch.cluster import CONTAINER_NAME, connect

    api = kube_cluster.api_client()
    core = k8s.CoreV1Api(api)
    program = "import time; print('first', flush=True); time.sleep(0.5); print('last')"
    pod = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="late"),
        spec=k8s.V1PodSpec(
            restart_policy="Never",
            containers=[
                k8s.V1Container(
                    name=CONTAINER_NAME, image="mergejob:test", command=["python", "-c", program]
                )
            ],
        ),
    )
    core.create_namespaced_pod(kube_namespace, pod)  # no kubelet yet: nobody binds it
    cluster = connect(kubeconfig=str(kube_cluster.kubeconfig_path), namespace=kube_namespace)
    out = io.BytesIO()
    try:
        assert follow._follow_pod(cluster, "late", out, tail=None) is False
        assert out.getvalue() == b""
        done = threading.Event()

        def follow_late() -> None:
            while not follow._follow_pod(cluster, "late", out, tail=None):
                time.sleep(0.2)
            done.set()

        thread = threading.Thread(target=follow_late, daemon=True)
        thread.start()
        with FakeKubelet.for_cluster(kube_cluster, kube_namespace):
            assert done.wait(60), "the follower never finished"
        assert out.getvalue() == b"first\nlast\n"
    finally:
        cluster.close()
        api.close()
