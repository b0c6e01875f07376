"""A kubelet stand-in for tests against the real API server of ``cluster.py``.

``FakeKubelet`` registers a Node, watches the Pods of one namespace, binds each
pending Pod to its Node, "runs" each container as a subprocess of this machine
(through a ``command_rewriter`` hook that maps the image's paths onto this
machine), reports the Pod status (Running, then Succeeded/Failed with exit
codes) so the Job controller reacts as on a real cluster, and serves the
container output on ``/containerLogs/...`` over HTTPS so that
``CoreV1Api.read_namespaced_pod_log`` works through the API server.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.server
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

if TYPE_CHECKING:
    from .cluster import LocalCluster

COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# (pod, container, mounts{mountPath: host path}) -> (argv, env overrides)
CommandRewriter = Callable[
    [k8s.V1Pod, k8s.V1Container, dict[str, str]], tuple[list[str], dict[str, str]]
]
# pod -> completion index (for Indexed Jobs on servers that drop the annotation)
IndexCallback = Callable[[k8s.V1Pod], "int | None"]


class IndicesInOrder:
    """An :data:`IndexCallback` that numbers the pods in the order they appear (0, 1, ...),
    as an Indexed Job of a server without them (1.20) needs; ``seen``: pod name -> index."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, pod: k8s.V1Pod) -> int:
        assert pod.metadata is not None
        return self.seen.setdefault(str(pod.metadata.name), len(self.seen))


