"""Following a job's log: the newest pod's, or every pod's of a merge split over an Indexed
Job, until the Job ends.

A followed stream can be cut (a proxy, a kubelet restart, a read timeout on a silent log):
it is opened again and the bytes already written are skipped, so no line is lost or printed
twice; a stream cut as the container ended is completed from the whole log once.

Example::

    import sys
    from mergejob.launch.cluster import connect
    from mergejob.launch.follow import stream_logs

    stream_logs(connect(), "merge-llama", sys.stdout.buffer, follow=True)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

import urllib3
from kubernetes import client as k8s

from mergejob.errors import MergeJobError
from mergejob.launch.cluster import (
    COMPLETION_INDEX_ANNOTATION,
    Cluster,
    container_status,
    finished,
    job_pods,
    open_pod_log,
    pending_reason,
    pod_log,
    read_job,
)
from mergejob.launch.errors import (
    Action,
    ClusterUnreachableError,
    InvalidObjectError,
    NotFoundError,
)

log = logging.getLogger("mergejob")

# Connect and read timeouts of a followed log: a log that is silent that long is opened
# again (from its new lines on).
STREAM_TIMEOUT = (10.0, 300.0)
# Once a Job is finished, how long its pods' log streams are still read to their end.
FINISH_GRACE = 60.0
# Reopenings in a row of a pod's log stream that bring nothing before following it stops.
FOLLOW_RETRIES = 5


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
    pods = job_pods(cluster, job)
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
        pods = job_pods(cluster, job)
        todo = [p for p in pods if str(p.metadata.name) not in followed]
        if not todo:
            job = read_job(cluster, name)
            if finished(job):
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
        reason = pending_reason(pod)
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
            pods = job_pods(cluster, job)
            for pod in pods:
                pod_name = str(pod.metadata.name)
                reason = pending_reason(pod)
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
            if finished(read_job(cluster, name)):
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
    seen = 0  # bytes written to ``out``, counted from the log's start when ``tail`` is None
    from_start = tail is None
    first = True
    idle = 0
    while True:
        try:
            response = open_pod_log(
                cluster, pod, follow=True, tail_lines=tail, _request_timeout=STREAM_TIMEOUT
            )
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
            state = _container_state(cluster, pod)
            if state == "waiting" and first and seen == 0:
                # Not started yet: the API server answers an empty log for a pod no node
                # has taken yet (no error), so only the pod's status tells.
                return False
            if state != "running":
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


def _write_rest(cluster: Cluster, pod: str, out: _Sink, seen: int) -> None:
    """Write what a finished container's whole log holds past its first ``seen`` bytes."""
    try:
        data = bytes(open_pod_log(cluster, pod).data)
    except MergeJobError:
        return  # gone since: what was read is all there is
    if len(data) > seen:
        out.write(data[seen:])
        out.flush()


def _container_state(cluster: Cluster, pod: str) -> str:
    """The pod's merge container: ``running`` (its log may grow), ``waiting`` (not started
    yet: the pod is unscheduled, or its container is being created), else ``ended`` (it
    has terminated, or the pod is gone or not readable: nothing more to follow)."""
    try:
        obj = cluster.call(
            Action("get", "pods", cluster.namespace, pod),
            cluster.core.read_namespaced_pod,
            pod,
            cluster.namespace,
        )
    except MergeJobError:
        return "ended"
    container = container_status(obj)
    if container and container.state and container.state.running:
        return "running"
    if container and container.state and container.state.terminated:
        return "ended"
    phase = obj.status.phase if obj.status else None
    return "waiting" if phase in (None, "Pending") else "ended"
