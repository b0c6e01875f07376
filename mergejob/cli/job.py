"""CLI commands around one job besides ``merge``: run, plan, verify, schema.

``mergejob run`` is the pod entrypoint: the spec comes from a file (``--config``, else
``MERGEJOB_CONFIG``, else ``/etc/mergejob/config.yaml``, a mounted ConfigMap), then
``MERGEJOB_*`` environment variables override single fields, then flags (flags > environment
> file; the layering is :func:`mergejob.spec.run_sources`). Exit codes: 0 done, 2 bad spec or
input (never worth a retry), 1 anything else.

``mergejob verify`` checks a merged output, or an extracted adapter (a folder whose recipe
has an ``extract:`` section: :mod:`mergejob.extraction.verify`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from typing import Any

from mergejob import settings
from mergejob.cli.args import (
    add_job_arguments,
    add_logging_arguments,
    flag_overrides,
    recorded_inputs_of,
    spec_from_args,
)
from mergejob.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, SpecError
from mergejob.spec import MergeSpec, load_spec_file, run_sources

log = logging.getLogger("mergejob")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's commands to the ``mergejob`` parser."""
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
    split = run.add_argument_group(
        "one index of a merge or extraction split over workers (Indexed Job)"
    )
    split.add_argument(
        "--index",
        type=int,
        metavar="I",
        help="merge only the shards (extract only the groups) of index I (default: "
        "$JOB_COMPLETION_INDEX, which an Indexed Job sets); index 0 then waits for the "
        "others and finalises",
    )
    split.add_argument(
        "--index-count",
        type=int,
        metavar="N",
        help="the number of indices (default: $MERGEJOB_INDEX_COUNT); without it, one "
        "process does everything",
    )
    split.add_argument(
        "--finalize",
        action="store_true",
        help="only the finalising step: check every shard record, write the index, config, "
        "tokenizer, card and recipe, commit (idempotent; an extraction: redo any missing "
        "group, then the same)",
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
        "--index-count", "--index_count", dest="index_count", type=int, metavar="N",
        help="the job runs as an Indexed Job of N indices: show each index's share of the "
        "base (the bytes it reads, and downloads from the Hub)",
    )  # fmt: skip
    plan.add_argument(
        "--strict",
        action="store_true",
        help="exit 2 on notices too (untied embeddings, resized vocabulary, ignored tensors)",
    )
    plan.set_defaults(func=cmd_plan)

    verify = sub.add_parser(
        "verify",
        help="recompute tensors of a merged output from base + adapters and compare; or "
        "check an extracted adapter against its base and fine-tuned model",
    )
    verify.add_argument("output", metavar="OUTPUT", help="a folder written by mergejob")
    verify.add_argument("--base", help="base model folder (default: from OUTPUT/mergejob.yaml)")
    verify.add_argument(
        "--finetuned",
        "--finetuned_model_name_or_path",
        dest="finetuned",
        help="an extracted adapter's fine-tuned model folder (default: from the recipe)",
    )
    verify.add_argument(
        "--adapters", nargs="+", help="adapter folders, in merge order (default: from the recipe)"
    )
    verify.add_argument("--weights", nargs="+", type=float, help="adapter weights (default 1.0)")
    verify.add_argument("--all", action="store_true", help="check every tensor, not a sample")
    verify.add_argument(
        "--sample",
        type=int,
        default=None,
        help="tensors to sample (default 24); an extracted adapter: LoRA modules to recompute "
        "(default every one)",
    )
    verify.add_argument(
        "--tolerance-ulps",
        type=int,
        default=None,
        help="allowed difference in ulps of the output dtype (default: from the engine in the "
        "recipe: 1 for the stream engine, 1 per adapter for the peft engine)",
    )
    verify.add_argument("--no-logits", action="store_true", help="skip the logits check")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    add_logging_arguments(verify)
    verify.set_defaults(func=cmd_verify)

    schema = sub.add_parser("schema", help="print the JSON Schema of the spec file")
    schema.set_defaults(func=cmd_schema)


# ---------------------------------------------------------------------------------------
# run


