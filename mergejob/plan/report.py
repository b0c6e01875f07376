"""``mergejob plan``: a job checked and costed from safetensors headers and adapter configs.

No weight is read. The base is seen through a *header view* (:mod:`mergejob.io.header_view`):
a temporary folder whose safetensors files hold the real headers followed by a sparse hole as
long as the data the header declares (no disk used). For a local base that view tolerates a
truncated download (it is reported, and every other check still runs); for a Hub base the
headers come from HTTP range requests (``get_safetensors_metadata``), so planning a 70B job
downloads kilobytes. The stream engine's :func:`mergejob.plan.work.build_plan` then runs on
that view, which is also the check ``mergejob merge``/``run`` make before reading a weight.

The report gives, per adapter, its method, targets, ranks, alpha, scale and variant; the
tensors that change; every problem (exit 2) and every notice (untied embeddings, resized
vocabulary, ignored adapter tensors; exit 0, or 2 with ``--strict``); the output's dtype and
size; the disk needed (download cache + output); the peak memory of each engine; and a time
estimate from throughput constants measured by ``bench/bench_plan_estimate.py``.

Example::

    from mergejob.plan.report import plan_report
    report = plan_report(spec)
    print(report.render())
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergejob import logs, settings
from mergejob.adapter_config import adapter_weights_path, read_adapter_config
from mergejob.errors import InputError, MergeJobError
from mergejob.fetch import DEFAULT_AHEAD
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.header_view import header_view
from mergejob.io.headers import FLOAT_DTYPES, TensorRef, file_size, hub_headers, read_header
from mergejob.io.shards import assign_runs
from mergejob.plan.checks import (
    Problems,
    check_lora_shapes,
    check_output_apart,
    check_output_config,
    output_dtype,
)
from mergejob.plan.cost import (
    THROUGHPUT,
    JobSizes,
    MemoryEstimate,
    Throughput,
    peft_memory,
    peft_seconds,
    stream_memory,
    stream_seconds,
)
from mergejob.spec import MergeSpec

if TYPE_CHECKING:
    from mergejob.plan.work import Plan
    from mergejob.sources import ResolvedSource

log = logging.getLogger(__name__)

# PEFT methods that change the model's inputs, not its weights: nothing to merge.
NOT_MERGEABLE = frozenset(
    {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "MULTITASK_PROMPT_TUNING"}
)


# ---------------------------------------------------------------------------------------
# The report


@dataclass
class AdapterSummary:
    """One adapter as the plan sees it."""

    source: str
    weight: float
    method: str  # PEFT type, e.g. LORA
    variant: str  # lora, rslora, dora, rslora+dora
    targets: list[str]
    modules: int
    ranks: list[int]
    alphas: list[float]
    scales: list[float]
    full_tensors: dict[str, str]  # module -> role (modules_to_save, base_layer, plain)


@dataclass
class PlanReport:
    """Everything ``mergejob plan`` prints."""

    base: str
    engine: str
    device: str
    workers: int
    output_dir: str | None
    output_dtype: str | None
    adapters: list[AdapterSummary] = field(default_factory=list)
    tensors_total: int = 0
    changed_tensors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    output_bytes: int = 0
    shards: int = 0
    largest_shard_bytes: int = 0
    download_bytes: int = 0
    disk: dict[str, Any] = field(default_factory=dict)
    memory: list[MemoryEstimate] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    # The base's values read to check the output dtype holds them (only when it is narrower
    # than the stored one): {"dtype", "tensors", "bytes_read", "unread"}; empty: none read.
    ranges: dict[str, Any] = field(default_factory=dict)
    # A Hub base the stream engine fetches shard by shard: its largest shard, and the bytes
    # each index of an Indexed Job downloads (with --index-count N).
    streamed: bool = False
    largest_input_shard_bytes: int = 0
    index_downloads: list[int] = field(default_factory=list)
    strict: bool = False
    # A MoE base (transformers fuses its experts at run time): {"layers", "experts"
    # (per layer), "changed": expert tensors on disk each adapter changes}; empty: not MoE.
    experts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and not (self.strict and self.notices)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["tensors_changed"] = len(self.changed_tensors)
        return data

    def render(self) -> str:
        """The human-readable plan."""
        lines = [
            f"plan: {len(self.adapters)} adapter(s) into {self.base} -> "
            f"{self.output_dir or '(no folder)'} (engine {self.engine} on {self.device}, "
            f"{self.workers} worker(s))",
            "",
            "adapters:",
        ]
        for i, a in enumerate(self.adapters):
            lines.append(f"  [{i}] {a.source}  {a.method} ({a.variant}), weight {a.weight:g}")
            if a.modules:
                lines.append(
                    f"      targets {', '.join(a.targets) or '-'} ({a.modules} modules); "
                    f"rank {_listed(a.ranks)}; alpha {_listed(a.alphas)}; "
                    f"scale {_listed(a.scales)}"
                )
            for module, role in sorted(a.full_tensors.items()):
                lines.append(f"      full tensor {module} ({role})")
        lines += [
            "",
            f"changes: {len(self.changed_tensors)} of {self.tensors_total} base tensors",
        ]
        if self.experts:
            changed = ", ".join(
                f"adapter {i} changes {n} expert tensors"
                for i, n in enumerate(self.experts["changed"])
            )
            lines.append(
                f"experts: {self.experts['layers']} MoE layers of {self.experts['experts']} "
                f"experts each (one tensor per expert on disk){f'; {changed}' if changed else ''}"
            )
        if self.config:
            lines.append(f"config.json: {json.dumps(self.config, sort_keys=True)}")
        lines += [
            "",
            f"output: {self.output_dtype or '?'}, {logs.size_text(self.output_bytes)} in "
            f"{self.shards} shard(s) (largest {logs.size_text(self.largest_shard_bytes)})",
        ]
        if self.disk:
            free = ", ".join(
                f"{where} {logs.size_text(n)} free"
                for where, n in self.disk.get("free", {}).items()
            )
            lines.append(
                f"disk: {logs.size_text(self.disk['needed_bytes'])} needed "
                f"({logs.size_text(self.download_bytes)} download cache + "
                f"{logs.size_text(self.disk['output_bytes'])} output){f'; {free}' if free else ''}"
            )
        if self.disk.get("windowed_bytes"):
            lines.append(
                f"disk with --delete-downloaded and --delete-uploaded: about "
                f"{logs.size_text(self.disk['windowed_bytes'])} (a window of shards, not the model)"
            )
        if self.streamed:
            lines.append(
                "download: the base's shards one file at a time as the merge needs them "
                "(stream engine), uploaded as they are written when publishing"
            )
        for i, nbytes in enumerate(self.index_downloads):
            lines.append(
                f"index {i}/{len(self.index_downloads)}: downloads {logs.size_text(nbytes)}"
            )
        for m in self.memory:
            gpu = f", {logs.size_text(m.gpu_bytes)} per GPU" if m.gpu_bytes else ""
            note = f" ({m.note})" if m.note else ""
            lines.append(
                f"memory, {m.engine} engine: {logs.size_text(m.host_bytes)} RAM{gpu}{note}"
            )
        for engine, seconds in self.seconds.items():
            lines.append(f"time, {engine} engine: ~{logs.duration_text(seconds)}")
        if self.ranges:
            lines.append(
                f"values: read {logs.size_text(self.ranges['bytes_read'])} of base weights "
                f"({self.ranges['tensors']} tensors) to check that {self.ranges['dtype']} "
                "holds them"
            )
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


def _listed(values: Sequence[Any]) -> str:
    if not values:
        return "-"
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


# ---------------------------------------------------------------------------------------
# Building the report


def plan_report(
    spec: MergeSpec,
    *,
    token: str | None = None,
    strict: bool = False,
    index_count: int | None = None,
) -> PlanReport:
    """Check ``spec`` and estimate it, reading headers and configs only.

    ``index_count``: the job runs as an Indexed Job of that many indices; the report says
    how many bytes of the base each index reads (and, for a Hub base, downloads).

    Problems that make the merge impossible are collected in ``problems`` (every one that can
    be found, not only the first); bad input that stops planning itself (a base that does not
    exist, a spec error) is raised.
    """
    from mergejob.sources import (
        ADAPTER_PATTERNS,
        BASE_SMALL_PATTERNS,
        CONFIG_PATTERNS,
        resolve_source,
    )

    report = PlanReport(
        base=spec.base.display(),
        engine=spec.engine.name,
        device=spec.engine.device,
        workers=spec.engine.workers,
        output_dir=spec.output.dir,
        output_dtype=None,
        strict=strict,
    )
    apart = Problems(collect=True)
    with apart.check():  # the one check of the output folder a merge makes before any read
        check_output_apart(spec, spec.output.dir)
    report.problems += apart.found
    base = resolve_source(spec.base, role="base model", patterns=BASE_SMALL_PATTERNS, token=token)
    adapters = [
        resolve_source(a, role="adapter", patterns=ADAPTER_PATTERNS, token=token)
        for a in spec.adapters
    ]
    config_from = (
        resolve_source(
            spec.config.config_from, role="config_from", patterns=CONFIG_PATTERNS, token=token
        )
        if spec.config.config_from is not None
        else None
    )
    remote = None
    if base.repo_id is not None:
        try:
            remote = hub_headers(base.repo_id, base.commit or spec.base.revision, token)
        except Exception as exc:  # no range requests: fall back to the files themselves
            log.warning("reading headers over HTTP failed (%s); downloading the base", exc)
            base = resolve_source(spec.base, role="base model", token=token)
            remote = None
        if remote is not None:
            report.download_bytes += _missing_from_cache(str(base.repo_id), base.commit, remote)
    for adapter in adapters:
        if adapter.repo_id is not None:
            report.download_bytes += _folder_bytes(adapter.local_dir)
    adapter_dirs = [a.local_dir for a in adapters]
    with header_view(base.local_dir, remote_headers=remote) as view:
        report.problems += view.problems
        plan = _fill(report, spec, view.folder, adapter_dirs, base.local_dir)
        _inputs(report, spec, plan, view.folder, remote, index_count, base, token)
        _check_config(report, spec, view.folder, adapter_dirs, config_from)
        _check_ranges(report, view.folder, base.local_dir)
        # Messages name the view's temporary folder where they mean the base.
        shown = str(base.local_dir)
        report.problems = _unique(p.replace(str(view.folder), shown) for p in report.problems)
        report.notices = _unique(n.replace(str(view.folder), shown) for n in report.notices)
    _estimate(report, spec, plan, adapter_dirs)
    return report


def _inputs(
    report: PlanReport,
    spec: MergeSpec,
    plan: Plan | None,
    view_dir: Path,
    remote: dict[str, Any] | None,
    index_count: int | None,
    base: ResolvedSource,
    token: str | None,
) -> None:
    """How the base comes in: streamed shard by shard (stream engine, Hub base) or first
    downloaded whole (peft engine), its largest shard, and each index's share of it."""
    if remote is not None:
        sizes = _remote_sizes(base, list(remote), token) or {
            name: file_size(header) for name, header in remote.items()
        }
        if spec.engine.name == "stream":
            report.streamed = True
        else:
            report.notices.append(
                "the peft engine downloads the whole base first (snapshot_download): it "
                "loads the whole model anyway; the stream engine fetches it shard by shard"
            )
    else:
        sizes = {p.name: p.stat().st_size for p in Path(view_dir).glob("*.safetensors")}
    report.largest_input_shard_bytes = max(sizes.values(), default=0)
    if plan is None or not index_count or index_count < 1:
        return
    for share in assign_runs(plan.shard_sizes(), index_count):
        files = {Path(p).name for i in share for p in plan.shard_inputs(i).values()}
        report.index_downloads.append(sum(sizes.get(name, 0) for name in files))