class PodStartError(RuntimeError):
    """A container cannot be started yet (missing ConfigMap/Secret, ...).

    Like a real kubelet, the stand-in keeps the Pod Pending with the container
    waiting for ``reason`` and retries, unless ``retry`` is false (then the
    Pod fails with ``ContainerCannotRun``).
    """

    def __init__(
        self, message: str, reason: str = "CreateContainerConfigError", retry: bool = True
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry = retry


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion; ``$$`` escapes; unknown refs stay."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(repl, text)


def map_path(value: str, mounts: Mapping[str, str]) -> str:
    """Rewrite a path inside the container to the host folder of its mount."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        mp = mount_path.rstrip("/")
        if value in (mp, mount_path):
            return mounts[mount_path]
        if value.startswith(mp + "/"):
            return mounts[mount_path].rstrip("/") + value[len(mp) :]
    return value


class MappingRewriter:
    """A ``command_rewriter`` that maps the image's world onto this machine.

    * ``executables``: argv[0] (full path or basename, e.g. ``"mergejob"`` or
      ``"python"``) -> host executable.
    * argv entries that are paths under a volume mount (``/etc/mergejob/x``, or
      ``--config=/etc/mergejob/x``) are rewritten to the host folder.
    * ``mount_env``: mount path -> env var that receives the host folder, e.g.
      ``{"/etc/mergejob": "MERGEJOB_CONFIG"}``.
    * ``env``: extra environment for every container.
    """

    def __init__(
        self,
        executables: Mapping[str, str] | None = None,
        mount_env: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.executables = dict(executables or {})
        self.mount_env = dict(mount_env or {})
        self.env = dict(env or {})

    def __call__(
        self, pod: k8s.V1Pod, container: k8s.V1Container, mounts: dict[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        argv = list(container.command or []) + list(container.args or [])
        if not argv:
            raise PodStartError(
                f"container {container.name} has no command: the image entrypoint is unknown here",
                reason="ContainerCannotRun",
                retry=False,
            )
        exe = argv[0]
        if exe in self.executables:
            argv[0] = self.executables[exe]
        elif os.path.basename(exe) in self.executables:
            argv[0] = self.executables[os.path.basename(exe)]
        out = [argv[0]]
        for arg in argv[1:]:
            if "=" in arg and arg.startswith("-"):
                k, v = arg.split("=", 1)
                out.append(f"{k}={map_path(v, mounts)}")
            else:
                out.append(map_path(arg, mounts))
        env = dict(self.env)
        # The container's own value (path-mapped by the kubelet) wins over mount_env,
        # e.g. MERGEJOB_CONFIG=/etc/mergejob/config.yaml set by the Job itself.
        own = {e.name for e in container.env or []}
        for mount_path, var in self.mount_env.items():
            if var in own:
                continue
            host = map_path(mount_path, mounts)
            if host != mount_path:
                env[var] = host
        return out, env


class LogStream:
    """Output of one container, readable while it is written (for follow)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._cond = threading.Condition()
        self.closed = False

    def write(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(data)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def data(self) -> bytes:
        with self._cond:
            return b"".join(self._chunks)

    def read_from(self, index: int, timeout: float) -> tuple[list[bytes], int, bool]:
        """Chunks from ``index`` on (waits up to ``timeout`` for new ones)."""
        with self._cond:
            if index >= len(self._chunks) and not self.closed:
                self._cond.wait(timeout)
            chunks = self._chunks[index:]
            return chunks, index + len(chunks), self.closed


@dataclass
class ContainerRun:
    """What the stand-in ran for one container (for assertions)."""

    pod: str
    container: str
    argv: list[str]
    env: dict[str, str]
    mounts: dict[str, str]
    cwd: str
    process_env: dict[str, str] = field(default_factory=dict, repr=False)
    exit_code: int | None = None
    reason: str | None = None
    restarts: int = 0
    log: LogStream = field(default_factory=LogStream)

    @property
    def output(self) -> str:
        return self.log.data().decode(errors="replace")


class _LogHandler(http.server.BaseHTTPRequestHandler):
    server: _LogServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        if url.path == "/healthz":
            self._reply(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._reply(404, f"404 page not found: {url.path}")
            return
        _, ns, pod, container = parts
        stream = self.server.kubelet.log_stream(ns, pod, container)
        if stream is None:
            self._reply(
                400,
                f'container "{container}" in pod "{pod}" is waiting to start: ContainerCreating',
            )
            return
        follow = query.get("follow", ["false"])[0] == "true"
        tail = query.get("tailLines", [None])[0]
        limit = query.get("limitBytes", [None])[0]
        remaining = int(limit) if limit is not None else None
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Connection", "close")
        self.end_headers()

        def emit(data: bytes) -> bool:
            nonlocal remaining
            if remaining is not None:
                data = data[:remaining]
                remaining -= len(data)
            if data:
                self.wfile.write(data)
                self.wfile.flush()
            return remaining is None or remaining > 0

        kubelet = self.server.kubelet
        with kubelet._lock:
            cut = follow and kubelet.cut_log_streams > 0
            if cut:
                kubelet.cut_log_streams -= 1
        if cut:
            remaining = kubelet.cut_after_bytes
        chunks, index, closed = stream.read_from(0, 0)
        first = b"".join(chunks)
        if tail is not None:
            lines = first.splitlines(keepends=True)
            first = b"".join(lines[-int(tail) :]) if int(tail) > 0 else b""
        try:
            if not emit(first) or not follow:
                return
            while not closed and not self.server.stopping.is_set():
                chunks, index, closed = stream.read_from(index, 0.2)
                if not emit(b"".join(chunks)):
                    return
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return
        finally:
            if cut and remaining is not None and remaining <= 0:
                with kubelet._lock:
                    kubelet.log_streams_cut += 1


class _LogServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, kubelet: FakeKubelet, ctx: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _LogHandler)
        self.kubelet = kubelet
        self.stopping = threading.Event()
        self.socket = ctx.wrap_socket(self.socket, server_side=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients (the API server) hang up on follow streams; not an error


class FakeKubelet:
    """Registers a Node and runs the Pods of one namespace as local processes.

    Parameters:
      api_client: an admin ``ApiClient``.
      namespace: the namespace whose Pods it binds and runs.
      cert_path/key_path: the HTTPS serving certificate for the log endpoint;
        the API server must trust it (``LocalCluster.kubelet_cert_path``).
      command_rewriter: ``(pod, container, mounts) -> (argv, env)``; ``env``
        overrides the process env (host env + container env). Default:
        ``MappingRewriter()`` (command + args as written, mount paths mapped).
      completion_index: ``pod -> int | None``, for the JOB_COMPLETION_INDEX env
        var when the pod lacks the ``batch.kubernetes.io/job-completion-index``
        annotation (Kubernetes 1.20 has no Indexed Jobs).
      inherit_env: start processes with this process' environment under the
        container's (PATH, HOME, ...).
    """

    def __init__(
        self,
        api_client: k8s.ApiClient,
        namespace: str,
        *,
        cert_path: str | os.PathLike[str],
        key_path: str | os.PathLike[str],
        node_name: str | None = None,
        command_rewriter: CommandRewriter | None = None,
        completion_index: IndexCallback | None = None,
        inherit_env: bool = True,
        kill_grace_seconds: float = 2.0,
        retry_seconds: float = 0.5,
    ) -> None:
        self.api_client = api_client
        self.owns_client = False  # close api_client on stop()
        self.core = k8s.CoreV1Api(api_client)
        self.namespace = namespace
        self.node_name = node_name or f"fake-node-{namespace}"[:63]
        self.command_rewriter: CommandRewriter = command_rewriter or MappingRewriter()
        self.completion_index = completion_index
        self.inherit_env = inherit_env
        self.kill_grace_seconds = kill_grace_seconds
        self.retry_seconds = retry_seconds
        self.runs: dict[tuple[str, str], ContainerRun] = {}
        self.errors: list[str] = []
        # Fault: the next `cut_log_streams` followed log streams end (as if a proxy or a
        # kubelet restart cut them) once `cut_after_bytes` have been sent.
        self.cut_log_streams = 0
        self.cut_after_bytes = 0
        self.log_streams_cut = 0
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(str(cert_path), str(key_path))
        self._server: _LogServer | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._handled: set[str] = set()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._deleting: set[str] = set()
        self._stop = threading.Event()
        self._watch: k8s_watch.Watch | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="mergejob-kubelet-"))
        self.port = 0

    @classmethod
    def for_cluster(cls, cluster: LocalCluster, namespace: str, **kwargs: Any) -> FakeKubelet:
        kubelet = cls(
            cluster.api_client(),
            namespace,
            cert_path=cluster.kubelet_cert_path,
            key_path=cluster.kubelet_key_path,
            **kwargs,
        )
        kubelet.owns_client = True
        return kubelet

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> FakeKubelet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._server = _LogServer(self, self._ctx)
        self.port = int(self._server.server_address[1])
        server = self._server
        self._spawn(lambda: server.serve_forever(poll_interval=0.1), "log-server")
        self._register_node()
        self._spawn(self._watch_loop, "pod-watch")

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            _kill_group(proc, signal.SIGKILL)
        if self._server is not None:
            self._server.stopping.set()
            self._server.shutdown()
        for run in list(self.runs.values()):
            run.log.close()
        for t in self._threads:
            t.join(timeout=10)
        if self._server is not None:
            self._server.server_close()
        try:
            self.core.delete_node(self.node_name)
        except ApiException:
            pass
        except Exception as e:
            self.errors.append(f"delete node: {e!r}")
        shutil.rmtree(self._workdir, ignore_errors=True)
        if self.owns_client:
            self.api_client.close()

    # ------------------------------------------------------------ accessors
    def log_stream(self, namespace: str, pod: str, container: str) -> LogStream | None:
        if namespace != self.namespace:
            return None
        run = self.runs.get((pod, container))
        return run.log if run else None

    def wait_for_run(self, pod_prefix: str = "", timeout: float = 30.0) -> ContainerRun:
        """The first finished ContainerRun whose pod name starts with ``pod_prefix``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run in list(self.runs.values()):
                if run.pod.startswith(pod_prefix) and run.exit_code is not None and run.log.closed:
                    return run
            time.sleep(0.05)
        raise TimeoutError(
            f"no finished container for pod prefix {pod_prefix!r}; errors={self.errors}"
        )

    # ------------------------------------------------------------ internals
    def _spawn(self, target: Callable[..., Any], name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=f"fake-kubelet-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux"},
            },
        }
        try:
            self.core.create_node(k8s.V1Node.model_validate(node))
        except ApiException as e:
            if e.status != 409:
                raise
        now = _now()
        status = {
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": self.node_name},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
                "capacity": {"cpu": "64", "memory": "256Gi", "pods": "110"},
                "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110"},
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "fake kubelet is ready",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "nodeInfo": {
                    "machineID": "fake",
                    "systemUUID": "fake",
                    "bootID": "fake",
                    "kernelVersion": os.uname().release,
                    "osImage": "mergejob fake kubelet",
                    "containerRuntimeVersion": "fake://1",
                    "kubeletVersion": "v1.20.2",
                    "kubeProxyVersion": "v1.20.2",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            }
        }
        self.core.patch_node_status(self.node_name, status)

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            self._watch = k8s_watch.Watch()
            try:
                for event in self._watch.stream(
                    self.core.list_namespaced_pod, self.namespace, timeout_seconds=60
                ):
                    if self._stop.is_set():
                        break
                    self._on_event(event["type"], event["object"])
            except Exception as e:
                if self._stop.is_set():
                    return
                self.errors.append(f"watch: {e!r}")
                time.sleep(0.5)

    def _on_event(self, kind: str, pod: k8s.V1Pod) -> None:
        meta = pod.metadata
        spec = pod.spec
        if meta is None or spec is None or kind == "DELETED":
            return
        uid = str(meta.uid)
        if meta.deletion_timestamp is not None:
            if spec.node_name == self.node_name:
                with self._lock:
                    first = uid not in self._deleting
                    self._deleting.add(uid)
                if first:
                    self._spawn(self._delete_pod, f"delete-{meta.name}", pod)
            return
        if spec.node_name and spec.node_name != self.node_name:
            return
        phase = pod.status.phase if pod.status else None
        if phase in ("Succeeded", "Failed"):
            return
        with self._lock:
            if uid in self._handled:
                return
            self._handled.add(uid)
        self._spawn(self._run_pod, f"pod-{meta.name}", pod)

    def _delete_pod(self, pod: k8s.V1Pod) -> None:
        assert pod.metadata is not None
        uid = str(pod.metadata.uid)
        with self._lock:
            procs = [p for key, p in self._procs.items() if key.startswith(uid + "/")]
        for proc in procs:
            _terminate(proc, self.kill_grace_seconds)
        try:
            self.core.delete_namespaced_pod(
                str(pod.metadata.name),
                self.namespace,
                grace_period_seconds=0,
                body=k8s.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=k8s.V1Preconditions(uid=uid)
                ),
            )
        except ApiException as e:
            if e.status not in (404, 409):
                self.errors.append(f"delete pod {pod.metadata.name}: {e.status} {e.reason}")

    # -------------------------------------------------------------- running
    def _bind(self, pod: k8s.V1Pod) -> None:
        assert pod.metadata is not None and pod.spec is not None
        if pod.spec.node_name == self.node_name:
            return
        body = k8s.V1Binding(
            metadata=k8s.V1ObjectMeta(name=pod.metadata.name, uid=pod.metadata.uid),
            target=k8s.V1ObjectReference(api_version="v1", kind="Node", name=self.node_name),
        )
        # The server answers a Status, which the client cannot read as a
        # V1Binding (target is required): take the raw response instead.
        resp: Any = self.core.create_namespaced_pod_binding(
            str(pod.metadata.name), self.namespace, body, _preload_content=False
        )
        resp.read()
        resp.release_conn()

    def _patch_status(self, pod_name: str, status: dict[str, Any]) -> None:
        for attempt in range(5):
            try:
                self.core.patch_namespaced_pod_status(pod_name, self.namespace, {"status": status})
                return
            except ApiException as e:
                if e.status == 404:
                    return
                if attempt == 4:
                    raise
                time.sleep(0.1)

    def _run_pod(self, pod: k8s.V1Pod) -> None:
        assert pod.metadata is not None and pod.spec is not None
        name = str(pod.metadata.name)
        uid = str(pod.metadata.uid)
        started = _now()
        containers: list[k8s.V1Container] = list(pod.spec.containers or [])
        pod_dir = self._workdir / f"{name}-{uid[:8]}"
        bound = False
        last_message = ""
        while True:
            if self._stop.is_set() or uid in self._deleting:
                return
            try:
                if not bound:
                    self._bind(pod)
                    bound = True
                volumes = self._materialise_volumes(pod, pod_dir)
                prepared = [self._prepare_container(pod, c, volumes, pod_dir) for c in containers]
                break
            except PodStartError as e:
                self.errors.append(f"start pod {name}: {e}")
                if e.retry:
                    if str(e) != last_message:
                        last_message = str(e)
                        self._report_waiting(pod, containers, started, e)
                    time.sleep(self.retry_seconds)
                    continue
                self._report_start_failure(pod, containers, started, str(e))
                return
            except Exception as e:
                self.errors.append(f"start pod {name}: {e!r}")
                self._report_start_failure(pod, containers, started, repr(e))
                return
        restart_on_failure = pod.spec.restart_policy == "OnFailure"
        threads: list[threading.Thread] = []
        for run in prepared:
            with self._lock:
                self.runs[(name, run.container)] = run
        self._report_running(pod, prepared, started)
        for run, container in zip(prepared, containers, strict=True):
            t = threading.Thread(
                target=self._run_container,
                args=(pod, container, run, restart_on_failure, prepared, started),
                daemon=True,
                name=f"fake-kubelet-{name}-{run.container}",
            )
            threads.append(t)
            t.start()
        for t in threads:
            t.join()
        if self._stop.is_set() or uid in self._deleting:
            return
        codes = [r.exit_code if r.exit_code is not None else 137 for r in prepared]
        phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
        self._patch_status(
            name,
            {
                "phase": phase,
                "conditions": self._conditions(False),
                "containerStatuses": [self._status_terminated(pod, r, started) for r in prepared],
            },
        )

    def _run_container(
        self,
        pod: k8s.V1Pod,
        container: k8s.V1Container,
        run: ContainerRun,
        restart_on_failure: bool,
        all_runs: list[ContainerRun],
        started: str,
    ) -> None:
        assert pod.metadata is not None
        uid = str(pod.metadata.uid)
        backoff = 0.2
        while True:
            # Under the lock: stop() and pod deletion see every process started.
            with self._lock:
                if self._stop.is_set() or uid in self._deleting:
                    run.exit_code = 137
                    break
                try:
                    proc = subprocess.Popen(
                        run.argv,
                        env=run.process_env,
                        cwd=run.cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                except OSError as e:
                    run.log.write(f"fake-kubelet: cannot start {run.argv!r}: {e}\n".encode())
                    run.exit_code = 128
                    run.reason = "ContainerCannotRun"
                    break
                self._procs[f"{uid}/{run.container}"] = proc
            assert proc.stdout is not None
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                run.log.write(chunk)
            code = proc.wait()
            run.exit_code = code if code >= 0 else 128 - code
            if (
                run.exit_code == 0
                or not restart_on_failure
                or self._stop.is_set()
                or uid in self._deleting
            ):
                break
            run.restarts += 1
            self._report_running(pod, all_runs, started, restarted=run)
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            run.exit_code = None
        run.log.close()

    def _event(self, pod: k8s.V1Pod, reason: str, message: str, type_: str = "Warning") -> None:
        assert pod.metadata is not None
        now = _now()
        body = {
            "metadata": {"generateName": f"{pod.metadata.name}."},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": self.namespace,
                "name": pod.metadata.name,
                "uid": pod.metadata.uid,
            },
            "reason": reason,
            "message": message[:1000],
            "type": type_,
            "source": {"component": "kubelet", "host": self.node_name},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(self.namespace, k8s.CoreV1Event.model_validate(body))
        except ApiException as e:
            self.errors.append(f"event {reason}: {e.status}")

    def _report_waiting(
        self,
        pod: k8s.V1Pod,
        containers: list[k8s.V1Container],
        started: str,
        error: PodStartError,
    ) -> None:
        """Pending, containers waiting (CreateContainerConfigError, ContainerCreating)."""
        assert pod.metadata is not None
        message = str(error)
        if error.reason == "ContainerCreating":
            self._event(pod, "FailedMount", f"MountVolume.SetUp failed: {message}")
        else:
            self._event(pod, "Failed", f"Error: {message}")
        statuses = [
            {
                "name": c.name,
                "image": c.image or "",
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": error.reason, "message": message[:1000]}},
            }
            for c in containers
        ]
        self._patch_status(
            str(pod.metadata.name),
            {
                "phase": "Pending",
                "hostIP": "127.0.0.1",
                "startTime": started,
                "conditions": self._conditions(False),
                "containerStatuses": statuses,
            },
        )

    def _report_start_failure(
        self, pod: k8s.V1Pod, containers: list[k8s.V1Container], started: str, message: str
    ) -> None:
        assert pod.metadata is not None
        statuses = [
            {
                "name": c.name,
                "image": c.image or "",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "ContainerCannotRun",
                        "message": message[:1000],
                        "startedAt": started,
                        "finishedAt": _now(),
                    }
                },
            }
            for c in containers
        ]
        try:
            self._patch_status(
                str(pod.metadata.name),
                {
                    "phase": "Failed",
                    "startTime": started,
                    "message": message[:1000],
                    "containerStatuses": statuses,
                },
            )
        except ApiException as e:
            self.errors.append(f"status {pod.metadata.name}: {e.status}")

    @staticmethod
    def _conditions(ready: bool) -> list[dict[str, str]]:
        now = _now()
        value = "True" if ready else "False"
        return [
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": value, "lastTransitionTime": now},
            {"type": "Ready", "status": value, "lastTransitionTime": now},
        ]

    def _report_running(
        self,
        pod: k8s.V1Pod,
        runs: list[ContainerRun],
        started: str,
        restarted: ContainerRun | None = None,
    ) -> None:
        assert pod.metadata is not None
        statuses = []
        for r in runs:
            st: dict[str, Any] = {
                "name": r.container,
                "image": self._image(pod, r.container),
                "imageID": "",
                "containerID": f"fake://{pod.metadata.uid}/{r.container}",
                "ready": True,
                "started": True,
                "restartCount": r.restarts,
                "state": {"running": {"startedAt": _now() if r is restarted else started}},
            }
            if r is restarted and r.exit_code is not None:
                st["lastState"] = {
                    "terminated": {
                        "exitCode": r.exit_code,
                        "reason": "Error",
                        "startedAt": started,
                        "finishedAt": _now(),
                    }
                }
            statuses.append(st)
        self._patch_status(
            str(pod.metadata.name),
            {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "startTime": started,
                "conditions": self._conditions(True),
                "containerStatuses": statuses,
            },
        )

    @staticmethod
    def _image(pod: k8s.V1Pod, container: str) -> str:
        assert pod.spec is not None
        for c in pod.spec.containers or []:
            if c.name == container:
                return str(c.image or "")
        return ""

    def _status_terminated(self, pod: k8s.V1Pod, run: ContainerRun, started: str) -> dict[str, Any]:
        assert pod.metadata is not None
        code = run.exit_code if run.exit_code is not None else 137
        return {
            "name": run.container,
            "image": self._image(pod, run.container),
            "imageID": "",
            "containerID": f"fake://{pod.metadata.uid}/{run.container}",
            "ready": False,
            "started": False,
            "restartCount": run.restarts,
            "state": {
                "terminated": {
                    "exitCode": code,
                    "reason": run.reason or ("Completed" if code == 0 else "Error"),
                    "startedAt": started,
                    "finishedAt": _now(),
                    "containerID": f"fake://{pod.metadata.uid}/{run.container}",
                }
            },
        }

    # ------------------------------------------------- env, volumes, argv
    def _config_map_data(self, name: str, optional: bool | None) -> dict[str, bytes] | None:
        try:
            cm = self.core.read_namespaced_config_map(name, self.namespace)
        except ApiException as e:
            if e.status == 404 and optional:
                return None
            raise PodStartError(f'configmap "{name}" not found') from e
        data = {k: v.encode() for k, v in (cm.data or {}).items()}
        for k, v in (cm.binary_data or {}).items():
            data[k] = base64.b64decode(v)
        return data

    def _secret_data(self, name: str, optional: bool | None) -> dict[str, bytes] | None:
        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as e:
            if e.status == 404 and optional:
                return None
            raise PodStartError(f'secret "{name}" not found') from e
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def _materialise_volumes(self, pod: k8s.V1Pod, pod_dir: Path) -> dict[str, str]:
        """Volume name -> host folder (ConfigMap/Secret keys as files, emptyDir)."""
        assert pod.spec is not None
        out: dict[str, str] = {}
        for vol in pod.spec.volumes or []:
            target = pod_dir / "volumes" / vol.name
            data: dict[str, bytes] | None = None
            items: list[k8s.V1KeyToPath] | None = None
            try:
                if vol.config_map is not None:
                    data = self._config_map_data(str(vol.config_map.name), vol.config_map.optional)
                    items = vol.config_map.items
                elif vol.secret is not None:
                    data = self._secret_data(str(vol.secret.secret_name), vol.secret.optional)
                    items = vol.secret.items
                elif vol.empty_dir is None:
                    self.errors.append(
                        f"pod {pod.metadata and pod.metadata.name}: "
                        f"volume {vol.name} unsupported, left empty"
                    )
            except PodStartError as e:
                raise PodStartError(f'volume "{vol.name}": {e}', reason="ContainerCreating") from e
            target.mkdir(parents=True, exist_ok=True)
            data = data or {}
            if items:
                for item in items:
                    if item.key not in data:
                        raise PodStartError(
                            f"key {item.key} missing for volume {vol.name}",
                            reason="ContainerCreating",
                        )
                    path = target / item.path
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data[item.key])
            else:
                for key, value in data.items():
                    (target / key).write_bytes(value)
            out[vol.name] = str(target)
        return out

    def _field_ref(self, pod: k8s.V1Pod, path: str) -> str:
        assert pod.metadata is not None
        meta = pod.metadata
        simple = {
            "metadata.name": meta.name,
            "metadata.namespace": meta.namespace or self.namespace,
            "metadata.uid": meta.uid,
            "spec.nodeName": self.node_name,
            "spec.serviceAccountName": pod.spec.service_account_name if pod.spec else None,
            "status.hostIP": "127.0.0.1",
            "status.podIP": "127.0.0.1",
        }
        if path in simple:
            return str(simple[path] or "")
        m = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
        if m:
            src = (meta.annotations if m.group(1) == "annotations" else meta.labels) or {}
            return str(src.get(m.group(2), ""))
        raise PodStartError(f"unsupported fieldRef {path}", retry=False)

    def resolve_env(self, pod: k8s.V1Pod, container: k8s.V1Container) -> dict[str, str]:
        """The container's environment as the kubelet would compute it."""
        env: dict[str, str] = {}
        for src in container.env_from or []:
            prefix = src.prefix or ""
            data: dict[str, bytes] | None = None
            if src.config_map_ref is not None:
                data = self._config_map_data(
                    str(src.config_map_ref.name), src.config_map_ref.optional
                )
            elif src.secret_ref is not None:
                data = self._secret_data(str(src.secret_ref.name), src.secret_ref.optional)
            for k, v in (data or {}).items():
                env[prefix + k] = v.decode(errors="replace")
        for var in container.env or []:
            if var.value_from is None:
                env[var.name] = expand_vars(var.value or "", env)
                continue
            vf = var.value_from
            if vf.secret_key_ref is not None:
                ref = vf.secret_key_ref
                sdata = self._secret_data(str(ref.name), ref.optional)
                if sdata is None or ref.key not in sdata:
                    if ref.optional:
                        continue
                    raise PodStartError(
                        f"couldn't find key {ref.key} in Secret {self.namespace}/{ref.name}"
                    )
                env[var.name] = sdata[ref.key].decode(errors="replace")
            elif vf.config_map_key_ref is not None:
                cref = vf.config_map_key_ref
                cdata = self._config_map_data(str(cref.name), cref.optional)
                if cdata is None or cref.key not in cdata:
                    if cref.optional:
                        continue
                    raise PodStartError(
                        f"couldn't find key {cref.key} in ConfigMap {self.namespace}/{cref.name}"
                    )
                env[var.name] = cdata[cref.key].decode(errors="replace")
            elif vf.field_ref is not None:
                env[var.name] = self._field_ref(pod, vf.field_ref.field_path)
            else:
                raise PodStartError(f"unsupported valueFrom for env {var.name}", retry=False)
        return env

    def _prepare_container(
        self, pod: k8s.V1Pod, container: k8s.V1Container, volumes: dict[str, str], pod_dir: Path
    ) -> ContainerRun:
        assert pod.metadata is not None
        mounts: dict[str, str] = {}
        for vm in container.volume_mounts or []:
            if vm.name not in volumes:
                raise PodStartError(f"volume mount {vm.name} has no volume", retry=False)
            host = volumes[vm.name]
            if vm.sub_path:
                host = os.path.join(host, vm.sub_path)
            mounts[vm.mount_path] = host
        env = self.resolve_env(pod, container)
        index = (pod.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION)
        if index is None and self.completion_index is not None:
            got = self.completion_index(pod)
            index = None if got is None else str(got)
        if index is not None:
            env.setdefault("JOB_COMPLETION_INDEX", index)
        env.setdefault("HOSTNAME", str(pod.metadata.name))
        # Container paths in env values (e.g. CONFIG=/etc/mergejob/x.yaml) point at the host copies.
        env = {k: map_path(v, mounts) for k, v in env.items()}
        argv, overrides = self.command_rewriter(pod, container, mounts)
        env.update(overrides)
        argv = [expand_vars(a, env) for a in argv]
        full_env = dict(os.environ) if self.inherit_env else {}
        full_env.update(env)
        cwd = pod_dir / "cwd" / container.name
        cwd.mkdir(parents=True, exist_ok=True)
        workdir = str(cwd)
        if container.working_dir:
            mapped = map_path(container.working_dir, mounts)
            if mapped != container.working_dir:
                workdir = mapped
        return ContainerRun(
            pod=str(pod.metadata.name),
            container=container.name,
            argv=argv,
            env=env,
            mounts=mounts,
            cwd=workdir,
            process_env=full_env,
        )


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    _kill_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        proc.wait(timeout=10)
