"""The job's one path: spec -> sources -> plan -> engine -> output folder -> publish.

``merge(spec)`` is what ``mergejob merge``, ``mergejob run`` and the Python API all call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergejob import model_config, output, recipe, settings
from mergejob.errors import (
    InputError,
    InputsChangedError,
    MergeFailedError,
    ModelError,
    listing,
)
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.job import EngineReport, PreparedJob
from mergejob.plan.work import check_lora_shapes, plan_for_job
from mergejob.recipe import Timings
from mergejob.sources import (
    ADAPTER_PATTERNS,
    BASE_PATTERNS,
    CONFIG_PATTERNS,
    ResolvedSource,
    resolve_source,
)
from mergejob.spec import MergeSpec

if TYPE_CHECKING:
    from mergejob.publish import HubTarget, PublishResult, ShardUploader

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """Where the merged model is and how it was made.

    ``output_dir`` is None when the model was only published (its local copy was temporary);
    ``published`` says where it went on the Hub.
    """

    output_dir: Path | None
    engine: EngineReport
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    published: PublishResult | None = None

    def summary(self) -> str:
        """What a command prints when the job is done."""
        lines = []
        if self.output_dir is not None:
            lines.append(f"merged model written to {self.output_dir} in {self.seconds:.1f}s")
        else:
            lines.append(f"merged in {self.seconds:.1f}s")
        if self.published is not None:
            where = self.published.pr_url or self.published.commit_url
            lines.append(f"published to {self.published.url}: {where}")
        return "\n".join(lines)


def prepare(
    spec: MergeSpec, *, token: str | None = None, timings: Timings | None = None
) -> PreparedJob:
    """Resolve every source to local files and check the job; no weights are read."""
    timings = timings or Timings()
    with timings.phase("resolve"):
        base = resolve_source(spec.base, role="base model", patterns=BASE_PATTERNS, token=token)
        adapters = [
            resolve_source(a, role="adapter", patterns=ADAPTER_PATTERNS, token=token)
            for a in spec.adapters
        ]
        config_from = None
        if spec.config.config_from is not None:
            config_from = resolve_source(
                spec.config.config_from, role="config_from", patterns=CONFIG_PATTERNS, token=token
            )
    with timings.phase("plan"):
        if not (base.local_dir / "config.json").is_file():
            raise ModelError(f"{base.local_dir}/config.json: missing; is this a model folder?")
        index = CheckpointIndex.from_folder(base.local_dir)
        if spec.engine.name != "stream":
            for adapter in adapters:
                check_lora_shapes(index, adapter.local_dir)
        dtype = spec.output.dtype if spec.output.dtype != "auto" else index.stored_dtype()
        if dtype not in {"bfloat16", "float16", "float32"}:
            raise ModelError(
                f"{base.local_dir}: weights are stored as {dtype}; pass --dtype bfloat16, "
                "float16 or float32"
            )
        check_output_config(spec, base, adapters, config_from, index)
        job = PreparedJob(
            spec=spec, base=base, adapters=adapters, output_dtype=dtype, config_from=config_from
        )
        if spec.engine.name == "stream":
            # Every check of the stream engine (each adapter tensor lands on one base
            # tensor and fits it; the configs are expressible); cached for the engine.
            plan_for_job(job)
    return job


def check_output_config(
    spec: MergeSpec,
    base: ResolvedSource,
    adapters: list[ResolvedSource],
    config_from: ResolvedSource | None,
    index: CheckpointIndex,
) -> None:
    """config_from and overrides: every check before any weight is read."""
    if config_from is None and not spec.config.overrides:
        return
    base_config = model_config.read_config(base.local_dir)
    model_config.plan_output_config(
        base_config,
        config_from=model_config.read_config(config_from.local_dir) if config_from else None,
        config_from_name=config_from.display if config_from else None,
        overrides=spec.config.overrides,
        allow_unknown=spec.config.allow_unknown_keys,
        vocab_size=model_config.merged_vocab_size(base_config, [a.local_dir for a in adapters]),
    )


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
    started = time.monotonic()
    token = token if token is not None else settings.hub_token()
    target: HubTarget | None = None
    if spec.publish is not None:
        from mergejob import publish

        # Before any download or tensor: a bad token fails in seconds, not after the merge.
        target = publish.check_access(spec.publish, token=token)
        token = publish.resolve_token(token)
    # Publishing with no output.dir: the local copy is temporary, in a fixed place per
    # repo so that a rerun resumes from its finished shards.
    temporary = spec.output.dir is None
    if spec.output.dir is not None:
        out_dir = Path(spec.output.dir)
    elif target is not None:
        from mergejob.publish import default_local_dir

        out_dir = default_local_dir(target)
    else:
        raise InputError("output.dir: required unless publish.repo_id is set")
    output.check_output_dir(out_dir, overwrite=spec.output.overwrite or temporary)
    timings = Timings()
    job = prepare(spec, token=token, timings=timings)
    inputs_of: Callable[[], list[dict[str, Any]]]
    if recorded_inputs is not None:  # a rerun from a recipe: fail before writing anything
        checked = check_recorded_inputs(job, recorded_inputs, timings)
        inputs_of = lambda: checked  # noqa: E731 - one of two ways to the same answer
    else:
        inputs_of = InputDigests(job).result  # for the recipe, beside the merge
    # The stream engine resumes from the finished shards an interrupted run left behind.
    resumable = spec.engine.name == "stream"
    partial = output.open_partial(out_dir, resume=resumable)
    uploader = start_uploader(spec, target, token) if target is not None else None
    published: PublishResult | None = None
    complete = False  # the output folder is finished; only publishing is left
    try:
        with timings.phase("merge", engine=spec.engine.name):
            report = run_engine(job, partial, on_shard_done=uploader)
        with timings.phase("write"):
            write_extras(job, partial)
            write_config(job, partial)
            write_card(
                job, partial, report, repo_id=target.repo_id if target else None, token=token
            )
        write_recipe(job, partial, report, timings, inputs=inputs_of())
        complete = True
        if target is not None:
            with timings.phase("publish", repo=target.display):
                published = publish_output(job, partial, target, uploader, token)
        if temporary:
            files = sorted(p.name for p in partial.iterdir() if not p.name.startswith("."))
            output.discard_partial(out_dir)
            final: Path | None = None
        else:
            # The shard records were kept until now, so that a rerun after a failed publish
            # merges nothing again; the finished folder does not need them.
            output.drop_records(partial)
            final = output.commit_partial(out_dir)
            files = sorted(p.name for p in final.iterdir())
    except BaseException as exc:
        if resumable and (complete or not isinstance(exc, InputError | MergeFailedError)):
            log.warning("kept %s: rerun the same job to resume from its finished shards", partial)
        else:
            output.discard_partial(out_dir)
        raise
    finally:
        if uploader is not None:
            uploader.close(wait=False)
    return MergeResult(
        output_dir=final,
        engine=report,
        files=files,
        seconds=time.monotonic() - started,
        timings=dict(timings.seconds),
        published=published,
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
    from mergejob.errors import SpecError

    raise SpecError(f"engine.name: {name!r}: unknown engine; use --engine stream or peft")


def write_config(job: PreparedJob, out_dir: Path) -> None:
    """config.json: what the engine wrote, with config_from and the overrides applied."""
    config_from = model_config.read_config(job.config_from.local_dir) if job.config_from else None
    if model_config.finalize_output_config(
        out_dir,
        job.base.local_dir,
        config_from=config_from,
        overrides=job.spec.config.overrides,
        output_dtype=job.output_dtype,
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
    inputs = [recipe.source_record("base", job.base, BASE_PATTERNS, workers=workers)]
    inputs += [
        recipe.source_record("adapter", a, ADAPTER_PATTERNS, workers=workers) for a in job.adapters
    ]
    if job.config_from is not None:
        inputs.append(
            recipe.source_record("config_from", job.config_from, CONFIG_PATTERNS, workers=workers)
        )
    return inputs


def check_recorded_inputs(
    job: PreparedJob, recorded: Sequence[Mapping[str, Any]], timings: Timings
) -> list[dict[str, Any]]:
    """Hash this job's inputs now and compare them with a recipe's record of the same
    inputs; returns the records (for the new recipe) or raises naming the changed files."""
    with timings.phase("inputs"):
        current = input_records(job)
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

    def __init__(self, job: PreparedJob) -> None:
        self._job = job
        self._value: list[dict[str, Any]] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mergejob-input-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = input_records(self._job, workers=1)
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


def start_uploader(spec: MergeSpec, target: HubTarget, token: str | None) -> ShardUploader:
    """The background uploader the engine hands each finished shard to. With
    ``delete_uploaded``, at most two finished shards wait for it (disk use stays bounded;
    with several local workers the bound holds for the shards they report, not for those
    they are still writing)."""
    from mergejob import publish

    token = publish.resolve_token(token)
    delete = bool(spec.publish and spec.publish.delete_uploaded)
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


def write_extras(job: PreparedJob, out_dir: Path) -> None:
    """Tokenizer, generation_config and chat template next to the weights."""
    source = output.choose_tokenizer_source(job.base.local_dir, job.adapter_dirs)
    copied = output.copy_tokenizer(source, out_dir)
    if copied:
        log.info("tokenizer from %s: %s", source, ", ".join(copied))
    else:
        log.warning("no tokenizer found in the base or any adapter; the output has none")
    if not (out_dir / "generation_config.json").is_file():
        output.copy_generation_config(job.base.local_dir, out_dir)
