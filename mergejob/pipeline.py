"""The job's one path: spec -> sources -> plan -> engine -> output folder -> publish.

``merge(spec)`` is what ``mergejob merge``, ``mergejob run`` and the Python API all call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mergejob import logs, model_config, output, recipe, settings
from mergejob.errors import (
    InputError,
    InputsChangedError,
    MergeFailedError,
    SpecError,
    listing,
)
from mergejob.fetch import StreamedBase, open_streamed_base
from mergejob.job import EngineReport, PreparedJob
from mergejob.plan.checks import check_job, check_output_apart
from mergejob.plan.work import plan_for_job
from mergejob.recipe import Timings
from mergejob.sources import (
    ADAPTER_PATTERNS,
    BASE_PATTERNS,
    BASE_SMALL_PATTERNS,
    CONFIG_PATTERNS,
    resolve_source,
)
from mergejob.spec import MergeSpec

if TYPE_CHECKING:
    from mergejob.publish import HubTarget, PublishResult, ShardUploader

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class JobResult:
    """What a finished job (a merge, an extraction) tells its caller.

    ``output_dir`` is None when the output was only published (its local copy was
    temporary); ``published`` says where it went on the Hub; ``already_finished``: the
    output held this very job already, nothing was done again.
    """

    output_dir: Path | None
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    published: PublishResult | None = None
    already_finished: bool = False

    what: ClassVar[str] = "job"

    def done_lines(self) -> list[str]:
        """What the job made (a job that did its work)."""
        return [] if self.output_dir is None else [f"written to {self.output_dir}"]

    def summary(self) -> str:
        """What a command prints when the job is done."""
        if self.already_finished:
            where = self.output_dir if self.output_dir is not None else "the Hub"
            lines = [f"{where} already holds this {self.what}: nothing to do"]
        else:
            lines = self.done_lines()
        if self.published is not None:
            where = self.published.pr_url or self.published.commit_url
            lines.append(logs.published_line(self.published.url, where))
        return "\n".join(lines)


@dataclass(kw_only=True)
class MergeResult(JobResult):
    """Where the merged model is and how it was made (``engine``: the engine's report)."""

    engine: EngineReport

    what: ClassVar[str] = "merge"

    def done_lines(self) -> list[str]:
        if self.output_dir is not None:
            return [logs.merged_line(self.output_dir, self.seconds)]
        return [f"merged in {self.seconds:.1f}s"]


def prepare(
    spec: MergeSpec, *, token: str | None = None, timings: Timings | None = None
) -> PreparedJob:
    """Resolve every source to local files and check the job (:func:`check_job`, then the
    stream engine's plan); no weights are read."""
    timings = timings or Timings()
    # The stream engine fetches a Hub base's shards during the merge (mergejob.fetch): here
    # only its small files, the pinned commit and the shards' headers.
    stream = spec.engine.name == "stream" and not settings.hub_offline()
    streamed: StreamedBase | None = None
    with timings.phase("resolve"):
        base = resolve_source(
            spec.base,
            role="base model",
            patterns=BASE_SMALL_PATTERNS if stream else BASE_PATTERNS,
            token=token,
        )
        if stream and base.repo_id is not None and base.commit is not None:
            streamed = open_streamed_base(base.repo_id, base.commit, base.local_dir, token)
        adapters = [
            resolve_source(a, role="adapter", patterns=ADAPTER_PATTERNS, token=token)
            for a in spec.adapters
        ]
        config_from = None
        if spec.config.config_from is not None:
            config_from = resolve_source(
                spec.config.config_from, role="config_from", patterns=CONFIG_PATTERNS, token=token
            )
    settings.kill_point("resolved")
    with timings.phase("plan"):
        checked = check_job(
            spec,
            base.local_dir,
            [a.local_dir for a in adapters],
            config_from.local_dir if config_from else None,
            config_from_name=config_from.display if config_from else None,
            index=streamed.index if streamed is not None else None,
        )
        assert checked.output_dtype is not None  # raising mode: a failed check raised
        job = PreparedJob(
            spec=spec,
            base=base,
            adapters=adapters,
            output_dtype=checked.output_dtype,
            config_from=config_from,
            streamed=streamed,
            token=token,
        )
        if streamed is not None:
            # Each shard is named by its LFS sha256 before it is downloaded: free digests.
            job.digests.add_known(streamed.sha256s())
        if spec.engine.name == "stream":
            # Every check of the stream engine (each adapter tensor lands on one base
            # tensor and fits it; the configs are expressible); cached for the engine.
            plan_for_job(job)
    return job


@dataclass
class StartedJob:
    """A job past every check, ready for its engine: what :func:`start_job` hands the
    engine and :func:`finish_output`.

    ``inputs`` gives the recipe's input records (hashed on a thread beside the merge, or
    already checked against a recipe's); ``finished`` is true when the output already holds
    this very merge (a rerun after a crash that came after the last step); ``complete`` when
    the partial folder does (a crash after the recipe: only the commit and the rename are
    left, and the folder is published as it is, so a commit that landed is recognised).
    """

    job: PreparedJob
    out_dir: Path
    partial: Path
    temporary: bool
    target: HubTarget | None
    token: str | None
    timings: Timings
    inputs: Callable[[], list[dict[str, Any]]]
    started: float
    plan_id: str | None = None
    finished: bool = False
    complete: bool = False
    marker_id: str | None = None

    @property
    def spec(self) -> MergeSpec:
        return self.job.spec


def output_dir_of(spec: MergeSpec, target: HubTarget | None) -> Path:
    """Where the job writes: ``output.dir``, or for a publish-only job a temporary folder in
    a fixed place per repo (so that a rerun resumes from its finished shards)."""
    if spec.output.dir is not None:
        return Path(spec.output.dir)
    if target is not None:
        from mergejob.publish import default_local_dir

        return default_local_dir(target)
    raise SpecError("output.dir: required unless publish.repo_id is set")


@dataclass
class OutputPlace:
    """Where a job writes, checked before any download (:func:`open_output`): the folder
    (a temporary one for a publish-only job), whether it may be replaced, the Hub target
    and the token to publish with, and whether it may already hold this very job's output
    (to be confirmed once the plan is known)."""

    out_dir: Path
    temporary: bool
    overwrite: bool
    target: HubTarget | None
    token: str | None
    maybe_finished: bool


def open_output(spec: MergeSpec, *, token: str | None = None) -> OutputPlace:
    """The first steps of every job (a merge, an extraction): the Hub access (a bad token
    fails in seconds, before any download), then the output folder: never one that would
    replace an input, a crash between two renames finished, and one that holds something
    else refused (unless it may hold this very job's output, looked at later)."""
    token = token if token is not None else settings.hub_token()
    target: HubTarget | None = None
    if spec.publish is not None:
        from mergejob import publish

        target = publish.check_access(spec.publish, token=token)
        token = publish.resolve_token(token)
    out_dir = output_dir_of(spec, target)
    temporary = spec.output.dir is None
    overwrite = spec.output.overwrite or temporary
    # Never an output that would replace an input, whatever the flags: before any read.
    check_output_apart(spec, out_dir)
    output.recover_replaced(out_dir)
    # An output folder that holds something else fails before any download; one that may
    # hold this very job's output is looked at once the plan (and its id) is known.
    maybe_finished = output.may_hold_finished(out_dir, temporary=temporary)
    if not maybe_finished:
        output.check_output_dir(out_dir, overwrite=overwrite)
    return OutputPlace(out_dir, temporary, overwrite, target, token, maybe_finished)


def start_job(
    spec: MergeSpec,
    *,
    token: str | None = None,
    recorded_inputs: Sequence[Mapping[str, Any]] | None = None,
    hash_inputs: bool = True,
    shared_partial: bool = False,
) -> StartedJob:
    """Everything before the engine, in this order: the Hub access (a bad token fails in
    seconds, before any download), the output folder, the sources and every check
    (:func:`prepare`), the inputs against a recipe's record (``recorded_inputs``: a rerun
    from a recipe fails before writing anything if they changed), the partial folder.

    ``hash_inputs``: hash the inputs for the recipe on a thread beside the merge (the job
    that writes the recipe). ``shared_partial``: the partial folder is shared with other
    indices of an Indexed Job: it is created if missing and never cleared here.
    """
    started = time.monotonic()
    place = open_output(spec, token=token)
    out_dir, temporary, overwrite = place.out_dir, place.temporary, place.overwrite
    target, token, maybe_finished = place.target, place.token, place.maybe_finished
    timings = Timings()
    job = prepare(spec, token=token, timings=timings)
    plan_id = plan_for_job(job).plan_id if spec.engine.name == "stream" else None
    settings.kill_point("planned")
    current = _Once(lambda: input_records(job))
    marker_id = published_marker_id(job, plan_id)
    partial = output.partial_dir_for(out_dir)
    finished = False
    if maybe_finished and not partial.exists():  # a partial folder: a run is not done
        if temporary:
            finished = output.published_for(out_dir, marker_id)
        else:
            finished = holds_this_job(out_dir, job, plan_id, current)
    if maybe_finished and not finished:
        output.check_output_dir(out_dir, overwrite=overwrite)
    complete = (
        not finished
        and (partial / settings.RECIPE_FILE).is_file()
        and holds_this_job(partial, job, plan_id, current)
    )
    inputs: Callable[[], list[dict[str, Any]]]
    if recorded_inputs is not None:  # a rerun from a recipe: fail before writing anything
        checked = check_recorded_inputs(job, recorded_inputs, timings)
        inputs = lambda: checked  # noqa: E731 - one of two ways to the same answer
    elif hash_inputs and not finished and not complete and current.value is None:
        inputs = InputDigests(job).result  # for the recipe, beside the merge
    else:
        inputs = current  # hashed already, or only if asked for
    if not finished and not complete:
        # The stream engine resumes from the finished shards an interrupted run left.
        resume = shared_partial or spec.engine.name == "stream"
        partial = output.open_partial(out_dir, resume=resume)
    return StartedJob(
        job=job,
        out_dir=out_dir,
        partial=partial,
        temporary=temporary,
        target=target,
        token=token,
        timings=timings,
        inputs=inputs,
        started=started,
        plan_id=plan_id,
        finished=finished,
        complete=complete,
        marker_id=marker_id,
    )


class _Once:
    """A value computed on the first call and kept (``value``: None until then)."""

    def __init__(self, compute: Callable[[], list[dict[str, Any]]]) -> None:
        self._compute = compute
        self.value: list[dict[str, Any]] | None = None

    def __call__(self) -> list[dict[str, Any]]:
        if self.value is None:
            self.value = self._compute()
        return self.value


def holds_this_job(
    folder: Path,
    job: PreparedJob,
    plan_id: str | None,
    current_inputs: Callable[[], list[dict[str, Any]]],
) -> bool:
    """Whether ``folder`` (an output, or a partial folder) holds this very job's finished
    output: its recipe agrees with its files (:func:`mergejob.output.finished_recipe`) and
    records the same model (the spec as the card shows it, and the Hub repo the card names)
    and the same inputs: the stream engine's plan id fingerprints them; the peft engine has
    none, so their sha256 are compared with the recipe's (hashing them costs less than the
    merge a rerun would redo)."""
    document = output.finished_recipe(folder)
    if document is None:
        return False
    if plan_id is not None and output.recipe_plan_id(document) != plan_id:
        return False
    if model_identity(document) != model_identity(resolved_spec(job)):
        return False
    if plan_id is None:
        record = document.get(recipe.RECIPE_KEY)
        recorded = record.get("inputs") if isinstance(record, dict) else None
        if not isinstance(recorded, list):
            return False
        if recipe.input_changes(recorded, current_inputs()):
            return False
    return True


def model_identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What a resolved spec (or a recipe) says the output is, beyond its weights: the spec
    as the card shows it (config_from, overrides, dtype, shard size...) and the Hub repo the
    card names; not where it was written or how many workers wrote it."""
    from mergejob.card import card_spec

    publish = spec.get("publish")
    repo_id = publish.get("repo_id") if isinstance(publish, Mapping) else None
    return {**card_spec(spec), "repo_id": repo_id}


def published_marker_id(job: PreparedJob, plan_id: str | None) -> str | None:
    """What the published marker records of a publish-only job, to know it on a rerun: the
    plan id (the weights and their inputs) with a digest of :func:`model_identity` (so that
    a rerun with, say, other config overrides publishes again). None without a plan id."""
    if plan_id is None:
        return None
    identity = json.dumps(model_identity(resolved_spec(job)), sort_keys=True, default=str)
    return f"{plan_id}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def merge(
    spec: MergeSpec,
    *,
    token: str | None = None,
    recorded_inputs: Sequence[Mapping[str, Any]] | None = None,
) -> MergeResult:
    """Run the whole job described by ``spec`` and return where the result is.

    ``recorded_inputs``: the ``recipe.inputs`` of the recipe this job reruns; an input whose
    files are no longer those bytes fails the job (:class:`InputsChangedError`) before
    anything is merged or written, since the output could not reproduce the recipe's.

    Example::

        import mergejob
        spec = mergejob.MergeSpec.model_validate(
            {"base": "./base", "adapters": ["./a", "./b"], "output": {"dir": "./merged"}}
        )
        result = mergejob.merge(spec)
    """
    job = start_job(spec, token=token, recorded_inputs=recorded_inputs)
    if job.finished:
        return already_finished(job)
    resumable = spec.engine.name == "stream"
    uploader = start_uploader(spec, job.target, job.token) if job.target is not None else None
    try:
        if job.complete:
            log.info("%s: written by an earlier run of this job; merging nothing", job.partial)
            report = EngineReport(engine=spec.engine.name, extra={"plan_id": job.plan_id})
        else:
            with job.timings.phase("merge", engine=spec.engine.name):
                report = run_engine(job.job, job.partial, on_shard_done=uploader)
            settings.kill_point("merged")
        return finish_output(job, report, uploader=uploader)
    except BaseException as exc:
        # The recipe is written last: with it, the folder is finished and only publishing
        # is left; keep it for the rerun (of either engine: start_job recognises it).
        complete = (job.partial / settings.RECIPE_FILE).is_file()
        if complete or (resumable and not isinstance(exc, InputError | MergeFailedError)):
            log.warning(
                "kept %s: rerun the same job to resume from its finished shards", job.partial
            )
        else:
            output.discard_partial(job.out_dir)
        raise
    finally:
        if uploader is not None:
            uploader.close(wait=False)


def finish_output(
    job: StartedJob,
    report: EngineReport,
    *,
    uploader: ShardUploader | None = None,
) -> MergeResult:
    """Everything after the engine, in this order: tokenizer and generation_config,
    config.json, card, recipe (last: it lists every other file), the Hub commit, then the
    shard records go and the folder is renamed into place (or, publish-only, removed).

    Every entry point ends here: a local merge, ``mergejob run``, and the finaliser of an
    Indexed Job. A crash anywhere before the rename leaves the partial folder for a rerun.
    """
    prepared, partial, timings = job.job, job.partial, job.timings
    if not job.complete:  # else an earlier run wrote all of it: the folder stays as it is
        with timings.phase("write"):
            output.write_extras(partial, prepared.base.local_dir, prepared.adapter_dirs)
            write_config(prepared, partial, report)
            write_card(
                prepared,
                partial,
                report,
                repo_id=job.target.repo_id if job.target else None,
                token=job.token,
            )
        settings.kill_point("written")
        write_recipe(prepared, partial, report, timings, inputs=job.inputs())
        settings.kill_point("recipe-written")
    final, files, published = settle_output(
        job.out_dir,
        partial,
        temporary=job.temporary,
        target=job.target,
        plan_id=job.marker_id,
        timings=timings,
        publish=lambda target: publish_output(prepared, partial, target, uploader, job.token),
    )
    return MergeResult(
        output_dir=final,
        engine=report,
        files=files,
        seconds=time.monotonic() - job.started,
        timings=dict(timings.seconds),
        published=published,
    )


def settle_output(
    out_dir: Path,
    partial: Path,
    *,
    temporary: bool,
    target: HubTarget | None,
    plan_id: str | None,
    timings: Timings,
    publish: Callable[[HubTarget], PublishResult],
) -> tuple[Path | None, list[str], PublishResult | None]:
    """The last steps of every job (a merge, an extraction), once the partial folder holds
    the whole output with its recipe: ``publish(target)`` when there is a target (unless this plan
    is on the Hub already), then the engine's records go and the folder is renamed into
    place (publish-only: removed). Returns the final folder (None when removed), its files
    and what was published."""
    published: PublishResult | None = None
    if target is not None and not output.published_for(out_dir, plan_id):
        with timings.phase("publish", repo=target.display):
            published = publish(target)
        if plan_id is not None:
            output.mark_published(out_dir, plan_id, published.commit_url)
        settings.kill_point("published")
    # Last: the shard records (a crash before this point redoes the step, merging nothing).
    output.drop_records(partial)
    settings.kill_point("records-dropped")
    final: Path | None
    if temporary:
        files = sorted(p.name for p in partial.iterdir() if not p.name.startswith("."))
        output.discard_partial(out_dir)
        final = None
    else:
        final = output.commit_partial(out_dir)
        files = sorted(p.name for p in final.iterdir())
    settings.kill_point("renamed")
    # The marker only bridges a crash between the commit and here; a publish-only job
    # leaves nothing on this machine.
    output.forget_published(out_dir)
    return final, files, published


def already_finished(job: StartedJob) -> MergeResult:
    """The result of a job whose output already holds this very merge (and, publishing, is
    on the Hub): nothing is merged, written or uploaded again."""
    log.info("%s already holds this merge (plan %s): nothing to do", job.out_dir, job.plan_id)
    # What a crash after the rename (or, publish-only, after the removal) left: done now.
    output.forget_published(job.out_dir)
    return MergeResult(
        output_dir=None if job.temporary else job.out_dir.absolute(),
        engine=EngineReport(engine=job.spec.engine.name, extra={"already_finished": True}),
        files=[] if job.temporary else sorted(p.name for p in job.out_dir.iterdir()),
        seconds=time.monotonic() - job.started,
        already_finished=True,
    )


def run_engine(
    job: PreparedJob, out_dir: Path, *, on_shard_done: Callable[[Path], None] | None = None
) -> EngineReport:
    """Run the spec's engine into ``out_dir``. ``on_shard_done`` gets each finished shard
    while the next ones merge (stream engine; the peft engine writes them all at the end)."""
    name = job.spec.engine.name
    if name == "peft":
        from mergejob.engines.peft import merge_with_peft

        return merge_with_peft(job, out_dir)
    if name == "stream":
        from mergejob.engines.stream import merge_with_stream

        return merge_with_stream(job, out_dir, on_shard_done=on_shard_done)
    raise SpecError(f"engine.name: {name!r}: unknown engine; use --engine stream or peft")


def write_config(job: PreparedJob, out_dir: Path, report: EngineReport) -> None:
    """config.json, once: the keys the engine's merge decided, then config_from and the
    overrides (:func:`mergejob.output.write_config`)."""
    config_from = model_config.read_config(job.config_from.local_dir) if job.config_from else None
    if output.write_config(
        out_dir,
        job.base.local_dir,
        updates=report.config_updates,
        config_from=config_from,
        overrides=job.spec.config.overrides,
    ):
        log.info("config.json: %s", describe_config_changes(job))


def describe_config_changes(job: PreparedJob) -> str:
    parts = []
    if job.config_from is not None:
        parts.append(f"from {job.config_from.display}")
    if job.spec.config.overrides:
        parts.append(
            "overrides " + ", ".join(f"{k}={v!r}" for k, v in job.spec.config.overrides.items())
        )
    return "; ".join(parts)


def input_records(job: PreparedJob, *, workers: int = 4) -> list[dict[str, Any]]:
    """The recipe's ``inputs``: each source with the sha256 of the files the merge reads
    (free for Hub inputs, whose cache names them by it; read for local ones)."""
    digest = job.digests.get  # shared with the stream engine's shard records: read once
    streamed = [f.name for f in job.streamed.files] if job.streamed is not None else []
    inputs = [
        recipe.source_record(
            "base", job.base, BASE_PATTERNS, workers=workers, digest=digest, also=streamed
        )
    ]
    inputs += [
        recipe.source_record("adapter", a, ADAPTER_PATTERNS, workers=workers, digest=digest)
        for a in job.adapters
    ]
    if job.config_from is not None:
        inputs.append(
            recipe.source_record(
                "config_from", job.config_from, CONFIG_PATTERNS, workers=workers, digest=digest
            )
        )
    return inputs


def check_recorded_inputs(
    job: PreparedJob, recorded: Sequence[Mapping[str, Any]], timings: Timings
) -> list[dict[str, Any]]:
    """Hash this job's inputs now and compare them with a recipe's record of the same
    inputs; returns the records (for the new recipe) or raises naming the changed files."""
    with timings.phase("inputs"):
        current = input_records(job)
    return compare_inputs(recorded, current)


def compare_inputs(
    recorded: Sequence[Mapping[str, Any]], current: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``current`` (the inputs as hashed now) if they match a recipe's ``recorded`` ones,
    else :class:`InputsChangedError` naming every changed file."""
    changes = recipe.input_changes(recorded, current)
    if changes:
        raise InputsChangedError(
            f"the inputs differ from those the recipe recorded ({len(changes)} file(s)):"
            f"{listing(changes)}\nthe output would not reproduce the recipe's; restore those "
            "files, or delete the recipe: section of the spec file to merge the inputs as "
            "they are now"
        )
    log.info("inputs: every file matches the recipe's sha256")
    return current


class InputDigests:
    """:func:`input_records` on a daemon thread, started when the merge starts: hashing a
    local 140 GB base takes minutes, hidden behind the merge rather than added after it (a
    failing job does not wait for it)."""

    def __init__(self, job: PreparedJob | Callable[[], list[dict[str, Any]]]) -> None:
        # A job's inputs, or any job's own records (an extraction's base and fine-tune).
        self._records = job if callable(job) else (lambda: input_records(job, workers=1))
        self._value: list[dict[str, Any]] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mergejob-input-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._records()
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> list[dict[str, Any]]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def write_recipe(
    job: PreparedJob,
    out_dir: Path,
    report: EngineReport,
    timings: Timings,
    *,
    inputs: list[dict[str, Any]] | None = None,
) -> Path:
    """``mergejob.yaml``: the resolved spec (Hub inputs at their commits), file checksums,
    engine, versions and timings. Written last, so it lists every other file. ``inputs``:
    from :class:`InputDigests` if the caller started it (else hashed here)."""
    spec = resolved_spec(job)
    if inputs is None:
        inputs = input_records(job)
    engine: dict[str, Any] = {"name": report.engine, "device": job.spec.engine.device}
    if report.tensors_changed is not None:
        engine["tensors_changed"] = report.tensors_changed
    engine.update({k: v for k, v in report.extra.items() if _plain(v)})
    records = report.extra.get("shard_records")
    known = {
        name: record["sha256"]
        for name, record in (records.items() if isinstance(records, dict) else [])
        if isinstance(record, dict) and isinstance(record.get("sha256"), str)
    }
    document = recipe.build_recipe(
        spec=spec,
        inputs=inputs,
        output_dir=out_dir,
        engine=engine,
        timings=timings.seconds,
        known_digests=known,
    )
    if job.spec.publish is not None:
        document = recipe.without_local_paths(document)  # no home folder reaches the Hub
    return recipe.write_recipe(out_dir, document)


def resolved_spec(job: PreparedJob) -> dict[str, Any]:
    """The spec as the recipe records it: Hub inputs pinned to their commits, local ones as
    absolute paths, the output dtype as chosen (never ``auto``)."""
    spec = job.spec.to_dict()
    spec["base"] = recipe.pinned_source(job.base, spec["base"])
    spec["adapters"] = [
        recipe.pinned_source(source, entry)
        for source, entry in zip(job.adapters, spec["adapters"], strict=True)
    ]
    if job.config_from is not None:
        spec["config"]["config_from"] = recipe.pinned_source(
            job.config_from, spec["config"]["config_from"]
        )
    spec["output"]["dtype"] = job.output_dtype
    if spec["output"].get("dir"):
        spec["output"]["dir"] = str(Path(spec["output"]["dir"]).absolute())
    return spec


def write_card(
    job: PreparedJob,
    out_dir: Path,
    report: EngineReport,
    *,
    repo_id: str | None = None,
    token: str | None = None,
) -> Path:
    """README.md: the model card (see :mod:`mergejob.card`), in every output."""
    from mergejob.card import write_model_card

    return write_model_card(
        out_dir, job, report, resolved_spec=resolved_spec(job), repo_id=repo_id, token=token
    )


def start_uploader(
    spec: MergeSpec,
    target: HubTarget,
    token: str | None,
    *,
    delete_uploaded: bool | None = None,
) -> ShardUploader:
    """The background uploader the engine hands each finished shard to. With
    ``delete_uploaded`` (default: the spec's), at most two finished shards wait for it (disk
    use stays bounded; with several local workers the bound holds for the shards they
    report, not for those they are still writing)."""
    from mergejob import publish

    token = publish.resolve_token(token)
    delete = bool(spec.publish and spec.publish.delete_uploaded)
    if delete_uploaded is not None:
        delete = delete_uploaded
    return publish.ShardUploader(
        publish.hub_api(token),
        target,
        token=token,
        max_pending=2 if delete else None,
        delete_uploaded=delete,
    )


def publish_output(
    job: PreparedJob,
    folder: Path,
    target: HubTarget,
    uploader: ShardUploader | None,
    token: str | None,
) -> PublishResult:
    """Upload what the uploader has not yet sent and make the one commit (or pull request)."""
    from mergejob import publish

    spec = job.spec.publish
    count = len(job.adapters)
    message = (spec.commit_message if spec else None) or (
        f"Upload {job.base.display} + {count} merged adapter{'s' if count != 1 else ''} (mergejob)"
    )
    description = "Adapters, in merge order:\n" + "\n".join(
        f"- {a.display} (weight {w.weight:g})"
        for a, w in zip(job.adapters, job.spec.adapters, strict=True)
    )
    return publish.publish_folder(
        folder,
        target,
        token=token,
        uploader=uploader,
        commit_message=message,
        commit_description=description,
        delete_uploaded=bool(spec and spec.delete_uploaded),
    )


def _plain(value: object) -> bool:
    return isinstance(value, str | int | float | bool) or value is None
