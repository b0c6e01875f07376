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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from mergejob.cli.args import (
    add_cluster_arguments,
    add_job_arguments,
    add_launch_arguments,
    add_logging_arguments,
    options_from_args,
    spec_from_args,
)
from mergejob.errors import EXIT_FAILURE, EXIT_OK, SpecError
from mergejob.launch.manifests import (
    JobObjects,
    LaunchOptions,
    build_objects,
    check_launch,
    config_map_name,
    to_yaml,
)
from mergejob.spec import MergeSpec

if TYPE_CHECKING:
    from mergejob.launch.cluster import Cluster
    from mergejob.launch.status import JobStatus

log = logging.getLogger("mergejob")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the launcher's commands to the ``mergejob`` parser."""
    render = sub.add_parser(
        "render",
        help="print the job's Kubernetes objects as YAML (for kubectl apply -f - or GitOps)",
        description="Print the ConfigMap (the spec) and the Job that `mergejob submit` would "
        "create, as YAML. Nothing is sent anywhere.",
    )
    add_job_arguments(render, pods=True)
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
    add_job_arguments(submit, pods=True)
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


def job_from_args(args: argparse.Namespace) -> tuple[MergeSpec, LaunchOptions]:
    """The spec from the job flags and the options from the launch flags, both checked."""
    spec = spec_from_args(args, config=args.config)
    options = options_from_args(args)
    check_launch(spec, options, local=bool(getattr(args, "local", False)))
    return spec, options


def objects_from_args(args: argparse.Namespace) -> JobObjects:
    """The job's objects, built once from the flags."""
    return build_objects(*job_from_args(args))


@contextmanager
def _connect(args: argparse.Namespace) -> Iterator[Cluster]:
    """The cluster the cluster flags name (the kubeconfig's, or in-cluster), closed after."""
    from mergejob.launch.cluster import connect

    cluster = connect(
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespace=args.namespace,
        as_user=args.as_user,
    )
    try:
        yield cluster
    finally:
        cluster.close()


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
    from mergejob.launch.follow import stream_logs
    from mergejob.launch.jobs import submit, wait_for_job

    spec, options = job_from_args(args)  # a bad job fails before any cluster is asked
    with _connect(args) as cluster:
        # The objects go where the launcher works: --namespace, else the context's.
        objects = build_objects(spec, options.model_copy(update={"namespace": cluster.namespace}))
        created = submit(cluster, objects, replace=args.replace, dry_run=args.dry_run)
        ns, name, config_map = cluster.namespace, objects.name, config_map_name(objects.name)
        if args.dry_run:
            for obj in created:
                obj.metadata.managed_fields = None  # bookkeeping, not the object
            sys.stdout.write(to_yaml(created))
            print(
                f"# server-side dry run: job {ns}/{name} and configmap {config_map} are "
                "valid; nothing was created",
                file=sys.stderr,
            )
            return EXIT_OK
        print(
            f"job {ns}/{name} submitted (configmap {config_map}, "
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
            stream_logs(
                cluster, name, sys.stdout.buffer, follow=True, notify=_notify, deadline=deadline
            )
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        status = wait_for_job(cluster, name, timeout=remaining)
        return _finish(status)


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


def _finish(status: JobStatus) -> int:
    """Print the final status; the exit code says how the job ended."""
    sys.stdout.flush()
    print(status.render(), file=sys.stderr if status.phase != "Succeeded" else sys.stdout)
    code = status.exit_code
    return EXIT_FAILURE if code is None else code


def cmd_status(args: argparse.Namespace) -> int:
    """``mergejob status NAME``."""
    from mergejob.launch.status import job_status

    with _connect(args) as cluster:
        status = job_status(cluster, args.name, tail=args.tail)
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
    else:
        print(status.render())
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """``mergejob logs NAME [-f]``."""
    from mergejob.launch.follow import stream_logs

    with _connect(args) as cluster:
        sys.stdout.flush()
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        stream_logs(
            cluster,
            args.name,
            sys.stdout.buffer,
            follow=args.follow,
            tail=args.tail,
            all_pods=args.all_pods,
            notify=_notify,
            deadline=deadline,
        )
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    """``mergejob wait NAME``: the exit code says how the job ended."""
    from mergejob.launch.jobs import wait_for_job

    with _connect(args) as cluster:
        status = wait_for_job(cluster, args.name, timeout=args.timeout)
    return _finish(status)


def cmd_cancel(args: argparse.Namespace) -> int:
    """``mergejob cancel NAME``: delete the Job, its Pods and its ConfigMap."""
    from mergejob.launch.jobs import cancel

    with _connect(args) as cluster:
        done = cancel(cluster, args.name, wait=args.wait)
    parts = [f"job {cluster.namespace}/{done.job}"]
    if done.pods:
        parts.append(f"{len(done.pods)} pod(s) ({', '.join(done.pods)})")
    parts += [f"configmap {name}" for name in done.config_maps]
    print("deleted " + ", ".join(parts))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """``mergejob list``: NAME, PHASE, PODS (active/succeeded/failed), AGE, SPEC."""
    from mergejob.launch.jobs import list_jobs

    with _connect(args) as cluster:
        rows = list_jobs(cluster, all_namespaces=args.all_namespaces)
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
