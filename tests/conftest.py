"""Shared fixtures: tiny generated models and adapters (nothing is downloaded)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MERGEJOB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

_HERE = Path(__file__).parent
pytest_plugins = [
    name
    for name, path in (
        ("tests.hubserver.fixtures", _HERE / "hubserver" / "fixtures.py"),
        ("tests.kube.fixtures", _HERE / "kube" / "fixtures.py"),
    )
    if path.is_file()
]


class ModelFactory:
    """Builds tiny bases and adapters once per test session, keyed by their arguments."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, Path] = {}

    def _key(self, kind: str, args: dict[str, Any]) -> str:
        parts = [kind] + [f"{k}={args[k]}" for k in sorted(args)]
        return "_".join(parts).replace("/", "-").replace(" ", "").replace("'", "")[:200]

    def base(self, **kwargs: Any) -> Path:
        from mergejob.fixtures import make_base

        key = self._key("base", kwargs)
        if key not in self._made:
            self._made[key] = make_base(self.root / key, **kwargs)
        return self._made[key]

    def adapter(self, base: Path, **kwargs: Any) -> Path:
        from mergejob.fixtures import make_adapter

        key = self._key(f"adapter-{base.name}", kwargs)
        if key not in self._made:
            self._made[key] = make_adapter(base, self.root / key, **kwargs)
        return self._made[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    return ModelFactory(tmp_path_factory.mktemp("models"))


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``mergejob`` in-process; returns (exit code, stdout, stderr)."""
    from mergejob.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors and --help
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run
