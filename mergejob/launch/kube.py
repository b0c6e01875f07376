"""Submit, watch and cancel merge jobs through the Kubernetes API.

Everything here talks to the cluster the kubeconfig (or the in-cluster service account)
names, with the objects of :mod:`mergejob.launch.manifests`. Failures come back as
:class:`~mergejob.errors.MergeJobError`s that say what to do: a cluster that does not
answer, a permission the user lacks (verb, resource, namespace), a job that already exists.

Example::

    from mergejob.launch import kube
    from mergejob.launch.manifests import LaunchOptions, build_objects

    cluster = kube.connect(context="gpu-cluster")
    objects = build_objects(spec, LaunchOptions(namespace=cluster.namespace, gpus=8))
    kube.submit(cluster, objects)
    status = kube.wait_for_job(cluster, objects.name)
    print(status.render())
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, cast

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

from mergejob.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, InputError, MergeJobError
from mergejob.launch.manifests import APP_NAME, CONTAINER_NAME, SPEC_SHA_ANNOTATION, JobObjects

log = logging.getLogger("mergejob")

T = TypeVar("T")

# Connect and read timeouts of ordinary requests, and of a followed log: a log that is
# silent that long is opened again (from its new lines on).
REQUEST_TIMEOUT = (10.0, 60.0)
STREAM_TIMEOUT = (10.0, 300.0)
# Once a Job is finished, how long its pods' log streams are still read to their end.
FINISH_GRACE = 60.0
# Reopenings in a row of a pod's log stream that bring nothing before following it stops.
FOLLOW_RETRIES = 5
IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
LAUNCHER_RBAC_HINT = "k8s/base/rbac.yaml"


# ---------------------------------------------------------------------------------------
# Errors


class ClusterUnreachableError(MergeJobError):
    """The API server did not answer (down, wrong address, network, TLS)."""


class KubeConfigError(InputError):
    """No usable kubeconfig or in-cluster config, or a context that is not there."""


class PermissionDeniedError(InputError):
    """The API server refused the user (401: who you are; 403: what you may do)."""


class AlreadyExistsError(InputError):
    """An object of that name is already there (409)."""


class JobExistsError(AlreadyExistsError):
    """A job of that name is already there."""


class NotFoundError(InputError):
    """The object is not there (404)."""


class JobNotFoundError(NotFoundError):
    """No job of that name in the namespace."""


class InvalidObjectError(InputError):
    """The API server rejected an object as invalid (422) or the request as bad (400)."""


class KubeApiError(MergeJobError):
    """Any other answer of the API server (5xx, 429 after retries, ...)."""


@dataclass(frozen=True)
class Action:
    """What the launcher was doing when a request failed, for the error message."""

    verb: str
    resource: str
    namespace: str | None = None
    name: str | None = None

    def describe(self) -> str:
        """``create configmaps/x in namespace ns``."""
        what = f"{self.resource}/{self.name}" if self.name else self.resource
        where = f" in namespace {self.namespace}" if self.namespace else ""
        return f"{self.verb} {what}{where}"


def _server_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"{exc.status} {exc.reason}".strip()


def api_error(exc: ApiException, action: Action, server: str) -> MergeJobError:
    """Turn an ``ApiException`` into an error whose message says what to do next."""
    message = _server_message(exc)
    if exc.status == 401:
        return PermissionDeniedError(
            f"{server} rejected the credentials (401 Unauthorized) while trying to "
            f"{action.describe()}: the kubeconfig's token or certificate is invalid or "
            "expired; log in to the cluster again or pick another --context"
        )
    if exc.status == 403:
        return PermissionDeniedError(
            f"permission denied: you may not {action.verb} {action.resource}"
            f"{f' in namespace {action.namespace}' if action.namespace else ''} "
            f"(the API server said: {message}). The launcher needs create, get, list, watch "
            "and delete on jobs; create, get, patch and delete on configmaps; get, list, "
            "watch and delete on pods; get on pods/log. Ask a cluster admin to bind the Role "
            f"in {LAUNCHER_RBAC_HINT} in that namespace, or use --namespace for one where "
            "you have those rights"
        )
    if exc.status == 404:
        return NotFoundError(f"{action.describe()}: not found ({message})")
    if exc.status == 409:
        return AlreadyExistsError(f"{action.describe()}: already exists ({message})")
    if exc.status in (400, 422):
        return InvalidObjectError(f"the API server rejected {action.describe()}: {message}")
    return KubeApiError(f"{action.describe()} failed: {message} (HTTP {exc.status})")


def unreachable_error(exc: Exception, server: str) -> ClusterUnreachableError:
    """A connection failure (refused, DNS, TLS) as one line that says what to check."""
    reason = getattr(exc, "reason", None) or exc
    text = " ".join(str(reason).split())
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(
        r"(certificate verify failed[^'\")]*)", text
    )
    detail = match.group(1).strip() if match else text[:200]
    return ClusterUnreachableError(
        f"cannot reach the Kubernetes API server at {server}: {detail}. Check that the "
        "cluster is up and that the kubeconfig names it (--kubeconfig, --context; "
        "`kubectl cluster-info`), or run the job on this machine with `mergejob submit --local`"
    )


# ---------------------------------------------------------------------------------------
# Connecting


@dataclass
class Cluster:
    """An API client plus the namespace the launcher works in."""

    api: k8s.ApiClient
    namespace: str
    server: str

    @property
    def core(self) -> k8s.CoreV1Api:
        """The core (v1) API."""
        return k8s.CoreV1Api(self.api)

    @property
    def batch(self) -> k8s.BatchV1Api:
        """The batch (v1) API."""
        return k8s.BatchV1Api(self.api)

    def call(self, action: Action, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, with the API's failures turned into mergejob errors."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise api_error(exc, action, self.server) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise unreachable_error(exc, self.server) from None

    def close(self) -> None:
        """Close the client's connection pool."""
        self.api.close()


