"""The one builder of the Kubernetes objects of a merge job.

``mergejob render`` prints these objects, ``mergejob submit`` sends them, ``--local`` runs
their container here, and ``k8s/`` is checked against them: one builder, so the four cannot
drift. Objects are typed ``kubernetes.client`` models, built explicitly.

Example::

    from mergejob.launch.manifests import LaunchOptions, build_objects, to_yaml
    from mergejob.spec import MergeSpec

    spec = MergeSpec.model_validate(
        {"base": "meta-llama/Meta-Llama-3-70B-Instruct", "adapters": ["org/adapter"],
         "output": {"dir": "/cache/merged"}, "engine": {"name": "peft", "device": "auto"}}
    )
    objects = build_objects(spec, LaunchOptions(gpus=8, memory="300Gi"))
    print(to_yaml(objects.all()))

The job's contract with the image (``image/Dockerfile``): the container runs
``mergejob run``; the spec is the ConfigMap's ``config.yaml`` mounted at ``/etc/mergejob/``
and named by ``MERGEJOB_CONFIG``; the Hub token is ``HF_TOKEN`` from a Secret; exit code 2
means bad input (the Job fails at once), 1 anything else (retried up to ``backoffLimit``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from kubernetes import client as k8s
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergejob import settings
from mergejob.errors import EXIT_BAD_INPUT, SpecError
from mergejob.spec import MergeSpec

log = logging.getLogger("mergejob")

APP_NAME = "mergejob"
CONTAINER_NAME = "merge"
CONFIG_MOUNT = "/etc/mergejob"
CONFIG_KEY = "config.yaml"
CONFIG_PATH = f"{CONFIG_MOUNT}/{CONFIG_KEY}"
CACHE_MOUNT = "/cache"
TMP_MOUNT = "/tmp"
SHM_MOUNT = "/dev/shm"
GPU_RESOURCE = "nvidia.com/gpu"
SPEC_SHA_ANNOTATION = "mergejob.dev/spec-sha256"
CONFIG_MAP_SUFFIX = "-spec"
DEFAULT_SECRET_NAME = "hf-token"
DEFAULT_SECRET_KEY = "token"
# The image runs as this user (image/Dockerfile: USER 1000:1000).
IMAGE_UID = 1000
# Where `make image` and image/build.sh read the image name; fallback for an installed package.
IMAGE_FILE = Path(__file__).resolve().parents[2] / "image" / "IMAGE"
FALLBACK_IMAGE_REPOSITORY = "ghcr.io/mergejob/mergejob"
# Environment names that would carry a token: never set from a flag, only from a Secret.
TOKEN_ENV_NAMES = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN"})

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def default_image() -> str:
    """The image of a merge pod: the first line of ``image/IMAGE`` (shared with ``make
    image``); from an installed package without the source tree, the release's tag."""
    try:
        line = IMAGE_FILE.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        line = ""
    return line or f"{FALLBACK_IMAGE_REPOSITORY}:{settings.VERSION}"


class Toleration(BaseModel):
    """A pod toleration (the fields of ``V1Toleration``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """``key[=value][:Effect]`` as ``kubectl taint`` writes a taint; ``:Effect`` alone or
        ``*`` tolerates every taint (of that effect)."""
        body, _, effect = text.partition(":")
        key, eq, value = body.partition("=")
        key = key.strip()
        return cls(
            key=None if key in {"", "*"} else key,
            operator="Equal" if eq else "Exists",
            value=value if eq else None,
            effect=effect or None,  # type: ignore[arg-type]
        )

    def to_model(self) -> k8s.V1Toleration:
        """As the client's typed model."""
        return k8s.V1Toleration(
            key=self.key,
            operator=self.operator,
            value=self.value,
            effect=self.effect,
            toleration_seconds=self.toleration_seconds,
        )


def _quantity(value: str | None) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    if not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; write it like 8, 500m, 64Gi")
    return value


