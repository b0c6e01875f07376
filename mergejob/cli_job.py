"""CLI commands around one job besides ``merge``: run, plan, verify, schema."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's commands to the ``mergejob`` parser."""
