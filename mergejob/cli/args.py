"""The shared arguments of the ``mergejob`` commands, and what they build.

The one place that defines a flag used by more than one command: the job's flags (seed
spellings kept), the logging flags, the launch and cluster flags; the table from job flags
to spec fields; and the builders of a spec (:func:`spec_from_args`) and of launch options
(:func:`options_from_args`) from parsed arguments. A leaf of ``mergejob.cli``: it imports no
other module of it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergejob.errors import EXIT_BAD_INPUT, SpecError
from mergejob.launch.manifests import (
    DEFAULT_SECRET_KEY,
    DEFAULT_SECRET_NAME,
    LaunchOptions,
    Toleration,
    default_image,
)
from mergejob.spec import (
    DTYPES,
    ENGINES,
    DuplicateKeyError,
    MergeSpec,
    build_spec,
    decode_text,
    load_mapping_text,
    load_spec_file,
    parse_assignment,
    repeated_adapters,
)

log = logging.getLogger("mergejob")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits with the bad-input code (2) and one clear line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"mergejob: error: {message}\n")


# ---------------------------------------------------------------------------------------
# The job's flags


_WORKERS_HELP = "worker processes on the CPU (stream engine; an extraction's layers)"
# On render and submit --workers N counts the pods of an Indexed Job (LaunchOptions.workers),
# not the spec's engine.workers, which every pod would multiply by N.
_PODS_HELP = (
    "split the merge (stream engine) or the extraction over N pods of an Indexed Job (the "
    "output on a ReadWriteMany --cache-pvc they share); with --local, N processes here. Each "
    "pod runs one worker per visible GPU (--device cuda)"
)


def add_job_arguments(parser: argparse.ArgumentParser, *, pods: bool = False) -> None:
    """The job's flags, shared by every command that takes a job (seed spellings kept).

    ``pods``: the command launches the job (render, submit), so ``--workers N`` is the
    number of pods (``args.indices``) rather than the spec's worker processes.
    """
    job = parser.add_argument_group("the job (seed-compatible flags, or --config SPEC)")
    job.add_argument("--config", metavar="SPEC", help="YAML/JSON spec file; flags override it")
    job.add_argument(
        "--base_model_name_or_path", "--base-model-name-or-path", "--base",
        dest="base", metavar="ID_OR_PATH", help="base model: local folder or Hub id[@revision]",
    )  # fmt: skip
    job.add_argument(
        "--peft_model_paths", "--peft-model-paths", "--adapters",
        dest="adapters", nargs="+", metavar="ID_OR_PATH",
        help="adapters to merge, in order: local folders or Hub ids[@revision]",
    )  # fmt: skip
    job.add_argument(
        "--weights", nargs="+", type=float, metavar="W",
        help="one weight per adapter, in order (default 1.0 each; stream engine): a "
        "multiplier of its delta, negative to subtract it",
    )  # fmt: skip
    job.add_argument(
        "--output_dir", "--output-dir", dest="output_dir", metavar="DIR",
        help="output folder (with --push_to_hub: the Hub repo id, as in the seed script)",
    )  # fmt: skip
    job.add_argument("--device", help="cpu (default), auto (spread over every GPU), cuda or cuda:N")
    job.add_argument(
        "--push_to_hub", "--push-to-hub", dest="push_to_hub", action="store_true", default=None,
        help="publish the merged model to the Hub repo named by --output_dir",
    )  # fmt: skip
    add_publish_arguments(parser)
    job.add_argument(
        "--trust_remote_code", "--trust-remote-code", dest="trust_remote_code",
        action="store_true", default=None, help="allow custom model code (peft engine)",
    )  # fmt: skip
    job.add_argument(
        "--dtype", choices=DTYPES,
        help="output dtype; auto (default) keeps the base's stored dtype, float16 is the seed's",
    )  # fmt: skip
    job.add_argument("--max-shard-size", "--max_shard_size", dest="max_shard_size",
                     help="largest output shard (default 5GB)")  # fmt: skip
    job.add_argument("--engine", choices=ENGINES, help="merge engine (default: stream)")
    if pods:
        job.add_argument("--workers", dest="indices", type=int, metavar="N", help=_PODS_HELP)
    else:
        job.add_argument("--workers", type=int, help=_WORKERS_HELP)
    job.add_argument(
        "--max-memory", "--max_memory", dest="max_memory", metavar="MAP",
        help="accelerate max_memory for the peft engine, e.g. 0=70GiB,1=70GiB,cpu=200GiB",
    )  # fmt: skip
    job.add_argument("--offload-folder", "--offload_folder", dest="offload_folder",
                     metavar="DIR", help="accelerate disk-offload folder (peft engine)")  # fmt: skip
    job.add_argument("--overwrite", action="store_true", default=None,
                     help="replace a non-empty output folder")  # fmt: skip
    add_download_arguments(job, what="stream engine, Hub base: base", user="output shard")
    job.add_argument(
        "--set-config", "--set_config", dest="set_config", action="append", metavar="KEY=VALUE",
        help="set a config.json key of the output (repeatable; the value is JSON: "
        "rope_theta=3580165449.0, max_position_embeddings=1048576)",
    )  # fmt: skip
    job.add_argument(
        "--config-from", "--config_from", dest="config_from", metavar="ID_OR_PATH",
        help="take config.json from this model (same architecture and shapes)",
    )  # fmt: skip


def add_download_arguments(group: Any, *, what: str, user: str) -> None:
    """``--download-workers``/``--delete-downloaded``: how a streamed Hub input is fetched
    (``what`` its shards, freed once every ``user`` that reads them is done); ``merge`` and
    ``extract`` share them."""
    group.add_argument(
        "--download-workers", "--download_workers", dest="download_workers", type=int,
        metavar="N", help=f"{what} shards downloaded at once (default 4)",
    )  # fmt: skip
    group.add_argument(
        "--delete-downloaded", "--delete_downloaded", dest="delete_downloaded",
        action="store_true", default=None,
        help=f"{what} shards this job downloaded are removed from the HF cache once every "
        f"{user} that reads them is done (bounded disk use)",
    )  # fmt: skip


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    """How a job publishes (with ``--push_to_hub``): shared by ``merge`` and ``extract``."""
    hub = parser.add_argument_group(
        "publishing (with --push_to_hub, or publish.repo_id in the spec; token: HF_TOKEN or "
        "HF_TOKEN_PATH)"
    )
    hub.add_argument(
        "--local-dir", "--local_dir", dest="local_dir", metavar="DIR",
        help="keep the local copy here (default: a temporary folder, removed once published)",
    )  # fmt: skip
    hub.add_argument("--private", action="store_true", default=None,
                     help="create the repo private (an existing repo keeps its visibility)")  # fmt: skip
    hub.add_argument(
        "--branch", "--hub-revision", dest="hub_revision", metavar="BRANCH",
        help="commit to this branch of the repo (created if missing; default: main)",
    )  # fmt: skip
    hub.add_argument("--create-pr", "--create_pr", dest="create_pr", action="store_true",
                     default=None, help="open a pull request instead of committing")  # fmt: skip
    hub.add_argument("--commit-message", "--commit_message", dest="commit_message",
                     metavar="TEXT", help="summary line of the commit")  # fmt: skip
    hub.add_argument(
        "--delete-uploaded", "--delete_uploaded", dest="delete_uploaded", action="store_true",
        default=None, help="free each local shard once it is on the Hub (bounded disk use)",
    )  # fmt: skip


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """-v and --log-format after the command too (``mergejob run --log-format json``)."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
        help="log lines as text (default) or JSON (one object a line)",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# From the job's flags to a spec