def _refuse_secrets(values: dict[str, str], what: str) -> None:
    """Refuse a value that holds the Hub token (``HF_TOKEN`` or the file ``HF_TOKEN_PATH``
    names), whatever its key: it would be written in clear into the Job for anyone who can
    read it. The message names the key, never the value."""
    secrets = settings.known_secrets()
    for key, item in values.items():
        if any(secret in item for secret in secrets):
            raise ValueError(
                f"{key}: the value holds the Hub token, which is never written into {what} of "
                "the Job (anyone who can read the Job would see it); put it in a Secret and "
                "name it with --secret"
            )


class LaunchOptions(BaseModel):
    """How the job runs on the cluster; the spec says what it does.

    Defaults make a one-pod CPU Job with a scratch ``emptyDir`` cache, the Hub token from the
    Secret ``hf-token`` (key ``token``; optional unless the spec publishes), three retries
    for failures worth a retry, and cleanup a day after it finishes.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str | None = Field(default=None, description="Job name (default: from the spec).")
    namespace: str | None = Field(default=None, description="Namespace of every object.")
    image: str = Field(default_factory=default_image, description="Container image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    gpus: int = Field(default=0, ge=0, description="nvidia.com/gpu limit.")
    cpu: str | None = Field(default=None, description="CPU request (no limit: no throttling).")
    memory: str | None = Field(default=None, description="Memory request and limit.")
    ephemeral_storage: str | None = Field(default=None, description="Ephemeral-storage request.")
    cache_pvc: str | None = Field(default=None, description="PVC mounted at /cache.")
    cache_size: str | None = Field(default=None, description="sizeLimit of the emptyDir cache.")
    shm_size: str | None = Field(default=None, description="sizeLimit of /dev/shm (memory).")
    secret_name: str | None = Field(
        default=DEFAULT_SECRET_NAME, description="Secret holding the Hub token; None: no token."
    )
    secret_key: str = Field(default=DEFAULT_SECRET_KEY, description="Key of the token.")
    secret_optional: bool | None = Field(
        default=None,
        description="Start without the Secret; None: optional unless the spec publishes.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = Field(default=None, description="A V1Affinity, as JSON.")
    priority_class_name: str | None = None
    service_account_name: str | None = None
    ttl_seconds_after_finished: int | None = Field(default=86400, ge=0)
    active_deadline_seconds: int | None = Field(default=None, gt=0)
    backoff_limit: int = Field(default=3, ge=0)
    workers: int = Field(
        default=1,
        ge=1,
        description="Pods of an Indexed Job, each merging its share of the shards (or "
        "extracting its share of the groups) into the shared cache PVC; index 0 finalises "
        "(see mergejob/indexed.py, mergejob/extraction/split.py).",
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra container env.")
    read_only_root_filesystem: bool = True

    @field_validator("name", "namespace", "cache_pvc", "secret_name", "service_account_name")
    @classmethod
    def _dns_label(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 63 or not _DNS_LABEL.match(value)):
            raise ValueError(
                f"{value!r} is not a valid name: lowercase letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63 characters"
            )
        return value

    @field_validator("cpu", "memory", "ephemeral_storage", "cache_size", "shm_size")
    @classmethod
    def _quantities(cls, value: str | None) -> str | None:
        return _quantity(value)

    @field_validator("node_selector", "labels")
    @classmethod
    def _label_map(cls, value: dict[str, str]) -> dict[str, str]:
        _refuse_secrets(value, "a label")
        for key, item in value.items():
            if not _LABEL_KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
                raise ValueError(f"{key!r} is not a valid label key")
            if len(item) > 63 or not _LABEL_VALUE.match(item):
                raise ValueError(f"{key}={item!r}: not a valid label value")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not an environment variable name")
            if key.upper() in TOKEN_ENV_NAMES:
                raise ValueError(
                    f"{key}: a token is never passed as a plain value (it would show in the Job "
                    "for anyone who can read it); put it in a Secret and name it with --secret"
                )
        _refuse_secrets(value, "an environment variable")
        return value

    @model_validator(mode="after")
    def _cache(self) -> LaunchOptions:
        if self.cache_pvc and self.cache_size:
            raise ValueError("cache_size applies to the emptyDir cache; not with cache_pvc")
        return self


@dataclass(frozen=True)
class JobShape:
    """How many pods a Job runs and how their failures count.

    The default is the single-pod Job. :meth:`indexed` is the shape of the many-pod merge
    (one pod per completion index, each merging its share of the shards); the same pod
    template and ``podFailurePolicy`` serve both.
    """

    completions: int | None = None
    parallelism: int | None = None
    indexed: bool = False
    backoff_limit_per_index: int | None = None
    max_failed_indexes: int | None = None

    @classmethod
    def indexed_job(cls, parts: int, *, backoff_limit_per_index: int = 3) -> JobShape:
        """``parts`` pods at once, index i retried on its own, any failed index fails all."""
        if parts < 1:
            raise ValueError("an Indexed Job needs at least one part")
        return cls(
            completions=parts,
            parallelism=parts,
            indexed=True,
            backoff_limit_per_index=backoff_limit_per_index,
            max_failed_indexes=0,
        )


@dataclass
class JobObjects:
    """The objects of one job, in the order they are created."""

    config_map: k8s.V1ConfigMap
    job: k8s.V1Job

    def all(self) -> list[Any]:
        """Every object, ConfigMap first (the Job's pod mounts it)."""
        return [self.config_map, self.job]

    @property
    def name(self) -> str:
        """The Job's name."""
        return str(self.job.metadata.name)

    @property
    def spec_sha256(self) -> str:
        """The spec's hash, as annotated on the objects."""
        return str((self.job.metadata.annotations or {})[SPEC_SHA_ANNOTATION])


# ---------------------------------------------------------------------------------------
# The spec as the ConfigMap carries it


def spec_data(spec: MergeSpec) -> dict[str, Any]:
    """The spec as written into the ConfigMap: only what differs from the defaults, so a
    newer image reads it the same way and the hash ignores how it was spelled."""
    return spec.model_dump(mode="json", exclude_defaults=True, exclude_none=True)


def spec_sha256(spec: MergeSpec) -> str:
    """sha256 of the spec's canonical JSON (sorted keys): equal specs, equal hashes."""
    canonical = json.dumps(spec_data(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def spec_document(spec: MergeSpec) -> str:
    """The ``config.yaml`` of the ConfigMap (what ``mergejob run`` reads in the pod)."""
    return yaml.safe_dump(spec_data(spec), sort_keys=False, default_flow_style=False)


def default_job_name(spec: MergeSpec) -> str:
    """``mergejob-<what it makes>-<hash>``: readable, and the same spec gets the same name,
    so submitting it twice is caught."""
    target = spec.publish.repo_id.split("/")[-1] if spec.publish else spec.output.dir or ""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(target.rstrip("/")).name.lower()).strip("-")
    slug = slug[:40].strip("-")
    parts = [APP_NAME, slug, spec_sha256(spec)[:8]] if slug else [APP_NAME, spec_sha256(spec)[:8]]
    return "-".join(parts)


def job_labels(name: str, options: LaunchOptions, component: str = "merge") -> dict[str, str]:
    """The ``app.kubernetes.io`` labels of every object of one job (plus ``--label``)."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": APP_NAME,
        **options.labels,
    }


def config_map_name(job_name: str) -> str:
    """The spec ConfigMap of a job: ``<job>-spec``."""
    return f"{job_name}{CONFIG_MAP_SUFFIX}"


def build_config_map(spec: MergeSpec, options: LaunchOptions, *, job_name: str) -> k8s.V1ConfigMap:
    """The spec as an immutable ConfigMap (``config.yaml``); it never holds a token."""
    return k8s.V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=k8s.V1ObjectMeta(
            name=config_map_name(job_name),
            namespace=options.namespace,
            labels=job_labels(job_name, options),
            annotations={SPEC_SHA_ANNOTATION: spec_sha256(spec)},
        ),
        immutable=True,
        data={CONFIG_KEY: spec_document(spec)},
    )


# ---------------------------------------------------------------------------------------
# The pod


def token_secret_optional(spec: MergeSpec, options: LaunchOptions) -> bool:
    """A job that publishes cannot run without its token; one that only pulls public models
    can, so by default the Secret is optional exactly when nothing is pushed."""
    if options.secret_optional is not None:
        return options.secret_optional
    return spec.publish is None


def container_env(spec: MergeSpec, options: LaunchOptions) -> list[k8s.V1EnvVar]:
    """The environment contract of ``mergejob run`` (see mergejob/settings.py)."""
    env = [
        k8s.V1EnvVar(name="MERGEJOB_CONFIG", value=CONFIG_PATH),
        k8s.V1EnvVar(name="HF_HOME", value=f"{CACHE_MOUNT}/huggingface"),
        # The root filesystem is read-only: whatever writes under $HOME writes to /tmp.
        k8s.V1EnvVar(name="HOME", value=TMP_MOUNT),
        # Download bars would bury the job's own lines in the pod log.
        k8s.V1EnvVar(name="HF_HUB_DISABLE_PROGRESS_BARS", value="1"),
    ]
    if options.secret_name:
        env.append(
            k8s.V1EnvVar(
                name="HF_TOKEN",
                value_from=k8s.V1EnvVarSource(
                    secret_key_ref=k8s.V1SecretKeySelector(
                        name=options.secret_name,
                        key=options.secret_key,
                        optional=token_secret_optional(spec, options),
                    )
                ),
            )
        )
    env += [k8s.V1EnvVar(name=key, value=value) for key, value in options.env.items()]
    return env


def container_resources(options: LaunchOptions) -> k8s.V1ResourceRequirements | None:
    """Requests for CPU, memory and disk; limits for memory (an OOM kill beats node
    pressure) and GPUs. No CPU limit: throttling only slows a merge down."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if options.cpu:
        requests["cpu"] = options.cpu
    if options.memory:
        requests["memory"] = limits["memory"] = options.memory
    if options.ephemeral_storage:
        requests["ephemeral-storage"] = options.ephemeral_storage
    if options.gpus:
        limits[GPU_RESOURCE] = str(options.gpus)
    if not requests and not limits:
        return None
    return k8s.V1ResourceRequirements(requests=requests or None, limits=limits or None)


def pod_tolerations(options: LaunchOptions) -> list[k8s.V1Toleration] | None:
    """``--toleration``s; a GPU pod also tolerates the usual ``nvidia.com/gpu`` taint of
    GPU nodes (as GKE and the GPU operator set it) unless one is given for that key."""
    tolerations = [t.to_model() for t in options.tolerations]
    if options.gpus and not any(t.key == GPU_RESOURCE for t in options.tolerations):
        tolerations.append(
            k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
        )
    return tolerations or None


def affinity_model(affinity: dict[str, Any] | None) -> k8s.V1Affinity | None:
    """A V1Affinity from its JSON form (``--affinity FILE``), through the client's own
    deserializer so unknown fields are dropped the way the client drops them."""
    if not affinity:
        return None
    api = k8s.ApiClient()
    return api.deserialize(json.dumps(affinity), "V1Affinity", "application/json")


def build_volumes(options: LaunchOptions, *, config_map: str) -> list[k8s.V1Volume]:
    """The spec (ConfigMap), the cache (PVC or emptyDir), /dev/shm (memory) and /tmp."""
    if options.cache_pvc:
        cache = k8s.V1Volume(
            name="cache",
            persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                claim_name=options.cache_pvc
            ),
        )
    else:
        cache = k8s.V1Volume(
            name="cache", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=options.cache_size)
        )
    return [
        k8s.V1Volume(name="config", config_map=k8s.V1ConfigMapVolumeSource(name=config_map)),
        cache,
        k8s.V1Volume(
            name="shm",
            empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=options.shm_size),
        ),
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()),
    ]


