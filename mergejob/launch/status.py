"""Where a job stands: its phase, times, retries, progress and, if it failed, why.

The report is built from the Job, its pods and the tails of their logs
(:func:`summarize`, no cluster needed, so it is tested on plain objects); the progress comes
from the job's own log lines, read back with the parsers of :mod:`mergejob.logs` that
define them. :func:`job_status` reads those objects from the cluster for ``mergejob status``.

Example::

    from mergejob.launch.cluster import connect
    from mergejob.launch.status import job_status

    print(job_status(connect(), "merge-llama").render())
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kubernetes import client as k8s

from mergejob.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from mergejob.launch.cluster import (
    COMPLETION_INDEX_ANNOTATION,
    Cluster,
    container_status,
    job_pods,
    pending_reason,
    pod_log,
    read_job,
)
from mergejob.launch.manifests import SPEC_SHA_ANNOTATION
from mergejob.logs import (
    parse_download_done,
    parse_finaliser_waiting,
    parse_index,
    parse_index_done,
    parse_index_shard_done,
    parse_merged,
    parse_phase,
    parse_published,
    parse_shard_done,
    phase_from_fields,
    split_line,
)

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
            rows.extend(self._index_rows())
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

    def _index_rows(self) -> list[tuple[str, str]]:
        """The indices line, then one line per index."""
        text = f"{self.completions} indices"
        if self.completed_indexes:
            text += f", completed {self.completed_indexes}"
        if self.failed_indexes:
            text += f", failed {self.failed_indexes}"
        rows = [("indices", text)]
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
        return rows


# The phases whose progress is counted in shards (a merge) or groups (an extraction).
_WORK_PHASES = ("merge", "extract")


def _stamp(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def _took(started: str | None, finished: str | None) -> str:
    if not started or not finished:
        return ""
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    seconds = (
        dt.datetime.strptime(finished, fmt) - dt.datetime.strptime(started, fmt)
    ).total_seconds()
    return f" (after {duration(seconds)})"


def duration(seconds: float) -> str:
    """A span the way ``kubectl`` shows ages: ``45s``, ``12m03s``, ``5h07m``, ``3d``."""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def pod_report(pod: k8s.V1Pod) -> PodReport:
    """A pod's phase and, once its container ended, exit code and reason."""
    report = PodReport(
        name=str(pod.metadata.name),
        phase=str(pod.status.phase if pod.status and pod.status.phase else "Pending"),
    )
    if pod.status and pod.status.reason:
        report.reason = pod.status.reason
        report.message = pod.status.message
    container = container_status(pod)
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


# ---------------------------------------------------------------------------------------
# Progress, from the job's own log lines


def progress_from_log(lines: Iterable[str]) -> str | None:
    """Where the job is, from its own log lines (text or JSON): the last phase and, in
    the merge phase, the last shard finished."""
    phase: str | None = None
    event = ""
    shard = ""
    download = ""
    output: str | None = None
    for raw in lines:
        line, fields = split_line(raw)
        found = phase_from_fields(fields)
        if found:
            phase, event = found.phase, found.event
        found = parse_phase(line)
        if found:
            phase, event = found.phase, found.event
            if phase in _WORK_PHASES and event == "start":
                shard = ""
        done = parse_shard_done(line)
        if done:
            shard = f"{done.unit} {done.done}/{done.total}"
        fetched = parse_download_done(line)
        if fetched:
            download = f"download {fetched.done}/{fetched.total}"
        output = parse_merged(line) or output
    if output:
        return f"done: merged model written to {output}"
    if phase is None:
        return None
    state = {"start": "running", "done": "done", "failed": "failed"}.get(event, event)
    text = f"phase {phase} {state}"
    if phase in _WORK_PHASES and state == "running":
        # A Hub base comes in during the merge: both how far the download and the merge are.
        done_parts = [part for part in (download, shard) if part]
        if done_parts:
            text += ", " + ", ".join(done_parts) + " done"
    return text


def _index_progress(lines: Iterable[str], index: int | None) -> tuple[int | None, str | None]:
    """The index a pod's log names (when its annotation did not) and how far it got."""
    progress = None
    for line in lines:
        if index is None:
            index = parse_index(line)
        shard = parse_index_shard_done(line)
        if shard:
            progress = f"{shard.unit} {shard.done}/{shard.total} done"
        if parse_finaliser_waiting(line) is not None:
            progress = "shards done; waiting for the other indices to finalise"
        done = parse_index_done(line)
        if done:
            progress = done.summary
        if parse_merged(line) or parse_published(line):
            progress = "finalised: " + line.strip()
    return index, progress


def index_states(pods: list[k8s.V1Pod], logs: dict[str, list[str]]) -> list[IndexState]:
    """Per index, its newest pod, attempts and progress. The index is the pod's
    ``job-completion-index`` annotation, else the ``index i/n`` its log names (servers
    before Indexed Jobs drop the annotation)."""
    by_index: dict[int | None, list[tuple[k8s.V1Pod, str | None]]] = {}
    for pod in pods:
        raw = (pod.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION)
        annotated = int(raw) if raw is not None and raw.isdigit() else None
        index, progress = _index_progress(logs.get(str(pod.metadata.name), []), annotated)
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


# ---------------------------------------------------------------------------------------
# The report


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
        report.pending = pending_reason(newest)
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


def job_status(cluster: Cluster, name: str, *, tail: int = 20) -> JobStatus:
    """The job's phase, times, retries, progress and, if it failed, why (with the failing
    pod's last ``tail`` log lines)."""
    job = read_job(cluster, name)
    pods = job_pods(cluster, job)
    texts: dict[str, list[str]] = {}
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
            texts[pod_name] = text.splitlines()
    report = summarize(job, pods, texts)
    if report.failed_pod is not None:
        report.last_log_lines = report.last_log_lines[-tail:]
    return report