def _remote_sizes(base: ResolvedSource, names: list[str], token: str | None) -> dict[str, int]:
    """The Hub's own sizes of the base's shards (one paths-info request; {} if it fails:
    the headers then give them to within a few bytes)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    if base.repo_id is None:
        return {}
    try:
        infos = HfApi(token=token).get_paths_info(base.repo_id, names, revision=base.commit)
    except Exception as exc:  # the estimate, not the job, depends on it
        log.debug("paths-info of %s failed: %s", base.repo_id, exc)
        return {}
    return {i.path: int(i.size) for i in infos if isinstance(i, RepoFile)}


def _missing_from_cache(repo_id: str, commit: str | None, headers: dict[str, Any]) -> int:
    from huggingface_hub import try_to_load_from_cache

    missing = 0
    for name, header in headers.items():
        cached = try_to_load_from_cache(repo_id, name, revision=commit)
        if not isinstance(cached, str):
            missing += file_size(header)
    return missing


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def _model_type(base_dir: Path) -> str | None:
    """The base's model_type (for adapters with ``target_modules: null``), None if unread."""
    with suppress(OSError, ValueError):
        config = json.loads((Path(base_dir) / settings.CONFIG_FILE).read_text())
        if isinstance(config, dict) and isinstance(config.get("model_type"), str):
            return str(config["model_type"])
    return None