def build_container(
    spec: MergeSpec,
    options: LaunchOptions,
    *,
    args: list[str] | None = None,
    extra_env: list[k8s.V1EnvVar] | None = None,
) -> k8s.V1Container:
    """The one container: ``mergejob run`` (the image's entrypoint, written out so that
    ``kubectl describe`` shows it), with the spec, cache, shm and tmp mounted."""
    return k8s.V1Container(
        name=CONTAINER_NAME,
        image=options.image,
        image_pull_policy=options.image_pull_policy,
        command=["mergejob", "run"],
        args=args or None,
        working_dir=CACHE_MOUNT,
        env=container_env(spec, options) + list(extra_env or []),
        resources=container_resources(options),
        volume_mounts=[
            k8s.V1VolumeMount(name="config", mount_path=CONFIG_MOUNT, read_only=True),
            k8s.V1VolumeMount(name="cache", mount_path=CACHE_MOUNT),
            k8s.V1VolumeMount(name="shm", mount_path=SHM_MOUNT),
            k8s.V1VolumeMount(name="tmp", mount_path=TMP_MOUNT),
        ],
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            read_only_root_filesystem=options.read_only_root_filesystem,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
        # A failed pod's last log lines survive in its status after the log is gone.
        termination_message_policy="FallbackToLogsOnError",
    )


