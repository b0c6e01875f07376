"""A merge job's objects on the cluster: submit, cancel, wait for, list.

A job is a ConfigMap (the spec) and a Job that mounts it, both built by
:mod:`mergejob.launch.manifests`. :func:`submit` creates them and makes the Job own the
ConfigMap; :func:`cancel` deletes the Job, its pods and its ConfigMap; :func:`wait_for_job`
watches the Job until it ends; :func:`list_jobs` shows mergejob's Jobs.

Example::

    from mergejob.launch.cluster import connect
    from mergejob.launch.jobs import submit, wait_for_job
    from mergejob.launch.manifests import LaunchOptions, build_objects

    cluster = connect(context="gpu-cluster")
    objects = build_objects(spec, LaunchOptions(namespace=cluster.namespace, gpus=8))
    submit(cluster, objects)
    print(wait_for_job(cluster, objects.name).render())
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException

from mergejob.launch.cluster import Cluster, created, find_job, finished, job_pods, read_job
from mergejob.launch.errors import (
    Action,
    JobExistsError,
    JobNotFoundError,
    KubeApiError,
    NotFoundError,
    PermissionDeniedError,
    api_error,
    unreachable_error,
)
from mergejob.launch.manifests import APP_NAME, SPEC_SHA_ANNOTATION, JobObjects
from mergejob.launch.status import JobStatus, duration, job_status, summarize

log = logging.getLogger("mergejob")


# ---------------------------------------------------------------------------------------
# Submitting


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
    existing = find_job(cluster, name)
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


def _exists_message(existing: k8s.V1Job, objects: JobObjects, namespace: str) -> str:
    name = objects.name
    old = ((existing.metadata.annotations if existing.metadata else None) or {}).get(
        SPEC_SHA_ANNOTATION
    )
    state = {"Complete": "finished", "Failed": "failed"}.get(finished(existing) or "", "active")
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


def _labels(obj: Any) -> dict[str, str]:
    return dict((obj.metadata.labels if obj.metadata else None) or {})


def _remove_stale_config_map(cluster: Cluster, cm_name: str, job_name: str) -> None:
    """A ConfigMap of ours left without its Job (an earlier submit that failed half-way)."""
    cm = cluster.find("configmaps", cm_name)
    if cm is None:
        return
    if _labels(cm).get("app.kubernetes.io/instance") != job_name:
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
    pods = job_pods(cluster, job)
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
        while find_job(cluster, name) is not None or job_pods(cluster, job):
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
        cm = cluster.find("configmaps", cm_name)
        if cm is None:
            continue
        labels = _labels(cm)
        if (
            labels.get("app.kubernetes.io/name") == APP_NAME
            and labels.get("app.kubernetes.io/instance") == job.metadata.name
        ):
            names.append(cm_name)
    return names


# ---------------------------------------------------------------------------------------
# Waiting


def wait_for_job(
    cluster: Cluster, name: str, *, timeout: float | None = None, tail: int = 20
) -> JobStatus:
    """Block until the Job is Complete or Failed (watching it) and return its status.
    Raises :class:`KubeApiError` when ``timeout`` seconds pass first."""
    ns = cluster.namespace
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = read_job(cluster, name)
        if finished(job):
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
                if event["type"] != "ERROR" and finished(event["object"]):
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
    ns = None if all_namespaces else cluster.namespace
    where = () if ns is None else (ns,)
    list_jobs_in, list_pods_in = (
        (cluster.batch.list_job_for_all_namespaces, cluster.core.list_pod_for_all_namespaces)
        if ns is None
        else (cluster.batch.list_namespaced_job, cluster.core.list_namespaced_pod)
    )
    jobs = cluster.call(
        Action("list", "jobs", ns), list_jobs_in, *where, label_selector=selector
    ).items
    pods = cluster.call(
        Action("list", "pods", ns), list_pods_in, *where, label_selector=selector
    ).items
    by_job: dict[tuple[str, str], list[k8s.V1Pod]] = {}
    for pod in sorted(pods, key=created):
        job_name = _labels(pod).get("job-name")
        if job_name:
            by_job.setdefault((str(pod.metadata.namespace), job_name), []).append(pod)
    now = dt.datetime.now(dt.UTC)
    rows = []
    for job in sorted(jobs, key=lambda j: (str(j.metadata.namespace), created(j))):
        key = (str(job.metadata.namespace), str(job.metadata.name))
        report = summarize(job, by_job.get(key, []), {})
        age = (
            duration((now - created(job)).total_seconds())
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