def connect(
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    namespace: str | None = None,
    as_user: str | None = None,
) -> Cluster:
    """A client for the cluster of ``kubeconfig`` (else ``$KUBECONFIG``, else
    ``~/.kube/config``) and ``context``, or the in-cluster service account when there is
    no kubeconfig inside a pod. The namespace defaults to the context's, else ``default``.
    ``as_user`` impersonates a user or ``system:serviceaccount:NS:NAME`` (like ``--as``).
    """
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    has_file = bool(kubeconfig) or any(Path(p).is_file() for p in path.split(os.pathsep) if p)
    if has_file:
        try:
            api = k8s_config.new_client_from_config(
                config_file=path, context=context, persist_config=False
            )
            contexts, active = k8s_config.list_kube_config_contexts(config_file=path)
        except ConfigException as exc:
            raise KubeConfigError(f"kubeconfig {path}: {exc}") from None
        except OSError as exc:
            raise KubeConfigError(f"kubeconfig {path}: cannot read it ({exc.strerror})") from None
        chosen = next((c for c in contexts if c.get("name") == context), active) or {}
        default_namespace = (chosen.get("context") or {}).get("namespace")
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = k8s.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except ConfigException as exc:
            raise KubeConfigError(f"in-cluster config: {exc}") from None
        api = k8s.ApiClient(configuration)
        try:
            default_namespace = Path(IN_CLUSTER_NAMESPACE_FILE).read_text().strip()
        except OSError:
            default_namespace = None
    else:
        raise KubeConfigError(
            f"no kubeconfig ({path} does not exist, KUBECONFIG is not set) and not inside a "
            "cluster: pass --kubeconfig FILE, or print the objects with `mergejob render`, "
            "or run the job here with `mergejob submit --local`"
        )
    if as_user:
        api.set_default_header("Impersonate-User", as_user)
    return Cluster(
        api=api,
        namespace=namespace or default_namespace or "default",
        server=str(api.configuration.host),
    )


# ---------------------------------------------------------------------------------------
# Submitting


def _read_job(cluster: Cluster, name: str) -> k8s.V1Job | None:
    try:
        return cluster.call(
            Action("get", "jobs", cluster.namespace, name),
            cluster.batch.read_namespaced_job,
            name,
            cluster.namespace,
        )
    except NotFoundError:
        return None


def _finished(job: k8s.V1Job) -> str | None:
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return str(condition.type)
    return None


def _exists_message(existing: k8s.V1Job, objects: JobObjects, namespace: str) -> str:
    name = objects.name
    old = ((existing.metadata.annotations if existing.metadata else None) or {}).get(
        SPEC_SHA_ANNOTATION
    )
    state = {"Complete": "finished", "Failed": "failed"}.get(_finished(existing) or "", "active")
    if old == objects.spec_sha256:
        return (
            f"job {namespace}/{name} already exists with this same spec ({state}): see it "
            f"with `mergejob status {name} -n {namespace}`, or add --replace to delete it "
            "and its pods and submit again"
        )
    what = f"spec sha256 {old[:12]}" if old else "a spec mergejob did not write"
    return (
        f"job {namespace}/{name} already exists ({state}) with a different spec ({what}, "
        f"this one {objects.spec_sha256[:12]}): choose another --name, or add --replace to "
        "delete the old job and its pods and submit this one"
    )


def submit(
    cluster: Cluster,
    objects: JobObjects,
    *,
    replace: bool = False,
    dry_run: bool = False,
) -> list[Any]:
    """Create the ConfigMap, then the Job, and make the Job own the ConfigMap (so deleting
    the Job, or its ``ttlSecondsAfterFinished``, removes both). Returns the objects as the
    server stored them; with ``dry_run``, as it would have (server-side dry run, nothing
    stored). An existing job of the same name is refused unless ``replace``."""
    ns = cluster.namespace
    name = objects.name
    config_map = objects.config_map
    cm_name = str(config_map.metadata.name)
    existing = _read_job(cluster, name)
    if existing is not None:
        if not replace:
            raise JobExistsError(_exists_message(existing, objects, ns))
        if dry_run:
            raise JobExistsError(
                f"job {ns}/{name} exists; a server-side dry run cannot check its replacement "
                "(the old job would have to be deleted first): dry-run under another --name"
            )
        log.info("replacing job %s/%s", ns, name)
        cancel(cluster, name, wait=True)
    if not dry_run:
        _remove_stale_config_map(cluster, cm_name, name)
    dry = "All" if dry_run else None
    created_cm = cluster.call(
        Action("create", "configmaps", ns, cm_name),
        cluster.core.create_namespaced_config_map,
        ns,
        config_map,
        dry_run=dry,
    )
    try:
        created_job = cluster.call(
            Action("create", "jobs", ns, name),
            cluster.batch.create_namespaced_job,
            ns,
            objects.job,
            dry_run=dry,
        )
    except BaseException:
        if not dry_run:
            _delete_quietly(cluster, "configmaps", cm_name)
        raise
    if not dry_run:
        created_cm = _adopt_config_map(cluster, cm_name, created_job) or created_cm
    return [created_cm, created_job]