def build_pod_template(
    spec: MergeSpec,
    options: LaunchOptions,
    *,
    job_name: str,
    config_map: str,
    component: str = "merge",
    args: list[str] | None = None,
    extra_env: list[k8s.V1EnvVar] | None = None,
) -> k8s.V1PodTemplateSpec:
    """The merge pod: non-root, no API token, never restarted in place (the Job retries)."""
    labels = job_labels(job_name, options, component)
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(
            labels={
                key: labels[key]
                for key in (
                    "app.kubernetes.io/name",
                    "app.kubernetes.io/instance",
                    "app.kubernetes.io/component",
                )
            }
        ),
        spec=k8s.V1PodSpec(
            restart_policy="Never",
            service_account_name=options.service_account_name,
            automount_service_account_token=False,
            priority_class_name=options.priority_class_name,
            node_selector=dict(options.node_selector) or None,
            tolerations=pod_tolerations(options),
            affinity=affinity_model(options.affinity),
            image_pull_secrets=[
                k8s.V1LocalObjectReference(name=n) for n in options.image_pull_secrets
            ]
            or None,
            security_context=k8s.V1PodSecurityContext(
                run_as_non_root=True,
                run_as_user=IMAGE_UID,
                run_as_group=IMAGE_UID,
                fs_group=IMAGE_UID,
                seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
            ),
            containers=[build_container(spec, options, args=args, extra_env=extra_env)],
            volumes=build_volumes(options, config_map=config_map),
        ),
    )


