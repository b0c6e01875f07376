"""The ``mergejob`` command: thin. It parses, builds a MergeSpec and calls the library.

``main`` is the entry point of the ``mergejob`` script and, through ``hf_main``, of the
``hf-mergejob`` script that the Hugging Face CLI runs as ``hf mergejob`` (an extension).
The flags shared by several commands live in :mod:`mergejob.cli.args`; each command module
(:mod:`~mergejob.cli.merge`, :mod:`~mergejob.cli.job`, :mod:`~mergejob.cli.launch`) adds its
commands, and imports torch only inside the commands that merge, so ``--help``, ``render``
and ``schema`` start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mergejob.cli import job, launch, merge
from mergejob.cli.args import ArgumentParser
from mergejob.errors import EXIT_BAD_INPUT, EXIT_FAILURE, MergeJobError
from mergejob.logs import hide_secrets, setup_logging

__all__ = ["build_parser", "hf_main", "main"]

log = logging.getLogger("mergejob")

# The name the Hugging Face CLI runs this package's ``hf-mergejob`` script by.
HF_PROG = "hf mergejob"


def build_parser(prog: str = "mergejob") -> argparse.ArgumentParser:
    """The parser of every command; ``prog`` is the name usage lines give the program."""
    parser = ArgumentParser(
        prog=prog,
        description="Bake PEFT adapters into a base model and publish it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=("text", "json"), help="log line format")
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser)
    merge.register(sub)
    job.register(sub)
    launch.register(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "mergejob") -> int:
    """Run one ``mergejob`` command; returns its exit code (0 done, 2 bad input, 1 other)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in {"--help", "--verbose", "--log-format"}:
        argv.insert(0, "merge")  # the seed's invocation: flags without a command
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    hide_secrets()
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args))
    except MergeJobError as exc:
        print(f"mergejob: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mergejob: interrupted", file=sys.stderr)
        return 130
    except Exception:
        log.exception("mergejob: unexpected failure (worth a retry; report it if it repeats)")
        return EXIT_FAILURE


def hf_main(argv: Sequence[str] | None = None) -> int:
    """The ``hf-mergejob`` script: :func:`main`, named ``hf mergejob`` in usage lines."""
    return main(argv, prog=HF_PROG)