def _adopt_config_map(cluster: Cluster, cm_name: str, job: k8s.V1Job) -> k8s.V1ConfigMap | None:
    owner = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job.metadata.name,
        "uid": job.metadata.uid,
    }
    try:
        return cluster.call(
            Action("patch", "configmaps", cluster.namespace, cm_name),
            cluster.core.patch_namespaced_config_map,
            cm_name,
            cluster.namespace,
            {"metadata": {"ownerReferences": [owner]}},
        )
    except PermissionDeniedError:
        log.warning(
            "configmap %s: not made owned by its job (no patch permission); "
            "`mergejob cancel` still deletes it",
            cm_name,
        )
        return None


def _remove_stale_config_map(cluster: Cluster, cm_name: str, job_name: str) -> None:
    """A ConfigMap of ours left without its Job (an earlier submit that failed half-way)."""
    try:
        cm = cluster.call(
            Action("get", "configmaps", cluster.namespace, cm_name),
            cluster.core.read_namespaced_config_map,
            cm_name,
            cluster.namespace,
        )
    except NotFoundError:
        return
    labels = (cm.metadata.labels if cm.metadata else None) or {}
    if labels.get("app.kubernetes.io/instance") != job_name:
        raise JobExistsError(
            f"configmap {cluster.namespace}/{cm_name} exists and is not mergejob's: "
            "choose another --name"
        )
    _delete_quietly(cluster, "configmaps", cm_name)


def _delete_quietly(cluster: Cluster, resource: str, name: str) -> None:
    delete = {
        "configmaps": cluster.core.delete_namespaced_config_map,
        "pods": cluster.core.delete_namespaced_pod,
    }[resource]
    with contextlib.suppress(NotFoundError):
        cluster.call(
            Action("delete", resource, cluster.namespace, name), delete, name, cluster.namespace
        )


# ---------------------------------------------------------------------------------------
# Cancelling


@dataclass
class Cancelled:
    """What ``cancel`` deleted."""

    job: str
    pods: list[str] = field(default_factory=list)
    config_maps: list[str] = field(default_factory=list)


def cancel(cluster: Cluster, name: str, *, wait: bool = False, timeout: float = 120.0) -> Cancelled:
    """Delete the Job (foreground: its pods go first), its Pods and its spec ConfigMap.
    With ``wait``, return once the Job and its Pods are gone."""
    ns = cluster.namespace
    job = read_job(cluster, name)
    pods = _job_pods(cluster, job)
    config_maps = _job_config_maps(cluster, job)
    cluster.call(
        Action("delete", "jobs", ns, name),
        cluster.batch.delete_namespaced_job,
        name,
        ns,
        propagation_policy="Foreground",
    )
    for pod in pods:
        _delete_quietly(cluster, "pods", str(pod.metadata.name))
    for cm in config_maps:
        _delete_quietly(cluster, "configmaps", cm)
    if wait:
        deadline = time.monotonic() + timeout
        while _read_job(cluster, name) is not None or _job_pods(cluster, job):
            if time.monotonic() > deadline:
                raise KubeApiError(
                    f"job {ns}/{name} is still being deleted after {timeout:.0f}s "
                    "(a pod that does not terminate?); check `kubectl get pods`"
                )
            time.sleep(0.5)
    return Cancelled(job=name, pods=[str(p.metadata.name) for p in pods], config_maps=config_maps)


def _job_config_maps(cluster: Cluster, job: k8s.V1Job) -> list[str]:
    """The ConfigMaps the Job's pods mount that belong to this job (by label)."""
    names = []
    volumes = job.spec.template.spec.volumes if job.spec and job.spec.template.spec else None
    for volume in volumes or []:
        if volume.config_map is None:
            continue
        cm_name = str(volume.config_map.name)
        try:
            cm = cluster.call(
                Action("get", "configmaps", cluster.namespace, cm_name),
                cluster.core.read_namespaced_config_map,
                cm_name,
                cluster.namespace,
            )
        except NotFoundError:
            continue
        labels = (cm.metadata.labels if cm.metadata else None) or {}
        if (
            labels.get("app.kubernetes.io/name") == APP_NAME
            and labels.get("app.kubernetes.io/instance") == job.metadata.name
        ):
            names.append(cm_name)
    return names


# ---------------------------------------------------------------------------------------
# Pods and logs


def _job_pods(cluster: Cluster, job: k8s.V1Job) -> list[k8s.V1Pod]:
    """The Job's pods, oldest first (selected by the Job's own selector)."""
    labels = (job.spec.selector.match_labels if job.spec and job.spec.selector else None) or {
        "job-name": str(job.metadata.name)
    }
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    pods = cluster.call(
        Action("list", "pods", cluster.namespace),
        cluster.core.list_namespaced_pod,
        cluster.namespace,
        label_selector=selector,
    ).items
    return sorted(pods, key=_created)


def _created(obj: Any) -> dt.datetime:
    stamp = obj.metadata.creation_timestamp if obj.metadata else None
    return stamp or dt.datetime.min.replace(tzinfo=dt.UTC)


def read_job(cluster: Cluster, name: str) -> k8s.V1Job:
    """The Job, or :class:`JobNotFoundError` with a hint."""
    job = _read_job(cluster, name)
    if job is None:
        raise JobNotFoundError(
            f"no job {name!r} in namespace {cluster.namespace}; "
            f"see `mergejob list -n {cluster.namespace}`"
        )
    return job


def pod_log(cluster: Cluster, pod: str, *, tail: int | None = None) -> str | None:
    """The merge container's log, or None while it cannot be read (not started, gone)."""
    try:
        return cluster.call(
            Action("get", "pods/log", cluster.namespace, pod),
            cluster.core.read_namespaced_pod_log,
            pod,
            cluster.namespace,
            container=CONTAINER_NAME,
            tail_lines=tail,
        )
    except (InvalidObjectError, NotFoundError):
        return None


