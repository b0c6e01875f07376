"""The ``mergejob`` command: thin. It parses, builds a MergeSpec and calls the library.

``main`` is the entry point of the ``mergejob`` script and, through ``hf_main``, of the
``hf-mergejob`` script that the Hugging Face CLI runs as ``hf mergejob`` (an extension).
The flags shared by several commands live in :mod:`mergejob.cli.args`; each command module
(:mod:`~mergejob.cli.merge`, :mod:`~mergejob.cli.extract`, :mod:`~mergejob.cli.job`,
:mod:`~mergejob.cli.launch`) adds its commands, and imports torch only inside the commands
that merge or extract, so ``--help``, ``render`` and ``schema`` start fast.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from collections.abc import Sequence

from mergejob.cli import extract, job, launch, merge
from mergejob.cli.args import ArgumentParser
from mergejob.errors import EXIT_BAD_INPUT, EXIT_FAILURE, MergeJobError
from mergejob.logs import hide_secrets, quiet_library_bars, scrub_secrets, setup_logging

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
    extract.register(sub)
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
    quiet_library_bars()
    try:
        return int(args.func(args))
    except MergeJobError as exc:
        print(f"mergejob: error: {scrub_secrets(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mergejob: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        found = os_error_in(exc)
        if found is not None:
            code, message = describe_os_error(*found)
            print(f"mergejob: error: {scrub_secrets(message)}", file=sys.stderr)
            return code
        log.exception("mergejob: unexpected failure (worth a retry; report it if it repeats)")
        return EXIT_FAILURE


# An OS error no check foresaw, by errno: (exit code, what to do). Bad input (2) is what the
# same job on the same inputs and mounts meets again; ENOSPC is 1: a Job's retry may get a
# fresh volume (an emptyDir, a new node's disk) where the output fits.
_OS_ERRORS: dict[int, tuple[int, str]] = {
    errno.EROFS: (EXIT_BAD_INPUT, "write the output (and the download cache) to a writable folder"),
    errno.EACCES: (EXIT_BAD_INPUT, "give the job a folder it may write, or a file it may read"),
    errno.EPERM: (EXIT_BAD_INPUT, "give the job a folder it may write, or a file it may read"),
    errno.ELOOP: (EXIT_BAD_INPUT, "a symbolic link loops; point it at a real file"),
    errno.ENAMETOOLONG: (EXIT_BAD_INPUT, "use a shorter path"),
    errno.EFBIG: (
        EXIT_BAD_INPUT,
        "a file outgrew this process's file-size limit (ulimit -f) or the filesystem's; raise "
        "the limit or pass a smaller --max-shard-size",
    ),
    errno.ENOSPC: (
        EXIT_FAILURE,
        "free space or give the job a larger volume (--cache-size, --cache-pvc); worth a "
        "retry where the job gets a fresh volume",
    ),
    errno.EDQUOT: (EXIT_FAILURE, "free space or raise the quota; then rerun"),
}
# A Rust library's I/O error (safetensors): "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_in(exc: BaseException) -> tuple[int, str | None] | None:
    """The errno (and file, if known) of the OS error behind ``exc``: ``exc`` itself, an
    error it was raised from (``raise ... from``), or a library error that quotes one
    ("(os error 28)", safetensors' Rust I/O errors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            filename = current.filename
            return current.errno, None if filename is None else os.fsdecode(filename)
        match = _RUST_OS_ERROR.search(str(current))
        if match:
            return int(match.group(1)), None
        current = current.__cause__  # only "raise ... from": a bug while handling one is a bug
    return None


def describe_os_error(number: int, filename: str | None) -> tuple[int, str]:
    """The exit code and the one line for an OS error ``number`` on ``filename``."""
    code, advice = _OS_ERRORS.get(number, (EXIT_FAILURE, "worth a retry; report it if it repeats"))
    name = errno.errorcode.get(number, f"errno {number}")
    where = f"{filename}: " if filename else ""
    return code, f"{where}{os.strerror(number).lower()} ({name}); {advice}"


def hf_main(argv: Sequence[str] | None = None) -> int:
    """The ``hf-mergejob`` script: :func:`main`, named ``hf mergejob`` in usage lines."""
    return main(argv, prog=HF_PROG)
