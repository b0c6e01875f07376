"""``mergejob extract``: a LoRA adapter from a fine-tuned model and its base, run here.

The flags build a spec with an ``extract:`` section (or ``--config SPEC`` gives one; flags
override single fields); :func:`mergejob.extraction.job.extract` does the rest. The same
spec runs in a pod with ``mergejob run`` and on a cluster with ``mergejob submit``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mergejob.cli.args import (
    add_download_arguments,
    add_logging_arguments,
    add_publish_arguments,
    recorded_inputs_of,
    spec_from_args,
)
from mergejob.errors import EXIT_BAD_INPUT, EXIT_OK, SpecError
from mergejob.spec import MergeSpec

# args attribute -> (dotted spec field, the flag's name in messages)
_EXTRACT_FLAGS = {
    "finetuned": ("extract.finetuned", "--finetuned_model_name_or_path"),
    "max_rank": ("extract.max_rank", "--max-rank"),
    "min_energy": ("extract.min_energy", "--min-energy"),
    "sv_epsilon": ("extract.sv_epsilon", "--sv-epsilon"),
    "distribute_scale": ("extract.distribute_scale", "--distribute-scale"),
    "include": ("extract.include", "--include"),
    "exclude": ("extract.exclude", "--exclude"),
    "embeddings": ("extract.embeddings", "--embeddings"),
    "skip_undecomposable": ("extract.skip_undecomposable", "--skip-undecomposable"),
    "svd": ("extract.svd", "--svd"),
    "extract_dtype": ("extract.dtype", "--dtype"),
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``extract`` to the ``mergejob`` parser."""
    parser = sub.add_parser(
        "extract",
        help="extract a LoRA adapter: the difference between a fine-tuned model and its base",
        description="For every weight the two models share, ΔW = tuned - base in fp32 and its "
        "truncated SVD, written as a PEFT LoRA adapter (per-module ranks) with a card, a "
        "recipe and extraction.json (each module's rank, kept energy and error). Both "
        "checkpoints are read shard by shard, one module at a time. Exit codes: 0 done, 2 "
        "bad input, 1 other failures.",
    )
    add_extract_arguments(parser)
    add_publish_arguments(parser)
    add_logging_arguments(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the extraction and print its plan (modules, ranks, memory, disk, time); "
        "read no weight",
    )
    parser.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    parser.set_defaults(func=cmd_extract)


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    """The extraction's flags (mergekit-extract-lora's spellings where it has them)."""
    job = parser.add_argument_group("the extraction (flags, or --config SPEC)")
    job.add_argument("--config", metavar="SPEC", help="YAML/JSON spec file; flags override it")
    job.add_argument(
        "--base_model_name_or_path", "--base-model-name-or-path", "--base-model", "--base",
        dest="base", metavar="ID_OR_PATH", help="the base model: local folder or Hub id[@revision]",
    )  # fmt: skip
    job.add_argument(
        "--finetuned_model_name_or_path", "--finetuned-model-name-or-path", "--finetuned",
        "--model", dest="finetuned", metavar="ID_OR_PATH",
        help="the fine-tuned model: local folder or Hub id[@revision]",
    )  # fmt: skip
    job.add_argument(
        "--output_dir", "--output-dir", "--out-path", dest="output_dir", metavar="DIR",
        help="the adapter's folder (with --push_to_hub: the Hub repo id)",
    )  # fmt: skip
    job.add_argument(
        "--push_to_hub", "--push-to-hub", dest="push_to_hub", action="store_true", default=None,
        help="publish the adapter to the Hub repo named by --output_dir",
    )  # fmt: skip
    job.add_argument(
        "--device",
        help="cpu (default), cuda (every visible GPU, one thread each), cuda:N (that GPU), "
        "auto (every visible GPU, else the CPU)",
    )
    job.add_argument(
        "--workers", type=int, metavar="N",
        help="on the CPU, N worker processes (cores / N torch threads each) extracting the "
        "layers in turn; the adapter's bytes are the same (default 1)",
    )  # fmt: skip
    job.add_argument("--overwrite", action="store_true", default=None,
                     help="replace a non-empty output folder")  # fmt: skip
    add_download_arguments(job, what="Hub inputs: both models'", user="layer")
    job.add_argument(
        "--trust_remote_code", "--trust-remote-code", dest="trust_remote_code",
        action="store_true", default=None, help="allow custom model code (module types)",
    )  # fmt: skip
    rank = parser.add_argument_group("rank and factors")
    rank.add_argument("--max-rank", "--max_rank", dest="max_rank", type=int, metavar="R",
                      help="largest rank of any module (default 32)")  # fmt: skip
    rank.add_argument(
        "--min-energy", "--min_energy", dest="min_energy", type=float, metavar="F",
        help="per module, the smallest rank keeping a fraction F of ‖ΔW‖² (capped by --max-rank)",
    )  # fmt: skip
    rank.add_argument("--sv-epsilon", "--sv_epsilon", dest="sv_epsilon", type=float,
                      metavar="EPS", help="drop singular values below EPS")  # fmt: skip
    rank.add_argument(
        "--distribute-scale", dest="distribute_scale",
        action=argparse.BooleanOptionalAction, default=None,
        help="B = U·sqrt(S), A = sqrt(S)·Vᵀ (default); --no-distribute-scale: B = U·S, A = Vᵀ",
    )  # fmt: skip
    rank.add_argument("--dtype", dest="extract_dtype", choices=("float32", "bfloat16", "float16"),
                      help="dtype of the factors (default float32)")  # fmt: skip
    rank.add_argument(
        "--svd", choices=("auto", "exact", "randomized"),
        help="auto (default): full SVD for small modules, randomized (power iterations, within "
        "1e-4 of the optimum) for large ones",
    )  # fmt: skip
    rank.add_argument("--exact-svd", "--exact_svd", dest="svd", action="store_const",
                      const="exact", help="always the full SVD (same as --svd exact)")  # fmt: skip
    which = parser.add_argument_group("which modules")
    which.add_argument("--include", "--include-regex", action="append", metavar="REGEX",
                       help="only modules whose name matches (repeatable)")  # fmt: skip
    which.add_argument("--exclude", "--exclude-regex", action="append", metavar="REGEX",
                       help="leave out modules whose name matches (repeatable)")  # fmt: skip
    which.add_argument(
        "--embeddings", choices=("full", "lora"),
        help="embeddings and lm_head: full (modules_to_save, default) or lora",
    )  # fmt: skip
    which.add_argument("--embed-lora", "--embed_lora", dest="embeddings", action="store_const",
                       const="lora", help="same as --embeddings lora (mergekit's flag)")  # fmt: skip
    which.add_argument(
        "--skip-undecomposable", "--skip_undecomposable", dest="skip_undecomposable",
        action="store_true", default=None,
        help="leave out changed tensors no LoRA carries (a LoRA layer's bias) instead of "
        "refusing them",
    )  # fmt: skip


