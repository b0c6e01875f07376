"""CLI commands of the launcher: render, submit, status, logs, wait, cancel, list."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the launcher's commands to the ``mergejob`` parser."""