def pod_failure_policy() -> k8s.V1PodFailurePolicy:
    """Bad input (exit 2) fails the Job at once; a pod lost to a disruption (eviction,
    preemption, node drain) is retried without counting against ``backoffLimit``."""
    return k8s.V1PodFailurePolicy(
        rules=[
            k8s.V1PodFailurePolicyRule(
                action="FailJob",
                on_exit_codes=k8s.V1PodFailurePolicyOnExitCodesRequirement(
                    container_name=CONTAINER_NAME, operator="In", values=[EXIT_BAD_INPUT]
                ),
            ),
            k8s.V1PodFailurePolicyRule(
                action="Ignore",
                on_pod_conditions=[
                    k8s.V1PodFailurePolicyOnPodConditionsPattern(
                        type="DisruptionTarget", status="True"
                    )
                ],
            ),
        ]
    )


def build_job(
    spec: MergeSpec,
    options: LaunchOptions,
    *,
    name: str,
    template: k8s.V1PodTemplateSpec,
    shape: JobShape | None = None,
    component: str = "merge",
) -> k8s.V1Job:
    """A Job around ``template``: one pod by default, or the shape given."""
    shape = shape or JobShape()
    # With per-index retries the Job-wide limit stays at its (unbounded) default.
    per_index = shape.backoff_limit_per_index is not None
    backoff_limit = None if per_index else options.backoff_limit
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(
            name=name,
            namespace=options.namespace,
            labels=job_labels(name, options, component),
            annotations={SPEC_SHA_ANNOTATION: spec_sha256(spec)},
        ),
        spec=k8s.V1JobSpec(
            completions=shape.completions,
            parallelism=shape.parallelism,
            completion_mode="Indexed" if shape.indexed else None,
            backoff_limit=backoff_limit,
            backoff_limit_per_index=shape.backoff_limit_per_index,
            max_failed_indexes=shape.max_failed_indexes,
            active_deadline_seconds=options.active_deadline_seconds,
            ttl_seconds_after_finished=options.ttl_seconds_after_finished,
            pod_failure_policy=pod_failure_policy(),
            template=template,
        ),
    )