def extract_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The extraction flags given, as dotted spec keys, and the flag behind each key."""
    overrides: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for attr, (dotted, flag) in _EXTRACT_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[dotted] = value
            labels[dotted] = flag
    return overrides, labels


def spec_of(args: argparse.Namespace) -> MergeSpec:
    """The extraction's spec: the spec file, then the flags."""
    overrides, labels = extract_overrides(args)
    if "extract.finetuned" not in overrides and not args.config:
        raise SpecError("--finetuned_model_name_or_path: required (or give --config SPEC)")
    layers = [overrides] if overrides else []
    return spec_from_args(args, *layers, config=args.config, labels=labels)


def cmd_extract(args: argparse.Namespace) -> int:
    """``mergejob extract``: extract, publish if asked, print the summary."""
    if args.dry_run and args.output_dir is None and not args.config:
        args.output_dir = "."  # a plan needs no output folder (the disk is looked at here)
    spec = spec_of(args)
    if args.dry_run:
        from mergejob import settings
        from mergejob.extraction.report import extraction_plan_report

        report = extraction_plan_report(spec, token=settings.hub_token())
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
        return EXIT_OK if report.ok else EXIT_BAD_INPUT
    from mergejob.extraction.job import extract  # torch: only for a command that works

    result = extract(spec, recorded_inputs=recorded_inputs_of(args.config))
    print(result.summary())
    return EXIT_OK