# args attribute -> (dotted spec field, the flag's name in messages)
_FLAG_FIELDS = {
    "base": ("base.path", "--base_model_name_or_path"),
    "trust_remote_code": ("base.trust_remote_code", "--trust_remote_code"),
    "adapters": ("adapters", "--peft_model_paths"),
    "output_dir": ("output.dir", "--output_dir"),
    "dtype": ("output.dtype", "--dtype"),
    "max_shard_size": ("output.max_shard_size", "--max-shard-size"),
    "overwrite": ("output.overwrite", "--overwrite"),
    "engine": ("engine.name", "--engine"),
    "device": ("engine.device", "--device"),
    "workers": ("engine.workers", "--workers"),
    "max_memory": ("engine.max_memory", "--max-memory"),
    "offload_folder": ("engine.offload_folder", "--offload-folder"),
    "download_workers": ("engine.download_workers", "--download-workers"),
    "delete_downloaded": ("engine.delete_downloaded", "--delete-downloaded"),
    "config_from": ("config.config_from", "--config-from"),
    "private": ("publish.private", "--private"),
    "hub_revision": ("publish.revision", "--branch"),
    "create_pr": ("publish.create_pr", "--create-pr"),
    "commit_message": ("publish.commit_message", "--commit-message"),
    "delete_uploaded": ("publish.delete_uploaded", "--delete-uploaded"),
}


