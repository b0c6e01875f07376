"""pytest fixtures for tests against a real Kubernetes API server.

A pytest plugin: ``tests/conftest.py`` names it in ``pytest_plugins``, so every test module
can ask for these fixtures by name.

* ``kube_cluster``: session-scoped ``LocalCluster``. Skipped when the binaries
  are missing (run ``bash tests/support/kube/build_k8s.sh``), unless
  ``MERGEJOB_REQUIRE_KUBE=1``, which turns the skip into a failure (CI).
* ``kube_namespace``: a fresh namespace per test, deleted afterwards.
* ``kubelet``: a ``FakeKubelet`` running the Pods of ``kube_namespace``; set
  ``kubelet.command_rewriter`` (or use ``kubelet.rewriter``) before creating
  Jobs to map the image's commands and paths onto this machine.
* ``kubectl``: the project's kubectl (with kustomize), module-scoped; skipped or failed
  like ``kube_cluster`` when it is missing.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from .cluster import BUILD_SCRIPT, LocalCluster, bin_dir, kubectl_path, missing_binaries
from .kubelet import FakeKubelet, MappingRewriter


def default_rewriter() -> MappingRewriter:
    """Maps ``python``/``python3`` and ``mergejob`` to this virtualenv, and the
    image's config mount ``/etc/mergejob`` to ``MERGEJOB_CONFIG``."""
    venv_bin = Path(sys.executable).parent
    return MappingRewriter(
        executables={
            "python": sys.executable,
            "python3": sys.executable,
            "mergejob": str(venv_bin / "mergejob"),
        },
        mount_env={"/etc/mergejob": "MERGEJOB_CONFIG"},
        env={"PYTHONUNBUFFERED": "1"},
    )


_shared_lock = threading.Lock()
_shared: LocalCluster | None = None
_shared_users = 0


def _acquire_cluster() -> LocalCluster:
    global _shared, _shared_users
    with _shared_lock:
        if _shared is None:
            cluster = LocalCluster()
            cluster.start()
            _shared = cluster
        _shared_users += 1
        return _shared


def _release_cluster() -> None:
    global _shared, _shared_users
    with _shared_lock:
        _shared_users -= 1
        if _shared_users == 0 and _shared is not None:
            _shared.stop()
            _shared = None


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[LocalCluster]:
    # One cluster per test process, even if these fixtures are ever imported by
    # more than one conftest (each import makes its own session fixture).
    missing = missing_binaries()
    if missing:
        reason = (
            f"Kubernetes test binaries missing in {bin_dir()} ({', '.join(missing)}): "
            f"run `bash {BUILD_SCRIPT}` once (about 8 minutes)"
        )
        if os.environ.get("MERGEJOB_REQUIRE_KUBE") == "1":
            pytest.fail(reason + " [MERGEJOB_REQUIRE_KUBE=1]", pytrace=False)
        pytest.skip(reason)
    cluster = _acquire_cluster()
    try:
        yield cluster
    finally:
        _release_cluster()


@pytest.fixture
def kube_namespace(kube_cluster: LocalCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    api = kube_cluster.api_client()
    core = k8s.CoreV1Api(api)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise
        api.close()


@pytest.fixture
def kubelet(kube_cluster: LocalCluster, kube_namespace: str) -> Iterator[FakeKubelet]:
    fake = FakeKubelet.for_cluster(
        kube_cluster, kube_namespace, command_rewriter=default_rewriter()
    )
    with fake:
        yield fake


@pytest.fixture(scope="module")
def kubectl() -> Path:
    path = kubectl_path()
    if path is None:
        reason = f"kubectl (with kustomize) missing in {bin_dir()}: run `bash {BUILD_SCRIPT}` once"
        if os.environ.get("MERGEJOB_REQUIRE_KUBE") == "1":
            pytest.fail(reason + " [MERGEJOB_REQUIRE_KUBE=1]", pytrace=False)
        pytest.skip(reason)
    return path