def _summarise_adapter(adapter_dir: Path, source: str, weight: float) -> AdapterSummary:
    config = read_adapter_config(adapter_dir)
    method = str(config.get("peft_type", "LORA")).upper()
    variant = "+".join(
        v
        for v, on in (("rslora", config.get("use_rslora")), ("dora", config.get("use_dora")))
        if on
    )
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    summary = AdapterSummary(
        source=source,
        weight=weight,
        method=method,
        variant=variant or ("lora" if method == "LORA" else method.lower()),
        targets=list(targets),
        modules=0,
        ranks=[],
        alphas=[],
        scales=[],
        full_tensors={},
    )
    return summary


def _fill(
    report: PlanReport,
    spec: MergeSpec,
    view_dir: Path,
    adapter_dirs: list[Path],
    base_dir: Path,
) -> Plan | None:
    """Adapters, changes, problems and notices from the stream engine's plan (returned,
    or None when the adapters do not fit)."""
    from mergejob.adapters import read_adapter
    from mergejob.errors import UnsupportedAdapterError
    from mergejob.plan.work import build_plan

    usable: list[tuple[Path, float]] = []
    usable_index: dict[Path, int] = {}
    model_type = _model_type(view_dir)
    for position, (adapter_dir, adapter) in enumerate(
        zip(adapter_dirs, spec.adapters, strict=True)
    ):
        try:
            summary = _summarise_adapter(adapter_dir, adapter.display(), adapter.weight)
        except MergeJobError as exc:
            report.problems.append(str(exc))
            continue
        report.adapters.append(summary)
        if summary.method in NOT_MERGEABLE:
            report.problems.append(
                f"{adapter.display()}: {summary.method} changes the model's inputs, not its "
                "weights; there is nothing to merge"
            )
            continue
        try:
            factors = read_adapter(adapter_dir, weight=adapter.weight, model_type=model_type)
        except UnsupportedAdapterError as exc:
            if spec.engine.name == "stream":
                report.problems.append(f"unsupported by the stream engine: {exc}")
            else:
                report.notices.append(f"{adapter.display()}: PEFT merges it ({exc})")
            continue
        except MergeJobError as exc:
            report.problems.append(str(exc))
            continue
        summary.modules = len(factors.loras)
        summary.ranks = sorted({lora.r for lora in factors.loras})
        summary.alphas = sorted({float(lora.alpha) for lora in factors.loras})
        summary.scales = sorted({float(lora.scale) for lora in factors.loras})
        summary.targets = sorted(
            {lora.module.rsplit(".", 1)[-1] for lora in factors.loras if not lora.parameter}
            | {
                str(t).rsplit(".", 1)[-1]
                for t in (factors.config.get("target_parameters") or [])
                if any(lora.parameter for lora in factors.loras)
            }
        )
        summary.full_tensors = {f.target: f.role for f in factors.full}
        usable_index.setdefault(adapter_dir, position)
        usable.append((adapter_dir, adapter.weight))
    index = _index(view_dir, report)
    if index is None:
        return None
    report.tensors_total = len(index.tensors)
    problems = Problems(collect=True)
    with problems.check():
        report.output_dtype = output_dtype(spec, index, base_dir)
    if spec.engine.name != "stream":
        for adapter_dir, _ in usable:  # the peft engine's own check, as merge makes it
            with problems.check():
                check_lora_shapes(index, adapter_dir)
    report.problems += problems.found
    dtype = report.output_dtype
    if dtype is None:  # not a float type: the report names the one it found
        report.output_dtype = spec.output.dtype if spec.output.dtype != "auto" else None
        report.output_dtype = report.output_dtype or index.stored_dtype()
        return None

    def plan_of(adapters: list[tuple[Path, float]]) -> Plan:
        return build_plan(
            view_dir,
            adapters,
            output_dtype=None if spec.output.dtype == "auto" else spec.output.dtype,
            max_shard_size=spec.output.max_shard_bytes,
            trust_remote_code=spec.base.trust_remote_code,
        )

    # build_plan stops at the first kind of problem: plan each adapter alone first, so that
    # every adapter's problems are listed, then all of them together.
    complete = len(usable) == len(spec.adapters)
    if len(usable) > 1 or not complete:
        for item in usable:
            try:
                alone = plan_of([item])
            except MergeJobError as exc:
                report.problems += _split_listing(str(exc))
                complete = False
                continue
            name = f"adapter {usable_index[item[0]]}"
            report.notices += _plan_notices(alone, [name])
    if not complete:
        _estimate_from_index(report, index, dtype, spec)
        return None
    try:
        plan = plan_of(usable)
    except MergeJobError as exc:
        report.problems += _split_listing(str(exc))
        _estimate_from_index(report, index, dtype, spec)
        return None
    report.changed_tensors = [t.name for t in plan.tensors if t.changed]
    report.tensors_total = len(plan.tensors)
    report.output_bytes = plan.output_bytes
    report.shards = len(plan.shards)
    report.largest_shard_bytes = plan.largest_shard_bytes
    report.config = dict(plan.config_updates)
    report.notices += _plan_notices(plan, [f"adapter {i}" for i in range(len(usable))])
    report.experts = _experts_summary(plan, index, model_type, len(usable))
    return plan