def stream_logs(
    cluster: Cluster,
    name: str,
    out: IO[bytes],
    *,
    follow: bool = False,
    tail: int | None = None,
    all_pods: bool = False,
    poll_seconds: float = 0.5,
    notify: Callable[[str], None] | None = None,
    deadline: float | None = None,
) -> None:
    """Write the job's log to ``out``: the newest pod's (every pod's with ``all_pods``, and
    always for a merge split over several pods); with ``follow``, keep writing as it runs,
    then the log of each retry, until the Job is finished (or ``time.monotonic()`` passes
    ``deadline``). Several pods are followed at once, each line prefixed with its index
    (or pod name), as ``kubectl logs --prefix`` does. ``notify`` hears why nothing is printed
    yet (a pending pod's reason)."""
    job = read_job(cluster, name)
    pods = _job_pods(cluster, job)
    all_pods = all_pods or _completions(job) > 1
    if not follow:
        chosen = pods if all_pods else pods[-1:]
        for pod in chosen:
            text = pod_log(cluster, str(pod.metadata.name), tail=tail)
            if len(chosen) > 1:
                out.write(f"==> pod {pod.metadata.name} <==\n".encode())
            if text:
                out.write(text.encode())
            out.flush()
        if not pods and notify:
            notify(f"job {name} has no pods yet")
        return
    if all_pods:
        _follow_all(cluster, name, job, out, tail, poll_seconds, notify, deadline)
        return
    followed: set[str] = {str(p.metadata.name) for p in pods[:-1]}
    said = ""
    while deadline is None or time.monotonic() < deadline:
        pods = _job_pods(cluster, job)
        todo = [p for p in pods if str(p.metadata.name) not in followed]
        if not todo:
            job = read_job(cluster, name)
            if _finished(job):
                return
            time.sleep(poll_seconds)
            continue
        pod = todo[0]
        pod_name = str(pod.metadata.name)
        if _follow_pod(cluster, pod_name, out, tail=tail):
            followed.add(pod_name)
            tail = None
            continue
        # Not started yet: say why once, then look again.
        reason = _pending_reason(pod)
        if reason and reason != said and notify:
            notify(f"pod {pod_name}: {reason}")
            said = reason
        if pod.status and pod.status.phase in ("Succeeded", "Failed"):
            followed.add(pod_name)  # finished without a readable log
        time.sleep(poll_seconds)


def _completions(job: k8s.V1Job) -> int:
    return int((job.spec.completions if job.spec else None) or 1)


class _Sink(Protocol):
    def write(self, data: bytes, /) -> Any: ...
    def flush(self) -> Any: ...


class _PrefixedLines:
    """Whole lines of one pod's log onto a stream shared with other pods, each line with
    the pod's prefix (a line is never cut by another pod's)."""

    def __init__(self, out: _Sink, prefix: str, lock: threading.Lock) -> None:
        self._out = out
        self._prefix = prefix.encode()
        self._lock = lock
        self._pending = b""

    def write(self, data: bytes) -> int:
        *lines, self._pending = (self._pending + data).split(b"\n")
        if lines:
            self._emit(lines)
        return len(data)

    def flush(self) -> None:
        with self._lock:
            self._out.flush()

    def close(self) -> None:
        if self._pending:
            self._emit([self._pending])
            self._pending = b""

    def _emit(self, lines: list[bytes]) -> None:
        text = b"".join(self._prefix + line + b"\n" for line in lines)
        with self._lock:
            self._out.write(text)
            self._out.flush()


def _pod_prefix(pod: k8s.V1Pod) -> str:
    annotations = (pod.metadata.annotations if pod.metadata else None) or {}
    index = annotations.get(COMPLETION_INDEX_ANNOTATION)
    return f"[index {index}] " if index is not None else f"[{pod.metadata.name}] "


def _follow_all(
    cluster: Cluster,
    name: str,
    job: k8s.V1Job,
    out: IO[bytes],
    tail: int | None,
    poll_seconds: float,
    notify: Callable[[str], None] | None,
    deadline: float | None,
) -> None:
    """Follow every pod of the job at once (one thread per pod), until the Job is finished
    and every started pod's log has been read to its end."""
    lock = threading.Lock()
    stop = threading.Event()
    threads: dict[str, threading.Thread] = {}
    said: dict[str, str] = {}

    def follow_one(pod_name: str, sink: _PrefixedLines) -> None:
        said = ""
        try:
            # Once more after ``stop``: a pod may have run and ended since the last look.
            while True:
                try:
                    if _follow_pod(cluster, pod_name, sink, tail=tail):
                        return
                except MergeJobError as exc:  # unreachable, rights: say so once, keep trying
                    if str(exc) != said:
                        log.warning("log of pod %s: %s", pod_name, exc)
                        said = str(exc)
                if stop.is_set():
                    return
                stop.wait(poll_seconds)  # not started yet
        finally:
            sink.close()

    try:
        while deadline is None or time.monotonic() < deadline:
            pods = _job_pods(cluster, job)
            for pod in pods:
                pod_name = str(pod.metadata.name)
                reason = _pending_reason(pod)
                if reason and said.get(pod_name) != reason and notify:
                    notify(f"pod {pod_name}: {reason}")
                    said[pod_name] = reason
                if pod_name not in threads:
                    sink = _PrefixedLines(out, _pod_prefix(pod), lock)
                    thread = threading.Thread(
                        target=follow_one,
                        args=(pod_name, sink),
                        name=f"mergejob-log-{pod_name}",
                        daemon=True,
                    )
                    threads[pod_name] = thread
                    thread.start()
            if _finished(read_job(cluster, name)):
                # Pods that never started will not: stop waiting for them; the others'
                # containers have ended (or are being stopped), so their streams end once
                # read; a pod stuck terminating is not waited for past FINISH_GRACE.
                stop.set()
                until = time.monotonic() + FINISH_GRACE
                for thread in threads.values():
                    thread.join(timeout=max(0.0, until - time.monotonic()))
                return
            time.sleep(poll_seconds)
    finally:
        stop.set()
        for thread in threads.values():
            thread.join(timeout=poll_seconds)


