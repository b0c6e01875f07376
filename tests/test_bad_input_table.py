"""The bad-input table: every way a job can be given bad input, across merge, plan, run,
verify, render and submit, ends the same way: the exit code (2: never worth a retry), one
line naming the file, field, flag or variable, no traceback, nothing left in the output's
parent (no partial folder), and every input's bytes as they were.

Each case builds its inputs in its own folder (a copy of a tiny base and adapter, then a
small edit), snapshots that folder (every file's sha256, every link's target), runs the
command in-process, and compares the snapshot after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TOKEN = "hf_TableTestTokenValue0123456789abcdef"


@dataclass
class Paths:
    """One case's folder: ``root`` holds the inputs and is the output's parent."""

    root: Path
    base: Path
    adapter: Path
    mounts: list[Path] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.root / "out"

    def fill(self, text: str) -> str:
        return text.format(
            root=self.root, base=self.base, adapter=self.adapter, out=self.out, token=TOKEN
        )


Setup = Callable[[Paths], None]


@dataclass(frozen=True)
class Case:
    """argv and env values and the needles may use {root} {base} {adapter} {out} {token}."""

    id: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    setup: Setup | None = None
    env: tuple[tuple[str, str], ...] = ()
    code: int = 2
    absent: tuple[str, ...] = ()  # never in the output (a token)
    report: bool = False  # ``plan``'s report lists the problem (stdout), not an error line


JOB = ("--base", "{base}", "--adapters", "{adapter}", "--output_dir", "{out}")


# ---------------------------------------------------------------------------------------
# Small edits of the inputs


def adapter_config(**changes: Any) -> Setup:
    def edit(p: Paths) -> None:
        path = p.adapter / "adapter_config.json"
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))

    return edit


def base_config_text(text: str) -> Setup:
    def edit(p: Paths) -> None:
        (p.base / "config.json").write_text(text)

    return edit


def remove(relative: str) -> Setup:
    def edit(p: Paths) -> None:
        path = p.root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return edit


def write(relative: str, data: bytes | str) -> Setup:
    def edit(p: Paths) -> None:
        path = p.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(p.fill(data))

    return edit


def both(*setups: Setup) -> Setup:
    def edit(p: Paths) -> None:
        for setup in setups:
            setup(p)

    return edit


def first_shard(p: Paths) -> Path:
    return sorted(p.base.glob("model-*.safetensors"))[0]


def truncate_shard(p: Paths) -> None:
    shard = first_shard(p)
    shard.write_bytes(shard.read_bytes()[:-100])


def garble_shard(p: Paths) -> None:
    first_shard(p).write_bytes(
        b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{not json at all, no}" + b"x" * 64
    )


def loop_shard(p: Paths) -> None:
    shard = first_shard(p)
    shard.unlink()
    shard.symlink_to("loop.safetensors")
    (p.base / "loop.safetensors").symlink_to(shard.name)


def index_names_missing_shard(p: Paths) -> None:
    first_shard(p).unlink()


def adapter_tensor(value: float, *, key_part: str = "lora_B") -> Setup:
    def edit(p: Paths) -> None:
        from safetensors.torch import load_file, save_file

        path = p.adapter / "adapter_model.safetensors"
        tensors = load_file(str(path))
        name = sorted(k for k in tensors if key_part in k)[0]
        tensors[name][0, 0] = value
        save_file(tensors, str(path), metadata={"format": "pt"})

    return edit


def pickle_only(p: Paths) -> None:
    weights = p.adapter / "adapter_model.safetensors"
    weights.rename(p.adapter / "adapter_model.bin")


def foreign_adapter(p: Paths) -> None:
    other = Path(os.environ["TABLE_FOREIGN_ADAPTER"])
    shutil.rmtree(p.adapter)
    shutil.copytree(other, p.adapter)


def non_empty_out(p: Paths) -> None:
    p.out.mkdir()
    (p.out / "keep.txt").write_text("precious")


def spec(text: str, name: str = "spec.yaml") -> Setup:
    return write(name, text)


GOOD_SPEC = "base: {base}\nadapters: [{adapter}]\noutput: {{dir: {out}}}\n"


def utf16_spec(p: Paths) -> None:
    (p.root / "spec.yaml").write_bytes(p.fill(GOOD_SPEC).encode("utf-16"))


def latin1_spec(p: Paths) -> None:
    (p.root / "spec.yaml").write_bytes(p.fill(GOOD_SPEC).encode() + "# café\n".encode("latin-1"))


def binary_spec(p: Paths) -> None:
    (p.root / "spec.yaml").write_bytes(bytes(range(256)) * 4)


def mount(options: str) -> Setup:
    """A tmpfs at {root}/mnt, the output then {root}/mnt/out (unmounted by the test)."""

    def edit(p: Paths) -> None:
        point = p.root / "mnt"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        p.mounts.append(point)

    return edit


MNT_JOB = ("--base", "{base}", "--adapters", "{adapter}", "--output_dir", "{root}/mnt/out")


# ---------------------------------------------------------------------------------------
# The table

# fmt: off
CASES: list[Case] = [
    # --- merge: the base
    Case("merge-base-missing", ("merge", "--base", "{root}/nope", "--adapters", "{adapter}",
         "--output_dir", "{out}"), ("{root}/nope", "base model")),
    Case("merge-base-no-config", ("merge", *JOB), ("{base}/config.json",),
         setup=remove("base/config.json")),
    Case("merge-base-config-not-json", ("merge", *JOB), ("{base}/config.json",),
         setup=base_config_text("{ not json")),
    Case("merge-base-shard-truncated", ("merge", *JOB), ("model-00001-of-00002.safetensors",),
         setup=truncate_shard),
    Case("merge-base-shard-garbled", ("merge", *JOB), ("model-00001-of-00002.safetensors",),
         setup=garble_shard),
    Case("merge-base-shard-symlink-loop", ("merge", *JOB),
         ("model-00001-of-00002.safetensors", "ELOOP"), setup=loop_shard),
    Case("merge-base-shard-missing", ("merge", *JOB), ("model-00001-of-00002.safetensors",),
         setup=index_names_missing_shard),
    Case("merge-peft-base-shard-symlink-loop", ("merge", *JOB, "--engine", "peft"),
         ("model-00001-of-00002.safetensors", "ELOOP"), setup=loop_shard),
    # --- merge: the adapter
    Case("merge-adapter-missing", ("merge", "--base", "{base}", "--adapters", "{root}/nope",
         "--output_dir", "{out}"), ("{root}/nope", "adapter")),
    Case("merge-adapter-no-config", ("merge", *JOB), ("{adapter}/adapter_config.json",),
         setup=remove("adapter/adapter_config.json")),
    Case("merge-adapter-config-not-json", ("merge", *JOB), ("{adapter}/adapter_config.json",),
         setup=write("adapter/adapter_config.json", "{{ nope")),
    Case("merge-adapter-config-latin1", ("merge", *JOB), ("{adapter}/adapter_config.json",),
         setup=write("adapter/adapter_config.json", b'{"r": 4, "x": "caf\xe9"}')),
    Case("merge-lora-alpha-string", ("merge", *JOB), ("{adapter}/adapter_config.json",
         "lora_alpha"), setup=adapter_config(lora_alpha="16")),
    Case("merge-peft-lora-alpha-string", ("merge", *JOB, "--engine", "peft"),
         ("{adapter}/adapter_config.json", "lora_alpha"), setup=adapter_config(lora_alpha="16")),
    Case("merge-r-string", ("merge", *JOB), ("adapter_config.json", "r: \"4\""),
         setup=adapter_config(r="4")),
    Case("merge-r-zero", ("merge", *JOB), ("adapter_config.json", "r: 0"),
         setup=adapter_config(r=0)),
    Case("merge-use-dora-string", ("merge", *JOB), ("adapter_config.json", "use_dora"),
         setup=adapter_config(use_dora="false")),
    Case("merge-target-modules-number", ("merge", *JOB), ("adapter_config.json",
         "target_modules"), setup=adapter_config(target_modules=5)),
    Case("merge-rank-pattern-string-rank", ("merge", *JOB), ("adapter_config.json",
         "rank_pattern"), setup=adapter_config(rank_pattern={"q_proj": "8"})),
    Case("merge-rank-mismatch", ("merge", *JOB), ("adapter_model.safetensors",
         "from the config's r"), setup=adapter_config(r=8)),
    Case("merge-unsupported-method", ("merge", *JOB), ("adapter_config.json", "LOHA"),
         setup=adapter_config(peft_type="LOHA")),
    Case("merge-adapter-no-weights", ("merge", *JOB), ("adapter_model.safetensors",),
         setup=remove("adapter/adapter_model.safetensors")),
    Case("merge-adapter-pickle-weights", ("merge", *JOB), ("adapter_model.bin", "pickle"),
         setup=pickle_only),
    Case("merge-adapter-nan", ("merge", *JOB), ("{adapter}/adapter_model.safetensors",
         "lora_B", "NaN"), setup=adapter_tensor(float("nan"))),
    Case("merge-adapter-inf", ("merge", *JOB), ("{adapter}/adapter_model.safetensors",
         "lora_A", "inf"), setup=adapter_tensor(float("inf"), key_part="lora_A")),
    Case("merge-peft-adapter-nan", ("merge", *JOB, "--engine", "peft"),
         ("{adapter}/adapter_model.safetensors", "lora_B", "NaN"),
         setup=adapter_tensor(float("nan"))),
    Case("merge-adapter-for-another-base", ("merge", *JOB), ("{adapter}", "q_proj"),
         setup=foreign_adapter),
    Case("merge-peft-adapter-for-another-base", ("merge", *JOB, "--engine", "peft"),
         ("{adapter}", "q_proj"), setup=foreign_adapter),
    # --- merge: flags
    Case("merge-dtype-unknown", ("merge", *JOB, "--dtype", "float8"), ("--dtype", "float8")),
    Case("merge-engine-unknown", ("merge", *JOB, "--engine", "tensorflow"), ("--engine",)),
    Case("merge-max-shard-size", ("merge", *JOB, "--max-shard-size", "big"),
         ("--max-shard-size", "big")),
    Case("merge-device", ("merge", *JOB, "--device", "gpu0"), ("--device", "gpu0")),
    Case("merge-workers-zero", ("merge", *JOB, "--workers", "0"), ("--workers",)),
    Case("merge-workers-not-int", ("merge", *JOB, "--workers", "two"), ("--workers",)),
    Case("merge-weights-count", ("merge", *JOB, "--weights", "0.5", "0.5"), ("--weights",)),
    Case("merge-weights-nan", ("merge", *JOB, "--weights", "nan"), ("--weights",)),
    Case("merge-weights-peft", ("merge", *JOB, "--weights", "0.5", "--engine", "peft"),
         ("--weights", "peft")),
    Case("merge-max-memory", ("merge", *JOB, "--engine", "peft", "--max-memory", "0=lots"),
         ("--max-memory",)),
    Case("merge-set-config-no-value", ("merge", *JOB, "--set-config", "rope_theta"),
         ("--set-config",)),
    Case("merge-set-config-unknown-key", ("merge", *JOB, "--set-config", "no_such_key=1"),
         ("no_such_key",)),
    Case("merge-config-from-missing", ("merge", *JOB, "--config-from", "{root}/nope"),
         ("{root}/nope",)),
    Case("merge-local-dir-without-push", ("merge", *JOB, "--local-dir", "{root}/local"),
         ("--local-dir",)),
    Case("merge-push-without-repo", ("merge", "--base", "{base}", "--adapters", "{adapter}",
         "--push_to_hub"), ("--push_to_hub",)),
    Case("merge-no-adapters", ("merge", "--base", "{base}", "--output_dir", "{out}"),
         ("--peft_model_paths",)),
    Case("merge-output-not-empty", ("merge", *JOB), ("{out}", "--overwrite"),
         setup=non_empty_out),
    Case("merge-output-read-only-fs", ("merge", *MNT_JOB), ("{root}/mnt", "EROFS"),
         setup=mount("ro,size=1m")),
    Case("merge-peft-output-read-only-fs", ("merge", *MNT_JOB, "--engine", "peft"),
         ("{root}/mnt", "EROFS"), setup=mount("ro,size=1m")),
    # --- merge: the spec file
    Case("spec-missing", ("merge", "--config", "{root}/nope.yaml"), ("{root}/nope.yaml",)),
    Case("spec-is-a-folder", ("merge", "--config", "{root}"), ("{root}",)),
    Case("spec-utf16", ("merge", "--config", "{root}/spec.yaml"), ("{root}/spec.yaml",
         "UTF-16"), setup=utf16_spec),
    Case("spec-latin1", ("merge", "--config", "{root}/spec.yaml"), ("{root}/spec.yaml",
         "UTF-8"), setup=latin1_spec),
    Case("spec-binary", ("merge", "--config", "{root}/spec.yaml"), ("{root}/spec.yaml",
         "binary"), setup=binary_spec),
    Case("spec-duplicate-key-yaml", ("merge", "--config", "{root}/spec.yaml"),
         ("{root}/spec.yaml", "'base'", "lines 1 and 4"),
         setup=spec(GOOD_SPEC + "base: {base}\n")),
    Case("spec-duplicate-nested-key-yaml", ("merge", "--config", "{root}/spec.yaml"),
         ("{root}/spec.yaml", "'dtype'", "lines 5 and 6"),
         setup=spec("base: {base}\nadapters: [{adapter}]\noutput:\n  dir: {out}\n"
                    "  dtype: float16\n  dtype: bfloat16\n")),
    Case("spec-duplicate-key-json", ("merge", "--config", "{root}/spec.json"),
         ("{root}/spec.json", "'adapters'", "lines 3 and 4"),
         setup=spec('{{\n "base": "{base}",\n "adapters": ["{adapter}"],\n'
                    ' "adapters": ["{adapter}"],\n "output": {{"dir": "{out}"}}\n}}\n',
                    "spec.json")),
    Case("spec-not-yaml", ("merge", "--config", "{root}/spec.yaml"), ("{root}/spec.yaml",
         "YAML"), setup=spec("base: [unclosed\n")),
    Case("spec-a-list", ("merge", "--config", "{root}/spec.yaml"), ("{root}/spec.yaml",
         "mapping"), setup=spec("- base\n- adapters\n")),
    Case("spec-unknown-key", ("merge", "--config", "{root}/spec.yaml"), ("adapter",
         "did you mean"), setup=spec("base: {base}\nadapter: [{adapter}]\n"
                                      "output: {{dir: {out}}}\n")),
    Case("spec-token", ("merge", "--config", "{root}/spec.yaml"), ("token",),
         setup=spec(GOOD_SPEC + "publish: {{repo_id: org/m, token: {token}}}\n"),
         absent=(TOKEN,)),
    Case("spec-no-output", ("merge", "--config", "{root}/spec.yaml"), ("output.dir",),
         setup=spec("base: {base}\nadapters: [{adapter}]\n")),
    Case("spec-no-adapters", ("merge", "--config", "{root}/spec.yaml"), ("adapters",),
         setup=spec("base: {base}\nadapters: []\noutput: {{dir: {out}}}\n")),
    Case("spec-weight-zero", ("merge", "--config", "{root}/spec.yaml"), ("weight",),
         setup=spec("base: {base}\nadapters: [{{path: {adapter}, weight: 0}}]\n"
                    "output: {{dir: {out}}}\n")),
    Case("spec-repo-id", ("merge", "--config", "{root}/spec.yaml"), ("repo_id",),
         setup=spec(GOOD_SPEC + "publish: {{repo_id: 'not a repo'}}\n")),
    Case("spec-lora-alpha-string-yaml", ("merge", "--config", "{root}/spec.yaml"),
         ("{adapter}/adapter_config.json", "lora_alpha"),
         setup=both(spec(GOOD_SPEC), adapter_config(lora_alpha="sixteen"))),
    # --- plan
    Case("plan-base-missing", ("plan", "--base", "{root}/nope", "--adapters", "{adapter}"),
         ("{root}/nope",)),
    Case("plan-lora-alpha-string", ("plan", *JOB), ("{adapter}/adapter_config.json",
         "lora_alpha"), setup=adapter_config(lora_alpha="16"), report=True),
    Case("plan-dtype-unknown", ("plan", *JOB, "--dtype", "float8"), ("--dtype",)),
    Case("plan-spec-utf16", ("plan", "--config", "{root}/spec.yaml"), ("UTF-16",),
         setup=utf16_spec),
    Case("plan-base-shard-symlink-loop", ("plan", *JOB), ("{base}/", "ELOOP"),
         setup=loop_shard),
    Case("plan-disk-too-small", ("plan", *MNT_JOB), ("{root}/mnt/out", "free", "writes"),
         setup=mount("size=16k"), report=True),
    # --- run (the pod entrypoint: flags, MERGEJOB_* variables, the spec file)
    Case("run-no-spec", ("run",), ("/etc/mergejob/config.yaml", "MERGEJOB_CONFIG")),
    Case("run-config-env-missing", ("run",), ("MERGEJOB_CONFIG", "{root}/nope.yaml"),
         env=(("MERGEJOB_CONFIG", "{root}/nope.yaml"),)),
    Case("run-config-env-duplicate-key", ("run",), ("{root}/spec.yaml", "'output'"),
         env=(("MERGEJOB_CONFIG", "{root}/spec.yaml"),),
         setup=spec(GOOD_SPEC + "output: {{dir: {root}/other}}\n")),
    Case("run-dtype-env", ("run", *JOB), ("MERGEJOB_DTYPE",), env=(("MERGEJOB_DTYPE", "fp8"),)),
    Case("run-workers-env", ("run", *JOB), ("MERGEJOB_WORKERS",),
         env=(("MERGEJOB_WORKERS", "many"),)),
    Case("run-overrides-env", ("run", *JOB), ("MERGEJOB_CONFIG_OVERRIDES",),
         env=(("MERGEJOB_CONFIG_OVERRIDES", "{{rope"),)),
    Case("run-engine-env", ("run", *JOB), ("MERGEJOB_ENGINE",), env=(("MERGEJOB_ENGINE", "tf"),)),
    Case("run-token-path-is-the-token", ("run", *JOB), ("HF_TOKEN_PATH", "names no file"),
         env=(("HF_TOKEN_PATH", "{token}"),), absent=(TOKEN,)),
    Case("run-token-path-folder", ("run", *JOB), ("HF_TOKEN_PATH", "folder"),
         env=(("HF_TOKEN_PATH", "{root}"),)),
    Case("run-token-path-empty-file", ("run", *JOB), ("HF_TOKEN_PATH", "empty"),
         env=(("HF_TOKEN_PATH", "{root}/token"),), setup=write("token", "")),
    Case("run-index-out-of-range", ("run", *JOB, "--index", "3", "--index-count", "2"),
         ("--index",)),
    Case("run-index-env-not-a-number", ("run", *JOB), ("JOB_COMPLETION_INDEX",),
         env=(("JOB_COMPLETION_INDEX", "abc"), ("MERGEJOB_INDEX_COUNT", "2"))),
    Case("run-adapter-nan", ("run", *JOB), ("adapter_model.safetensors", "NaN"),
         setup=adapter_tensor(float("nan"))),
    # --- verify
    Case("verify-no-output", ("verify", "{root}/nope"), ("{root}/nope",)),
    Case("verify-not-a-mergejob-output", ("verify", "{base}"), ("{base}/mergejob.yaml",)),
    Case("verify-base-missing", ("verify", "{base}", "--base", "{root}/nope", "--adapters",
         "{adapter}"), ("{root}/nope",)),
    Case("verify-lora-alpha-string", ("verify", "{base}", "--base", "{base}", "--adapters",
         "{adapter}"), ("adapter_config.json", "lora_alpha"),
         setup=adapter_config(lora_alpha="16")),
    # --- render (prints objects; reads no input but the spec and --affinity)
    Case("render-env-holds-token", ("render", *JOB, "--env", "NOTE=x{token}x"),
         ("--env", "NOTE", "Hub token"), env=(("HF_TOKEN", "{token}"),), absent=(TOKEN,)),
    Case("render-label-is-token-file", ("render", *JOB, "--label", "team={token}"),
         ("--label", "team", "Hub token"), env=(("HF_TOKEN_PATH", "{root}/token"),),
         setup=write("token", TOKEN + "\n"), absent=(TOKEN,)),
    Case("render-env-token-name", ("render", *JOB, "--env", "HF_TOKEN=x"), ("HF_TOKEN",)),
    Case("render-env-name", ("render", *JOB, "--env", "1BAD=x"), ("--env", "1BAD")),
    Case("render-label-key", ("render", *JOB, "--label", "a/b/c=1"), ("--label",)),
    Case("render-cpu", ("render", *JOB, "--cpu", "12x"), ("--cpu",)),
    Case("render-name", ("render", *JOB, "--name", "Bad_Name"), ("--name",)),
    Case("render-toleration", ("render", *JOB, "--toleration", "k:Sometimes"),
         ("--toleration",)),
    Case("render-affinity-missing", ("render", *JOB, "--affinity", "{root}/nope.yaml"),
         ("--affinity", "{root}/nope.yaml")),
    Case("render-affinity-utf16", ("render", *JOB, "--affinity", "{root}/spec.yaml"),
         ("--affinity", "UTF-16"), setup=utf16_spec),
    Case("render-workers-without-pvc", ("render", *JOB, "--workers", "2"), ("--cache-pvc",)),
    Case("render-spec-duplicate-key", ("render", "--config", "{root}/spec.yaml"),
         ("{root}/spec.yaml", "'adapters'"),
         setup=spec(GOOD_SPEC + "adapters: [{adapter}]\n")),
    # --- submit (fails before any cluster is asked)
    Case("submit-dry-run-local", ("submit", *JOB, "--local", "--dry-run"), ("--dry-run",)),
    Case("submit-env-holds-token", ("submit", *JOB, "--dry-run", "--env", "T={token}"),
         ("--env", "Hub token"), env=(("HF_TOKEN", "{token}"),), absent=(TOKEN,)),
    Case("submit-no-base", ("submit", "--adapters", "{adapter}", "--output_dir", "{out}"),
         ("--base_model_name_or_path",)),
    Case("submit-spec-latin1", ("submit", "--config", "{root}/spec.yaml", "--dry-run"),
         ("{root}/spec.yaml", "UTF-8"), setup=latin1_spec),
    Case("submit-kubeconfig-missing", ("submit", *JOB, "--dry-run", "--kubeconfig",
         "{root}/no-kubeconfig"), ("{root}/no-kubeconfig",)),
]
# fmt: on


# ---------------------------------------------------------------------------------------
# The run


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's sha256, a link's target, a folder."""
    entries: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                entries[key] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                entries[key] = "folder"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


