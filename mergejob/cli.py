"""The ``mergejob`` command: thin. It parses, builds a MergeSpec and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from mergejob.errors import EXIT_BAD_INPUT, EXIT_FAILURE, MergeJobError, SpecError
from mergejob.logs import setup_logging
from mergejob.spec import (
    DTYPES,
    ENGINES,
    MergeSpec,
    build_spec,
    load_spec_file,
    parse_assignment,
)

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
    hub = parser.add_argument_group(
        "publishing (with --push_to_hub, or publish.repo_id in the spec; token: HF_TOKEN or "
        "HF_TOKEN_PATH)"
    )
    hub.add_argument(
        "--local-dir", "--local_dir", dest="local_dir", metavar="DIR",
        help="keep the local copy here (default: a temporary folder, removed once published)",
    )  # fmt: skip
    hub.add_argument("--private", action="store_true", default=None,
                     help="create the repo private (an existing repo keeps its visibility)")  # fmt: skip
    hub.add_argument(
        "--branch", "--hub-revision", dest="hub_revision", metavar="BRANCH",
        help="commit to this branch of the repo (created if missing; default: main)",
    )  # fmt: skip
    hub.add_argument("--create-pr", "--create_pr", dest="create_pr", action="store_true",
                     default=None, help="open a pull request instead of committing")  # fmt: skip
    hub.add_argument("--commit-message", "--commit_message", dest="commit_message",
                     metavar="TEXT", help="summary line of the commit")  # fmt: skip
    hub.add_argument(
        "--delete-uploaded", "--delete_uploaded", dest="delete_uploaded", action="store_true",
        default=None, help="free each local shard once it is on the Hub (bounded disk use)",
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
    job.add_argument(
        "--set-config", "--set_config", dest="set_config", action="append", metavar="KEY=VALUE",
        help="set a config.json key of the output (repeatable; the value is JSON: "
        "rope_theta=3580165449.0, max_position_embeddings=1048576)",
    )  # fmt: skip
    job.add_argument(
        "--config-from", "--config_from", dest="config_from", metavar="ID_OR_PATH",
        help="take config.json from this model (same architecture and shapes)",
    )  # fmt: skip


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """-v and --log-format after the command too (``mergejob run --log-format json``)."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
        help="log lines as text (default) or JSON (one object a line)",
    )  # fmt: skip


_FLAG_FIELDS = {
    "base": ("base.path", "--base_model_name_or_path"),
    "trust_remote_code": ("base.trust_remote_code", "--trust_remote_code"),
    "adapters": ("adapters", "--peft_model_paths"),
    "output_dir": ("output.dir", "--output_dir"),
    "dtype": ("output.dtype", "--dtype"),
    "max_shard_size": ("output.max_shard_size", "--max-shard-size"),
    "overwrite": ("output.overwrite", "--overwrite"),
    "engine": ("engine.name", "--engine"),
    "device": ("engine.device", "--device"),
    "workers": ("engine.workers", "--workers"),
    "max_memory": ("engine.max_memory", "--max-memory"),
    "offload_folder": ("engine.offload_folder", "--offload-folder"),
    "config_from": ("config.config_from", "--config-from"),
    "private": ("publish.private", "--private"),
    "hub_revision": ("publish.revision", "--branch"),
    "create_pr": ("publish.create_pr", "--create-pr"),
    "commit_message": ("publish.commit_message", "--commit-message"),
    "delete_uploaded": ("publish.delete_uploaded", "--delete-uploaded"),
}


def flag_labels(overrides: dict[str, Any]) -> dict[str, str]:
    """The flag that set each dotted key of :func:`flag_overrides` (for error messages)."""
    by_field = {dotted: flag for dotted, flag in _FLAG_FIELDS.values()}
    by_field["publish.repo_id"] = "--output_dir (with --push_to_hub)"
    if "publish.repo_id" in overrides:
        by_field["output.dir"] = "--local-dir"
    return {
        key: "--set-config" if key.startswith("config.overrides.") else by_field.get(key, key)
        for key in overrides
    }


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The job flags the user gave, as dotted spec keys."""
    result = _plain_flag_overrides(args)
    for assignment in getattr(args, "set_config", None) or []:
        key, value = parse_assignment(assignment)
        result[f"config.overrides.{key}"] = value
    return result


def _plain_flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for attr, (dotted, _flag) in _FLAG_FIELDS.items():
        value = getattr(args, attr, None)
        if value is not None:
            result[dotted] = value
    local_dir = getattr(args, "local_dir", None)
    if getattr(args, "push_to_hub", None) and "output.dir" in result:
        # The seed's meaning: with --push_to_hub, --output_dir names the Hub repo.
        result["publish.repo_id"] = result.pop("output.dir")
    elif local_dir is not None and "output.dir" in result:
        raise SpecError(
            "--local-dir: only with --push_to_hub (then --output_dir is the Hub repo id); "
            "without it, --output_dir is the local folder"
        )
    if local_dir is not None:
        result["output.dir"] = local_dir
    return result


def spec_from_args(
    args: argparse.Namespace,
    *layers: dict[str, Any],
    labels: dict[str, str] | None = None,
    file_data: dict[str, Any] | None = None,
) -> MergeSpec:
    """File (``--config``, or ``file_data`` already read), then extra layers (environment),
    then flags. ``labels`` name where a layer's keys came from, for error messages."""
    if file_data is None:
        file_data = load_spec_file(args.config) if getattr(args, "config", None) else {}
    flags = flag_overrides(args)
    publishes = (
        "publish.repo_id" in flags
        or bool((file_data.get("publish") or {}).get("repo_id"))
        or _layers_have(layers, "publish.repo_id")
    )
    if getattr(args, "push_to_hub", None) and not publishes:
        raise SpecError(
            "--push_to_hub: give the Hub repo id as --output_dir (e.g. --output_dir "
            "org/merged-model), as the seed script did"
        )
    publish_flags = [
        flag
        for attr, (dotted, flag) in _FLAG_FIELDS.items()
        if dotted.startswith("publish.") and getattr(args, attr, None) is not None
    ]
    if getattr(args, "local_dir", None) is not None:
        publish_flags.append("--local-dir")
    if publish_flags and not publishes:
        raise SpecError(
            f"{publish_flags[0]}: only when publishing; add --push_to_hub with the repo id "
            "as --output_dir"
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
    all_labels = {**(labels or {}), **flag_labels(flags)}
    return build_spec(file_data, *layers, flags, origin=origin, labels=all_labels)


def _layers_have(layers: Sequence[dict[str, Any]], key: str) -> bool:
    return any(k == key or k.startswith(f"{key}.") for layer in layers for k in layer)


def cmd_merge(args: argparse.Namespace) -> int:
    from mergejob.pipeline import merge

    spec = spec_from_args(args)
    result = merge(spec, recorded_inputs=recorded_inputs_of(args))
    print(result.summary())
    return 0


def recorded_inputs_of(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The inputs a ``--config`` recipe (``mergejob.yaml``) recorded, to check a rerun."""
    from mergejob.recipe import recorded_inputs

    config = getattr(args, "config", None)
    return recorded_inputs(config) if config else None


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
    add_logging_arguments(merge_parser)
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
    from mergejob import cli_job

    cli_job.hide_secrets()
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
