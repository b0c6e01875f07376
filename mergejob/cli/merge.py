"""``mergejob merge``: the seed's command (its flags, or ``--config SPEC``), run here."""

from __future__ import annotations

import argparse

from mergejob.cli.args import (
    add_job_arguments,
    add_logging_arguments,
    recorded_inputs_of,
    spec_from_args,
)
from mergejob.errors import EXIT_OK, SpecError


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``merge`` to the ``mergejob`` parser."""
    merge = sub.add_parser("merge", help="merge adapters into a base model")
    add_job_arguments(merge)
    add_logging_arguments(merge)
    merge.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    """``mergejob merge``: merge, publish if asked, print the summary."""
    from mergejob.pipeline import merge  # torch: only for a command that merges

    spec = spec_from_args(args, config=args.config)
    if spec.task == "extract":
        raise SpecError(
            f"{args.config}: has an extract: section; run it with mergejob extract --config "
            "(or mergejob run --config)"
        )
    result = merge(spec, recorded_inputs=recorded_inputs_of(args.config))
    print(result.summary())
    return EXIT_OK