def _experts_summary(
    plan: Plan, index: CheckpointIndex, model_type: str | None, adapters: int
) -> dict[str, Any]:
    """MoE layers and experts per layer (transformers' conversion mapping of the base's
    model_type) and how many expert tensors each adapter changes; empty for other bases."""
    from mergejob.experts import fused_parameters

    if not any(".experts." in name for name in index.tensors):
        return {}  # no expert tensors: spares importing transformers for its mapping
    fused = fused_parameters(model_type, {n: t.shape for n, t in index.tensors.items()})
    if not fused:
        return {}
    layers = {name.rpartition(".")[0]: param.experts for name, param in fused.items()}
    changed = [0] * adapters
    for tensor in plan.tensors:
        for i in {op.adapter for op in tensor.ops if op.experts}:
            changed[i] += 1
    return {
        "layers": len(layers),
        "experts": max(layers.values()),
        "changed": changed,
    }


def _plan_notices(plan: Plan, names: list[str]) -> list[str]:
    """What a plan handles on its own but a user should know: untying, resizing, ignored
    adapter tensors, the plan's warnings."""
    notices = []
    if plan.untied:
        notices.append(
            f"tied embeddings will be untied: an adapter changes {plan.embeddings.input} or "
            f"{plan.embeddings.output}; both are written and tie_word_embeddings becomes false"
        )
    if "vocab_size" in plan.config_updates:
        notices.append(
            f"the vocabulary is resized to {plan.config_updates['vocab_size']} rows "
            f"(tokenizer from {plan.tokenizer_from})"
        )
    notices += list(plan.warnings)
    for adapter, ignored in plan.ignored:
        notices.append(f"{names[adapter]}: not used: {ignored.key} ({ignored.reason})")
    return notices


