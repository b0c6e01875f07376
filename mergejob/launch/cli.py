"""CLI commands of the launcher: render, submit, status, logs, wait, cancel, list.

The job is given as for ``mergejob merge`` (seed-style flags or ``--config SPEC``); how it
runs on the cluster is given by the launch flags (``--image``, ``--gpus``, ``--secret``...).
``render`` and ``submit`` build their objects with the same builder, so what is printed is
what is created.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergejob.errors import EXIT_FAILURE, EXIT_OK, SpecError
from mergejob.launch.manifests import (
    DEFAULT_SECRET_KEY,
    DEFAULT_SECRET_NAME,
    JobObjects,
    LaunchOptions,
    Toleration,
    build_objects,
    default_image,
    to_yaml,
)
from mergejob.spec import MergeSpec

log = logging.getLogger("mergejob")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the launcher's commands to the ``mergejob`` parser."""
    from mergejob.cli import add_job_arguments, add_logging_arguments

    render = sub.add_parser(
        "render",
        help="print the job's Kubernetes objects as YAML (for kubectl apply -f - or GitOps)",
        description="Print the ConfigMap (the spec) and the Job that `mergejob submit` would "
        "create, as YAML. Nothing is sent anywhere.",
    )
    add_job_arguments(render)
    add_launch_arguments(render)
    add_logging_arguments(render)
    render.set_defaults(func=cmd_render)

    submit = sub.add_parser(
        "submit",
        help="run the job as a Kubernetes Job (or here, with --local)",
        description="Create the job's ConfigMap and Job through the Kubernetes API (the "
        "kubeconfig's cluster, --context, or the in-cluster service account). Exit codes "
        "with --wait/--follow/--local: 0 done, 2 bad input, 1 other failure.",
    )
    add_job_arguments(submit)
    add_launch_arguments(submit)
    add_cluster_arguments(submit, namespace=False)
    submit.add_argument(
        "--dry-run",
        action="store_true",
        help="server-side dry run: the API server checks the objects, nothing is created; "
        "prints them as the server would store them",
    )
    submit.add_argument(
        "--replace", action="store_true", help="delete a job of the same name first"
    )
    submit.add_argument("--wait", action="store_true", help="wait until the job finishes")
    submit.add_argument(
        "--follow", "-f", action="store_true", help="print the job's log until it finishes"
    )
    submit.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --wait/--follow: give up after"
    )
    submit.add_argument(
        "--local",
        action="store_true",
        help="no cluster: run the same container command here, as a subprocess, with the "
        "same config file and environment",
    )
    add_logging_arguments(submit)
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser(
        "status", help="a job's phase, progress, retries and, if it failed, why"
    )
    status.add_argument("name", metavar="NAME", help="the job's name")
    add_cluster_arguments(status)
    status.add_argument("--tail", type=int, default=20, help="log lines of a failed pod")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    add_logging_arguments(status)
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="print a job's log (its newest pod's)")
    logs.add_argument("name", metavar="NAME", help="the job's name")
    add_cluster_arguments(logs)
    logs.add_argument(
        "--follow", "-f", action="store_true", help="keep printing until the job finishes"
    )
    logs.add_argument("--tail", type=int, help="only the last N lines")
    logs.add_argument("--all-pods", action="store_true", help="every pod's log, retries too")
    logs.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --follow: stop after this long"
    )
    add_logging_arguments(logs)
    logs.set_defaults(func=cmd_logs)

    wait = sub.add_parser(
        "wait",
        help="wait until a job finishes; exit 0 done, 2 bad input, 1 other failure",
    )
    wait.add_argument("name", metavar="NAME", help="the job's name")
    add_cluster_arguments(wait)
    wait.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after")
    add_logging_arguments(wait)
    wait.set_defaults(func=cmd_wait)

    cancel = sub.add_parser("cancel", help="delete a job, its pods and its spec ConfigMap")
    cancel.add_argument("name", metavar="NAME", help="the job's name")
    add_cluster_arguments(cancel)
    cancel.add_argument("--wait", action="store_true", help="return once everything is gone")
    add_logging_arguments(cancel)
    cancel.set_defaults(func=cmd_cancel)

    listing = sub.add_parser("list", help="the mergejob jobs of a namespace")
    add_cluster_arguments(listing)
    listing.add_argument(
        "--all-namespaces", "-A", action="store_true", help="jobs of every namespace"
    )
    add_logging_arguments(listing)
    listing.set_defaults(func=cmd_list)