def flag_labels(overrides: Mapping[str, Any]) -> dict[str, str]:
    """The flag that set each dotted key of :func:`flag_overrides` (for error messages)."""
    by_field = {dotted: flag for dotted, flag in _FLAG_FIELDS.values()}
    by_field["publish.repo_id"] = "--output_dir (with --push_to_hub)"
    if "publish.repo_id" in overrides:
        by_field["output.dir"] = "--local-dir"
    return {
        key: "--set-config" if key.startswith("config.overrides.") else by_field.get(key, key)
        for key in overrides
    }


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The job flags the user gave, as dotted spec keys."""
    result = _plain_flag_overrides(args)
    for assignment in getattr(args, "set_config", None) or []:
        key, value = parse_assignment(assignment)
        result[f"config.overrides.{key}"] = value
    return result


def _plain_flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for attr, (dotted, _flag) in _FLAG_FIELDS.items():
        value = getattr(args, attr, None)
        if value is not None:
            result[dotted] = value
    local_dir = getattr(args, "local_dir", None)
    if getattr(args, "push_to_hub", None) and "output.dir" in result:
        # The seed's meaning: with --push_to_hub, --output_dir names the Hub repo.
        result["publish.repo_id"] = result.pop("output.dir")
    elif local_dir is not None and "output.dir" in result:
        raise SpecError(
            "--local-dir: only with --push_to_hub (then --output_dir is the Hub repo id); "
            "without it, --output_dir is the local folder"
        )
    if local_dir is not None:
        result["output.dir"] = local_dir
    return result


def spec_from_args(
    args: argparse.Namespace,
    *layers: Mapping[str, Any],
    config: str | None = None,
    file_data: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
) -> MergeSpec:
    """The spec of a job command: the spec file ``config`` (its dict ``file_data`` when
    already read), then ``layers`` (the environment...), then the flags in ``args``.
    ``labels`` name where a layer's keys came from, for error messages."""
    if file_data is None:
        file_data = load_spec_file(config) if config else {}
    flags = flag_overrides(args)
    publishes = (
        "publish.repo_id" in flags
        or bool((file_data.get("publish") or {}).get("repo_id"))
        or _layers_have(layers, "publish.repo_id")
    )
    if getattr(args, "push_to_hub", None) and not publishes:
        raise SpecError(
            "--push_to_hub: give the Hub repo id as --output_dir (e.g. --output_dir "
            "org/merged-model), as the seed script did"
        )
    publish_flags = [
        flag
        for attr, (dotted, flag) in _FLAG_FIELDS.items()
        if dotted.startswith("publish.") and getattr(args, attr, None) is not None
    ]
    if getattr(args, "local_dir", None) is not None:
        publish_flags.append("--local-dir")
    if publish_flags and not publishes:
        raise SpecError(
            f"{publish_flags[0]}: only when publishing; add --push_to_hub with the repo id "
            "as --output_dir"
        )
    # Without a spec file, name the flag; with one, its validation names the file and the
    # key (and the nearest valid key for a typo such as "adapter:").
    if (
        not config
        and "base.path" not in flags
        and "base" not in file_data
        and not _layers_have(layers, "base")
    ):
        raise SpecError("--base_model_name_or_path: required (or give --config SPEC)")
    if (
        not config
        and "adapters" not in flags
        and "adapters" not in file_data
        and not _layers_have(layers, "adapters")
        and not _layers_have(layers, "extract")  # an extraction has no adapters
    ):
        raise SpecError("--peft_model_paths: required (or give --config SPEC)")
    all_labels = {**(labels or {}), **flag_labels(flags)}
    spec = build_spec(file_data, *layers, flags, origin=config or "flags", labels=all_labels)
    weights = getattr(args, "weights", None)
    if weights is not None:
        spec = with_weights(spec, weights)
    for line in repeated_adapters(spec):
        log.warning(line)
    return spec


