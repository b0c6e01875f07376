"""Makes the Kubernetes fixtures available to the tests in tests/kube.

Other test folders import them the same way (from ``tests/conftest.py``); the
cluster is still started only once per test process.
"""

from tests.kube.fixtures import kube_cluster, kube_namespace, kubelet

__all__ = ["kube_cluster", "kube_namespace", "kubelet"]