@pytest.fixture(scope="module")
def inputs(models: Any) -> dict[str, Path]:
    base = models.base()
    other = models.base(hidden_size=32, intermediate_size=64, seed=5)
    return {
        "base": base,
        "adapter": models.adapter(base),
        "foreign": models.adapter(other, seed=3),
    }


@pytest.fixture
def case_paths(inputs: dict[str, Path], tmp_path: Path) -> Iterator[Paths]:
    root = tmp_path / "case"
    root.mkdir()
    paths = Paths(root=root, base=root / "base", adapter=root / "adapter")
    shutil.copytree(inputs["base"], paths.base)
    shutil.copytree(inputs["adapter"], paths.adapter)
    try:
        yield paths
    finally:
        for point in paths.mounts:
            subprocess.run(["umount", str(point)], check=False)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, inputs: dict[str, Path]) -> None:
    for name in list(os.environ):
        if name.startswith("MERGEJOB_") and name != "MERGEJOB_DISABLE_PROGRESS_BARS":
            monkeypatch.delenv(name)
    for name in ("HF_TOKEN", "HF_TOKEN_PATH", "KUBECONFIG", "KUBERNETES_SERVICE_HOST",
                 "JOB_COMPLETION_INDEX"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach a network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("TABLE_FOREIGN_ADAPTER", str(inputs["foreign"]))


def test_the_table_has_sixty_distinct_cases_over_every_command() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 60
    commands = {case.argv[0] for case in CASES}
    assert commands == {"merge", "plan", "run", "verify", "render", "submit"}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(
    case: Case, case_paths: Paths, run_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = case_paths
    if case.setup is not None:
        case.setup(paths)
    for name, value in case.env:
        monkeypatch.setenv(name, paths.fill(value))
    before = snapshot(paths.root)
    shared_before = {name: snapshot(path) for name, path in _shared_inputs().items()}

    code, out, err = run_cli(*(paths.fill(arg) for arg in case.argv))

    assert code == case.code, out + err
    assert "Traceback" not in out + err
    needles = [paths.fill(needle) for needle in case.needles]
    if case.report:
        # plan's report: one problem line names it all.
        problems = [line for line in out.splitlines() if line.startswith("  - ")]
        assert any(all(n in line for n in needles) for line in problems), out
    else:
        lines = err.strip().splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("mergejob: error:")]
        assert len(starts) == 1, err
        # One error line; anything after it is an indented list of the problems found.
        assert all(line.startswith("  ") for line in lines[starts[0] + 1 :]), err
        for needle in needles:
            assert needle in err, f"{needle!r} not named in: {err}"
    for secret in case.absent:
        assert secret not in out + err
    # Nothing written beside the inputs (no output, no partial folder), no input changed.
    assert snapshot(paths.root) == before
    assert {name: snapshot(path) for name, path in _shared_inputs().items()} == shared_before


def _shared_inputs() -> dict[str, Path]:
    foreign = Path(os.environ["TABLE_FOREIGN_ADAPTER"])
    return {"foreign": foreign}
