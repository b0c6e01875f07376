"""A real (tiny) Kubernetes control plane on loopback for tests.

``LocalCluster`` starts etcd, kube-apiserver and kube-controller-manager
(v1.20.2, built by ``tests/support/kube/build_k8s.sh``) as child processes, waits until
the API server is ready, writes kubeconfig files and stops everything on exit.
There is no scheduler and no kubelet: see ``tests/support/kube/kubelet.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

K8S_VERSION = "1.20.2"
BUILD_SCRIPT = "tests/support/kube/build_k8s.sh"
REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")

ADMIN_USER = "mergejob-admin"
NOPERM_USER = "mergejob-noperm"


class BinariesMissingError(RuntimeError):
    """The Kubernetes binaries have not been built yet."""


class ClusterStartError(RuntimeError):
    """A control-plane component did not start."""


def cache_root() -> Path:
    env = os.environ.get("MERGEJOB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mergejob"


def bin_dir() -> Path:
    """Folder holding etcd, kube-apiserver, kube-controller-manager, kubectl."""
    return cache_root() / f"k8s-{K8S_VERSION}" / "bin"


def missing_binaries(directory: Path | None = None) -> list[str]:
    d = directory or bin_dir()
    return [b for b in REQUIRED_BINARIES if not os.access(d / b, os.X_OK)]


def kubectl_path() -> Path | None:
    """The project's kubectl 1.35 (with kustomize), if built; never /usr/bin/kubectl."""
    p = bin_dir() / "kubectl"
    return p if os.access(p, os.X_OK) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise ClusterStartError("openssl is needed to make keys and certificates")
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_self_signed_cert(cert: Path, key: Path, cn: str = "127.0.0.1") -> None:
    """A self-signed serving certificate for 127.0.0.1/localhost (also usable as its own CA)."""
    run_openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "7",
        "-subj",
        f"/CN={cn}",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
        "-addext",
        "extendedKeyUsage=serverAuth",
    )


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the test process dies (even by SIGKILL)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _client_from(kubeconfig: Path) -> k8s_client.ApiClient:
    api = k8s_config.new_client_from_config(config_file=str(kubeconfig))
    assert isinstance(api, k8s_client.ApiClient)
    return api


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager on loopback.

    Use as a context manager. After ``start()``:

    * ``kubeconfig_path``: kubeconfig of an admin (group ``system:masters``)
    * ``noperm_kubeconfig_path``: kubeconfig of a user with no RBAC grants
    * ``api_client()`` / ``noperm_api_client()``: configured ``ApiClient``s
    * ``kubelet_cert_path`` / ``kubelet_key_path``: the serving certificate a
      fake kubelet must use; the API server trusts it for logs.
    """

    def __init__(
        self, workdir: str | os.PathLike[str] | None = None, startup_timeout: float = 60.0
    ) -> None:
        missing = missing_binaries()
        if missing:
            raise BinariesMissingError(
                f"Kubernetes test binaries missing in {bin_dir()}: {', '.join(missing)}. "
                f"Build them with: bash {BUILD_SCRIPT}  (about 8 minutes, once)"
            )
        self.bin = bin_dir()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mergejob-kube-"))
        self.startup_timeout = startup_timeout
        self.admin_token = os.urandom(16).hex()
        self.noperm_token = os.urandom(16).hex()
        self.etcd_port = 0
        self.apiserver_port = 0
        self.server = ""
        self.kubeconfig_path = self.workdir / "admin.kubeconfig"
        self.noperm_kubeconfig_path = self.workdir / "noperm.kubeconfig"
        self.ca_path = self.workdir / "certs" / "apiserver.crt"
        self.kubelet_cert_path = self.workdir / "kubelet" / "kubelet.crt"
        self.kubelet_key_path = self.workdir / "kubelet" / "kubelet.key"
        self._procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self._logs: list[IO[bytes]] = []

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalCluster:
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
        try:
            self._prepare_files()
            self._start_etcd()
            self._start_apiserver()
            self._wait_ready()
            self._write_kubeconfigs()
            self._start_controller_manager()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for _name, proc, _log in reversed(self._procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _name, proc, _log in reversed(self._procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self._own_workdir and os.environ.get("MERGEJOB_KEEP_KUBE_DIR") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --------------------------------------------------------------- helpers
    def api_client(self) -> k8s_client.ApiClient:
        """An ApiClient authenticated as the admin (system:masters)."""
        return _client_from(self.kubeconfig_path)

    def noperm_api_client(self) -> k8s_client.ApiClient:
        """An ApiClient authenticated as a user with no permissions at all."""
        return _client_from(self.noperm_kubeconfig_path)

    def log_path(self, component: str) -> Path:
        return self.workdir / "logs" / f"{component}.log"

    def component_logs(self, n: int = 40) -> str:
        return "\n".join(f"--- {name} ---\n{_tail(log, n)}" for name, _p, log in self._procs)

    def kubectl_env(self) -> dict[str, str]:
        """Environment for running the project's kubectl against this cluster."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig_path)
        return env

    # ------------------------------------------------------------ internals
    def _prepare_files(self) -> None:
        for sub in ("etcd", "certs", "logs", "kubelet"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "etcd").chmod(0o700)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(
            f'{self.admin_token},{ADMIN_USER},uid-admin,"system:masters"\n'
            f"{self.noperm_token},{NOPERM_USER},uid-noperm\n"
        )
        tokens.chmod(0o600)
        sa_key = self.workdir / "sa.key"
        run_openssl("genrsa", "-out", str(sa_key), "2048")
        make_self_signed_cert(
            self.kubelet_cert_path, self.kubelet_key_path, cn="mergejob-fake-kubelet"
        )

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log_path = self.log_path(name)
        log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # no orphaned control plane
        )
        self._procs.append((name, proc, log_path))
        return proc

    def _check_alive(self) -> None:
        for name, proc, log in self._procs:
            if proc.poll() is not None:
                raise ClusterStartError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")

    def _start_etcd(self) -> None:
        self.etcd_port = free_port()
        peer_port = free_port()
        url = f"http://127.0.0.1:{self.etcd_port}"
        self._spawn(
            "etcd",
            [
                str(self.bin / "etcd"),
                "--name=mergejob-test",
                f"--data-dir={self.workdir / 'etcd' / 'data'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=mergejob-test=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level=warn",
                "--logger=zap",
            ],
        )

    def _start_apiserver(self) -> None:
        self.apiserver_port = free_port()
        self.server = f"https://127.0.0.1:{self.apiserver_port}"
        sa_key = self.workdir / "sa.key"
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin / "kube-apiserver"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                "--insecure-port=0",
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--cert-dir={self.workdir / 'certs'}",
                f"--token-auth-file={self.workdir / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--anonymous-auth=false",
                "--disable-admission-plugins=ServiceAccount",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--feature-gates=TTLAfterFinished=true",
                # Logs: the API server connects to the node's InternalIP at the
                # port of status.daemonEndpoints.kubeletEndpoint, over TLS, and
                # verifies the kubelet's certificate against this CA.
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-certificate-authority={self.kubelet_cert_path}",
                "--enable-priority-and-fairness=false",
                "--endpoint-reconciler-type=none",
                "--v=1",
            ],
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            if self.ca_path.exists():
                ctx = ssl.create_default_context(cafile=str(self.ca_path))
                req = urllib.request.Request(
                    f"{self.server}/readyz",
                    headers={"Authorization": f"Bearer {self.admin_token}"},
                )
                try:
                    with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                        if resp.status == 200:
                            return
                        last = f"HTTP {resp.status}"
                except urllib.error.HTTPError as e:
                    last = f"HTTP {e.code}"
                except (OSError, ssl.SSLError) as e:
                    last = repr(e)
            time.sleep(0.25)
        raise ClusterStartError(
            f"kube-apiserver not ready after {self.startup_timeout}s ({last}):\n{self.component_logs()}"
        )

    def _kubeconfig(self, user: str, token: str) -> dict[str, object]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "mergejob-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_path)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": user,
                    "context": {"cluster": "mergejob-test", "user": user, "namespace": "default"},
                }
            ],
            "current-context": user,
        }

    def _write_kubeconfigs(self) -> None:
        # JSON is valid YAML; kubectl and the python client both read it.
        for path, user, token in (
            (self.kubeconfig_path, ADMIN_USER, self.admin_token),
            (self.noperm_kubeconfig_path, NOPERM_USER, self.noperm_token),
        ):
            path.write_text(json.dumps(self._kubeconfig(user, token), indent=2))
            path.chmod(0o600)

    def _start_controller_manager(self) -> None:
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig_path}",
                "--controllers=job,garbagecollector,namespace,serviceaccount,ttl-after-finished",
                "--leader-elect=false",
                "--secure-port=0",
                "--port=0",
                "--feature-gates=TTLAfterFinished=true",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
        )
        time.sleep(0.2)
        self._check_alive()
