"""`make demo` (examples/demo.py): its work folder, and the whole run against the Hub test server.

The demo replaces its work folder on every run, so it must never delete a folder it did not
make: a folder without its mark (`.mergejob-demo`), a file, or a link is refused with exit 2.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo.py"


def run_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The demo as `make demo` runs it: the script by its path, in a fresh process."""
    env = {**os.environ, "MERGEJOB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mergejob_demo_example", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_folder_the_demo_did_not_make_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    mine = tmp_path / "my-work"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")

    result = run_demo("--dir", str(mine), "--no-hub", cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(mine) in lines[0] and ".mergejob-demo" in lines[0], lines
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == [
        "notes.txt",
        "sub",
        "sub/data.bin",
    ]
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_file_or_a_link_in_place_of_the_folder_is_refused(tmp_path: Path) -> None:
    demo = load_demo()
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    made = tmp_path / "made"
    demo.prepare_work_folder(made)
    link = tmp_path / "link"
    link.symlink_to(made, target_is_directory=True)

    for path in (a_file, link):
        with pytest.raises(FileExistsError, match="not a folder this demo made"):
            demo.prepare_work_folder(path)
    assert a_file.read_text() == "keep me"
    assert link.is_symlink() and (made / demo.MARKER).is_file()


def test_a_folder_the_demo_made_is_replaced_by_an_empty_marked_one(tmp_path: Path) -> None:
    demo = load_demo()
    work = tmp_path / "nested" / "work"
    demo.prepare_work_folder(work)
    assert sorted(p.name for p in work.iterdir()) == [demo.MARKER]
    (work / "merged").mkdir()
    (work / "merged" / "model.safetensors").write_bytes(b"old")

    demo.prepare_work_folder(work)

    assert sorted(p.name for p in work.iterdir()) == [demo.MARKER]


@pytest.mark.slow
def test_the_demo_publishes_to_the_test_hub_and_reruns_in_its_own_folder(tmp_path: Path) -> None:
    for _ in range(2):  # the second run replaces the folder the first one made
        result = run_demo("--dir", "out", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "published to the local test Hub" in result.stdout
        assert "each equal to the local copy" in result.stdout
    assert (tmp_path / "out" / ".mergejob-demo").is_file()
