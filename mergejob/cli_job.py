"""CLI commands around one job besides ``merge``: run, plan, verify, schema.

``mergejob run`` is the pod entrypoint: the spec comes from a file (``--config``, else
``MERGEJOB_CONFIG``, else ``/etc/mergejob/config.yaml``, a mounted ConfigMap), then
``MERGEJOB_*`` environment variables override single fields, then flags (flags > environment
> file). Exit codes: 0 done, 2 bad spec or input (never worth a retry), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from mergejob import settings
from mergejob.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, SpecError
from mergejob.spec import MergeSpec, env_labels, env_overrides, load_spec_file

log = logging.getLogger("mergejob")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's commands to the ``mergejob`` parser."""
    from mergejob.cli import add_job_arguments, add_logging_arguments

    run = sub.add_parser(
        "run",
        help="run the job described by a spec file and MERGEJOB_* variables (pod entrypoint)",
        description="Read the spec from --config, else $MERGEJOB_CONFIG, else "
        f"{settings.DEFAULT_CONFIG_PATH}; MERGEJOB_* variables override single fields, flags "
        "override both. Exit codes: 0 done, 2 bad spec or input (never worth a retry), "
        "1 other failures (worth a retry).",
    )
    add_job_arguments(run)
    add_logging_arguments(run)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check the job and print its plan; merge nothing",
    )
    split = run.add_argument_group("one index of a merge split over workers (Indexed Job)")
    split.add_argument(
        "--index",
        type=int,
        metavar="I",
        help="merge only the shards of index I (default: $JOB_COMPLETION_INDEX, which an "
        "Indexed Job sets); index 0 then waits for the others and finalises",
    )
    split.add_argument(
        "--index-count",
        type=int,
        metavar="N",
        help="the number of indices (default: $MERGEJOB_INDEX_COUNT); without it, one "
        "process merges everything",
    )
    split.add_argument(
        "--finalize",
        action="store_true",
        help="only the finalising step: check every shard record, write the index, config, "
        "tokenizer, card and recipe, commit (idempotent)",
    )
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser(
        "plan",
        help="check a job and estimate it from headers and adapter configs (no weights read)",
    )
    add_job_arguments(plan)
    add_logging_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument(
        "--strict",
        action="store_true",
        help="exit 2 on notices too (untied embeddings, resized vocabulary, ignored tensors)",
    )
    plan.set_defaults(func=cmd_plan)

    verify = sub.add_parser(
        "verify",
        help="recompute tensors of a merged output from base + adapters and compare",
    )
    verify.add_argument("output", metavar="OUTPUT", help="a folder written by mergejob")
    verify.add_argument("--base", help="base model folder (default: from OUTPUT/mergejob.yaml)")
    verify.add_argument(
        "--adapters", nargs="+", help="adapter folders, in merge order (default: from the recipe)"
    )
    verify.add_argument("--weights", nargs="+", type=float, help="adapter weights (default 1.0)")
    verify.add_argument("--all", action="store_true", help="check every tensor, not a sample")
    verify.add_argument("--sample", type=int, default=None, help="tensors to sample (default 24)")
    verify.add_argument(
        "--tolerance-ulps",
        type=int,
        default=None,
        help="allowed difference in ulps of the output dtype (default: DESIGN.md's tolerance, "
        "0 for one adapter through the stream engine, else 1 per adapter)",
    )
    verify.add_argument("--no-logits", action="store_true", help="skip the logits check")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    add_logging_arguments(verify)
    verify.set_defaults(func=cmd_verify)

    schema = sub.add_parser("schema", help="print the JSON Schema of the spec file")
    schema.set_defaults(func=cmd_schema)


# ---------------------------------------------------------------------------------------
# run


def spec_for_run(args: argparse.Namespace, environ: dict[str, str] | None = None) -> MergeSpec:
    """The spec of ``mergejob run``: file, then MERGEJOB_* variables, then flags."""
    from mergejob.cli import flag_overrides, spec_from_args

    environ = dict(os.environ if environ is None else environ)
    explicit = bool(getattr(args, "config", None)) or bool(environ.get("MERGEJOB_CONFIG"))
    path = args.config or environ.get("MERGEJOB_CONFIG") or settings.DEFAULT_CONFIG_PATH
    env = env_overrides(environ)
    given = {**env, **flag_overrides(args)}
    if not explicit and not Path(path).exists():
        if "base.path" not in given or "adapters" not in given:
            raise SpecError(
                f"{path}: spec file not found; mount the ConfigMap there, set MERGEJOB_CONFIG "
                "or pass --config, or give MERGEJOB_BASE and MERGEJOB_ADAPTERS"
            )
        file_data: dict[str, Any] = {}
        args.config = None
    else:
        file_data = load_spec_file(path)
        args.config = path
    return spec_from_args(args, env, labels=env_labels(env), file_data=file_data)


