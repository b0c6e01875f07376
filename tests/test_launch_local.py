"""``mergejob submit --local``: the job's container command, run here, no cluster."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mergejob.launch.local import local_environment
from mergejob.launch.manifests import CONFIG_MOUNT, LaunchOptions, build_objects
from mergejob.spec import MergeSpec
from tests.support.models import ModelFactory

RunCli = Callable[..., tuple[int, str, str]]


def test_local_run_writes_what_merge_writes(
    run_cli: RunCli, models: ModelFactory, tmp_path: Path
) -> None:
    base = models.base()
    adapter = models.adapter(base)
    flags = ["--base", base, "--adapters", adapter, "--dtype", "float32"]
    code, _, err = run_cli("submit", "--local", *flags, "--output_dir", tmp_path / "local")
    assert code == 0, err
    code, _, err = run_cli("merge", *flags, "--output_dir", tmp_path / "merge")
    assert code == 0, err
    local = {p.name: p for p in (tmp_path / "local").iterdir()}
    merged = {p.name: p for p in (tmp_path / "merge").iterdir()}
    assert sorted(local) == sorted(merged)
    for name in local.keys() - {"mergejob.yaml"}:
        assert local[name].read_bytes() == merged[name].read_bytes(), name


def test_local_run_passes_on_the_jobs_bad_input_exit_code(
    run_cli: RunCli, models: ModelFactory, tmp_path: Path
) -> None:
    code, _, _ = run_cli(
        "submit", "--local", "--base", models.base(), "--adapters", tmp_path / "missing",
        "--output_dir", tmp_path / "out",
    )  # fmt: skip
    assert code == 2
    assert not (tmp_path / "out").exists()


def test_local_environment_is_the_containers_with_this_machines_paths() -> None:
    spec = MergeSpec.model_validate({"base": "b", "adapters": ["a"], "output": {"dir": "o"}})
    objects = build_objects(spec, LaunchOptions(env={"MERGEJOB_LOG_FORMAT": "json"}))
    container = objects.job.spec.template.spec.containers[0]
    caller = {
        "PATH": "/usr/bin",
        "HOME": "/home/me",
        "HF_TOKEN": "from-this-machine",
        "MERGEJOB_ENGINE": "peft",  # a shell leftover must not change the job
        "MERGEJOB_CONFIG": "/somewhere/else.yaml",
    }
    env = local_environment(container, {CONFIG_MOUNT: "/tmp/x/config"}, caller)
    assert env["MERGEJOB_CONFIG"] == "/tmp/x/config/config.yaml"
    assert env["MERGEJOB_LOG_FORMAT"] == "json"
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    # Paths on the pod's own volumes (cache, /tmp) stay this machine's.
    assert env["HOME"] == "/home/me" and "HF_HOME" not in env
    assert env["HF_TOKEN"] == "from-this-machine"
    assert "MERGEJOB_ENGINE" not in env and env["PATH"] == "/usr/bin"