def with_weights(spec: MergeSpec, weights: Sequence[float]) -> MergeSpec:
    """``spec`` with ``--weights``: one per adapter, in order, whichever layer named them."""
    if len(weights) != len(spec.adapters):
        raise SpecError(
            f"--weights: {len(weights)} weight(s) for {len(spec.adapters)} adapter(s); give "
            "one per adapter, in the adapters' order"
        )
    data = spec.to_dict()
    for entry, weight in zip(data["adapters"], weights, strict=True):
        entry["weight"] = weight
    return build_spec(data, origin="--weights", labels={"adapters": "--weights"})


def _layers_have(layers: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(k == key or k.startswith(f"{key}.") for layer in layers for k in layer)


def recorded_inputs_of(config: str | None) -> list[dict[str, Any]] | None:
    """The inputs a spec file that is a recipe (``mergejob.yaml``) recorded, to check a rerun
    against; None without a spec file."""
    from mergejob.recipe import recorded_inputs  # the Hub client: only for a job that runs

    return recorded_inputs(config) if config else None


# ---------------------------------------------------------------------------------------
# How the job runs on Kubernetes: the launch and cluster flags


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """How the job runs on the cluster (the spec's flags say what it does)."""
    group = parser.add_argument_group("how it runs on Kubernetes")
    group.add_argument("--name", help="the Job's name (default: mergejob-<output>-<spec hash>)")
    group.add_argument("--namespace", "-n", help="namespace (default: the context's)")
    group.add_argument("--image", help=f"container image (default: {default_image()})")
    group.add_argument(
        "--image-pull-policy", choices=("Always", "IfNotPresent", "Never"), default=None
    )
    group.add_argument("--image-pull-secret", action="append", metavar="NAME", default=None)
    group.add_argument("--gpus", type=int, help="GPUs of the pod (nvidia.com/gpu limit)")
    group.add_argument("--cpu", help="CPU request, e.g. 16 or 500m")
    group.add_argument("--memory", help="memory request and limit, e.g. 300Gi")
    group.add_argument("--ephemeral-storage", help="ephemeral-storage request, e.g. 600Gi")
    cache = group.add_mutually_exclusive_group()
    cache.add_argument("--cache-pvc", metavar="CLAIM", help="PVC mounted at /cache")
    cache.add_argument(
        "--cache-size", metavar="SIZE", help="sizeLimit of the emptyDir at /cache (default none)"
    )
    group.add_argument("--shm-size", metavar="SIZE", help="sizeLimit of /dev/shm (memory)")
    secret = group.add_mutually_exclusive_group()
    secret.add_argument(
        "--secret",
        metavar="NAME",
        help=f"Secret holding the Hub token as HF_TOKEN (default: {DEFAULT_SECRET_NAME})",
    )
    secret.add_argument("--no-secret", action="store_true", help="no Hub token at all")
    group.add_argument("--secret-key", help=f"key in the Secret (default: {DEFAULT_SECRET_KEY})")
    optional = group.add_mutually_exclusive_group()
    optional.add_argument(
        "--secret-optional",
        dest="secret_optional",
        action="store_true",
        default=None,
        help="start even without the Secret (default: unless the spec publishes)",
    )
    optional.add_argument(
        "--secret-required", dest="secret_optional", action="store_false", default=None
    )
    group.add_argument("--node-selector", action="append", metavar="KEY=VALUE", default=None)
    group.add_argument(
        "--toleration",
        action="append",
        metavar="KEY[=VALUE][:EFFECT]",
        default=None,
        help="tolerate a taint (a GPU pod tolerates nvidia.com/gpu unless one is given)",
    )
    group.add_argument("--affinity", metavar="FILE", help="pod affinity, a YAML/JSON file")
    group.add_argument("--priority-class", metavar="NAME")
    group.add_argument("--service-account", metavar="NAME", help="the pod's service account")
    group.add_argument(
        "--ttl", type=int, metavar="SECONDS", help="delete the job this long after it ends "
        "(default 86400; -1: never)"
    )  # fmt: skip
    group.add_argument(
        "--active-deadline", type=int, metavar="SECONDS", help="fail the job after this long"
    )
    group.add_argument(
        "--backoff-limit", type=int, metavar="N", help="retries of failures worth one (default 3)"
    )
    group.add_argument("--label", action="append", metavar="KEY=VALUE", default=None)
    group.add_argument(
        "--env", action="append", metavar="KEY=VALUE", default=None,
        help="extra container environment (never a token: use --secret)",
    )  # fmt: skip
    group.add_argument("--writable-root", action="store_true", help="no read-only root filesystem")


def add_cluster_arguments(parser: argparse.ArgumentParser, *, namespace: bool = True) -> None:
    """Which cluster, as kubectl names it."""
    group = parser.add_argument_group("cluster")
    group.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: $KUBECONFIG)")
    group.add_argument("--context", help="kubeconfig context (default: the current one)")
    group.add_argument("--as", dest="as_user", metavar="USER", help="impersonate a user")
    if namespace:
        group.add_argument("--namespace", "-n", help="namespace (default: the context's)")