def cmd_run(args: argparse.Namespace) -> int:
    """``mergejob run``: the pod entrypoint."""
    from mergejob.cli import recorded_inputs_of
    from mergejob.pipeline import merge

    spec = spec_for_run(args)
    token = settings.hub_token()
    if args.dry_run:
        return print_plan(spec, as_json=False, token=token)
    split = args.finalize or args.index is not None or args.index_count is not None
    if split or os.environ.get("MERGEJOB_INDEX_COUNT"):
        return run_split(args, spec, token)
    result = merge(spec, token=token, recorded_inputs=recorded_inputs_of(args))
    print(result.summary())
    return EXIT_OK


def run_split(args: argparse.Namespace, spec: MergeSpec, token: str | None) -> int:
    """``mergejob run --index I --index-count N`` (or ``--finalize``): one index of a merge
    split over workers, see :mod:`mergejob.indexed`."""
    from mergejob import indexed as distributed

    env_index, env_count = distributed.index_from_env()
    index = args.index if args.index is not None else env_index
    count = args.index_count if args.index_count is not None else env_count
    if args.finalize:
        result = distributed.finalize_job(spec, token=token, count=count)
        print(result.summary() if result else "already finalised: nothing to do")
        return EXIT_OK
    index, count = distributed.check_index_args(index, count)
    report = distributed.run_index(spec, index=index, count=count, token=token)
    print(report.summary())
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# plan


def cmd_plan(args: argparse.Namespace) -> int:
    """``mergejob plan``: print what a merge would do and cost; non-zero on any problem."""
    from mergejob.cli import flag_overrides, spec_from_args

    layers: list[dict[str, Any]] = []
    file_data = load_spec_file(args.config) if args.config else {}
    if "output.dir" not in flag_overrides(args) and not (file_data.get("output") or {}).get("dir"):
        # A plan needs no output folder; the disk estimate then looks at the current one.
        layers.append({"output.dir": "."})
    spec = spec_from_args(args, *layers, file_data=file_data)
    token = settings.hub_token()
    return print_plan(spec, as_json=args.json, token=token, strict=args.strict)


def print_plan(spec: MergeSpec, *, as_json: bool, token: str | None, strict: bool = False) -> int:
    """Build the job's plan report, print it, and return the exit code it calls for."""
    from mergejob.plan.report import plan_report

    report = plan_report(spec, token=token, strict=strict)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.render())
    return EXIT_OK if report.ok else EXIT_BAD_INPUT


# ---------------------------------------------------------------------------------------
# verify and schema


def cmd_verify(args: argparse.Namespace) -> int:
    """``mergejob verify OUTPUT``: 0 when every checked tensor is within tolerance."""
    from mergejob.verify import DEFAULT_SAMPLE, verify_output

    report = verify_output(
        args.output,
        base=args.base,
        adapters=args.adapters,
        weights=args.weights,
        all_tensors=args.all,
        sample=args.sample or DEFAULT_SAMPLE,
        tolerance_ulps=args.tolerance_ulps,
        logits=not args.no_logits,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.summary())
        for check in report.checks:
            log.debug(
                "verify %s %s: %d ulp, max |diff| %.3g",
                check.kind,
                check.name,
                check.max_ulps,
                check.max_abs,
            )
    return EXIT_OK if report.ok else EXIT_FAILURE


def spec_schema() -> dict[str, Any]:
    """The JSON Schema of the spec file."""
    schema = MergeSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mergejob spec"
    return schema


def cmd_schema(args: argparse.Namespace) -> int:
    """``mergejob schema``: the spec file's JSON Schema on stdout."""
    print(json.dumps(spec_schema(), indent=2))
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# Secrets


class _HideSecrets(logging.Filter):
    """Replace the Hub token in any log line (message, arguments, traceback) by ``***``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def _clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self._clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        return True


def hide_secrets() -> None:
    """Install the token filter on the ``mergejob`` log handlers (a no-op without a token)."""
    secrets = []
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        secrets.append(token)
    path = os.environ.get("HF_TOKEN_PATH", "")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                secrets.append(handle.read().strip())
        except (OSError, UnicodeDecodeError):
            pass  # reported as bad input when the job asks for the token
    secrets = [s for s in secrets if len(s) >= 4]
    if not secrets:
        return
    for handler in logging.getLogger("mergejob").handlers:
        handler.addFilter(_HideSecrets(secrets))
