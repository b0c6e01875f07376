"""The embedded default: run the job's container on this machine, no cluster needed.

``mergejob submit --local`` builds the same objects as a cluster submit, writes the
ConfigMap's files to a temporary folder, and runs the container's command (``mergejob run``)
as a subprocess with the container's environment: ``MERGEJOB_CONFIG`` names the spec file
there, exactly as in the pod. Only the scheduler and the image are left out. Paths that live
on the pod's own volumes (the cache, ``/tmp``) are left to this machine's defaults, and the
Hub token is this machine's (``HF_TOKEN`` or the huggingface_hub login) instead of the
Secret's.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from kubernetes import client as k8s

from mergejob.launch.manifests import CONFIG_MOUNT, CONTAINER_NAME, JobObjects
from mergejob.spec import ENV_FIELDS

log = logging.getLogger("mergejob")

# How the container's ``mergejob`` is started here: this interpreter, this package.
_ENTRYPOINT = "import sys; from mergejob.cli import main; sys.exit(main())"


def _container(objects: JobObjects) -> k8s.V1Container:
    for container in objects.job.spec.template.spec.containers:
        if container.name == CONTAINER_NAME:
            return container
    raise LookupError(f"the Job has no container {CONTAINER_NAME!r}")


def _under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def local_environment(
    container: k8s.V1Container,
    mounts: Mapping[str, str],
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment for a process on this machine.

    ``mounts`` maps a container path to a local folder (the spec's folder); a variable
    pointing under a mount that is not mapped (the pod's cache or /tmp) keeps this machine's
    value. ``MERGEJOB_*`` spec overrides of the caller's shell are dropped, so the job runs
    the spec it was given, as in the pod. Secret references are not resolved here.
    """
    env = dict(os.environ if environ is None else environ)
    for name in [*ENV_FIELDS, "MERGEJOB_CONFIG"]:
        env.pop(name, None)
    pod_mounts = [m.mount_path for m in container.volume_mounts or []]
    for var in container.env or []:
        if var.value_from is not None or var.value is None:
            continue
        value = var.value
        mapped = next((m for m in sorted(mounts, key=len, reverse=True) if _under(value, m)), None)
        if mapped is not None:
            env[var.name] = mounts[mapped].rstrip("/") + value[len(mapped.rstrip("/")) :]
        elif any(_under(value, m) for m in pod_mounts):
            continue
        else:
            env[var.name] = value
    return env


def run_local(
    objects: JobObjects,
    *,
    cwd: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run the job's container here and return its exit code (0, 2 bad input, 1 other).

    Output goes to this process' stdout and stderr, as it would to the pod's log.
    """
    container = _container(objects)
    with tempfile.TemporaryDirectory(prefix="mergejob-local-") as tmp:
        config_dir = Path(tmp) / "config"
        config_dir.mkdir()
        for key, value in (objects.config_map.data or {}).items():
            (config_dir / key).write_text(value)
        env = local_environment(container, {CONFIG_MOUNT: str(config_dir)}, environ)
        command = list(container.command or []) + list(container.args or [])
        if not command or Path(command[0]).name != "mergejob":
            raise ValueError(f"the container runs {command!r}, not mergejob")
        argv = [sys.executable, "-c", _ENTRYPOINT, *command[1:]]
        log.info(
            "running job %s here (no cluster): mergejob %s with MERGEJOB_CONFIG=%s",
            objects.name,
            " ".join(command[1:]),
            env.get("MERGEJOB_CONFIG"),
        )
        sys.stdout.flush()
        sys.stderr.flush()
        count = objects.job.spec.completions or 1
        if objects.job.spec.completion_mode == "Indexed" and count > 1:
            return run_indexes(argv, env, count, cwd=cwd)
        return subprocess.run(argv, env=env, cwd=cwd, check=False).returncode


def run_indexes(
    argv: list[str],
    env: Mapping[str, str],
    count: int,
    *,
    cwd: str | os.PathLike[str] | None = None,
    poll_seconds: float = 0.2,
) -> int:
    """The pods of an Indexed Job as ``count`` processes here, each with its
    ``JOB_COMPLETION_INDEX``. As ``maxFailedIndexes: 0`` does, the first index that fails
    stops the others (index 0 would wait for it forever). Returns 0, 2 (bad input) or 1."""
    processes = [
        subprocess.Popen(argv, env={**env, "JOB_COMPLETION_INDEX": str(i)}, cwd=cwd)
        for i in range(count)
    ]
    codes: dict[int, int] = {}
    try:
        while len(codes) < count:
            for i, process in enumerate(processes):
                code = process.poll()
                if code is not None and i not in codes:
                    codes[i] = code
                    if code != 0:
                        log.error("index %d exited with %d: stopping the other indices", i, code)
                        return 2 if code == 2 else 1
            time.sleep(poll_seconds)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0