def _follow_pod(cluster: Cluster, pod: str, out: _Sink, *, tail: int | None) -> bool:
    """Stream one pod's log until its container ends; False if it has not started yet.

    A stream that breaks or goes silent is opened again: from the log's start, skipping the
    bytes already written (the log only grows), so no line is lost or printed twice; after
    ``tail`` lines, for the new lines only. Gives up (True) after ``FOLLOW_RETRIES``
    reopenings in a row that bring nothing.
    """
    ns = cluster.namespace
    seen = 0  # bytes written to ``out``, counted from the log's start when ``tail`` is None
    from_start = tail is None
    first = True
    idle = 0
    while True:
        try:
            raw: Any = cluster.call(
                Action("get", "pods/log", ns, pod),
                cluster.core.read_namespaced_pod_log,
                pod,
                ns,
                container=CONTAINER_NAME,
                follow=True,
                tail_lines=tail,
                _preload_content=False,
                _request_timeout=STREAM_TIMEOUT,
            )
            response = cast(urllib3.HTTPResponse, raw)  # _preload_content=False: not a str
        except (InvalidObjectError, NotFoundError):
            return not first  # not started yet; or gone since: nothing more to read
        except ClusterUnreachableError as exc:
            if first:
                raise  # nothing written yet: the caller may try again from the start
            if idle >= FOLLOW_RETRIES:
                log.warning("log of %s: %s; stopped following it", pod, exc)
                return True
            log.debug("log of %s: %s; trying again", pod, exc)
            idle += 1
            time.sleep(min(2.0**idle, 10.0))
            continue
        skip = seen if from_start and not first else 0
        before = seen
        ended = broken = False
        try:
            for chunk in response.stream(4096, decode_content=True):
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                if chunk:
                    out.write(chunk)
                    out.flush()
                    seen += len(chunk)
            ended = True
        except urllib3.exceptions.ReadTimeoutError:
            pass  # nothing for a while: the stream may be stale; open it again
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.debug("log stream of %s broke: %r; opening it again", pod, exc)
            broken = True
        finally:
            response.release_conn()
        if ended:
            if not _still_running(cluster, pod):
                if from_start:  # a stream cut as the container ended: the rest, once
                    _write_rest(cluster, pod, out, seen)
                return True
            # Ended while the container runs on (a proxy or a kubelet restart cut it, or
            # its end is not in the pod's status yet): open it again.
            time.sleep(0.5)
        first = False
        if not from_start:
            tail = 0  # after a tail: the new lines only
        idle = idle + 1 if broken and seen == before else 0
        if idle > FOLLOW_RETRIES:
            log.warning("log of %s: the stream keeps breaking; stopped following it", pod)
            return True


# ---------------------------------------------------------------------------------------
# Status


_PHASE_LINE = re.compile(r"\bphase (\w+) (start|done in [\d.]+s|failed after [\d.]+s)")
_SHARD_LINE = re.compile(r"\bshard (\d+)/(\d+) done")
_DONE_LINE = re.compile(r"merged model written to (\S+)")


def progress_from_log(lines: Iterable[str]) -> str | None:
    """Where the job is, from its own log lines (text or JSON): the last phase and, in
    the merge phase, the last shard finished."""
    phase: str | None = None
    event = ""
    shard = ""
    finished: str | None = None
    for raw in lines:
        line = raw.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                if record.get("phase") and record.get("event"):
                    phase, event = str(record["phase"]), str(record["event"])
                line = str(record.get("message", ""))
        match = _PHASE_LINE.search(line)
        if match:
            phase, event = match.group(1), match.group(2).split()[0]
            if phase == "merge" and event == "start":
                shard = ""
        match = _SHARD_LINE.search(line)
        if match:
            shard = f"shard {match.group(1)}/{match.group(2)}"
        match = _DONE_LINE.search(line)
        if match:
            finished = match.group(1)
    if finished:
        return f"done: merged model written to {finished}"
    if phase is None:
        return None
    state = {"start": "running", "done": "done", "failed": "failed"}.get(event, event)
    text = f"phase {phase} {state}"
    if phase == "merge" and shard and state == "running":
        text += f", {shard} done"
    return text


EXIT_MEANINGS = {
    EXIT_OK: "done",
    EXIT_FAILURE: "failed (worth a retry; the Job retries up to its backoffLimit)",
    EXIT_BAD_INPUT: "bad input: fix the spec or its inputs and resubmit (a retry cannot help)",
    137: "killed (SIGKILL): out of memory, or evicted",
    143: "terminated (SIGTERM): deleted, preempted or past its deadline",
}


@dataclass
class PodReport:
    """One pod of the job, as far as status needs it."""

    name: str
    phase: str
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    meaning: str | None = None


@dataclass
class IndexState:
    """One index of a merge split over an Indexed Job: its newest pod and how far it got."""

    index: int | None
    phase: str
    pod: str
    attempts: int = 1
    failures: int = 0
    progress: str | None = None
    exit_code: int | None = None


