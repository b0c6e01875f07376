"""The ``mergejob`` command: thin. It parses, builds a MergeSpec and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from mergejob.errors import EXIT_BAD_INPUT, EXIT_FAILURE, MergeJobError, SpecError
from mergejob.logs import setup_logging
from mergejob.spec import DTYPES, ENGINES, MergeSpec, build_spec, load_spec_file

log = logging.getLogger("mergejob")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that exits with the bad-input code (2) and one clear line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"mergejob: error: {message}\n")


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's flags, shared by every command that takes a job (seed spellings kept)."""
    job = parser.add_argument_group("the job (seed-compatible flags, or --config SPEC)")
    job.add_argument("--config", metavar="SPEC", help="YAML/JSON spec file; flags override it")
    job.add_argument(
        "--base_model_name_or_path", "--base-model-name-or-path", "--base",
        dest="base", metavar="ID_OR_PATH", help="base model: local folder or Hub id[@revision]",
    )  # fmt: skip
    job.add_argument(
        "--peft_model_paths", "--peft-model-paths", "--adapters",
        dest="adapters", nargs="+", metavar="ID_OR_PATH",
        help="adapters to merge, in order: local folders or Hub ids[@revision]",
    )  # fmt: skip
    job.add_argument(
        "--output_dir", "--output-dir", dest="output_dir", metavar="DIR",
        help="output folder (with --push_to_hub: the Hub repo id, as in the seed script)",
    )  # fmt: skip
    job.add_argument("--device", help="cpu (default), auto (spread over every GPU), cuda or cuda:N")
    job.add_argument(
        "--push_to_hub", "--push-to-hub", dest="push_to_hub", action="store_true", default=None,
        help="publish the merged model to the Hub repo named by --output_dir",
    )  # fmt: skip
    job.add_argument(
        "--trust_remote_code", "--trust-remote-code", dest="trust_remote_code",
        action="store_true", default=None, help="allow custom model code (peft engine)",
    )  # fmt: skip
    job.add_argument(
        "--dtype", choices=DTYPES,
        help="output dtype; auto (default) keeps the base's stored dtype, float16 is the seed's",
    )  # fmt: skip
    job.add_argument("--max-shard-size", "--max_shard_size", dest="max_shard_size",
                     help="largest output shard (default 5GB)")  # fmt: skip
    job.add_argument("--engine", choices=ENGINES, help="merge engine (default: stream)")
    job.add_argument("--workers", type=int, help="stream engine worker processes")
    job.add_argument(
        "--max-memory", "--max_memory", dest="max_memory", metavar="MAP",
        help="accelerate max_memory for the peft engine, e.g. 0=70GiB,1=70GiB,cpu=200GiB",
    )  # fmt: skip
    job.add_argument("--offload-folder", "--offload_folder", dest="offload_folder",
                     metavar="DIR", help="accelerate disk-offload folder (peft engine)")  # fmt: skip
    job.add_argument("--overwrite", action="store_true", default=None,
                     help="replace a non-empty output folder")  # fmt: skip


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The job flags the user gave, as dotted spec keys."""
    mapping = {
        "base": "base.path",
        "trust_remote_code": "base.trust_remote_code",
        "adapters": "adapters",
        "output_dir": "output.dir",
        "dtype": "output.dtype",
        "max_shard_size": "output.max_shard_size",
        "overwrite": "output.overwrite",
        "engine": "engine.name",
        "device": "engine.device",
        "workers": "engine.workers",
        "max_memory": "engine.max_memory",
        "offload_folder": "engine.offload_folder",
    }
    result: dict[str, Any] = {}
    for attr, dotted in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            result[dotted] = value
    return result


def spec_from_args(args: argparse.Namespace, *layers: dict[str, Any]) -> MergeSpec:
    """File (``--config``), then extra layers (environment), then flags."""
    file_data = load_spec_file(args.config) if getattr(args, "config", None) else {}
    flags = flag_overrides(args)
    if getattr(args, "push_to_hub", None):
        raise SpecError(
            "--push_to_hub: publishing to the Hub is not available in this version yet; "
            "merge into a folder with --output_dir and upload it with `hf upload`"
        )
    if "base.path" not in flags and "base" not in file_data and not _layers_have(layers, "base"):
        raise SpecError("--base_model_name_or_path: required (or give --config SPEC)")
    if (
        "adapters" not in flags
        and "adapters" not in file_data
        and not _layers_have(layers, "adapters")
    ):
        raise SpecError("--peft_model_paths: required (or give --config SPEC)")
    origin = args.config if getattr(args, "config", None) else "flags"
    return build_spec(file_data, *layers, flags, origin=origin)


def _layers_have(layers: Sequence[dict[str, Any]], key: str) -> bool:
    return any(k == key or k.startswith(f"{key}.") for layer in layers for k in layer)


def cmd_merge(args: argparse.Namespace) -> int:
    from mergejob.pipeline import merge

    spec = spec_from_args(args)
    result = merge(spec)
    print(f"merged model written to {result.output_dir} in {result.seconds:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="mergejob",
        description="Bake PEFT adapters into a base model and publish it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=("text", "json"), help="log line format")
    sub = parser.add_subparsers(dest="command", parser_class=_ArgumentParser)
    merge_parser = sub.add_parser("merge", help="merge adapters into a base model")
    add_job_arguments(merge_parser)
    merge_parser.set_defaults(func=cmd_merge)
    from mergejob import cli_job
    from mergejob.launch import cli as launch_cli

    cli_job.register(sub)
    launch_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in {"--help", "--verbose", "--log-format"}:
        argv.insert(0, "merge")  # the seed's invocation: flags without a command
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
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


if __name__ == "__main__":
    sys.exit(main())
