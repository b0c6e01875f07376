"""Shared fixtures: tiny generated models and adapters (nothing is downloaded), the CLI run
in-process, and the fixture modules of tests/support (Hub test server, Kubernetes)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.models import ModelFactory

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MERGEJOB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The fixture modules of tests/support, registered once here for every test module.
pytest_plugins = ["tests.support.hubserver.fixtures", "tests.support.kube.fixtures"]


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    """Tiny bases and adapters, each made once per test session."""
    # Imported here: tests/support/models imports torch, which many test modules never need.
    from tests.support.models import ModelFactory

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