@dataclass
class JobStatus:
    """What ``mergejob status`` prints (``--json``: this, as a dict)."""

    name: str
    namespace: str
    phase: str
    spec_sha256: str | None = None
    started: str | None = None
    finished: str | None = None
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    backoff_limit: int | None = None
    reason: str | None = None
    message: str | None = None
    progress: str | None = None
    pending: str | None = None
    failed_pod: PodReport | None = None
    last_log_lines: list[str] = field(default_factory=list)
    completions: int | None = None
    completed_indexes: str | None = None
    failed_indexes: str | None = None
    indexes: list[IndexState] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Whether the Job has ended, either way."""
        return self.phase in ("Succeeded", "Failed")

    @property
    def retries(self) -> int:
        """Pods started after the first (for a one-pod Job)."""
        return max(0, self.active + self.succeeded + self.failed - 1)

    @property
    def exit_code(self) -> int | None:
        """0 for success; for failure 2 when the pod said bad input, else 1."""
        if self.phase == "Succeeded":
            return EXIT_OK
        if self.phase == "Failed":
            bad_input = self.failed_pod is not None and self.failed_pod.exit_code == EXIT_BAD_INPUT
            return (
                EXIT_BAD_INPUT if bad_input or self.reason == "PodFailurePolicy" else EXIT_FAILURE
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
        return asdict(self)

    def render(self) -> str:
        """The human-readable report."""
        rows = [("job", f"{self.namespace}/{self.name}"), ("phase", self.phase)]
        if self.spec_sha256:
            rows.append(("spec", f"sha256 {self.spec_sha256[:16]}"))
        if self.started:
            rows.append(("started", self.started))
        if self.finished:
            rows.append(("finished", f"{self.finished}{_took(self.started, self.finished)}"))
        pods = f"{self.active} active, {self.succeeded} succeeded, {self.failed} failed"
        if self.backoff_limit is not None:
            pods += f" (retries {self.retries} of {self.backoff_limit})"
        rows.append(("pods", pods))
        if self.completions and self.completions > 1:
            done = self.completed_indexes or ""
            text = f"{self.completions} indices"
            if done:
                text += f", completed {done}"
            if self.failed_indexes:
                text += f", failed {self.failed_indexes}"
            rows.append(("indices", text))
            for state in self.indexes:
                label = "?" if state.index is None else str(state.index)
                line = f"  {label:>3}  {state.phase:<9} {state.pod}"
                if state.attempts > 1:
                    line += f" (attempt {state.attempts}, {state.failures} failed)"
                if state.exit_code not in (None, 0):
                    line += f", exit code {state.exit_code}"
                if state.progress:
                    line += f": {state.progress}"
                rows.append(("", line))
        if self.progress:
            rows.append(("progress", self.progress))
        if self.pending:
            rows.append(("waiting", self.pending))
        if self.reason or self.message:
            rows.append(("reason", ": ".join(x for x in (self.reason, self.message) if x)))
        if self.failed_pod is not None:
            pod = self.failed_pod
            detail = f"{pod.name}: {pod.phase}"
            if pod.exit_code is not None:
                detail += f", exit code {pod.exit_code}"
            if pod.reason:
                detail += f" ({pod.reason})"
            if pod.meaning:
                detail += f": {pod.meaning}"
            rows.append(("pod", detail))
            if pod.message and not self.last_log_lines:
                rows.append(("message", pod.message.strip().splitlines()[-1]))
        text = "\n".join(f"{key:<9}{value}" for key, value in rows)
        if self.last_log_lines:
            pod_name = self.failed_pod.name if self.failed_pod else "the pod"
            text += f"\nlast log lines of {pod_name}:\n"
            text += "\n".join(f"  {line}" for line in self.last_log_lines)
        return text


def _stamp(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def _took(started: str | None, finished: str | None) -> str:
    if not started or not finished:
        return ""
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    seconds = (
        dt.datetime.strptime(finished, fmt) - dt.datetime.strptime(started, fmt)
    ).total_seconds()
    return f" (after {_duration(seconds)})"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def _write_rest(cluster: Cluster, pod: str, out: _Sink, seen: int) -> None:
    """Write what a finished container's whole log holds past its first ``seen`` bytes."""
    try:
        raw: Any = cluster.call(
            Action("get", "pods/log", cluster.namespace, pod),
            cluster.core.read_namespaced_pod_log,
            pod,
            cluster.namespace,
            container=CONTAINER_NAME,
            _preload_content=False,
        )
    except MergeJobError:
        return  # gone since: what was read is all there is
    data = bytes(cast(urllib3.HTTPResponse, raw).data)
    if len(data) > seen:
        out.write(data[seen:])
        out.flush()


def _still_running(cluster: Cluster, pod: str) -> bool:
    """Whether the pod's merge container still runs (its log may grow)."""
    try:
        obj = cluster.call(
            Action("get", "pods", cluster.namespace, pod),
            cluster.core.read_namespaced_pod,
            pod,
            cluster.namespace,
        )
    except MergeJobError:
        return False  # gone, or not readable: nothing more to follow
    container = _container_status(obj)
    return bool(container and container.state and container.state.running)


def _container_status(pod: k8s.V1Pod) -> k8s.V1ContainerStatus | None:
    for status in (pod.status.container_statuses if pod.status else None) or []:
        if status.name == CONTAINER_NAME:
            return status
    return None


