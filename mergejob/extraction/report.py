"""What an extraction did and what one would cost.

``extraction_report`` is the report written as ``extraction.json`` beside the adapter (and as
a table in its card): per module its kind, shape, rank, the kept fraction of ‖ΔW‖², the
relative error ‖ΔW - B A‖_F / ‖ΔW‖_F of the factors as stored, the Eckart-Young optimum
``sqrt(Σ discarded σ²) / ‖ΔW‖_F`` where the full SVD gave it, and ``bias: true`` where the
layer's changed bias is carried as ``lora_B``'s bias (``lora_bias``; a layer whose weight
did not change then has zero factors of rank 1, ``method: none``). A LoRA layer saved whole
because its bias changed where ``lora_bias`` cannot carry it is a ``full`` row with a
``reason`` (``bias changed; lora_bias blocked by <layer>``).

``ExtractionPlanReport`` is what ``mergejob plan`` prints for an extraction: the modules (by
kind and shape), the ranks it will allow, the SVD method, notices and problems, the adapter's
largest size, the disk, the peak memory and a time estimate from throughput constants
measured on the 2-core benchmark machine (``bench/bench_extract.py``; a faster machine
finishes sooner, so they are an upper bound there).

Example::

    report = extraction_report(plan, outcome.rows, dropped=outcome.dropped)
    write_report(folder, report)
    print(markdown_table(report["modules"]))
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergejob import logs, settings
from mergejob.extraction.plan import ExtractionPlan, ModuleWork, plan_extraction
from mergejob.extraction.svd import (
    BLOCK_ELEMENTS,
    MAX_KRYLOV_BLOCKS,
    OVERSAMPLE_MIN,
    uses_randomized,
)
from mergejob.extraction.writer import factor_bytes
from mergejob.fetch import DEFAULT_AHEAD
from mergejob.io.header_view import header_view
from mergejob.io.headers import DTYPE_SIZES, file_size, hub_headers
from mergejob.io.shards import assign_runs
from mergejob.spec import MergeSpec

REPORT_FORMAT = 1
GB = 10**9


def extraction_report(
    plan: ExtractionPlan, rows: Sequence[Mapping[str, Any]], *, dropped: Sequence[str] = ()
) -> dict[str, Any]:
    """``extraction.json``: the settings, a summary, and one row per module."""
    extracted = [r for r in rows if r.get("status") == "extracted"]
    full = [r for r in rows if r.get("status") == "full"]
    ranks = [int(r["rank"]) for r in extracted]
    errors = [float(r["error"]) for r in extracted]
    summary: dict[str, Any] = {
        "modules": len(rows),
        "lora": len(extracted),
        "full": len(full),
        "identical": sum(1 for r in rows if r.get("status") == "identical"),
        "rank_min": min(ranks, default=0),
        "rank_max": max(ranks, default=0),
        "error_max": max(errors, default=0.0),
        "error_mean": sum(errors) / len(errors) if errors else 0.0,
        "biases": sum(1 for r in extracted if r.get("bias")),
    }
    norms = [float(r.get("norm", 0.0)) for r in extracted]
    total = sum(n * n for n in norms)
    if total > 0:
        # Over all LoRA modules together: the fraction of Σ‖ΔW‖² the adapter keeps.
        kept = sum(float(r["kept"]) * n * n for r, n in zip(extracted, norms, strict=True))
        summary["kept_overall"] = kept / total
    return {
        "format": REPORT_FORMAT,
        "settings": plan.settings.model_dump(mode="json", exclude={"finetuned"}),
        "summary": summary,
        "dropped": list(dropped),
        "excluded": list(plan.excluded),
        "modules": [dict(r) for r in rows],
    }


def write_report(folder: Path, report: Mapping[str, Any]) -> Path:
    """Write ``extraction.json`` (sorted keys, 2-space indent)."""
    path = Path(folder) / settings.EXTRACTION_REPORT_FILE
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return path


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    value = float(value)
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def _bias_cell(row: Mapping[str, Any]) -> str:
    if row.get("bias"):
        return "Δb"
    return "whole" if row.get("reason") else "-"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-module table of the card (identical modules left out)."""
    lines = [
        "| module | kind | shape | rank | kept ‖ΔW‖² | relative error | optimum | bias |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("status") == "identical":
            continue
        shape = "x".join(str(d) for d in row.get("shape", []))
        kind = "full (modules_to_save)" if row.get("status") == "full" else str(row.get("kind"))
        lines.append(
            f"| `{row['module']}` | {kind} | {shape} | {row.get('rank', '-')} "
            f"| {_number(row.get('kept'), 6)} | {_number(row.get('error'))} "
            f"| {_number(row.get('optimal_error'))} | {_bias_cell(row)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The plan of an extraction


@dataclass(frozen=True)
class ExtractThroughput:
    """Rates of the time estimate, measured by ``bench/bench_extract.py`` on the 2-core
    benchmark machine (bench/RESULTS.md); ``gpu_flops`` is an assumption (fp32 on one
    datacenter GPU)."""

    startup_s: float = 8.0  # imports (torch, transformers, peft)
    read_bps: float = 0.4 * GB  # both checkpoints read with pread, fp32 ΔW formed
    cpu_flops: float = 60e9  # fp32 GEMM, the Krylov products (fitted: 1.1B and 2.1B runs)
    svd_flops: float = 1.5e9  # LAPACK's full SVD (gesdd), counted as 4m²n + 8m³
    gpu_flops: float = 20e12
    krylov_blocks: int = 15  # typical for fine-tuning deltas (14-15 measured; at most 32)
    base_rss: int = 450 * 10**6  # python, torch, transformers and peft imported
    worker_rss: int = 250 * 10**6  # a worker process: python, torch, the engine (233 MB)


THROUGHPUT = ExtractThroughput()


@dataclass
class ModuleLine:
    """Modules of one kind, leaf name and shape, as the plan lists them."""

    name: str
    kind: str
    shape: list[int]
    count: int
    max_rank: int | None
    method: str


@dataclass
class IndexShare:
    """One index's share of an extraction split over an Indexed Job (``plan
    --index-count N``): its groups (a run, first to last), the bytes they read and, from
    the Hub, the bytes of the shards they read (downloaded by that index)."""

    index: int
    groups: list[int]
    read_bytes: int
    download_bytes: int = 0


@dataclass
class ExtractionPlanReport:
    """Everything ``mergejob plan`` prints for an extraction."""

    base: str
    finetuned: str
    output_dir: str | None
    device: str
    settings: dict[str, Any]
    workers: int = 1  # processes on the CPU (engine.workers; one on GPUs)
    modules: list[ModuleLine] = field(default_factory=list)
    tensors_total: int = 0
    excluded: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    adapter_bytes_max: int = 0
    read_bytes: int = 0
    download_bytes: int = 0
    # With engine.delete_downloaded: the most the streamed shards hold on disk at once.
    download_window_bytes: int = 0
    disk_bytes: int = 0
    memory_bytes: int = 0
    gpu_bytes: int = 0
    seconds: float = 0.0
    strict: bool = False
    index_shares: list[IndexShare] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not (self.strict and self.notices)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["task"] = "extract"
        return data

    def render(self) -> str:
        """The human-readable plan."""
        lines = [
            f"plan: extract {self.finetuned} - {self.base} as a LoRA adapter -> "
            f"{self.output_dir or '(no folder)'} (device {self.device}"
            + (f", {self.workers} workers)" if self.workers > 1 else ")"),
            f"settings: max_rank {self.settings.get('max_rank')}, "
            f"min_energy {self.settings.get('min_energy')}, "
            f"sv_epsilon {self.settings.get('sv_epsilon')}, "
            f"embeddings {self.settings.get('embeddings')}, svd {self.settings.get('svd')}, "
            f"dtype {self.settings.get('dtype')}",
            "",
            f"modules: {sum(m.count for m in self.modules)} ({self.tensors_total} tensors)",
        ]
        for m in self.modules:
            rank = f"rank <= {m.max_rank}" if m.max_rank is not None else "whole if changed"
            lines.append(f"  {m.count:4d} x {m.name} {m.kind} {list(m.shape)}: {rank} ({m.method})")
        if self.excluded:
            lines.append(f"  left out by include/exclude: {len(self.excluded)}")
        lines += [
            "",
            f"adapter: at most {logs.size_text(self.adapter_bytes_max)} (every module at its largest "
            "rank, every full module changed)",
            f"reads: {logs.size_text(self.read_bytes)} from both checkpoints"
            + (f"; download {logs.size_text(self.download_bytes)}" if self.download_bytes else ""),
            f"disk: {logs.size_text(self.disk_bytes)} needed (output, its parts, downloads"
            + (
                f": a window of {logs.size_text(self.download_window_bytes)} of shards, "
                "--delete-downloaded)"
                if self.download_window_bytes
                else ")"
            ),
            f"memory: {logs.size_text(self.memory_bytes)} RAM"
            + (f", {logs.size_text(self.gpu_bytes)} per GPU" if self.gpu_bytes else "")
            + (
                f" (each of {self.workers} workers: the largest module's ΔW and decomposition)"
                if self.workers > 1
                else " (the largest module's ΔW and decomposition)"
            ),
            f"time: ~{logs.duration_text(self.seconds)}",
            "",
        ]
        for share in self.index_shares:
            first, last = (share.groups[0], share.groups[-1]) if share.groups else (0, -1)
            lines.append(
                f"index {share.index}/{len(self.index_shares)}: "
                + (f"groups {first}-{last} ({len(share.groups)})" if share.groups else "no group")
                + f", reads {logs.size_text(share.read_bytes)}"
                + (
                    f"; downloads {logs.size_text(share.download_bytes)}"
                    if share.download_bytes
                    else ""
                )
            )
        if self.index_shares:
            lines.append("")
        if self.problems:
            lines.append(f"problems ({len(self.problems)}):")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append("problems: none")
        if self.notices:
            lines.append(f"notices ({len(self.notices)}):")
            lines += [f"  - {n}" for n in self.notices]
        return "\n".join(lines)


def _leaf(module: str) -> str:
    parts = module.split(".")
    generic = [p if not p.isdigit() else "N" for p in parts]
    return ".".join(generic)


def _method(module: ModuleWork, plan: ExtractionPlan) -> str:
    if module.kind == "full":
        return "copied"
    shape = (min(module.shape), max(module.shape))
    return (
        "randomized SVD"
        if uses_randomized(shape, plan.settings.max_rank, plan.settings.svd)
        else "full SVD"
    )


def _svd_cost(module: ModuleWork, plan: ExtractionPlan, throughput: ExtractThroughput) -> float:
    """CPU seconds of one module's decomposition (fp32 products, or LAPACK's full SVD)."""
    m, n = min(module.shape), max(module.shape)
    rank = plan.settings.max_rank
    if uses_randomized((m, n), rank, plan.settings.svd):
        width = rank + max(rank // 2, OVERSAMPLE_MIN)
        products = 2 * throughput.krylov_blocks + 1  # + the residual's B @ A
        return products * 2.0 * m * n * width / throughput.cpu_flops
    return (4.0 * m * m * n + 8.0 * m**3) / throughput.svd_flops


def module_memory(module: ModuleWork, plan: ExtractionPlan) -> int:
    """Peak bytes for one module: its fp32 ΔW, the read buffers, and the decomposition's
    work space (the full SVD's U and Vᵀ and LAPACK's copy, or the Krylov basis)."""
    if module.kind == "full":
        return sum(plan.base[n].nbytes + plan.tuned[n].nbytes for n in module.tensors)
    m, n = min(module.shape), max(module.shape)
    delta = 4 * m * n
    buffers = min(2 * 64 * 2**20, delta) + 3 * 4 * BLOCK_ELEMENTS  # reads; norm blocks
    rank = plan.settings.max_rank
    if uses_randomized((m, n), rank, plan.settings.svd):
        width = rank + max(rank // 2, OVERSAMPLE_MIN)
        cols = width * max(1, min(m // 2 // width, MAX_KRYLOV_BLOCKS))
        work = (8 + 4) * n * cols + (4 + 8) * m * cols  # Q (fp64), U; Z, Z in fp64
    else:
        work = 4 * (m * m + m * n) + delta  # U, Vᵀ (reduced) and gesdd's copy of ΔW
    return delta + buffers + work


def plan_report_for(
    plan: ExtractionPlan,
    *,
    base: str,
    finetuned: str,
    output_dir: str | None,
    device: str,
    workers: int = 1,
    download_bytes: int = 0,
    download_window_bytes: int = 0,
    strict: bool = False,
    throughput: ExtractThroughput = THROUGHPUT,
) -> ExtractionPlanReport:
    """The plan report of ``plan`` (its problems and notices included).
    ``download_window_bytes``: with ``engine.delete_downloaded``, the most the downloads
    hold on disk at once (0: they all stay)."""
    settings_ = plan.settings
    on_gpu = device.startswith(("cuda", "auto"))
    report = ExtractionPlanReport(
        base=base,
        finetuned=finetuned,
        output_dir=output_dir,
        device=device,
        workers=1 if on_gpu else workers,
        settings=settings_.model_dump(mode="json", exclude={"finetuned"}),
        tensors_total=len(plan.base),
        excluded=list(plan.excluded),
        problems=list(plan.problems),
        notices=list(plan.notices),
        download_bytes=download_bytes,
        download_window_bytes=download_window_bytes,
        strict=strict,
    )
    lines: dict[tuple[str, str, tuple[int, ...], str], ModuleLine] = {}
    seconds = throughput.startup_s
    for module in plan.modules:
        method = _method(module, plan)
        shape = module.shape or plan.tuned[module.tensors[0]].shape
        key = (_leaf(module.module), module.kind, tuple(shape), method)
        line = lines.get(key)
        if line is None:
            max_rank = None if module.kind == "full" else min(settings_.max_rank, *module.shape)
            line = ModuleLine(key[0], module.kind, list(shape), 0, max_rank, method)
            lines[key] = line
        line.count += 1
        if module.kind == "full":
            report.adapter_bytes_max += sum(plan.tuned[n].nbytes for n in module.tensors)
        else:
            rank = min(settings_.max_rank, *module.shape)
            factors = factor_bytes((module.shape[0], module.shape[1]), rank, settings_.dtype)
            report.adapter_bytes_max += factors
            if module.bias is not None:
                # lora_B's bias where a bias changed, or the layer saved whole where
                # lora_bias cannot carry it (its tuned weight and bias): the larger.
                bias = module.lora_shape[0] * DTYPE_SIZES[settings_.dtype]
                whole = sum(plan.tuned[n].nbytes for n in module.tensors)
                report.adapter_bytes_max += max(bias, whole - factors)
            seconds += _svd_cost(module, plan, throughput) * (
                throughput.cpu_flops / throughput.gpu_flops if on_gpu else 1
            )
    report.modules = list(lines.values())
    report.read_bytes = plan.input_bytes
    seconds += report.read_bytes / throughput.read_bps
    report.seconds = seconds
    largest = max((module_memory(m, plan) for m in plan.modules), default=0)
    report.memory_bytes = throughput.base_rss + largest
    if report.workers > 1:  # each worker holds its module; the parent none
        report.memory_bytes = throughput.base_rss + report.workers * (
            throughput.worker_rss + largest
        )
    if on_gpu:
        report.gpu_bytes = report.memory_bytes
    # The parts and the assembled adapter are both on disk before the parts go.
    on_disk = min(download_bytes, download_window_bytes or download_bytes)
    report.disk_bytes = 2 * report.adapter_bytes_max + on_disk
    return report


def extraction_plan_report(
    spec: MergeSpec,
    *,
    token: str | None = None,
    strict: bool = False,
    index_count: int | None = None,
) -> ExtractionPlanReport:
    """Check the extraction ``spec`` describes and estimate it from headers and configs: a
    Hub model's headers come over HTTP range requests (kilobytes, whatever its size).
    ``index_count``: the job runs as an Indexed Job of that many indices: each one's share."""
    from mergejob.sources import BASE_SMALL_PATTERNS, resolve_source

    assert spec.extract is not None
    sources = [
        resolve_source(spec.base, role="base model", patterns=BASE_SMALL_PATTERNS, token=token),
        resolve_source(
            spec.extract.finetuned,
            role="fine-tuned model",
            patterns=BASE_SMALL_PATTERNS,
            token=token,
        ),
    ]
    remote: list[dict[str, dict[str, Any]] | None] = []
    download = window = 0
    engine = spec.engine
    # A group waits for its files while the others' are fetched ahead (inputs.Downloads):
    # per model, the shards ahead, one for the checks and one per group read at once.
    held = DEFAULT_AHEAD + 1 + max(1, engine.workers)
    for source in sources:
        if source.repo_id is None:
            remote.append(None)
            continue
        headers = hub_headers(source.repo_id, source.commit or source.spec.revision, token)
        remote.append(headers)
        sizes = [file_size(h) for h in headers.values()]
        download += sum(sizes)
        window += min(sum(sizes), held * max(sizes, default=0))
    with (
        header_view(sources[0].local_dir, remote_headers=remote[0]) as base_view,
        header_view(sources[1].local_dir, remote_headers=remote[1]) as tuned_view,
    ):
        plan = plan_extraction(
            spec.extract,
            sources[0].local_dir,
            sources[1].local_dir,
            base_view=base_view.folder,
            tuned_view=tuned_view.folder,
            trust_remote_code=spec.base.trust_remote_code,
        )
        plan.problems[:0] = base_view.problems + tuned_view.problems
        report = plan_report_for(
            plan,
            base=spec.base.display(),
            finetuned=spec.extract.finetuned.display(),
            output_dir=spec.output.dir,
            device=spec.engine.device,
            workers=spec.engine.workers,
            download_bytes=download,
            download_window_bytes=window if engine.delete_downloaded else 0,
            strict=strict,
        )
        if index_count and index_count > 0:
            report.index_shares = index_shares(plan, index_count, remote)
        return report


def index_shares(
    plan: ExtractionPlan, count: int, remote: Sequence[Mapping[str, Any] | None] = (None, None)
) -> list[IndexShare]:
    """Each index's share of ``plan`` over ``count`` indices (the split of
    :mod:`mergejob.extraction.split`); ``remote``: each model's Hub headers by file name
    (None for a local folder), for the bytes an index downloads."""
    sizes = plan.group_sizes()
    shares = []
    for index, groups in enumerate(assign_runs(sizes, count)):
        files = {
            (side, Path(refs[n].path).name)
            for i in groups
            for m in plan.groups[i]
            for n in m.tensors
            for side, refs in enumerate((plan.base, plan.tuned))
        }
        download = sum(
            file_size(headers[name])
            for side, name in files
            if (headers := remote[side]) is not None and name in headers
        )
        shares.append(IndexShare(index, groups, sum(sizes[i] for i in groups), download))
    return shares
