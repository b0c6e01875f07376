"""k8s/ (kustomize) against the builder: the same objects, field for field.

Each kustomization.yaml names, in a comment line ``# mergejob render ...``, the render
command that builds the same Job and ConfigMap; these tests build the kustomization with the
project's kubectl 1.35 (kustomize 5.7, from tests/support/kube/build_k8s.sh), validate every
object against the Kubernetes 1.33 schemas in strict mode, and compare (the helpers are in
tests/support/kustomize.py). The differences by design:

* the ConfigMap's name carries kustomize's content hash (``mergejob-spec-<hash>``), and the
  Job's volume names it so; mergejob names it ``<job>-spec``;
* ``config.yaml`` is the spec file as written (comments and all) in k8s/, the normalised spec
  in render: both must parse to the same MergeSpec;
* the ``mergejob.dev/spec-sha256`` annotation is only written by mergejob (kustomize cannot
  compute it; its hash suffix plays that part);
* the launcher's ServiceAccount, Role and RoleBinding are only in k8s/ (they belong to the
  namespace, not to one job);
* an overlay's strategic-merge patch moves the volumes it patches to the front of the list
  (the order of volumes has no meaning): compared sorted by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mergejob.launch.manifests import SPEC_SHA_ANNOTATION
from mergejob.spec import MergeSpec
from tests.support.kustomize import (
    HASHED,
    K8S,
    K8S_SCHEMA_VERSION,
    RBAC_KINDS,
    ROOT,
    differences,
    kustomize,
    normalise,
    render_command,
)

pytestmark = pytest.mark.kube

KUSTOMIZATIONS = ["base", "overlays/gpu-node", "overlays/cpu-node"]

RunCli = Callable[..., tuple[int, str, str]]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_kustomize_object_is_valid_against_current_schemas_in_strict_mode(
    kubectl: Path, directory: str
) -> None:
    docs = kustomize(kubectl, directory)
    assert {d["kind"] for d in docs} == RBAC_KINDS | {"ConfigMap", "Job"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomize_builds_the_objects_render_prints(
    kubectl: Path,
    directory: str,
    run_cli: RunCli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = kustomize(kubectl, directory)
    monkeypatch.chdir(ROOT)
    code, out, err = run_cli(*render_command(directory))
    assert code == 0, err
    rendered = list(yaml.safe_load_all(out))
    # The annotation render adds, kustomize cannot: the only metadata render has in addition.
    assert all(SPEC_SHA_ANNOTATION in d["metadata"]["annotations"] for d in rendered)
    by_kind = {d["kind"]: d for d in docs if d["kind"] not in RBAC_KINDS}
    assert sorted(by_kind) == sorted(d["kind"] for d in rendered)
    for doc in rendered:
        assert differences(normalise(by_kind[doc["kind"]]), normalise(doc)) == [], doc["kind"]
    # The hash suffix is on the ConfigMap and on the Job's reference to it, consistently.
    cm_name = by_kind["ConfigMap"]["metadata"]["name"]
    assert HASHED.match(cm_name) and cm_name.startswith("mergejob-spec-")
    volumes = by_kind["Job"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": cm_name}} in volumes


def test_overlays_change_only_what_they_say(kubectl: Path) -> None:
    """gpu-node: 8 GPUs and the peft engine on them; cpu-node: the stream engine."""
    objects = {d: {o["kind"]: o for o in kustomize(kubectl, d)} for d in KUSTOMIZATIONS}
    gpu_job = objects["overlays/gpu-node"]["Job"]
    limits = gpu_job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    assert "parallelism" not in gpu_job["spec"] and "completions" not in gpu_job["spec"]
    gpu_spec = yaml.safe_load(objects["overlays/gpu-node"]["ConfigMap"]["data"]["config.yaml"])
    assert gpu_spec["engine"] == {"name": "peft", "device": "auto"}
    cpu_spec = yaml.safe_load(objects["overlays/cpu-node"]["ConfigMap"]["data"]["config.yaml"])
    assert cpu_spec["engine"]["name"] == "stream" and cpu_spec["engine"]["device"] == "cpu"
    cpu_job = objects["overlays/cpu-node"]["Job"]
    assert "nvidia.com/gpu" not in str(cpu_job)
    for directory in KUSTOMIZATIONS:
        job = objects[directory]["Job"]
        assert job["spec"]["podFailurePolicy"] == objects["base"]["Job"]["spec"]["podFailurePolicy"]
        assert job["metadata"]["namespace"] == "mergejob"


def test_launcher_role_is_limited_to_its_namespace_and_what_the_launcher_does(
    kubectl: Path,
) -> None:
    docs = {d["kind"]: d for d in kustomize(kubectl, "base")}
    assert "ClusterRole" not in docs and "ClusterRoleBinding" not in docs
    rules = {
        (group, resource): set(rule["verbs"])
        for rule in docs["Role"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
        ("", "configmaps"): {"create", "get", "patch", "delete"},
        ("", "pods"): {"get", "list", "watch", "delete"},
        ("", "pods/log"): {"get"},
    }
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["kind"] == "Role"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mergejob-launcher", "namespace": "mergejob"}
    ]
    # The merge pod itself gets no API token at all.
    assert docs["Job"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_example_secret_is_only_an_example(kubectl: Path) -> None:
    example = yaml.safe_load((K8S / "base" / "hf-token.secret.example.yaml").read_text())
    kubernetes_validate.validate(example, K8S_SCHEMA_VERSION, strict=True)
    assert example["stringData"]["token"] == "hf_REPLACE_WITH_YOUR_TOKEN"
    for directory in KUSTOMIZATIONS:
        assert all(d["kind"] != "Secret" for d in kustomize(kubectl, directory))
    # What the Job references is what the example (and the README) create.
    job = next(d for d in kustomize(kubectl, "base") if d["kind"] == "Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == example["metadata"]["name"]
    assert ref["key"] in example["stringData"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_spec_files_in_k8s_are_valid_specs(directory: str) -> None:
    data = yaml.safe_load((K8S / directory / "spec.yaml").read_text())
    MergeSpec.model_validate(data)