def build_objects(spec: MergeSpec, options: LaunchOptions | None = None) -> JobObjects:
    """The ConfigMap and the Job of a merge of ``spec``: one pod, or with
    ``options.workers`` N > 1 an Indexed Job of N pods (``mergejob run --index-count N``,
    each pod's index from ``JOB_COMPLETION_INDEX``; index ``i`` retried on its own up to
    ``backoff_limit`` times, any index that fails for good fails the Job)."""
    options = options or LaunchOptions()
    name = options.name or default_job_name(spec)
    config_map = build_config_map(spec, options, job_name=name)
    shape: JobShape | None = None
    args: list[str] | None = None
    if options.workers > 1:
        shape = JobShape.indexed_job(options.workers, backoff_limit_per_index=options.backoff_limit)
        args = ["--index-count", str(options.workers)]
    template = build_pod_template(
        spec, options, job_name=name, config_map=str(config_map.metadata.name), args=args
    )
    return JobObjects(
        config_map=config_map,
        job=build_job(spec, options, name=name, template=template, shape=shape),
    )


def check_launch(spec: MergeSpec, options: LaunchOptions, *, local: bool = False) -> None:
    """Whether ``spec`` can run as ``options`` say (``local``: as processes here, no cluster):
    a split job's needs (:func:`check_split_job`), and a warning for GPUs the spec leaves idle."""
    if options.workers > 1:
        check_split_job(spec, options, local=local)
    if options.gpus and spec.engine.device == "cpu":
        log.warning(
            "--gpus %d but the spec's engine.device is cpu: the GPUs stay idle "
            "(set --device auto or cuda)",
            options.gpus,
        )


def check_split_job(spec: MergeSpec, options: LaunchOptions, *, local: bool) -> None:
    """A job split over pods needs storage every pod shares, and a merge the stream engine
    (an extraction splits its groups: :mod:`mergejob.extraction.split`)."""
    if spec.task != "extract" and spec.engine.name != "stream":
        raise SpecError(
            f"--workers {options.workers}: needs the stream engine (--engine stream); the peft "
            "engine spreads one pod's GPUs instead (--gpus N --device auto)"
        )
    if local:
        return
    if not options.cache_pvc:
        raise SpecError(
            f"--workers {options.workers}: the pods write one output together: name a "
            f"ReadWriteMany PersistentVolumeClaim with --cache-pvc CLAIM (mounted at {CACHE_MOUNT})"
        )
    out = spec.output.dir
    if (
        out
        and out.startswith("/")
        and not (out == CACHE_MOUNT or out.startswith(f"{CACHE_MOUNT}/"))
    ):
        log.warning(
            "--workers %d: output.dir %s is not under %s (the shared PVC): every pod must "
            "see the same folder there",
            options.workers,
            out,
            CACHE_MOUNT,
        )


# ---------------------------------------------------------------------------------------
# Serialisation


# Keys a reader looks for first, in this order (the client sorts the rest alphabetically).
_FIRST_KEYS = ("apiVersion", "kind", "metadata", "name", "namespace", "labels", "annotations")


def _readable_order(value: Any) -> Any:
    if isinstance(value, dict):
        first = [k for k in _FIRST_KEYS if k in value]
        rest = [k for k in value if k not in _FIRST_KEYS]
        return {k: _readable_order(value[k]) for k in first + rest}
    if isinstance(value, list):
        return [_readable_order(item) for item in value]
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A typed model (or a plain dict) as the API's JSON: camelCase keys, no nulls."""
    result = k8s.ApiClient().sanitize_for_serialization(obj)
    assert isinstance(result, dict)
    return _readable_order(result)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the spec inside the ConfigMap) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(objects: list[Any]) -> str:
    """Objects as a multi-document YAML stream, ready for ``kubectl apply -f -``."""
    return yaml.dump_all(
        [to_dict(obj) for obj in objects],
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
    )