def _index(view_dir: Path, report: PlanReport) -> CheckpointIndex | None:
    try:
        return CheckpointIndex.from_folder(view_dir)
    except MergeJobError as exc:
        report.problems.append(str(exc))
        return None


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _split_listing(message: str) -> list[str]:
    """An error that lists several problems (title, then indented lines) -> one per line."""
    lines = message.splitlines()
    if len(lines) <= 1:
        return [message]
    title = lines[0].rstrip(":")
    return [f"{title}: {line.strip()}" for line in lines[1:] if line.strip()]


def _estimate_from_index(
    report: PlanReport, index: CheckpointIndex, dtype: str, spec: MergeSpec
) -> None:
    """Sizes without a plan (the adapters do not fit): every float tensor in ``dtype``."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    total = 0
    for info in index.tensors.values():
        numel = math.prod(info.shape) if info.shape else 1
        total += numel * size if info.dtype in ("float32", "bfloat16", "float16") else info.nbytes
    report.output_bytes = total
    report.largest_shard_bytes = min(total, spec.output.max_shard_bytes)
    report.shards = max(1, math.ceil(total / spec.output.max_shard_bytes))


def _check_config(
    report: PlanReport,
    spec: MergeSpec,
    view_dir: Path,
    adapter_dirs: list[Path],
    config_from: ResolvedSource | None,
) -> None:
    if config_from is None and not spec.config.overrides:
        return
    try:
        check_output_config(
            spec,
            view_dir,
            adapter_dirs,
            config_from.local_dir if config_from else None,
            config_from_name=config_from.display if config_from else None,
        )
    except InputError as exc:
        report.problems.append(str(exc))
        return
    keys = set(spec.config.overrides) | ({"(config_from)"} if config_from else set())
    for key in sorted(keys):
        if key != "(config_from)":
            report.config[key] = spec.config.overrides[key]
        elif config_from is not None:
            report.config["config_from"] = config_from.display


def _check_ranges(report: PlanReport, view_dir: Path, base_dir: Path) -> None:
    """The base tensors whose values the output dtype cannot hold, as problems.

    Headers say nothing of values, so this reads them, only where the output dtype is
    narrower than the stored one (float16 from bfloat16 or float32: the only case a real
    weight overflows): a full read of those tensors, streamed in bounded chunks, logged
    first. A base whose files are not on this machine (a Hub base not downloaded) is not
    read: a notice says so, and the merge checks every tensor as it writes it.
    """
    # Here, not at the top: they import torch, which the rest of the report does not need.
    from mergejob.io.reader import FileReader
    from mergejob.io.values import holds, narrower, range_message, value_range

    dtype = report.output_dtype
    if dtype is None or dtype not in FLOAT_DTYPES:
        return
    try:
        index = CheckpointIndex.from_folder(view_dir, check_size=False)
    except MergeJobError:
        return  # _fill reported it
    refs = [
        r for r in index.tensors.values() if r.dtype in FLOAT_DTYPES and narrower(dtype, r.dtype)
    ]
    if not refs:
        return
    # The values come from the base's own files (the view holds only their headers), where
    # they are here in full.
    readable: list[TensorRef] = []
    unread: list[str] = []
    for name in sorted({Path(r.path).name for r in refs}):
        try:
            header = read_header(Path(base_dir) / name, check_size=False)
        except (OSError, MergeJobError):
            unread.append(name)
            continue
        if header.data_held < header.data_declared:
            unread.append(name)
            continue
        real = header.tensors()
        readable += [real[r.name] for r in refs if Path(r.path).name == name and r.name in real]
    if unread:
        report.notices.append(
            f"{len(unread)} base file(s) are not here in full (a Hub base not downloaded, or "
            f"a truncated file), so their values were not checked against {dtype}'s range: "
            f"{', '.join(unread[:5])}"
            f"{' ...' if len(unread) > 5 else ''}; the merge stops at the first tensor "
            f"{dtype} cannot hold"
        )
    if not readable:
        return
    stored = sorted({r.dtype for r in readable})
    total = sum(r.nbytes for r in readable)
    log.info(
        "plan: reading %s of base weights stored as %s, to check that %s holds them",
        logs.size_text(total),
        "/".join(stored),
        dtype,
    )
    reader = FileReader()
    try:
        for ref in readable:
            found = value_range(reader, ref)
            if not holds(dtype, found.magnitude):
                report.problems.append(
                    range_message(ref.name, dtype, found.magnitude, what="the base tensor")
                )
    finally:
        reader.close()
    report.ranges = {
        "dtype": dtype,
        "tensors": len(readable),
        "bytes_read": total,
        "unread": unread,
    }


# ---------------------------------------------------------------------------------------
# Estimates


def _existing(path: Path) -> Path:
    """``path`` or its nearest folder that exists (where it would be created)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _free_bytes(path: Path) -> int | None:
    with suppress(OSError):
        return shutil.disk_usage(_existing(path)).free
    return None


