"""The builder of the job's Kubernetes objects (no cluster needed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mergejob.launch.manifests import (
    CONFIG_PATH,
    GPU_RESOURCE,
    SPEC_SHA_ANNOTATION,
    JobShape,
    LaunchOptions,
    Toleration,
    build_job,
    build_objects,
    build_pod_template,
    default_image,
    spec_sha256,
    to_dict,
    to_yaml,
)
from mergejob.spec import MergeSpec

ROOT = Path(__file__).resolve().parents[1]
# The newest Kubernetes minor whose schemas every check here uses (podFailurePolicy,
# backoffLimitPerIndex and friends exist there; the 1.20 test API server drops them).
K8S_SCHEMA_VERSION = "1.33"

RunCli = Callable[..., tuple[int, str, str]]


def make_spec(**overrides: Any) -> MergeSpec:
    data: dict[str, Any] = {
        "base": "meta-llama/Meta-Llama-3-70B-Instruct",
        "adapters": ["org/adapter-a@v1", {"path": "org/adapter-b", "weight": 0.5}],
        "output": {"dir": "/cache/merged", "dtype": "bfloat16"},
    }
    data.update(overrides)
    return MergeSpec.model_validate(data)


FULL_OPTIONS = LaunchOptions(
    name="merge-70b",
    namespace="ml",
    image="registry.example.com/mergejob:1.2.3",
    image_pull_policy="Always",
    image_pull_secrets=["regcred"],
    gpus=8,
    cpu="32",
    memory="320Gi",
    ephemeral_storage="400Gi",
    cache_pvc="merge-cache",
    shm_size="32Gi",
    secret_name="hub",
    secret_key="write-token",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[Toleration.parse("dedicated=ml:NoSchedule")],
    affinity={
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    },
    priority_class_name="batch-high",
    service_account_name="merge-pod",
    ttl_seconds_after_finished=3600,
    active_deadline_seconds=86400,
    backoff_limit=2,
    labels={"team": "llm"},
    env={"MERGEJOB_LOG_FORMAT": "json"},
)


def validate_strict(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)


def container(objects_or_job: Any) -> dict[str, Any]:
    job = to_dict(getattr(objects_or_job, "job", objects_or_job))
    return job["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "options",
    [LaunchOptions(), FULL_OPTIONS, LaunchOptions(cache_size="100Gi", secret_name=None)],
    ids=["defaults", "every-option", "emptydir-no-secret"],
)
def test_every_object_is_valid_against_current_schemas_in_strict_mode(
    options: LaunchOptions,
) -> None:
    for obj in build_objects(make_spec(), options).all():
        validate_strict(to_dict(obj))


def test_the_job_runs_mergejob_run_with_the_spec_mounted_where_it_reads_it() -> None:
    objects = build_objects(make_spec(), LaunchOptions(name="j"))
    pod = to_dict(objects.job)["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert main["command"] == ["mergejob", "run"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["MERGEJOB_CONFIG"] == CONFIG_PATH == "/etc/mergejob/config.yaml"
    mount = next(m for m in main["volumeMounts"] if m["name"] == "config")
    assert mount == {"name": "config", "mountPath": "/etc/mergejob", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == objects.config_map.metadata.name == "j-spec"
    # What the pod reads is the spec itself.
    data = yaml.safe_load(objects.config_map.data["config.yaml"])
    assert MergeSpec.model_validate(data) == make_spec()
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False


def test_pod_failure_policy_fails_at_once_on_bad_input_and_ignores_disruptions() -> None:
    spec = to_dict(build_objects(make_spec()).job)["spec"]
    assert spec["podFailurePolicy"]["rules"] == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "merge", "operator": "In", "values": [2]},
        },
        {
            "action": "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        },
    ]
    assert spec["backoffLimit"] == 3
    assert spec["ttlSecondsAfterFinished"] == 86400


def test_every_launch_option_lands_where_kubernetes_reads_it() -> None:
    job = to_dict(build_objects(make_spec(), FULL_OPTIONS).job)
    assert job["metadata"]["name"] == "merge-70b"
    assert job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] == 86400
    assert spec["ttlSecondsAfterFinished"] == 3600
    pod = spec["template"]["spec"]
    main = pod["containers"][0]
    assert main["image"] == "registry.example.com/mergejob:1.2.3"
    assert main["imagePullPolicy"] == "Always"
    assert main["resources"] == {
        "requests": {"cpu": "32", "memory": "320Gi", "ephemeral-storage": "400Gi"},
        "limits": {"memory": "320Gi", GPU_RESOURCE: "8"},
    }
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
    ]
    assert pod["affinity"] == FULL_OPTIONS.affinity
    assert pod["priorityClassName"] == "batch-high"
    assert pod["serviceAccountName"] == "merge-pod"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"] == {
        "name": "cache",
        "persistentVolumeClaim": {"claimName": "merge-cache"},
    }
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    env = {e["name"]: e for e in main["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "hub", "key": "write-token", "optional": True}
    }
    assert env["MERGEJOB_LOG_FORMAT"]["value"] == "json"
    labels = job["metadata"]["labels"]
    assert labels["team"] == "llm" and labels["app.kubernetes.io/instance"] == "merge-70b"


def test_cache_is_an_emptydir_with_a_size_limit_unless_a_pvc_is_named() -> None:
    pod = to_dict(build_objects(make_spec(), LaunchOptions(cache_size="500Gi")).job)
    volumes = {v["name"]: v for v in pod["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["emptyDir"] == {"sizeLimit": "500Gi"}
    with pytest.raises(ValueError, match="cache_size applies to the emptyDir"):
        LaunchOptions(cache_pvc="c", cache_size="1Gi")


def test_pod_is_non_root_with_a_read_only_root_filesystem_and_writable_volumes() -> None:
    pod = to_dict(build_objects(make_spec()).job)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    main = pod["containers"][0]
    assert main["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    # Everything the job writes goes to a volume: cache (HF_HOME, output), /tmp ($HOME).
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert {"/cache", "/tmp", "/dev/shm"} <= mounts
    assert env["HF_HOME"].startswith("/cache/") and env["HOME"] == "/tmp"
    assert main["workingDir"] == "/cache"
    writable = build_objects(make_spec(), LaunchOptions(read_only_root_filesystem=False))
    assert container(writable)["securityContext"]["readOnlyRootFilesystem"] is False


def test_token_secret_is_required_when_the_spec_publishes_and_optional_otherwise() -> None:
    def token_ref(spec: MergeSpec, **options: Any) -> dict[str, Any] | None:
        env = {
            e["name"]: e for e in container(build_objects(spec, LaunchOptions(**options)))["env"]
        }
        return env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] if "HF_TOKEN" in env else None

    publishing = make_spec(publish={"repo_id": "org/merged"})
    assert token_ref(publishing) == {"name": "hf-token", "key": "token", "optional": False}
    assert token_ref(make_spec()) == {"name": "hf-token", "key": "token", "optional": True}
    assert token_ref(make_spec(), secret_optional=False)["optional"] is False  # type: ignore[index]
    assert token_ref(make_spec(), secret_name=None) is None


def test_gpu_pods_tolerate_the_gpu_taint_unless_told_otherwise() -> None:
    pod = to_dict(build_objects(make_spec(), LaunchOptions(gpus=1)).job)["spec"]["template"]
    assert pod["spec"]["tolerations"] == [
        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    ]
    own = LaunchOptions(gpus=1, tolerations=[Toleration.parse(f"{GPU_RESOURCE}=a100:NoSchedule")])
    pod = to_dict(build_objects(make_spec(), own).job)["spec"]["template"]
    assert pod["spec"]["tolerations"] == [
        {"key": GPU_RESOURCE, "operator": "Equal", "value": "a100", "effect": "NoSchedule"}
    ]
    assert "tolerations" not in to_dict(build_objects(make_spec()).job)["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nvidia.com/gpu:NoSchedule", {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}),
        ("dedicated=ml:NoExecute", {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}),
        ("spot", {"key": "spot", "operator": "Exists"}),
        ("*", {"operator": "Exists"}),
    ],
)  # fmt: skip
def test_tolerations_parse_like_kubectl_taints(text: str, expected: dict[str, str]) -> None:
    assert to_dict(Toleration.parse(text).to_model()) == expected


def test_labels_and_spec_hash_annotation_on_every_object() -> None:
    spec = make_spec()
    objects = build_objects(spec, LaunchOptions(name="j"))
    for obj in objects.all():
        meta = to_dict(obj)["metadata"]
        assert meta["labels"]["app.kubernetes.io/name"] == "mergejob"
        assert meta["labels"]["app.kubernetes.io/instance"] == "j"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "mergejob"
        assert meta["annotations"][SPEC_SHA_ANNOTATION] == spec_sha256(spec)
    template = to_dict(objects.job)["spec"]["template"]["metadata"]["labels"]
    assert template["app.kubernetes.io/instance"] == "j"


def test_spec_hash_ignores_spelling_and_follows_content() -> None:
    spelled_out = MergeSpec.model_validate(
        {
            "base": {"path": "meta-llama/Meta-Llama-3-70B-Instruct"},
            "adapters": [
                {"path": "org/adapter-a", "revision": "v1", "weight": 1.0},
                {"path": "org/adapter-b", "weight": 0.5},
            ],
            "output": {"dir": "/cache/merged", "dtype": "bfloat16", "max_shard_size": "5GB"},
            "engine": {"name": "stream"},
        }
    )
    assert spec_sha256(spelled_out) == spec_sha256(make_spec())
    other = make_spec(output={"dir": "/cache/merged", "dtype": "float16"})
    assert spec_sha256(other) != spec_sha256(make_spec())


def test_default_name_is_readable_and_the_same_for_the_same_spec() -> None:
    spec = make_spec(publish={"repo_id": "org/Llama-3-70B-Merged"})
    name = build_objects(spec).name
    assert name == f"mergejob-llama-3-70b-merged-{spec_sha256(spec)[:8]}"
    assert build_objects(spec).name == name
    assert build_objects(make_spec()).name.startswith("mergejob-merged-")
    assert len(build_objects(make_spec(output={"dir": "/x/" + "a" * 200})).name) <= 63


def test_default_image_is_the_one_make_image_builds() -> None:
    line = (ROOT / "image" / "IMAGE").read_text().splitlines()[0].strip()
    assert default_image() == line
    assert container(build_objects(make_spec()))["image"] == line


def test_installed_package_falls_back_to_the_release_image(monkeypatch: pytest.MonkeyPatch) -> None:
    import mergejob.launch.manifests as manifests

    monkeypatch.setattr(manifests, "IMAGE_FILE", Path("/nonexistent/IMAGE"))
    line = (ROOT / "image" / "IMAGE").read_text().splitlines()[0].strip()
    # The fallback names the same image as image/IMAGE while the versions agree.
    assert manifests.default_image() == line


def test_no_token_ever_lands_in_an_object(monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "hf_CANARY_render_0123456789"
    monkeypatch.setenv("HF_TOKEN", canary)
    objects = build_objects(make_spec(publish={"repo_id": "org/m"}), FULL_OPTIONS)
    assert canary not in to_yaml(objects.all())
    assert canary not in json.dumps([to_dict(o) for o in objects.all()])
    for name in ("HF_TOKEN", "hf_token", "HUGGING_FACE_HUB_TOKEN"):
        with pytest.raises(ValueError, match="never passed as a plain value"):
            LaunchOptions(env={name: canary})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "Bad_Name", "not a valid name"),
        ("namespace", "x" * 64, "not a valid name"),
        ("memory", "lots", "not a Kubernetes quantity"),
        ("gpus", -1, "greater than or equal to 0"),
        ("node_selector", {"bad key!": "v"}, "not a valid label key"),
    ],
)
def test_bad_launch_options_are_refused_naming_the_field(
    field: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LaunchOptions(**{field: value})


def test_yaml_is_what_kubectl_apply_reads() -> None:
    objects = build_objects(make_spec(), FULL_OPTIONS)
    docs = list(yaml.safe_load_all(to_yaml(objects.all())))
    assert docs == [to_dict(o) for o in objects.all()]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
    assert list(docs[1]) [:3] == ["apiVersion", "kind", "metadata"]  # fmt: skip
    # The spec in the ConfigMap stays readable YAML (a literal block, not one quoted line).
    assert "config.yaml: |" in to_yaml(objects.all())


def test_builder_is_parametrised_for_the_indexed_variant() -> None:
    """The shape of the many-pod merge (issue 8): the same pod template and failure policy
    in an Indexed Job; each pod reads its part from JOB_COMPLETION_INDEX."""
    spec = make_spec()
    options = LaunchOptions(name="j", cache_pvc="shared-rwx")
    template = build_pod_template(
        spec, options, job_name="j", config_map="j-spec", component="merge-part"
    )
    job = to_dict(
        build_job(
            spec,
            options,
            name="j",
            template=template,
            shape=JobShape.indexed_job(4),
            component="merge-part",
        )
    )
    validate_strict(job)
    assert {k: job["spec"][k] for k in ("completionMode", "completions", "parallelism")} == {
        "completionMode": "Indexed",
        "completions": 4,
        "parallelism": 4,
    }
    assert job["spec"]["backoffLimitPerIndex"] == 3
    assert job["spec"]["maxFailedIndexes"] == 0
    assert "backoffLimit" not in job["spec"]
    assert (
        job["spec"]["podFailurePolicy"]
        == to_dict(build_objects(spec).job)["spec"]["podFailurePolicy"]
    )
    with pytest.raises(ValueError):
        JobShape.indexed_job(0)


def test_render_prints_the_builders_objects(run_cli: RunCli) -> None:
    code, out, err = run_cli(
        "render", "--base", "org/base", "--adapters", "org/a", "org/b",
        "--output_dir", "/cache/out", "--name", "j", "--gpus", "8", "--device", "auto",
        "--memory", "64Gi", "--toleration", "dedicated=ml:NoSchedule", "--label", "team=llm",
        "--node-selector", "pool=gpu", "--ttl", "-1", "--secret", "hub", "--secret-key", "t",
    )  # fmt: skip
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    spec = MergeSpec.model_validate(
        {"base": "org/base", "adapters": ["org/a", "org/b"], "output": {"dir": "/cache/out"},
         "engine": {"device": "auto"}}
    )  # fmt: skip
    options = LaunchOptions(
        name="j", gpus=8, memory="64Gi", tolerations=[Toleration.parse("dedicated=ml:NoSchedule")],
        labels={"team": "llm"}, node_selector={"pool": "gpu"}, ttl_seconds_after_finished=None,
        secret_name="hub", secret_key="t",
    )  # fmt: skip
    assert docs == [to_dict(o) for o in build_objects(spec, options).all()]
    for doc in docs:
        validate_strict(doc)


def test_render_takes_the_job_from_a_spec_file_like_merge(run_cli: RunCli, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("base: org/base\nadapters: [org/a]\noutput: {dir: /cache/o}\n")
    code, out, err = run_cli("render", "--config", spec_file, "--dtype", "float16")
    assert code == 0, err
    config_map = next(yaml.safe_load_all(out))
    data = yaml.safe_load(config_map["data"]["config.yaml"])
    assert data["output"] == {"dir": "/cache/o", "dtype": "float16"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--memory", "lots"], "--memory: "),
        (["--name", "Bad_Name"], "--name: "),
        (["--env", "HF_TOKEN=hf_x"], "--env: HF_TOKEN: a token is never passed"),
        (["--toleration", "k:Sometimes"], "--toleration k:Sometimes"),
        (["--node-selector", "novalue"], "--node-selector novalue: expected KEY=VALUE"),
        (["--cache-pvc", "c", "--cache-size", "1Gi"], "not allowed with argument"),
    ],
)
def test_render_refuses_bad_flags_with_exit_code_2_naming_the_flag(
    run_cli: RunCli, flags: list[str], message: str
) -> None:
    code, out, err = run_cli(
        "render", "--base", "org/b", "--adapters", "org/a", "--output_dir", "/o", *flags
    )
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_render_refuses_a_bad_spec_like_merge(run_cli: RunCli) -> None:
    code, _, err = run_cli("render", "--base", "org/b", "--output_dir", "/o")
    assert code == 2
    assert "--peft_model_paths: required" in err