# ---------------------------------------------------------------------------------------
# Flags


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
    for action in parser._actions:
        if action.dest == "workers":  # the job flag: here it counts pods, not processes
            action.metavar = "N"
            action.help = (
                "split the merge over N pods of an Indexed Job (stream engine; the output on "
                "a ReadWriteMany --cache-pvc they share); with --local, N processes here. "
                "Each pod runs one worker per visible GPU (--device cuda)"
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


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    result = {}
    for item in values or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(f"{flag} {item}: expected KEY=VALUE")
        result[key.strip()] = value
    return result


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


def _read_mapping(path: str, flag: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SpecError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{flag} {path}: not valid YAML/JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{flag} {path}: must hold a mapping")
    return data


def job_from_args(args: argparse.Namespace) -> tuple[MergeSpec, LaunchOptions]:
    """The spec from the job flags and the options from the launch flags, both checked."""
    from mergejob.cli import spec_from_args

    # On submit and render, --workers N is the number of indices (pods), not the spec's
    # engine.workers (which each pod would multiply by N).
    if getattr(args, "workers", None) is not None:
        args.indices, args.workers = args.workers, None
    spec = spec_from_args(args)
    options = options_from_args(args)
    if options.workers > 1:
        check_split_job(spec, options, local=bool(getattr(args, "local", False)))
    if options.gpus and spec.engine.device == "cpu":
        log.warning(
            "--gpus %d but the spec's engine.device is cpu: the GPUs stay idle "
            "(set --device auto or cuda)",
            options.gpus,
        )
    return spec, options


def check_split_job(spec: MergeSpec, options: LaunchOptions, *, local: bool) -> None:
    """A merge split over pods needs the stream engine and storage every pod shares."""
    if spec.engine.name != "stream":
        raise SpecError(
            f"--workers {options.workers}: needs the stream engine (--engine stream); the peft "
            "engine spreads one pod's GPUs instead (--gpus N --device auto)"
        )
    if local:
        return
    if not options.cache_pvc:
        raise SpecError(
            f"--workers {options.workers}: the pods write one output together: name a "
            "ReadWriteMany PersistentVolumeClaim with --cache-pvc CLAIM (mounted at /cache)"
        )
    out = spec.output.dir
    if out and out.startswith("/") and not (out == "/cache" or out.startswith("/cache/")):
        log.warning(
            "--workers %d: output.dir %s is not under /cache (the shared PVC): every pod must "
            "see the same folder there",
            options.workers,
            out,
        )


def objects_from_args(args: argparse.Namespace) -> JobObjects:
    """The job's objects, built once from the flags."""
    return build_objects(*job_from_args(args))


def _connect(args: argparse.Namespace) -> Any:
    from mergejob.launch import kube

    return kube.connect(
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespace=args.namespace,
        as_user=args.as_user,
    )


# ---------------------------------------------------------------------------------------
# Commands


def cmd_render(args: argparse.Namespace) -> int:
    """``mergejob render``: the objects as YAML on stdout."""
    objects = objects_from_args(args)
    sys.stdout.write(to_yaml(objects.all()))
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    """``mergejob submit``: create the objects (or run them here with --local)."""
    if args.local:
        return _submit_local(args)
    from mergejob.launch import kube

    spec, options = job_from_args(args)  # a bad job fails before any cluster is asked
    cluster = _connect(args)
    try:
        # The objects go where the launcher works: --namespace, else the context's.
        objects = build_objects(spec, options.model_copy(update={"namespace": cluster.namespace}))
        created = kube.submit(cluster, objects, replace=args.replace, dry_run=args.dry_run)
        ns, name = cluster.namespace, objects.name
        if args.dry_run:
            for obj in created:
                obj.metadata.managed_fields = None  # bookkeeping, not the object
            sys.stdout.write(to_yaml(created))
            print(
                f"# server-side dry run: job {ns}/{name} and configmap "
                f"{objects.config_map.metadata.name} are valid; nothing was created",
                file=sys.stderr,
            )
            return EXIT_OK
        print(
            f"job {ns}/{name} submitted (configmap {objects.config_map.metadata.name}, "
            f"spec sha256 {objects.spec_sha256[:16]})"
        )
        if not (args.wait or args.follow):
            print(
                f"  mergejob status {name} -n {ns}    mergejob logs {name} -n {ns} -f    "
                f"mergejob wait {name} -n {ns}"
            )
            return EXIT_OK
        sys.stdout.flush()
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        if args.follow:
            kube.stream_logs(
                cluster, name, sys.stdout.buffer, follow=True, notify=_notify, deadline=deadline
            )
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        status = kube.wait_for_job(cluster, name, timeout=remaining)
        return _finish(status)
    finally:
        cluster.close()


def _submit_local(args: argparse.Namespace) -> int:
    from mergejob.launch.local import run_local

    if args.dry_run:
        raise SpecError(
            "--dry-run with --local: nothing to dry-run without a cluster; check the job "
            "with `mergejob plan`, or print its objects with `mergejob render`"
        )
    ignored = [flag for flag in ("kubeconfig", "context", "as_user") if getattr(args, flag)]
    if ignored:
        log.warning("--local: ignoring %s", ", ".join(f"--{f.replace('_', '-')}" for f in ignored))
    return run_local(objects_from_args(args))


def _notify(message: str) -> None:
    print(f"mergejob: {message}", file=sys.stderr, flush=True)


def _finish(status: Any) -> int:
    """Print the final status; the exit code says how the job ended."""
    sys.stdout.flush()
    print(status.render(), file=sys.stderr if status.phase != "Succeeded" else sys.stdout)
    code = status.exit_code
    return EXIT_FAILURE if code is None else code


def cmd_status(args: argparse.Namespace) -> int:
    """``mergejob status NAME``."""
    from mergejob.launch import kube

    cluster = _connect(args)
    try:
        status = kube.job_status(cluster, args.name, tail=args.tail)
    finally:
        cluster.close()
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
    else:
        print(status.render())
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """``mergejob logs NAME [-f]``."""
    from mergejob.launch import kube

    cluster = _connect(args)
    try:
        sys.stdout.flush()
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        kube.stream_logs(
            cluster,
            args.name,
            sys.stdout.buffer,
            follow=args.follow,
            tail=args.tail,
            all_pods=args.all_pods,
            notify=_notify,
            deadline=deadline,
        )
    finally:
        cluster.close()
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    """``mergejob wait NAME``: the exit code says how the job ended."""
    from mergejob.launch import kube

    cluster = _connect(args)
    try:
        status = kube.wait_for_job(cluster, args.name, timeout=args.timeout)
    finally:
        cluster.close()
    return _finish(status)


def cmd_cancel(args: argparse.Namespace) -> int:
    """``mergejob cancel NAME``: delete the Job, its Pods and its ConfigMap."""
    from mergejob.launch import kube

    cluster = _connect(args)
    try:
        done = kube.cancel(cluster, args.name, wait=args.wait)
    finally:
        cluster.close()
    parts = [f"job {cluster.namespace}/{done.job}"]
    if done.pods:
        parts.append(f"{len(done.pods)} pod(s) ({', '.join(done.pods)})")
    parts += [f"configmap {name}" for name in done.config_maps]
    print("deleted " + ", ".join(parts))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """``mergejob list``: NAME, PHASE, PODS (active/succeeded/failed), AGE, SPEC."""
    from mergejob.launch import kube

    cluster = _connect(args)
    try:
        rows = kube.list_jobs(cluster, all_namespaces=args.all_namespaces)
    finally:
        cluster.close()
    header = ["NAME", "PHASE", "PODS(A/S/F)", "AGE", "SPEC"]
    table = [[r.name, r.phase, r.pods, r.age, r.spec_sha256] for r in rows]
    if args.all_namespaces:
        header.insert(0, "NAMESPACE")
        for row, r in zip(table, rows, strict=True):
            row.insert(0, r.namespace)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=False)]
    for row in [header, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK
