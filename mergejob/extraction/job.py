"""An extraction job, top to bottom, on the pipeline's own steps.

``extract(spec)`` is what ``mergejob extract``, ``mergejob run`` (a spec with an
``extract:`` section) and the Python API call. It walks the merge's path with the merge's
pieces: :func:`mergejob.pipeline.open_output` (the Hub access checked first, the output
folder checked and never one that would replace an input), the sources resolved like a
merge's (a Hub model's shards streamed: :mod:`mergejob.extraction.inputs`), the plan
(:mod:`mergejob.extraction.plan`, from the headers; every problem before any weight is read),
the inputs hashed for the recipe on a thread beside the work (or checked against a recipe's
record first), the engine (:mod:`mergejob.extraction.engine`, resumable per group; each
group waits for its own shards of a streamed model), then the adapter, its config, the
tokenizer, ``extraction.json``, the card and the recipe (last), and
:func:`mergejob.pipeline.settle_output` (one Hub commit, the records dropped, the folder
renamed into place). The opening (:func:`start_extraction`) and the tail
(:func:`finish_extraction`) are also those of each index of an extraction split over an
Indexed Job (:mod:`mergejob.extraction.split`), whose index 0 runs the tail once.

Example::

    import mergejob
    spec = mergejob.MergeSpec.model_validate({
        "base": "./base",
        "extract": {"finetuned": "./tuned", "max_rank": 32},
        "output": {"dir": "./adapter"},
    })
    result = mergejob.extract(spec)
    print(result.report["summary"])
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mergejob import output, pipeline, recipe, settings
from mergejob.card import card_spec
from mergejob.errors import InputError, SpecError
from mergejob.extraction.card import write_card
from mergejob.extraction.engine import (
    ExtractionOutcome,
    ProgressCallback,
    devices_for,
    run_extraction,
)
from mergejob.extraction.inputs import Downloads, ExtractionInputs, open_inputs
from mergejob.extraction.plan import ExtractionPlan
from mergejob.extraction.report import extraction_report, write_report
from mergejob.extraction.writer import assemble_adapter, write_adapter_config
from mergejob.fetch import DEFAULT_DOWNLOAD_WORKERS
from mergejob.recipe import Timings
from mergejob.sources import ResolvedSource
from mergejob.spec import MergeSpec

if TYPE_CHECKING:
    from mergejob.publish import HubTarget, PublishResult

log = logging.getLogger(__name__)

ENGINE_NAME = "extract"


@dataclass(kw_only=True)
class ExtractResult(pipeline.JobResult):
    """Where the adapter is, its report (``extraction.json``), and where it was published."""

    report: dict[str, Any]

    what: ClassVar[str] = "extraction"

    def done_lines(self) -> list[str]:
        stats = self.report.get("summary", {})
        lines = [
            f"extracted {stats.get('lora', 0)} LoRA module(s) (rank "
            f"{stats.get('rank_min')}..{stats.get('rank_max')}, relative error at most "
            f"{float(stats.get('error_max', 0.0)):.3g}) and {stats.get('full', 0)} whole "
            f"module(s) in {self.seconds:.1f}s"
        ]
        if self.output_dir is not None:
            lines.append(f"adapter written to {self.output_dir}")
        return lines


def resolve_inputs(
    spec: MergeSpec, *, token: str | None = None, stream: bool | None = None
) -> ExtractionInputs:
    """The base and the fine-tuned model: local folders as they are; a Hub id pinned to a
    commit, its small files fetched and its shards streamed during the extraction
    (``stream``, default: unless ``HF_HUB_OFFLINE``), else downloaded whole
    (:mod:`mergejob.extraction.inputs`)."""
    if spec.extract is None:
        raise SpecError("extract: this spec merges adapters; it has no extract: section")
    return open_inputs(spec.base, spec.extract.finetuned, token=token, stream=stream)


def resolved_spec(spec: MergeSpec, base: ResolvedSource, tuned: ResolvedSource) -> dict[str, Any]:
    """The spec as the recipe records it: both models pinned (Hub commit, or absolute
    path), the merge-only sections that an extraction leaves empty dropped."""
    data = spec.to_dict()
    data.pop("adapters", None)
    data["base"] = recipe.pinned_source(base, data["base"])
    data["extract"]["finetuned"] = recipe.pinned_source(tuned, data["extract"]["finetuned"])
    out = data.get("output", {})
    for key in ("dtype", "max_shard_size"):
        out.pop(key, None)
    if out.get("dir"):
        out["dir"] = str(Path(out["dir"]).absolute())
    engine = data.get("engine", {})
    engine.pop("name", None)  # workers stays, as a merge's recipe has it (not in the card)
    if data.get("config") == {"overrides": {}, "allow_unknown_keys": False}:
        data.pop("config")
    return data


def input_records(inputs: ExtractionInputs, *, workers: int = 4) -> list[dict[str, Any]]:
    """The recipe's ``inputs``: both models with the sha256 of the files an extraction reads
    (a streamed shard's is its LFS object id: the same record as a whole download's)."""
    return [
        inputs.record(0, "base", workers=workers),
        inputs.record(1, "finetuned", workers=workers),
    ]


def holds_this_extraction(folder: Path, plan_id: str, resolved: Mapping[str, Any]) -> bool:
    """Whether ``folder`` (an output, or a partial folder) holds this very extraction: its
    recipe agrees with its files, records this plan (layout, settings, input files) and the
    same spec as the card shows it, published to the same repo."""
    document = output.finished_recipe(folder)
    if document is None or output.recipe_plan_id(document) != plan_id:
        return False

    def what(spec: Mapping[str, Any]) -> dict[str, Any]:
        publish = spec.get("publish")
        repo_id = publish.get("repo_id") if isinstance(publish, Mapping) else None
        return {**card_spec(spec), "repo_id": repo_id}

    return what(document) == what(resolved)


@dataclass
class StartedExtraction:
    """An extraction opened by :func:`start_extraction`: where it writes, its inputs and
    plan, the spec as the recipe records it, and how far an earlier run got (``finished``:
    the output holds it already; ``complete``: the partial folder holds all of it, only the
    commit and the rename are left). ``shared``: the partial folder is shared with the
    other indices of an Indexed Job, never removed here."""

    spec: MergeSpec
    place: pipeline.OutputPlace
    sources: ExtractionInputs
    plan: ExtractionPlan
    resolved: dict[str, Any]
    partial: Path
    timings: Timings
    inputs: Callable[[], list[dict[str, Any]]]
    started: float
    finished: bool = False
    complete: bool = False
    shared: bool = False

    @property
    def out_dir(self) -> Path:
        return self.place.out_dir


def start_extraction(
    spec: MergeSpec,
    *,
    token: str | None = None,
    recorded_inputs: Sequence[Mapping[str, Any]] | None = None,
    hash_inputs: bool = True,
    shared: bool = False,
) -> StartedExtraction:
    """Everything before the engine: the Hub access and the output folder
    (:func:`mergejob.pipeline.open_output`), both models, the plan (every problem before any
    weight is read), what an earlier run left, the inputs against a recipe's record
    (``recorded_inputs``: fails before anything is written), the partial folder.
    ``hash_inputs``: hash the inputs for the recipe on a thread beside the work (the run
    that writes the recipe). ``shared``: see :class:`StartedExtraction`."""
    if spec.extract is None:
        raise SpecError("extract: this spec merges adapters; run it with mergejob merge")
    started = time.monotonic()
    place = pipeline.open_output(spec, token=token)
    timings = Timings()
    with timings.phase("resolve"):
        sources = resolve_inputs(spec, token=place.token)
    with timings.phase("plan"):
        plan = sources.plan(spec.extract, trust_remote_code=spec.base.trust_remote_code)
        plan.raise_problems()
        devices_for(spec.engine.device)  # a GPU asked for and missing: before any read
        for notice in plan.notices:
            log.info("notice: %s", notice)
    resolved = resolved_spec(spec, sources.base, sources.tuned)
    # What the recipe records: a published one names local folders by their names only.
    recorded = recipe.without_local_paths(resolved) if spec.publish is not None else resolved
    out_dir, partial = place.out_dir, output.partial_dir_for(place.out_dir)
    job = StartedExtraction(
        spec, place, sources, plan, resolved, partial, timings, lambda: [], started, shared=shared
    )
    if place.maybe_finished and not partial.exists():
        if place.temporary:
            job.finished = output.published_for(out_dir, plan.plan_id)
        else:
            job.finished = holds_this_extraction(out_dir, plan.plan_id, recorded)
    if job.finished:
        return job
    if place.maybe_finished:
        output.check_output_dir(out_dir, overwrite=place.overwrite)
    job.complete = (partial / settings.RECIPE_FILE).is_file() and holds_this_extraction(
        partial, plan.plan_id, recorded
    )
    if recorded_inputs is not None:  # a rerun from a recipe: fail before writing anything
        with timings.phase("inputs"):
            checked = pipeline.compare_inputs(recorded_inputs, input_records(sources))
        job.inputs = lambda: checked
    elif hash_inputs and not job.complete:  # for the recipe, beside the extraction
        job.inputs = pipeline.InputDigests(lambda: input_records(sources, workers=1)).result
    else:  # written already, or only if asked for
        job.inputs = lambda: input_records(sources)
    if not job.complete:
        job.partial = output.open_partial(out_dir, resume=True)
    return job


def extract(
    spec: MergeSpec,
    *,
    token: str | None = None,
    recorded_inputs: Sequence[Mapping[str, Any]] | None = None,
) -> ExtractResult:
    """Run the extraction ``spec`` describes (an ``extract:`` section) and return where the
    adapter is. ``recorded_inputs``: a recipe's inputs this rerun must match (else
    :class:`~mergejob.errors.InputsChangedError` before anything is written)."""
    job = start_extraction(spec, token=token, recorded_inputs=recorded_inputs)
    if job.finished:
        return already_extracted(job)
    with keeping_partial(job):
        outcome = None
        if not job.complete:
            with job.timings.phase("extract", device=spec.engine.device):
                outcome = run_engine(
                    spec, job.plan, job.partial, job.sources, token=job.place.token
                )
        return finish_extraction(job, outcome)


def already_extracted(job: StartedExtraction) -> ExtractResult:
    """The result of an extraction its output holds already: nothing is done again."""
    out_dir = job.out_dir
    log.info("%s already holds this extraction (plan %s): nothing to do", out_dir, job.plan.plan_id)
    output.forget_published(out_dir)
    return ExtractResult(
        output_dir=None if job.place.temporary else out_dir.absolute(),
        report=_read_report(out_dir),
        files=[] if job.place.temporary else sorted(p.name for p in out_dir.iterdir()),
        seconds=time.monotonic() - job.started,
        already_finished=True,
    )


@contextmanager
def keeping_partial(job: StartedExtraction) -> Iterator[None]:
    """On a failure, the partial folder stays for the rerun (its finished groups), except
    after bad input when it holds no recipe and nobody else writes into it."""
    try:
        yield
    except BaseException as exc:
        # With the recipe the folder is whole and only publishing is left; any other
        # failure but bad input keeps the finished groups for the rerun.
        kept = job.shared or (job.partial / settings.RECIPE_FILE).is_file()
        if kept or not isinstance(exc, InputError):
            log.warning(
                "kept %s: rerun the same job to resume from its finished groups", job.partial
            )
        else:
            output.discard_partial(job.out_dir)
        raise


def finish_extraction(job: StartedExtraction, outcome: ExtractionOutcome | None) -> ExtractResult:
    """Everything after the engine, once ``outcome`` has every group (None: ``job`` is
    complete, an earlier run wrote it all): the adapter, its config, the tokenizer,
    ``extraction.json``, the card, the recipe (last), then
    :func:`mergejob.pipeline.settle_output` (the Hub commit, the records dropped, the
    rename into place). The one tail of a one-pod extraction and of index 0 of many."""
    spec, place, partial, timings = job.spec, job.place, job.partial, job.timings
    base, tuned = job.sources.base, job.sources.tuned
    if outcome is None:
        log.info("%s holds this extraction already (an earlier run wrote it)", partial)
        report = _read_report(partial)
    else:
        report = write_adapter(
            spec, job.plan, outcome, partial, base, tuned, job.resolved, place.target,
            place.token, timings,
        )  # fmt: skip
        write_recipe(
            job.plan,
            outcome,
            partial,
            job.resolved,
            job.inputs(),
            timings,
            publishes=spec.publish is not None,
        )
    final, files, published = pipeline.settle_output(
        job.out_dir,
        partial,
        temporary=place.temporary,
        target=place.target,
        plan_id=job.plan.plan_id,
        timings=timings,
        publish=lambda target: publish_adapter(spec, partial, target, base, tuned, place.token),
    )
    return ExtractResult(
        output_dir=final,
        report=report,
        files=files,
        seconds=time.monotonic() - job.started,
        timings=dict(timings.seconds),
        published=published,
    )


def run_engine(
    spec: MergeSpec,
    plan: ExtractionPlan,
    partial: Path,
    inputs: ExtractionInputs,
    *,
    token: str | None = None,
    groups: Sequence[int] | None = None,
    progress: ProgressCallback | None = None,
) -> ExtractionOutcome:
    """The engine over ``plan`` (``groups``: only those, an index's share); with a streamed
    Hub model, beside the downloads of the shards its unfinished groups read, each group
    waiting for its own files."""
    engine = spec.engine
    options: dict[str, Any] = {
        "device": engine.device,
        "workers": engine.workers,
        "groups": groups,
        "progress": progress,
    }
    if not inputs.streamed:
        return run_extraction(plan, partial, **options)
    with Downloads(
        plan,
        partial,
        inputs,
        token=token,
        workers=engine.download_workers or DEFAULT_DOWNLOAD_WORKERS,
        delete_after_use=bool(engine.delete_downloaded),
        parallel=max(len(devices_for(engine.device)), engine.workers),
        groups=groups,
    ) as downloads:
        return run_extraction(plan, partial, gate=downloads.gate, peek=downloads.peek, **options)


def _read_report(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(folder) / settings.EXTRACTION_REPORT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_adapter(
    spec: MergeSpec,
    plan: ExtractionPlan,
    outcome: ExtractionOutcome,
    folder: Path,
    base: ResolvedSource,
    tuned: ResolvedSource,
    resolved: Mapping[str, Any],
    target: HubTarget | None,
    token: str | None,
    timings: Timings,
) -> dict[str, Any]:
    """Everything but the recipe: the adapter's safetensors and config, the fine-tune's
    tokenizer (a merge of the adapter then carries it), ``extraction.json`` and the card.
    Returns the report."""
    with timings.phase("write"):
        assemble_adapter(outcome.parts, folder)
        rows = outcome.rows
        ranks = {r["module"]: int(r["rank"]) for r in rows if r["status"] == "extracted"}
        saved = [r["module"] for r in rows if r["status"] == "full"]
        saved += [r["mirror"] for r in rows if r["status"] == "full" and r.get("mirror")]
        modules = sorted({name.rpartition(".")[0] for name in plan.base})
        base_id = base.repo_id or str(Path(base.local_dir).absolute())
        write_adapter_config(
            folder,
            ranks=ranks,
            modules_to_save=saved,
            all_modules=modules,
            fan_in_fan_out=any(
                m.transposed and m.kind == "lora" and m.module in ranks for m in plan.modules
            ),
            base_model_name_or_path=base_id,
            revision=base.commit,
            task_type=plan.task_type,
        )
        copied = output.copy_tokenizer(tuned.local_dir, folder)
        if copied:
            log.info("tokenizer from the fine-tuned model: %s", ", ".join(copied))
        report = extraction_report(plan, rows, dropped=outcome.dropped)
        write_report(folder, report)
        write_card(
            folder,
            base=base,
            tuned=tuned,
            report=report,
            resolved_spec=resolved,
            repo_id=target.repo_id if target else None,
            token=token,
        )
    return report


def write_recipe(
    plan: ExtractionPlan,
    outcome: ExtractionOutcome,
    folder: Path,
    resolved: Mapping[str, Any],
    inputs: list[dict[str, Any]],
    timings: Timings,
    *,
    publishes: bool,
) -> Path:
    """``mergejob.yaml``, last: the resolved spec, the inputs' and every file's sha256, the
    plan id (what a rerun recognises), versions and timings."""
    engine = {
        "name": ENGINE_NAME,
        "device": resolved.get("engine", {}).get("device", "cpu"),
        "plan_id": plan.plan_id,
        "groups": len(outcome.parts),
        "resumed_groups": outcome.resumed,
    }
    document = recipe.build_recipe(
        spec=resolved,
        inputs=inputs,
        output_dir=folder,
        engine=engine,
        timings=timings.seconds,
    )
    if publishes:
        document = recipe.without_local_paths(document)  # no home folder reaches the Hub
    return recipe.write_recipe(folder, document)


def publish_adapter(
    spec: MergeSpec,
    folder: Path,
    target: HubTarget,
    base: ResolvedSource,
    tuned: ResolvedSource,
    token: str | None,
) -> PublishResult:
    """One commit (or pull request) with every file of the adapter's folder."""
    from mergejob import publish

    options = spec.publish
    message = (options.commit_message if options else None) or (
        f"Upload a LoRA adapter extracted from {tuned.display} - {base.display} (mergejob)"
    )
    return publish.publish_folder(
        folder,
        target,
        token=token,
        commit_message=message,
        commit_description=f"base: {base.display}\nfine-tuned: {tuned.display}",
        delete_uploaded=bool(options and options.delete_uploaded),
    )
