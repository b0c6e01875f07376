"""One extraction over many workers: index ``i`` of ``n`` extracts its groups, index 0 ends it.

The merge's split (:mod:`mergejob.indexed`) with groups (layers) instead of output shards,
in the same settings: the pods of an Indexed Job (``JOB_COMPLETION_INDEX``, ``--index-count
n``) writing into one partial folder on a ReadWriteMany PVC, or ``mergejob submit --local
--workers n`` (``n`` processes here). Within a pod the share is split again as a one-pod
extraction is (``engine.workers`` processes on the CPU, one thread per GPU).

Which groups index ``i`` extracts is :func:`index_groups`, a pure function of the plan:
runs of consecutive groups balanced by the bytes they read
(:func:`mergejob.indexed.index_shards` over :meth:`ExtractionPlan.group_sizes`), so an index
reads, and with a Hub model downloads, its own stretch of both models' shards (the
:class:`~mergejob.extraction.inputs.Downloads` of its groups; the checks before the groups,
the LoRA layers' biases and the tensors no LoRA carries, are read by every index). Every
finished group leaves its part and record, so a pod killed half-way and started again with
the same index redoes only its unfinished groups; an index that is done leaves the merge's
marker in ``.mergejob-indexes/``.

Index 0, once its own groups are done, waits for every index's marker
(:func:`mergejob.indexed.wait_for_indexes`), extracts again any group whose part does not
hold its record (so a lost file never blocks the job), and then runs the one tail of
:func:`mergejob.extraction.job.extract` (:func:`~mergejob.extraction.job.finish_extraction`:
adapter, config, tokenizer, report, card, recipe, Hub commit, rename) once. The output is
byte for byte that of one pod: each group's bytes depend on the group alone. A retried index
0 finishes again idempotently: the output already finished, or the partial folder already
whole, is recognised by the same opening as a one-pod rerun
(:func:`~mergejob.extraction.job.start_extraction`). ``mergejob run --finalize`` of an
extraction is a one-pod ``extract`` of the same spec: it resumes every finished group.

Example (pod ``i`` of ``n``)::

    from mergejob.extraction.split import run_extract_index
    report = run_extract_index(spec, index=i, count=n)   # index 0 also finishes the adapter
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from mergejob import logs
from mergejob.errors import InputError, SpecError
from mergejob.extraction.engine import ExtractionOutcome, ProgressCallback
from mergejob.extraction.job import (
    StartedExtraction,
    finish_extraction,
    keeping_partial,
    run_engine,
    start_extraction,
)
from mergejob.extraction.plan import ExtractionPlan
from mergejob.extraction.writer import group_done, part_name, read_part
from mergejob.indexed import (
    IndexMarker,
    IndexReport,
    index_shards,
    read_marker,
    wait_for_indexes,
    write_marker,
)
from mergejob.spec import MergeSpec

log = logging.getLogger("mergejob")


def index_groups(
    plan: ExtractionPlan, count: int, index: int, sizes: Sequence[int] | None = None
) -> list[int]:
    """The groups (positions in ``plan.groups``) index ``index`` of ``count`` extracts: a
    run of consecutive groups, balanced by the bytes they read (``sizes``: the plan's
    :meth:`~ExtractionPlan.group_sizes`, when the caller has them); every group belongs to
    exactly one index."""
    return index_shards(plan.group_sizes() if sizes is None else sizes, count, index)


def run_extract_index(
    spec: MergeSpec,
    *,
    index: int,
    count: int,
    token: str | None = None,
    poll_seconds: float = 2.0,
    wait_timeout: float | None = None,
    recorded_inputs: Sequence[Mapping[str, Any]] | None = None,
) -> IndexReport:
    """Extract the groups of index ``index`` of ``count`` into the job's partial folder (on
    storage every index shares), leave its marker; index 0 then waits for the others and
    finishes the adapter. ``wait_timeout`` bounds index 0's wait; ``recorded_inputs``: a
    rerun from a recipe, checked by every index before it writes anything."""
    if count < 1:
        raise SpecError(f"--index-count {count}: must be at least 1")
    finalizes = index == 0
    job = start_extraction(
        spec, token=token, recorded_inputs=recorded_inputs, hash_inputs=finalizes, shared=True
    )
    plan = job.plan
    sizes = plan.group_sizes()
    mine = index_groups(plan, count, index, sizes)
    report = IndexReport(
        index=index,
        count=count,
        shards=[part_name(i) for i in mine],
        unit="group",
        verb="extracted",
    )
    if job.finished or (job.complete and not finalizes):
        log.info("index %d/%d: %s holds this extraction already", index, count, job.out_dir)
        report.already_finalized = True
        return report
    with keeping_partial(job):
        outcome = None
        if not job.complete:
            log.info(
                "index %d/%d: %d of %d group(s), %s of %s read (plan %s)",
                index,
                count,
                len(mine),
                len(sizes),
                logs.size_text(sum(sizes[i] for i in mine)),
                logs.size_text(sum(sizes)),
                plan.plan_id[:12],
            )
            report.resumed = _finished(job, mine)
            report.merged = [part_name(i) for i in mine if part_name(i) not in report.resumed]
            with job.timings.phase("extract", device=spec.engine.device, index=index):
                share = run_engine(
                    spec,
                    plan,
                    job.partial,
                    job.sources,
                    token=job.place.token,
                    groups=mine,
                    progress=_group_logger(index, count),
                )
            marker = IndexMarker(index, count, plan.plan_id, report.merged, report.resumed)
            write_marker(job.partial, marker)
            if not finalizes:
                return report
            wait_for_indexes(
                job.partial, plan, count, poll_seconds=poll_seconds, timeout=wait_timeout
            )
            outcome = gather(job, count, share.dropped)
        report.result = finish_extraction(job, outcome)
    return report


def _finished(job: StartedExtraction, groups: Sequence[int]) -> list[str]:
    """The parts of ``groups`` whose record holds (written by an earlier try)."""
    partial, plan_id = job.partial, job.plan.plan_id
    return [part_name(i) for i in groups if group_done(partial, plan_id, i)]


def _group_logger(index: int, count: int) -> ProgressCallback:
    def progress(done: int, total: int, label: str) -> None:
        # `mergejob status` reads these lines back from the pod's log.
        log.info(logs.index_shard_done_line(index, count, done, total, label, unit="group"))

    return progress


def gather(job: StartedExtraction, count: int, dropped: list[str]) -> ExtractionOutcome:
    """Every group's part, once every index has left its marker: a part whose record does
    not hold (a lost or damaged file) is extracted again here; ``dropped``: what the checks
    left out (the same in every index: they read the same tensors)."""
    plan, partial = job.plan, job.partial
    everything = range(len(plan.groups))
    whole = set(_finished(job, everything))
    redo = [i for i in everything if part_name(i) not in whole]
    if redo:
        log.warning("finaliser: %d group(s) without a whole part; extracting them here", len(redo))
        run_engine(job.spec, plan, partial, job.sources, token=job.place.token, groups=redo)
    resumed = 0
    for i in range(count):
        marker = read_marker(partial, i, count, plan.plan_id)
        resumed += len(marker.resumed) if marker is not None else 0
    parts = [partial / part_name(i) for i in everything]
    outcome = ExtractionOutcome(
        parts=parts,
        rows=[row for part in parts for row in read_part(part)[1]],
        dropped=dropped,
        resumed=resumed,
    )
    if not outcome.extracted:
        raise InputError(
            f"{plan.tuned_dir}: no group of any of the {count} indices holds a change: the "
            "fine-tuned model is the base itself (or include/exclude left out what changed)"
        )
    return outcome