def _pending_reason(pod: k8s.V1Pod) -> str | None:
    """Why a pod is not running yet: unschedulable, image pull, missing Secret, ..."""
    status = pod.status
    if status is None or status.phase not in (None, "Pending"):
        return None
    container = _container_status(pod)
    if container and container.state and container.state.waiting:
        waiting = container.state.waiting
        if (waiting.reason and waiting.reason != "ContainerCreating") or waiting.message:
            return ": ".join(x for x in (waiting.reason, waiting.message) if x)
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return ": ".join(x for x in (condition.reason, condition.message) if x)
    return "waiting to be scheduled" if not (pod.spec and pod.spec.node_name) else None


def pod_report(pod: k8s.V1Pod) -> PodReport:
    """A pod's phase and, once its container ended, exit code and reason."""
    report = PodReport(
        name=str(pod.metadata.name),
        phase=str(pod.status.phase if pod.status and pod.status.phase else "Pending"),
    )
    if pod.status and pod.status.reason:
        report.reason = pod.status.reason
        report.message = pod.status.message
    container = _container_status(pod)
    state = container.state if container else None
    terminated = state.terminated if state else None
    if terminated is not None:
        report.exit_code = terminated.exit_code
        report.reason = terminated.reason or report.reason
        report.message = terminated.message or report.message
    elif state is not None and state.waiting is not None and state.waiting.reason:
        report.reason = state.waiting.reason
        report.message = state.waiting.message
    if report.exit_code is not None:
        report.meaning = EXIT_MEANINGS.get(report.exit_code)
        if report.reason == "OOMKilled":
            report.meaning = "out of memory: raise --memory (or use the stream engine)"
    elif report.reason == "DeadlineExceeded":
        report.meaning = "past the job's activeDeadlineSeconds"
    return report


def summarize(
    job: k8s.V1Job,
    pods: list[k8s.V1Pod],
    logs: dict[str, list[str]],
) -> JobStatus:
    """A JobStatus from the Job, its pods (oldest first) and the tails of their logs."""
    status = job.status or k8s.V1JobStatus()
    meta = job.metadata
    conditions = {c.type: c for c in status.conditions or [] if c.status == "True"}
    report = JobStatus(
        name=str(meta.name),
        namespace=str(meta.namespace),
        phase="Pending",
        spec_sha256=(meta.annotations or {}).get(SPEC_SHA_ANNOTATION),
        started=_stamp(status.start_time),
        active=status.active or 0,
        succeeded=status.succeeded or 0,
        failed=status.failed or 0,
        backoff_limit=job.spec.backoff_limit if job.spec else None,
    )
    newest = pods[-1] if pods else None
    if "Failed" in conditions:
        condition = conditions["Failed"]
        report.phase = "Failed"
        report.reason, report.message = condition.reason, condition.message
        report.finished = _stamp(condition.last_transition_time)
    elif "Complete" in conditions:
        report.phase = "Succeeded"
        report.finished = _stamp(
            status.completion_time or conditions["Complete"].last_transition_time
        )
    elif job.spec and job.spec.suspend:
        report.phase = "Suspended"
    elif any(p.status and p.status.phase == "Running" for p in pods):
        report.phase = "Running"
    if report.phase in ("Pending", "Running") and newest is not None:
        report.pending = _pending_reason(newest)
    failed = [p for p in pods if p.status and p.status.phase == "Failed"]
    if report.phase != "Succeeded" and failed:
        report.failed_pod = pod_report(failed[-1])
        report.last_log_lines = logs.get(report.failed_pod.name, [])
        if not report.last_log_lines and report.failed_pod.message:
            # FallbackToLogsOnError: the runtime kept the log's end in the status.
            report.last_log_lines = report.failed_pod.message.rstrip().splitlines()[-20:]
    source = failed[-1] if report.phase == "Failed" and failed else newest
    if source is not None:
        report.progress = progress_from_log(logs.get(str(source.metadata.name), []))
    completions = job.spec.completions if job.spec else None
    if completions and completions > 1:
        report.completions = completions
        report.completed_indexes = status.completed_indexes
        report.failed_indexes = status.failed_indexes
        report.indexes = index_states(pods, logs)
        finaliser = next((i for i in report.indexes if i.index == 0), None)
        if finaliser is not None and finaliser.pod in logs:
            report.progress = progress_from_log(logs[finaliser.pod])
    return report


COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
_INDEX_LINE = re.compile(r"\bindex (\d+)/(\d+)(?::| done)")
_INDEX_SHARD_LINE = re.compile(r"\bindex \d+/\d+: shard (\d+)/(\d+) done")


def index_states(pods: list[k8s.V1Pod], logs: dict[str, list[str]]) -> list[IndexState]:
    """Per index, its newest pod, attempts and progress. The index is the pod's
    ``job-completion-index`` annotation, else the ``index i/n`` its log names (servers
    before Indexed Jobs drop the annotation)."""
    by_index: dict[int | None, list[tuple[k8s.V1Pod, str | None]]] = {}
    for pod in pods:
        lines = logs.get(str(pod.metadata.name), [])
        raw = (pod.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION)
        index = int(raw) if raw is not None and raw.isdigit() else None
        progress = None
        for line in lines:
            match = _INDEX_LINE.search(line)
            if match and index is None:
                index = int(match.group(1))
            shard = _INDEX_SHARD_LINE.search(line)
            if shard:
                progress = f"shard {shard.group(1)}/{shard.group(2)} done"
            if "finaliser: waiting for" in line:
                progress = "shards done; waiting for the other indices to finalise"
            if re.search(r"index \d+/\d+ done", line):
                progress = line.split("index", 1)[1].split(":", 1)[-1].strip() or "done"
            if "merged model written to" in line or "published to" in line:
                progress = "finalised: " + line.strip()
        by_index.setdefault(index, []).append((pod, progress))
    states = []
    for index in sorted(by_index, key=lambda i: (i is None, i or 0)):
        attempts = by_index[index]
        pod, progress = attempts[-1]
        report = pod_report(pod)
        states.append(
            IndexState(
                index=index,
                phase=report.phase,
                pod=report.name,
                attempts=len(attempts),
                failures=sum(1 for p, _ in attempts if p.status and p.status.phase == "Failed"),
                progress=progress,
                exit_code=report.exit_code,
            )
        )
    return states


