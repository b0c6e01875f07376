"""The connection to a cluster, and the reads every part of the launcher shares.

:func:`connect` gives a :class:`Cluster` for the cluster the kubeconfig (or the in-cluster
service account) names; every request goes through :meth:`Cluster.call`, so every failure
comes back as an error of :mod:`mergejob.launch.errors`. The reads here (a job, its pods and
their state, a pod's log) serve submit and cancel, status, and log following alike.

Example::

    from mergejob.launch.cluster import connect, read_job

    cluster = connect(context="gpu-cluster")
    job = read_job(cluster, "merge-llama")
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

from mergejob import settings
from mergejob.launch.errors import (
    Action,
    InvalidObjectError,
    JobNotFoundError,
    KubeConfigError,
    NotFoundError,
    api_error,
    unreachable_error,
)
from mergejob.launch.manifests import CONTAINER_NAME

T = TypeVar("T")

# Connect and read timeouts of ordinary requests.
REQUEST_TIMEOUT = (10.0, 60.0)
IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Set by the Job controller on each pod of an Indexed Job.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


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

    def find(self, resource: str, name: str) -> Any:
        """The object ``name`` of ``resource`` (``jobs``, ``configmaps``) in the namespace,
        or None when it is not there."""
        read = {
            "jobs": self.batch.read_namespaced_job,
            "configmaps": self.core.read_namespaced_config_map,
        }[resource]
        try:
            return self.call(
                Action("get", resource, self.namespace, name), read, name, self.namespace
            )
        except NotFoundError:
            return None

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
    path = settings.kubeconfig_path(kubeconfig)
    has_file = bool(kubeconfig) or any(Path(p).is_file() for p in path.split(os.pathsep) if p)
    if has_file:
        api, default_namespace = _from_kubeconfig(path, context)
    elif settings.in_cluster():
        api, default_namespace = _in_cluster()
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


def _from_kubeconfig(path: str, context: str | None) -> tuple[k8s.ApiClient, str | None]:
    """A client for ``context`` of the kubeconfig at ``path``, and that context's namespace."""
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
    return api, (chosen.get("context") or {}).get("namespace")


def _in_cluster() -> tuple[k8s.ApiClient, str | None]:
    """A client with the pod's service account, and the pod's namespace."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except ConfigException as exc:
        raise KubeConfigError(f"in-cluster config: {exc}") from None
    try:
        namespace: str | None = Path(IN_CLUSTER_NAMESPACE_FILE).read_text().strip()
    except OSError:
        namespace = None
    return k8s.ApiClient(configuration), namespace


# ---------------------------------------------------------------------------------------
# A job and its pods


def find_job(cluster: Cluster, name: str) -> k8s.V1Job | None:
    """The Job, or None when there is none of that name."""
    return cluster.find("jobs", name)


def read_job(cluster: Cluster, name: str) -> k8s.V1Job:
    """The Job, or :class:`JobNotFoundError` with a hint."""
    job = find_job(cluster, name)
    if job is None:
        raise JobNotFoundError(
            f"no job {name!r} in namespace {cluster.namespace}; "
            f"see `mergejob list -n {cluster.namespace}`"
        )
    return job


def job_pods(cluster: Cluster, job: k8s.V1Job) -> list[k8s.V1Pod]:
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
    return sorted(pods, key=created)


def created(obj: Any) -> dt.datetime:
    """When an object was created (the earliest time, for one that does not say)."""
    stamp = obj.metadata.creation_timestamp if obj.metadata else None
    return stamp or dt.datetime.min.replace(tzinfo=dt.UTC)


def finished(job: k8s.V1Job) -> str | None:
    """``Complete`` or ``Failed`` once the Job has ended, else None."""
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return str(condition.type)
    return None


def container_status(pod: k8s.V1Pod) -> k8s.V1ContainerStatus | None:
    """The merge container's status in the pod, once it has one."""
    for status in (pod.status.container_statuses if pod.status else None) or []:
        if status.name == CONTAINER_NAME:
            return status
    return None


def pending_reason(pod: k8s.V1Pod) -> str | None:
    """Why a pod is not running yet: unschedulable, image pull, missing Secret, ..."""
    status = pod.status
    if status is None or status.phase not in (None, "Pending"):
        return None
    container = container_status(pod)
    if container and container.state and container.state.waiting:
        waiting = container.state.waiting
        if (waiting.reason and waiting.reason != "ContainerCreating") or waiting.message:
            return ": ".join(x for x in (waiting.reason, waiting.message) if x)
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return ": ".join(x for x in (condition.reason, condition.message) if x)
    return "waiting to be scheduled" if not (pod.spec and pod.spec.node_name) else None


# ---------------------------------------------------------------------------------------
# A pod's log


def pod_log(cluster: Cluster, pod: str, *, tail: int | None = None) -> str | None:
    """The merge container's log, or None while it cannot be read (not started, gone)."""
    try:
        return cast(str, _read_log(cluster, pod, tail_lines=tail))
    except (InvalidObjectError, NotFoundError):
        return None


def open_pod_log(cluster: Cluster, pod: str, **options: Any) -> urllib3.HTTPResponse:
    """The merge container's log as an unread response, to stream (``follow=True``,
    ``tail_lines``, ``_request_timeout``, ... as ``read_namespaced_pod_log`` takes them)."""
    raw = _read_log(cluster, pod, _preload_content=False, **options)
    return cast(urllib3.HTTPResponse, raw)  # _preload_content=False: the response, not a str


def _read_log(cluster: Cluster, pod: str, **options: Any) -> Any:
    return cluster.call(
        Action("get", "pods/log", cluster.namespace, pod),
        cluster.core.read_namespaced_pod_log,
        pod,
        cluster.namespace,
        container=CONTAINER_NAME,
        **options,
    )
