"""k8s/ kustomizations built with the project's kubectl, and compared with `mergejob render`.

Each kustomization.yaml names, in a comment line ``# mergejob render ...``, the render
command that builds the same Job and ConfigMap (``render_command``). ``kustomize`` builds a
kustomization; ``normalise`` takes out what differs by design between the two (see
tests/test_manifests_kustomize.py); ``differences`` lists what else differs, field by field.
The ``kubectl`` fixture (tests/support/kube/fixtures.py) gives the kubectl to build with.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from mergejob.launch.manifests import SPEC_SHA_ANNOTATION
from mergejob.spec import MergeSpec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding"}
K8S_SCHEMA_VERSION = "1.33"
# kustomize's content-hash suffix of a generated ConfigMap's name.
HASHED = re.compile(r"^(?P<name>.+)-[a-z0-9]{10}$")


def kustomize(kubectl: Path, directory: str) -> list[dict[str, Any]]:
    """``kubectl kustomize k8s/DIRECTORY``, parsed (a fresh copy each call)."""
    return copy.deepcopy(_kustomize(kubectl, directory))


@functools.cache
def _kustomize(kubectl: Path, directory: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(kubectl), "kustomize", str(K8S / directory)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_command(directory: str) -> list[str]:
    """The ``# mergejob render ...`` line of a kustomization.yaml, as argv."""
    text = (K8S / directory / "kustomization.yaml").read_text()
    match = re.search(r"^#\s+mergejob (render .*)$", text, re.MULTILINE)
    assert match, f"k8s/{directory}/kustomization.yaml names no `mergejob render` line"
    return shlex.split(match.group(1))


def normalise(doc: dict[str, Any]) -> dict[str, Any]:
    """Take out what differs by design (see tests/test_manifests_kustomize.py's docstring)."""
    doc = yaml.safe_load(yaml.safe_dump(doc))  # a deep copy
    meta = doc["metadata"]
    annotations = meta.get("annotations") or {}
    annotations.pop(SPEC_SHA_ANNOTATION, None)
    if not annotations:
        meta.pop("annotations", None)
    if doc["kind"] == "ConfigMap":
        meta["name"] = _unhash(meta["name"])
        spec = MergeSpec.model_validate(yaml.safe_load(doc["data"]["config.yaml"]))
        doc["data"]["config.yaml"] = spec.model_dump(mode="json")
    if doc["kind"] == "Job":
        pod = doc["spec"]["template"]["spec"]
        for volume in pod["volumes"]:
            if "configMap" in volume:
                volume["configMap"]["name"] = _unhash(volume["configMap"]["name"])
        # A strategic-merge patch puts the volumes it patches first; their order means nothing.
        pod["volumes"].sort(key=lambda volume: volume["name"])
    return doc


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two parsed objects differ, as ``path: a != b`` lines (empty when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            line
            for key in sorted(set(a) | set(b))
            for line in differences(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{path}.{key}")
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            line
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for line in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _unhash(name: str) -> str:
    match = HASHED.match(name)
    return match.group("name") if match and match.group("name").endswith("-spec") else name