def _check_disk(report: PlanReport, spec: MergeSpec, offload_bytes: int) -> None:
    """Free space where the job writes (the output, the download cache, the offload folder):
    a filesystem that cannot hold what the job writes there is a problem (the merge would
    fail with ENOSPC after hours), with the figures. Places on one filesystem add up."""
    places: list[tuple[str, str, Path, int]] = []  # (label, shown as, path, bytes)
    output_bytes, download_bytes = report.output_bytes, report.download_bytes
    # The delete options bound what stays on disk at once (the windows of _estimate).
    if spec.publish is not None and spec.publish.delete_uploaded:
        output_bytes = min(
            output_bytes, (2 + max(1, spec.engine.workers)) * report.largest_shard_bytes
        )
    if report.streamed and spec.engine.delete_downloaded:
        download_bytes = min(download_bytes, (DEFAULT_AHEAD + 1) * report.largest_input_shard_bytes)
    if spec.output.dir:
        places.append(("output", spec.output.dir, Path(spec.output.dir), output_bytes))
    if download_bytes:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
        places.append(("cache", cache, Path(cache), download_bytes))
    if offload_bytes and spec.engine.offload_folder:
        folder = spec.engine.offload_folder
        places.append(("offload", folder, Path(folder), offload_bytes))
    by_device: dict[int, list[tuple[str, str, Path, int]]] = {}
    for place in places:
        try:
            device = _existing(place[2]).stat().st_dev
        except OSError:
            continue
        by_device.setdefault(device, []).append(place)
    for group in by_device.values():
        free = _free_bytes(group[0][2])
        if free is None:
            continue
        for label, _, _, _ in group:
            report.disk["free"][label] = free
        needed = sum(place[3] for place in group)
        if free < needed:
            what = " + ".join(f"{logs.size_text(n)} {label}" for label, _, _, n in group)
            where = ", ".join(shown for _, shown, _, _ in group)
            report.problems.append(
                f"{where}: {logs.size_text(free)} free, the job writes {logs.size_text(needed)} there ({what}); "
                "free space or choose a folder on a larger disk"
            )