# LaunchOptions field -> the flag's name in messages
_OPTION_FLAGS = {
    "name": "--name",
    "namespace": "--namespace",
    "image": "--image",
    "image_pull_policy": "--image-pull-policy",
    "image_pull_secrets": "--image-pull-secret",
    "gpus": "--gpus",
    "cpu": "--cpu",
    "memory": "--memory",
    "ephemeral_storage": "--ephemeral-storage",
    "cache_pvc": "--cache-pvc",
    "cache_size": "--cache-size",
    "shm_size": "--shm-size",
    "secret_name": "--secret",
    "secret_key": "--secret-key",
    "secret_optional": "--secret-optional",
    "node_selector": "--node-selector",
    "tolerations": "--toleration",
    "affinity": "--affinity",
    "priority_class_name": "--priority-class",
    "service_account_name": "--service-account",
    "ttl_seconds_after_finished": "--ttl",
    "active_deadline_seconds": "--active-deadline",
    "backoff_limit": "--backoff-limit",
    "workers": "--workers",
    "labels": "--label",
    "env": "--env",
}


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    """LaunchOptions from the launch flags; errors name the flag."""
    given: dict[str, Any] = {
        "name": args.name,
        "namespace": args.namespace,
        "image": args.image,
        "image_pull_policy": args.image_pull_policy,
        "gpus": args.gpus,
        "cpu": args.cpu,
        "memory": args.memory,
        "ephemeral_storage": args.ephemeral_storage,
        "cache_pvc": args.cache_pvc,
        "cache_size": args.cache_size,
        "shm_size": args.shm_size,
        "secret_key": args.secret_key,
        "secret_optional": args.secret_optional,
        "priority_class_name": args.priority_class,
        "service_account_name": args.service_account,
        "active_deadline_seconds": args.active_deadline,
        "backoff_limit": args.backoff_limit,
        "workers": getattr(args, "indices", None),
    }
    given = {key: value for key, value in given.items() if value is not None}
    if args.no_secret:
        given["secret_name"] = None
    elif args.secret:
        given["secret_name"] = args.secret
    if args.ttl is not None:
        given["ttl_seconds_after_finished"] = None if args.ttl < 0 else args.ttl
    if args.image_pull_secret:
        given["image_pull_secrets"] = args.image_pull_secret
    if args.node_selector:
        given["node_selector"] = _pairs(args.node_selector, "--node-selector")
    if args.label:
        given["labels"] = _pairs(args.label, "--label")
    if args.env:
        given["env"] = _pairs(args.env, "--env")
    if args.writable_root:
        given["read_only_root_filesystem"] = False
    for text in args.toleration or []:
        try:
            given.setdefault("tolerations", []).append(Toleration.parse(text))
        except ValidationError as exc:
            reasons = "; ".join(str(e["msg"]) for e in exc.errors())
            raise SpecError(f"--toleration {text}: {reasons}") from None
    try:
        if args.affinity:
            given["affinity"] = _read_mapping(args.affinity, "--affinity")
        return LaunchOptions(**given)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            flag = _OPTION_FLAGS.get(field, field)
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(f"{flag}: {message}")
        raise SpecError("\n".join(lines)) from None


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    result = {}
    for item in values or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(f"{flag} {item}: expected KEY=VALUE")
        result[key.strip()] = value
    return result


def _read_mapping(path: str, flag: str) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    try:
        data = load_mapping_text(decode_text(raw, f"{flag} {path}", what="file"))
    except (yaml.YAMLError, DuplicateKeyError) as exc:
        reason = " ".join(str(exc).split())
        raise SpecError(f"{flag} {path}: not valid YAML/JSON ({reason})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{flag} {path}: must hold a mapping")
    return data
