"""One merge over many workers: index ``i`` of ``n`` merges its shards, one step finalises.

The same code runs in every setting that splits a merge:

* the pods of an Indexed Job (``completionMode: Indexed``; Kubernetes sets
  ``JOB_COMPLETION_INDEX``, the Job's args give ``--index-count n``), all writing into one
  partial folder on shared storage (a ReadWriteMany PVC);
* ``mergejob submit --local --workers n``: ``n`` processes on this machine, each with its own
  ``JOB_COMPLETION_INDEX``;
* within one pod, the index's share is split again over the pod's GPUs (one worker each).

Which shards index ``i`` writes is :func:`index_shards`, a pure function of the plan's shard
sizes, ``n`` and ``i`` (balanced by bytes: :func:`mergejob.io.shards.assign_shards`). Every
finished shard leaves its record (size, sha256, plan id), so a pod killed half-way and
started again with the same index redoes only its unfinished shards. An index that has
finished (and uploaded, when publishing) leaves a marker in ``.mergejob-indexes/``.

The finalising step, and why it runs in index 0
-----------------------------------------------
Index 0, once its own shards are done, waits until every index has left its marker, then
checks every shard record against its file, writes the index, config, tokenizer, card and
recipe, makes the one Hub commit and renames the folder into place. Chosen over a second Job
submitted by the launcher because:

* it survives the launcher going away (a laptop closed after ``submit``): nothing outside
  the Indexed Job has to watch it;
* the Job's own state says the whole truth: Complete means the model is finished (and
  published), so ``mergejob wait``, ``kubectl wait`` and GitOps tools need nothing else;
* there is no race and no lock to go stale: only index 0 ever finalises, and at most one pod
  of an index runs at a time (with a ``podFailurePolicy`` the controller replaces a pod only
  once it has failed), so a retried index 0 just finalises again;
* the cost is index 0's idle wait for the slowest index, short because shares are balanced
  by bytes.

The finalising step is idempotent: run again on a finished output of the same plan it does
nothing (the recipe's ``plan_id`` says so); run again after a crash half-way it redoes what
is left (records are removed only once everything else is written). ``mergejob run
--finalize`` runs it alone, e.g. by hand after a Job whose index 0 was given up on.

Example (pod ``i`` of ``n``)::

    from mergejob.indexed import run_index
    report = run_index(spec, index=i, count=n)   # index 0 also finalises
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergejob import output, settings
from mergejob.errors import MergeFailedError, SpecError
from mergejob.io.shards import RECORDS_DIR, assign_shards
from mergejob.job import EngineReport, PreparedJob
from mergejob.recipe import Timings
from mergejob.spec import MergeSpec

if TYPE_CHECKING:
    from mergejob.pipeline import MergeResult
    from mergejob.plan.work import Plan
    from mergejob.publish import HubTarget, ShardUploader

log = logging.getLogger("mergejob")

INDEX_ENV = "JOB_COMPLETION_INDEX"
INDEX_COUNT_ENV = "MERGEJOB_INDEX_COUNT"
INDEXES_DIR = ".mergejob-indexes"
FINALIZED_SUFFIX = ".mergejob-finalized.json"
RECIPE_FILE = "mergejob.yaml"


# ---------------------------------------------------------------------------------------
# Who writes what


def index_shards(shard_sizes: Sequence[int], count: int, index: int) -> list[int]:
    """The shards (positions in the plan, in file order) that index ``index`` of ``count``
    writes: a pure function of the sizes, balanced by bytes. Every shard belongs to exactly
    one index; with more indices than shards, the extra ones get nothing."""
    if not 0 <= index < count:
        raise SpecError(f"index {index}: must be in 0..{count - 1} for {count} indices")
    return assign_shards(shard_sizes, count)[index]


def device_shares(
    shards: Sequence[int], shard_sizes: Sequence[int], devices: int
) -> list[list[int]]:
    """An index's shards split again over the pod's ``devices`` workers, by bytes."""
    split = assign_shards([shard_sizes[s] for s in shards], max(1, devices))
    return [[shards[i] for i in part] for part in split]


def index_from_env(environ: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """``(JOB_COMPLETION_INDEX, MERGEJOB_INDEX_COUNT)`` as integers (None where unset)."""
    environ = os.environ if environ is None else environ
    values: list[int | None] = []
    for name in (INDEX_ENV, INDEX_COUNT_ENV):
        raw = (environ.get(name) or "").strip()
        try:
            values.append(int(raw) if raw else None)
        except ValueError:
            raise SpecError(f"{name}={raw!r}: must be a whole number") from None
    return values[0], values[1]


# ---------------------------------------------------------------------------------------
# Markers: an index is done; a job is finalised


@dataclass
class IndexMarker:
    """Left by an index once its shards are finished (and uploaded, when publishing)."""

    index: int
    count: int
    plan_id: str
    merged: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)


def _marker_path(partial_dir: Path, index: int, count: int) -> Path:
    return Path(partial_dir) / INDEXES_DIR / f"{count}-{index}.json"


def write_marker(partial_dir: Path, marker: IndexMarker) -> None:
    path = _marker_path(partial_dir, marker.index, marker.count)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(marker), sort_keys=True))
    os.replace(tmp, path)


def read_marker(partial_dir: Path, index: int, count: int, plan_id: str) -> IndexMarker | None:
    """The marker of ``index`` for this plan, or None."""
    try:
        data = json.loads(_marker_path(partial_dir, index, count).read_text())
        marker = IndexMarker(**data)
    except (OSError, ValueError, TypeError):
        return None
    return marker if marker.plan_id == plan_id else None


def missing_indexes(partial_dir: Path, count: int, plan_id: str) -> list[int]:
    """The indices of ``count`` that have not yet left a marker of this plan."""
    return [i for i in range(count) if read_marker(partial_dir, i, count, plan_id) is None]


def _finalized_marker(out_dir: Path) -> Path:
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}{FINALIZED_SUFFIX}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _recipe_plan_id(out_dir: Path) -> str | None:
    try:
        recipe = yaml.safe_load((Path(out_dir) / RECIPE_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    engine = ((recipe or {}).get("recipe") or {}).get("engine") or {}
    plan_id = engine.get("plan_id") if isinstance(engine, dict) else None
    return str(plan_id) if plan_id else None


def finalized(out_dir: Path, plan: Plan, *, temporary: bool) -> bool:
    """Whether this plan's output is already finished (and published, for a publish-only
    job whose local copy is gone): the finaliser then has nothing to do."""
    partial = output.partial_dir_for(out_dir)
    if partial.exists():
        return False
    if temporary:
        marker = _read_json(_finalized_marker(out_dir))
        return marker.get("plan_id") == plan.plan_id and bool(marker.get("published"))
    return _recipe_plan_id(out_dir) == plan.plan_id


# ---------------------------------------------------------------------------------------
# One index


@dataclass
class IndexReport:
    """What one index did; ``result`` is set where it finalised."""

    index: int
    count: int
    shards: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    already_finalized: bool = False
    result: MergeResult | None = None

    def summary(self) -> str:
        """What ``mergejob run`` prints for this index."""
        lines = [
            f"index {self.index}/{self.count} done: {len(self.shards)} shard(s), "
            f"{len(self.merged)} merged, {len(self.resumed)} already finished"
        ]
        if self.already_finalized:
            lines.append("the output was already finalised: nothing to do")
        if self.result is not None:
            lines.append(self.result.summary())
        return "\n".join(lines)


@dataclass
class _Context:
    """Everything an index and the finaliser share: the prepared job, its plan, where."""

    spec: MergeSpec
    job: PreparedJob
    plan: Plan
    out_dir: Path
    partial: Path
    temporary: bool
    target: HubTarget | None
    token: str | None
    timings: Timings


def _context(spec: MergeSpec, token: str | None) -> _Context:
    from mergejob.pipeline import prepare
    from mergejob.plan.work import plan_for_job

    if spec.engine.name != "stream":
        raise SpecError(
            f"engine.name: {spec.engine.name!r}: a merge split over indices needs the stream "
            "engine (--engine stream); the peft engine spreads one pod's GPUs with device_map"
        )
    token = token if token is not None else settings.hub_token()
    target = None
    if spec.publish is not None:
        from mergejob import publish

        target = publish.check_access(spec.publish, token=token)
        token = publish.resolve_token(token)
    if spec.output.dir is not None:
        out_dir = Path(spec.output.dir)
    elif target is not None:
        from mergejob import publish

        out_dir = publish.default_local_dir(target)
    else:
        raise SpecError("output.dir: required unless publish.repo_id is set")
    timings = Timings()
    job = prepare(spec, token=token, timings=timings)
    return _Context(
        spec=spec,
        job=job,
        plan=plan_for_job(job),
        out_dir=out_dir,
        partial=output.partial_dir_for(out_dir),
        temporary=spec.output.dir is None,
        target=target,
        token=token,
        timings=timings,
    )


def _check_output(ctx: _Context) -> None:
    """An output folder holding something else is bad input, unless --overwrite."""
    if not ctx.temporary:
        output.check_output_dir(ctx.out_dir, overwrite=ctx.spec.output.overwrite)


def run_index(
    spec: MergeSpec,
    *,
    index: int,
    count: int,
    token: str | None = None,
    finalize: bool = True,
    poll_seconds: float = 2.0,
    wait_timeout: float | None = None,
) -> IndexReport:
    """Merge the shards of index ``index`` of ``count`` into the job's partial folder (on
    storage every index shares); index 0 then waits for the others and finalises.

    Resumes: shards whose record holds are kept. Publishing, each shard is preuploaded as it
    finishes; the finaliser makes the commit. ``wait_timeout`` bounds index 0's wait (a Job
    bounds it with ``activeDeadlineSeconds``; a failed index fails the Job and its pods).
    """
    if count < 1:
        raise SpecError(f"--index-count {count}: must be at least 1")
    ctx = _context(spec, token)
    plan = ctx.plan
    report = IndexReport(index=index, count=count)
    mine = index_shards(plan.shard_sizes(), count, index)
    report.shards = [plan.shards[i].name for i in mine]
    if finalized(ctx.out_dir, plan, temporary=ctx.temporary):
        log.info("index %d/%d: %s is already finished for this plan", index, count, ctx.out_dir)
        report.already_finalized = True
        return report
    _check_output(ctx)
    ctx.partial.mkdir(parents=True, exist_ok=True)
    size = sum(plan.shards[i].nbytes for i in mine)
    log.info(
        "index %d/%d: %d of %d shard(s), %.1f MB of %.1f MB (plan %s)",
        index,
        count,
        len(mine),
        len(plan.shards),
        size / 1e6,
        plan.output_bytes / 1e6,
        plan.plan_id[:12],
    )
    uploader = _uploader(ctx)
    # Index 0 writes the recipe: its inputs are hashed beside its merge and its wait.
    from mergejob.pipeline import InputDigests

    digests = InputDigests(ctx.job) if index == 0 and finalize else None
    try:
        with ctx.timings.phase("merge", engine="stream", index=index):
            merged, resumed = merge_shares(
                ctx,
                mine,
                on_shard_done=_shard_logger(index, count, len(mine), uploader),
            )
        if uploader is not None:
            uploader.wait()
    finally:
        if uploader is not None:
            uploader.close()
    report.merged, report.resumed = merged, resumed
    write_marker(
        ctx.partial,
        IndexMarker(index=index, count=count, plan_id=plan.plan_id, merged=merged, resumed=resumed),
    )
    if index == 0 and finalize:
        wait_for_indexes(ctx.partial, plan, count, poll_seconds=poll_seconds, timeout=wait_timeout)
        inputs = digests.result() if digests is not None else None
        report.result = finalize_output(ctx, count=count, inputs=inputs)
    return report


def _uploader(ctx: _Context) -> ShardUploader | None:
    if ctx.target is None:
        return None
    from mergejob import publish

    # Never delete_uploaded here: the finaliser re-reads every shard for its checksum.
    token = publish.resolve_token(ctx.token)
    return publish.ShardUploader(publish.hub_api(token), ctx.target, token=token)


def _shard_logger(
    index: int, count: int, total: int, uploader: ShardUploader | None
) -> Callable[[Path], None]:
    done = [0]

    def on_shard_done(path: Path) -> None:
        done[0] += 1
        # `mergejob status` reads these lines back from the pod's log.
        log.info("index %d/%d: shard %d/%d done: %s", index, count, done[0], total, path.name)
        if uploader is not None:
            uploader(path)

    return on_shard_done


def merge_shares(
    ctx: _Context, shards: Sequence[int], *, on_shard_done: Callable[[Path], None] | None = None
) -> tuple[list[str], list[str]]:
    """Write ``shards`` into the partial folder with the pod's workers (one per visible GPU
    for ``--device cuda``, else ``engine.workers`` CPU processes); returns (merged, resumed).
    """
    from mergejob.engines.stream import run_worker, worker_devices

    devices = worker_devices(ctx.spec.engine.device, ctx.spec.engine.workers)
    shares = device_shares(shards, ctx.plan.shard_sizes(), len(devices))
    busy = [(device, share) for device, share in zip(devices, shares, strict=True) if share]
    if len(busy) <= 1:
        device, share = busy[0] if busy else (devices[0], [])
        worker = run_worker(
            ctx.plan, ctx.partial, device=device, shards=share, on_shard_done=on_shard_done
        )
        return worker.merged, worker.resumed
    return _run_device_processes(ctx.plan, ctx.partial, busy, on_shard_done)


def _run_device_processes(
    plan: Plan,
    partial: Path,
    busy: list[tuple[str, list[int]]],
    on_shard_done: Callable[[Path], None] | None,
) -> tuple[list[str], list[str]]:
    """One spawned process per device; a shard is reported done once its process ends."""
    context = multiprocessing.get_context("spawn")
    results: Any = context.Queue()
    processes = [
        context.Process(
            target=_device_main,
            args=(plan, str(partial), device, share, len(busy), results),
            name=f"mergejob-device-{i}",
            daemon=True,
        )
        for i, (device, share) in enumerate(busy)
    ]
    for process in processes:
        process.start()
    merged: list[str] = []
    resumed: list[str] = []
    try:
        for _ in processes:
            kind, payload = results.get()
            if kind == "error":
                raise MergeFailedError(f"device worker: {payload}; rerun to resume")
            merged += payload[0]
            resumed += payload[1]
            if on_shard_done is not None:
                for name in payload[1] + payload[0]:
                    on_shard_done(partial / name)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=30)
    return merged, resumed


def _device_main(
    plan: Plan, partial: str, device: str, shards: list[int], workers: int, results: Any
) -> None:
    from mergejob.engines.stream import cpu_threads, run_worker

    try:
        report = run_worker(
            plan,
            Path(partial),
            device=device,
            shards=shards,
            threads=cpu_threads(workers) if device == "cpu" else None,
        )
        results.put(("done", (report.merged, report.resumed)))
    except BaseException as exc:
        results.put(("error", f"{device}: {type(exc).__name__}: {exc}"))
        raise


def wait_for_indexes(
    partial: Path,
    plan: Plan,
    count: int,
    *,
    poll_seconds: float = 2.0,
    timeout: float | None = None,
) -> None:
    """Block until every index of ``count`` has left its marker for this plan (polled:
    shared file systems cache directory listings for a while, re-reading sees past that)."""
    started = time.monotonic()
    said = 0.0
    while True:
        missing = missing_indexes(partial, count, plan.plan_id)
        if not missing:
            return
        waited = time.monotonic() - started
        if timeout is not None and waited >= timeout:
            raise MergeFailedError(
                f"{partial}: index(es) {', '.join(map(str, missing))} of {count} have not "
                f"finished after {waited:.0f}s; see `mergejob status`, then rerun"
            )
        if waited - said >= 30 or said == 0:
            log.info("finaliser: waiting for index(es) %s of %d", missing, count)
            said = waited or 1e-9
        time.sleep(poll_seconds)


# ---------------------------------------------------------------------------------------
# The finalising step


def finalize_job(
    spec: MergeSpec, *, token: str | None = None, count: int | None = None
) -> MergeResult | None:
    """``mergejob run --finalize``: check every shard, write the rest, commit. Returns None
    when the output is already finished for this plan (idempotent)."""
    ctx = _context(spec, token)
    if finalized(ctx.out_dir, ctx.plan, temporary=ctx.temporary):
        log.info("finaliser: %s is already finished for this plan", ctx.out_dir)
        return None
    if not ctx.partial.is_dir():
        raise MergeFailedError(
            f"{ctx.partial}: no partial output; run the indices first (mergejob run --index)"
        )
    return finalize_output(ctx, count=count)


def finalize_output(
    ctx: _Context, *, count: int | None, inputs: list[dict[str, Any]] | None = None
) -> MergeResult:
    """Every shard's record checked (re-read for its sha256), then index, config, tokenizer,
    card and recipe, the Hub commit, and the rename into place. A shard whose record does
    not hold is merged again here, so a corrupted file never blocks the job."""
    from mergejob import pipeline
    from mergejob.engines.stream import finalize, run_worker
    from mergejob.pipeline import MergeResult

    plan, partial = ctx.plan, ctx.partial
    started = time.monotonic()
    _check_output(ctx)
    _remove_foreign_files(plan, partial)
    with ctx.timings.phase("finalize"):
        try:
            records = finalize(plan, partial, verify_checksums=True, keep_records=True)
        except MergeFailedError as exc:
            log.warning("finaliser: %s; merging those shards here", str(exc).splitlines()[0])
            names = set(_unfinished(plan, partial))
            redo = [i for i, s in enumerate(plan.shards) if s.name in names]
            run_worker(plan, partial, shards=redo)
            records = finalize(plan, partial, verify_checksums=True, keep_records=True)
    report = EngineReport(
        engine="stream",
        tensors_changed=plan.changed_tensors,
        extra={
            "workers": count or 1,
            "device": ctx.spec.engine.device,
            "shards": len(plan.shards),
            "plan_id": plan.plan_id,
            "shard_records": {r.name: {"size": r.size, "sha256": r.sha256} for r in records},
        },
    )
    job = ctx.job
    with ctx.timings.phase("write"):
        pipeline.write_extras(job, partial)
        pipeline.write_config(job, partial)
        pipeline.write_card(
            job,
            partial,
            report,
            repo_id=ctx.target.repo_id if ctx.target else None,
            token=ctx.token,
        )
    pipeline.write_recipe(job, partial, report, ctx.timings, inputs=inputs)
    marker_path = _finalized_marker(ctx.out_dir)
    marker = _read_json(marker_path)
    published = None
    if ctx.target is not None and not (
        marker.get("plan_id") == plan.plan_id and marker.get("published")
    ):
        with ctx.timings.phase("publish", repo=ctx.target.display):
            published = pipeline.publish_output(job, partial, ctx.target, None, ctx.token)
        _write_json(marker_path, {"plan_id": plan.plan_id, "published": published.commit_url})
    # Last: the records and markers (a crash before this point redoes the step).
    output.drop_records(partial)
    shutil.rmtree(partial / INDEXES_DIR, ignore_errors=True)
    if ctx.temporary:
        files = sorted(p.name for p in partial.iterdir() if not p.name.startswith("."))
        output.discard_partial(ctx.out_dir)
        final = None
    else:
        final = output.commit_partial(ctx.out_dir)
        files = sorted(p.name for p in final.iterdir())
        marker_path.unlink(missing_ok=True)
    log.info("finaliser: %d shard(s) checked and committed", len(records))
    return MergeResult(
        output_dir=final,
        engine=report,
        files=files,
        seconds=time.monotonic() - started,
        timings=dict(ctx.timings.seconds),
        published=published,
    )


def _unfinished(plan: Plan, partial: Path) -> list[str]:
    from mergejob.io.shards import read_record, record_holds

    return [
        s.name
        for s in plan.shards
        if not record_holds(partial, read_record(partial, s.name), plan.plan_id)
    ]


def _remove_foreign_files(plan: Plan, partial: Path) -> None:
    """What no index of this plan wrote (other plans' shards, half-written files, a crashed
    finaliser's extras) goes before the finaliser writes; records and markers stay."""
    output.remove_all_but(partial, {s.name for s in plan.shards} | {RECORDS_DIR, INDEXES_DIR})


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def check_index_args(index: int | None, count: int | None) -> tuple[int, int]:
    """``--index``/``--index-count`` (or their variables) made whole: both or neither."""
    if count is None:
        raise SpecError(
            f"--index {index}: give the number of indices too (--index-count, or {INDEX_COUNT_ENV})"
        )
    if index is None:
        raise SpecError(
            f"--index-count {count}: give this worker's index too (--index, or {INDEX_ENV}, "
            "which an Indexed Job sets)"
        )
    if count < 1 or not 0 <= index < count:
        raise SpecError(f"--index {index} --index-count {count}: need 0 <= index < count")
    return index, count