def _estimate(
    report: PlanReport,
    spec: MergeSpec,
    plan: Plan | None,
    adapters: list[Path],
    rates: Throughput = THROUGHPUT,
) -> None:
    out_bytes = report.output_bytes
    offload = out_bytes if spec.engine.name == "peft" and spec.engine.offload_folder else 0
    # With both delete options the disk holds a window: the shards fetched ahead (and the
    # one in flight) per download worker, and the output shards waiting for the upload
    # (two) or being written (one per worker).
    fetch_window = (DEFAULT_AHEAD + 1) * report.largest_input_shard_bytes
    upload_window = (2 + max(1, spec.engine.workers)) * report.largest_shard_bytes
    windowed = 0
    if report.streamed:
        windowed = min(report.download_bytes, fetch_window) + min(out_bytes, upload_window)
    report.disk = {
        "output_bytes": out_bytes,
        "download_bytes": report.download_bytes,
        "offload_bytes": offload,
        "needed_bytes": out_bytes + report.download_bytes + offload,
        "windowed_bytes": windowed,
        "free": {},
    }
    _check_disk(report, spec, offload)
    report.memory = [
        stream_memory(plan, spec.engine.workers, spec.engine.device, out_bytes),
        peft_memory(out_bytes, spec, _adapter_bytes(adapters)),
    ]
    sizes = JobSizes(output_bytes=report.output_bytes, download_bytes=report.download_bytes)
    report.seconds = {
        "stream": stream_seconds(plan, sizes, spec, rates),
        "peft": peft_seconds(plan, sizes, spec, rates),
    }


def _adapter_bytes(adapter_dirs: list[Path]) -> int:
    total = 0
    for adapter_dir in adapter_dirs:
        with suppress(MergeJobError, OSError):
            total += adapter_weights_path(adapter_dir).stat().st_size
    return total