def run_spec(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> tuple[MergeSpec, str | None]:
    """The spec of ``mergejob run`` from its flags and ``environ`` (default: the process
    environment), and the spec file it read (None when there was none)."""
    sources = run_sources(
        flag_overrides(args),
        settings.environ() if environ is None else environ,
        config=args.config,
    )
    spec = spec_from_args(
        args,
        sources.environment,
        config=sources.path,
        file_data=sources.file_data,
        labels=sources.labels,
    )
    return spec, sources.path


def spec_for_run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> MergeSpec:
    """The spec of ``mergejob run``: file, then MERGEJOB_* variables, then flags."""
    return run_spec(args, environ)[0]


def cmd_run(args: argparse.Namespace) -> int:
    """``mergejob run``: the pod entrypoint."""
    spec, config = run_spec(args)
    token = settings.hub_token()
    if args.dry_run:
        return print_plan(spec, as_json=False, token=token)
    split = args.finalize or args.index is not None or args.index_count is not None
    if split or settings.index_variables()[1]:
        return run_split(args, spec, token, config=config)
    if spec.task == "extract":
        return run_extract(spec, token, config=config)
    from mergejob.pipeline import merge  # torch: only for a command that merges

    result = merge(spec, token=token, recorded_inputs=recorded_inputs_of(config))
    print(result.summary())
    return EXIT_OK


def run_extract(spec: MergeSpec, token: str | None, *, config: str | None) -> int:
    """``mergejob run`` of a spec with an ``extract:`` section: one process extracts it
    (with ``--finalize``, what the indices left is resumed and the adapter finished)."""
    from mergejob.extraction.job import extract  # torch: only for a command that works

    result = extract(spec, token=token, recorded_inputs=recorded_inputs_of(config))
    print(result.summary())
    return EXIT_OK


def run_split(
    args: argparse.Namespace, spec: MergeSpec, token: str | None, *, config: str | None = None
) -> int:
    """``mergejob run --index I --index-count N`` (or ``--finalize``): one index of a merge
    split over workers, see :mod:`mergejob.indexed`, or of an extraction
    (:mod:`mergejob.extraction.split`). ``config``: the spec file read, whose recorded
    inputs (a recipe's) the job is checked against, as a plain run is."""
    from mergejob import indexed  # torch: only for a command that merges

    if args.finalize and spec.task == "extract":
        return run_extract(spec, token, config=config)
    env_index, env_count = indexed.index_from_env()
    index = args.index if args.index is not None else env_index
    count = args.index_count if args.index_count is not None else env_count
    recorded = recorded_inputs_of(config)
    if args.finalize:
        result = indexed.finalize_job(spec, token=token, count=count, recorded_inputs=recorded)
        print(result.summary() if result else "already finalised: nothing to do")
        return EXIT_OK
    index, count = indexed.check_index_args(index, count)
    if spec.task == "extract":
        from mergejob.extraction.split import run_extract_index

        report = run_extract_index(
            spec, index=index, count=count, token=token, recorded_inputs=recorded
        )
    else:
        report = indexed.run_index(
            spec, index=index, count=count, token=token, recorded_inputs=recorded
        )
    print(report.summary())
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# plan


def cmd_plan(args: argparse.Namespace) -> int:
    """``mergejob plan``: print what a merge would do and cost; non-zero on any problem."""
    layers: list[dict[str, Any]] = []
    file_data = load_spec_file(args.config) if args.config else {}
    if "output.dir" not in flag_overrides(args) and not (file_data.get("output") or {}).get("dir"):
        # A plan needs no output folder; the disk estimate then looks at the current one.
        layers.append({"output.dir": "."})
    spec = spec_from_args(args, *layers, config=args.config, file_data=file_data)
    token = settings.hub_token()
    return print_plan(
        spec, as_json=args.json, token=token, strict=args.strict, index_count=args.index_count
    )


def print_plan(
    spec: MergeSpec,
    *,
    as_json: bool,
    token: str | None,
    strict: bool = False,
    index_count: int | None = None,
) -> int:
    """Build the job's plan report, print it, and return the exit code it calls for."""
    from mergejob.plan.report import plan_report  # reads headers over the Hub client

    if spec.task == "extract":
        from mergejob.extraction.report import extraction_plan_report

        extraction = extraction_plan_report(
            spec, token=token, strict=strict, index_count=index_count
        )
        print(json.dumps(extraction.to_dict(), indent=2) if as_json else extraction.render())
        return EXIT_OK if extraction.ok else EXIT_BAD_INPUT
    report = plan_report(spec, token=token, strict=strict, index_count=index_count)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.render())
    return EXIT_OK if report.ok else EXIT_BAD_INPUT


# ---------------------------------------------------------------------------------------
# verify and schema


def cmd_verify(args: argparse.Namespace) -> int:
    """``mergejob verify OUTPUT``: 0 when every checked tensor is within tolerance (an
    extracted adapter: every check of :mod:`mergejob.extraction.verify` holds)."""
    from mergejob.extraction.verify import is_extraction_output  # torch

    if args.finetuned is not None or is_extraction_output(args.output):
        return verify_extraction_output(args)
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


def verify_extraction_output(args: argparse.Namespace) -> int:
    """``mergejob verify OUTPUT`` of an extracted adapter (its recipe has ``extract:``)."""
    from mergejob.extraction.verify import verify_extraction

    merge_only = (
        ("--adapters", args.adapters),
        ("--weights", args.weights),
        ("--tolerance-ulps", args.tolerance_ulps),
    )
    for flag, value in merge_only:
        if value is not None:
            raise SpecError(
                f"{flag}: {args.output} is an extracted adapter, checked against its base and "
                "fine-tuned model (--base, --finetuned); leave it out"
            )
    report = verify_extraction(
        args.output,
        base=args.base,
        finetuned=args.finetuned,
        sample=None if args.all else args.sample,
        token=settings.hub_token(),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.summary())
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