def job_status(cluster: Cluster, name: str, *, tail: int = 20) -> JobStatus:
    """The job's phase, times, retries, progress and, if it failed, why (with the failing
    pod's last ``tail`` log lines)."""
    job = read_job(cluster, name)
    pods = _job_pods(cluster, job)
    logs: dict[str, list[str]] = {}
    failed = [p for p in pods if p.status and p.status.phase == "Failed"]
    wanted = {str(p.metadata.name): tail for p in failed[-1:]}
    if job.spec and (job.spec.completions or 1) > 1:
        # An Indexed Job: every pod's progress (and index, on servers that drop it).
        wanted.update({str(p.metadata.name): max(tail, 400) for p in pods})
    if pods:
        # Progress needs the phase lines, which lie further back than the last few.
        wanted[str(pods[-1].metadata.name)] = max(tail, 400)
    for pod_name, lines in wanted.items():
        text = pod_log(cluster, pod_name, tail=lines)
        if text:
            logs[pod_name] = text.splitlines()
    report = summarize(job, pods, logs)
    if report.failed_pod is not None:
        report.last_log_lines = report.last_log_lines[-tail:]
    return report


def wait_for_job(
    cluster: Cluster, name: str, *, timeout: float | None = None, tail: int = 20
) -> JobStatus:
    """Block until the Job is Complete or Failed (watching it) and return its status.
    Raises :class:`KubeApiError` when ``timeout`` seconds pass first."""
    ns = cluster.namespace
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = read_job(cluster, name)
        if _finished(job):
            return job_status(cluster, name, tail=tail)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            status = job_status(cluster, name, tail=tail)
            why = status.progress or status.pending
            raise KubeApiError(
                f"job {ns}/{name} is still {status.phase.lower()}{f' ({why})' if why else ''}; "
                f"gave up waiting (--timeout): `mergejob wait {name}` again, or "
                f"`mergejob status {name}`"
            )
        watcher = k8s_watch.Watch()
        seconds = 30 if remaining is None else max(1, min(30, int(remaining)))
        try:
            for event in watcher.stream(
                cluster.batch.list_namespaced_job,
                ns,
                field_selector=f"metadata.name={name}",
                resource_version=job.metadata.resource_version,
                timeout_seconds=seconds,
                _request_timeout=(10.0, seconds + 10.0),
            ):
                if event["type"] == "DELETED":
                    raise JobNotFoundError(f"job {ns}/{name} was deleted while waiting for it")
                if event["type"] != "ERROR" and _finished(event["object"]):
                    watcher.stop()
                    break
        except ApiException as exc:
            if exc.status != 410:  # 410 Gone: the resourceVersion is too old; read again
                raise api_error(exc, Action("watch", "jobs", ns, name), cluster.server) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise unreachable_error(exc, cluster.server) from None


# ---------------------------------------------------------------------------------------
# Listing


@dataclass
class JobSummary:
    """One row of ``mergejob list``."""

    namespace: str
    name: str
    phase: str
    pods: str
    age: str
    spec_sha256: str


def list_jobs(cluster: Cluster, *, all_namespaces: bool = False) -> list[JobSummary]:
    """The mergejob Jobs (by label) of the namespace, or of every namespace."""
    selector = f"app.kubernetes.io/name={APP_NAME}"
    if all_namespaces:
        jobs = cluster.call(
            Action("list", "jobs"),
            cluster.batch.list_job_for_all_namespaces,
            label_selector=selector,
        ).items
        pods = cluster.call(
            Action("list", "pods"),
            cluster.core.list_pod_for_all_namespaces,
            label_selector=selector,
        ).items
    else:
        ns = cluster.namespace
        jobs = cluster.call(
            Action("list", "jobs", ns),
            cluster.batch.list_namespaced_job,
            ns,
            label_selector=selector,
        ).items
        pods = cluster.call(
            Action("list", "pods", ns),
            cluster.core.list_namespaced_pod,
            ns,
            label_selector=selector,
        ).items
    by_job: dict[tuple[str, str], list[k8s.V1Pod]] = {}
    for pod in sorted(pods, key=_created):
        job_name = (pod.metadata.labels or {}).get("job-name")
        if job_name:
            by_job.setdefault((str(pod.metadata.namespace), job_name), []).append(pod)
    now = dt.datetime.now(dt.UTC)
    rows = []
    for job in sorted(jobs, key=lambda j: (str(j.metadata.namespace), _created(j))):
        key = (str(job.metadata.namespace), str(job.metadata.name))
        report = summarize(job, by_job.get(key, []), {})
        age = (
            _duration((now - _created(job)).total_seconds())
            if job.metadata.creation_timestamp
            else "?"
        )
        rows.append(
            JobSummary(
                namespace=key[0],
                name=key[1],
                phase=report.phase,
                pods=f"{report.active}/{report.succeeded}/{report.failed}",
                age=age,
                spec_sha256=(report.spec_sha256 or "")[:12],
            )
        )
    return rows
