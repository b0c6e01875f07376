"""``mergejob plan``: a job checked and costed from safetensors headers and adapter configs.

No weight is read. The base is seen through a *header view*: a temporary folder whose
safetensors files hold the real headers followed by a sparse hole as long as the data the
header declares (no disk used). For a local base that view tolerates a truncated download (it
is reported, and every other check still runs); for a Hub base the headers come from HTTP
range requests (``get_safetensors_metadata``), so planning a 70B job downloads kilobytes.
The stream engine's :func:`mergejob.plan.work.build_plan` then runs on that view, which is also
the check ``mergejob merge``/``run`` make before reading a weight.

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
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergejob.adapter_config import adapter_weights_path, read_adapter_config
from mergejob.errors import InputError, MergeJobError
from mergejob.io.checkpoint import CheckpointIndex, read_header
from mergejob.spec import MergeSpec

log = logging.getLogger(__name__)

GB = 10**9
# PEFT methods that change the model's inputs, not its weights: nothing to merge.
NOT_MERGEABLE = frozenset(
    {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "MULTITASK_PROMPT_TUNING"}
)


# ---------------------------------------------------------------------------------------
# Throughput and memory constants


@dataclass(frozen=True)
class Throughput:
    """Rates the time estimate uses, bytes or flops per second (one worker).

    Measured with ``bench/bench_plan_estimate.py`` on a 2-core CPU VM with a network disk
    (see bench/RESULTS.md); a faster machine finishes sooner, so there the estimates are an
    upper bound. ``download_bps`` and ``gpu_flops`` are assumptions (a well-connected pod
    pulling from the Hub; an fp32 GEMM on a datacenter GPU).
    """

    startup_s: float = 8.0  # python, torch and transformers imports
    read_bps: float = 0.46 * GB  # safetensors data read with pread
    write_bps: float = 0.12 * GB  # shard files written, hashed and fsynced
    convert_bps: float = 0.25 * GB  # fp32 work per output byte of a changed tensor
    hash_bps: float = 0.54 * GB  # sha256 per thread (the recipe's input checksums)
    cpu_flops: float = 10e9  # fp32 B @ A per worker (2 cores, AVX2; the rest is convert_bps)
    gpu_flops: float = 20e12  # fp32 matmul on one GPU (TF32 off)
    download_bps: float = 0.2 * GB  # assumed Hub bandwidth
    peft_load_bps: float = 0.1 * GB  # from_pretrained into memory
    peft_save_bps: float = 0.07 * GB  # save_pretrained


THROUGHPUT = Throughput()

# Resident memory of a merge process that has imported torch, transformers and mergejob and
# built its plan, and of a spawned stream worker before its buffers (fitted to peak RSS
# measured on the 1B benchmark fixture; see bench/RESULTS.md).
BASE_RSS = 274 * 10**6
WORKER_RSS = 190 * 10**6
PEFT_BASE_RSS = 450 * 10**6  # + peft and accelerate
# The recipe hashes the inputs with 4 threads reading 8 MiB chunks (plus the bytes in flight).
RECIPE_HASH_BYTES = 64 * 10**6
# Live fp32 blocks of a worker at its peak while it changes a tensor: w32, the delta, the rows
# read, the rounded rows, and the allocator's and BLAS's temporaries (measured: about five).
LIVE_BLOCKS = 5


# ---------------------------------------------------------------------------------------
# The header view


@dataclass
class HeaderView:
    """A folder that looks like the base to a header reader, without its weights."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    shard_bytes: dict[str, int] = field(default_factory=dict)  # full file sizes
    remote: bool = False


def _sparse_copy(header: bytes, data_len: int, dest: Path) -> None:
    with open(dest, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        handle.truncate(8 + len(header) + data_len)


def _data_len(header: dict[str, Any]) -> int:
    ends = [
        int(info["data_offsets"][1])
        for key, info in header.items()
        if key != "__metadata__" and isinstance(info, dict) and info.get("data_offsets")
    ]
    return max(ends, default=0)


@contextmanager
def header_view(
    base_dir: Path, *, remote_headers: dict[str, dict[str, Any]] | None = None
) -> Iterator[HeaderView]:
    """A temporary header view of ``base_dir`` (other files are linked, not copied).

    ``remote_headers`` (file name -> header dict) stands in for shards that are not local.
    A local shard shorter than its header says is reported in ``problems``, not raised.
    """
    tmp = Path(tempfile.mkdtemp(prefix="mergejob-plan-"))
    view = HeaderView(folder=tmp, remote=remote_headers is not None)
    try:
        for path in sorted(Path(base_dir).iterdir()):
            if not path.is_file() or path.suffix == ".safetensors":
                continue
            (tmp / path.name).symlink_to(path.resolve())
        headers: dict[str, dict[str, Any]] = dict(remote_headers or {})
        for path in sorted(Path(base_dir).glob("*.safetensors")):
            if path.name in headers:
                continue
            try:
                raw = _raw_header(path)
            except MergeJobError as exc:
                view.problems.append(str(exc))
                continue
            headers[path.name] = raw
            held = path.stat().st_size - 8 - _header_len(path)
            if held < _data_len(raw):
                view.problems.append(
                    f"{path}: truncated: holds {held} of the {_data_len(raw)} data bytes its "
                    "header declares (incomplete download?); delete it and fetch it again"
                )
        for name, header in headers.items():
            data = json.dumps(header, separators=(",", ":")).encode()
            _sparse_copy(data, _data_len(header), tmp / name)
            view.shard_bytes[name] = 8 + len(data) + _data_len(header)
        yield view
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _header_len(path: Path) -> int:
    with open(path, "rb") as handle:
        raw = handle.read(8)
    return struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0


def _raw_header(path: Path) -> dict[str, Any]:
    header, metadata = read_header(path, check_size=False)
    result: dict[str, Any] = dict(header)
    if metadata:
        result["__metadata__"] = metadata
    return result


def hub_headers(repo_id: str, revision: str | None, token: str | None) -> dict[str, dict[str, Any]]:
    """Every safetensors header of a Hub repo, read with HTTP range requests."""
    from huggingface_hub import HfApi

    meta = HfApi().get_safetensors_metadata(repo_id, revision=revision, token=token)
    headers: dict[str, dict[str, Any]] = {}
    for filename, file_meta in meta.files_metadata.items():
        header: dict[str, Any] = {
            name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
            for name, t in file_meta.tensors.items()
        }
        if file_meta.metadata:
            header["__metadata__"] = dict(file_meta.metadata)
        headers[Path(filename).name] = header
    return headers


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
class MemoryEstimate:
    """Peak memory of one engine for this job."""

    engine: str
    host_bytes: int
    gpu_bytes: int = 0  # per GPU
    note: str = ""


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
    strict: bool = False

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
        if self.config:
            lines.append(f"config.json: {json.dumps(self.config, sort_keys=True)}")
        lines += [
            "",
            f"output: {self.output_dtype or '?'}, {_size(self.output_bytes)} in "
            f"{self.shards} shard(s) (largest {_size(self.largest_shard_bytes)})",
        ]
        if self.disk:
            free = ", ".join(
                f"{where} {_size(n)} free" for where, n in self.disk.get("free", {}).items()
            )
            lines.append(
                f"disk: {_size(self.disk['needed_bytes'])} needed "
                f"({_size(self.download_bytes)} download cache + "
                f"{_size(self.disk['output_bytes'])} output){f'; {free}' if free else ''}"
            )
        for m in self.memory:
            gpu = f", {_size(m.gpu_bytes)} per GPU" if m.gpu_bytes else ""
            note = f" ({m.note})" if m.note else ""
            lines.append(f"memory, {m.engine} engine: {_size(m.host_bytes)} RAM{gpu}{note}")
        for engine, seconds in self.seconds.items():
            lines.append(f"time, {engine} engine: ~{_duration(seconds)}")
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


def _size(nbytes: int | float) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------
# Building the report


def plan_report(spec: MergeSpec, *, token: str | None = None, strict: bool = False) -> PlanReport:
    """Check ``spec`` and estimate it, reading headers and configs only.

    Problems that make the merge impossible are collected in ``problems`` (every one that can
    be found, not only the first); bad input that stops planning itself (a base that does not
    exist, a spec error) is raised.
    """
    from mergejob.sources import ADAPTER_PATTERNS, CONFIG_PATTERNS, resolve_source

    report = PlanReport(
        base=spec.base.display(),
        engine=spec.engine.name,
        device=spec.engine.device,
        workers=spec.engine.workers,
        output_dir=spec.output.dir,
        output_dtype=None,
        strict=strict,
    )
    base = resolve_source(spec.base, role="base model", patterns=_NON_WEIGHT_PATTERNS, token=token)
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
        _check_config(report, spec, view.folder, adapter_dirs, config_from)
        # Messages name the view's temporary folder where they mean the base.
        shown = str(base.local_dir)
        report.problems = _unique(p.replace(str(view.folder), shown) for p in report.problems)
        report.notices = _unique(n.replace(str(view.folder), shown) for n in report.notices)
    _estimate(report, spec, plan, adapter_dirs)
    return report


_NON_WEIGHT_PATTERNS = [
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "*.py",
]


def _missing_from_cache(repo_id: str, commit: str | None, headers: dict[str, Any]) -> int:
    from huggingface_hub import try_to_load_from_cache

    missing = 0
    for name, header in headers.items():
        cached = try_to_load_from_cache(repo_id, name, revision=commit)
        if not isinstance(cached, str):
            missing += 8 + len(json.dumps(header)) + _data_len(header)
    return missing


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


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
) -> Any:
    """Adapters, changes, problems and notices from the stream engine's plan (returned,
    or None when the adapters do not fit)."""
    from mergejob.adapters import read_adapter
    from mergejob.errors import UnsupportedAdapterError
    from mergejob.plan.work import build_plan

    usable: list[tuple[Path, float]] = []
    usable_index: dict[Path, int] = {}
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
            factors = read_adapter(adapter_dir, weight=adapter.weight)
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
        summary.targets = sorted({lora.module.rsplit(".", 1)[-1] for lora in factors.loras})
        summary.full_tensors = {f.target: f.role for f in factors.full}
        usable_index.setdefault(adapter_dir, position)
        usable.append((adapter_dir, adapter.weight))
    index = _index(view_dir, report)
    if index is None:
        return None
    report.tensors_total = len(index.tensors)
    dtype = spec.output.dtype if spec.output.dtype != "auto" else index.stored_dtype()
    report.output_dtype = dtype
    if dtype not in ("bfloat16", "float16", "float32"):
        report.problems.append(
            f"{base_dir}: weights are stored as {dtype}; pass --dtype bfloat16, float16 or float32"
        )
        return None

    def plan_of(adapters: list[tuple[Path, float]]) -> Any:
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
    return plan


def _plan_notices(plan: Any, names: list[str]) -> list[str]:
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
    config_from: Any,
) -> None:
    if config_from is None and not spec.config.overrides:
        return
    from mergejob import model_config

    try:
        base_config = model_config.read_config(view_dir)
        model_config.plan_output_config(
            base_config,
            config_from=model_config.read_config(config_from.local_dir) if config_from else None,
            config_from_name=config_from.display if config_from else None,
            overrides=spec.config.overrides,
            allow_unknown=spec.config.allow_unknown_keys,
            vocab_size=model_config.merged_vocab_size(base_config, adapter_dirs),
        )
    except InputError as exc:
        report.problems.append(str(exc))
        return
    keys = set(spec.config.overrides) | ({"(config_from)"} if config_from else set())
    for key in sorted(keys):
        if key == "(config_from)":
            report.config["config_from"] = config_from.display
        else:
            report.config[key] = spec.config.overrides[key]


# ---------------------------------------------------------------------------------------
# Estimates


def _free_bytes(path: Path) -> int | None:
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    with suppress(OSError):
        return shutil.disk_usage(probe).free
    return None


def _estimate(
    report: PlanReport,
    spec: MergeSpec,
    plan: Any,
    adapters: list[Path],
    rates: Throughput = THROUGHPUT,
) -> None:
    out_bytes = report.output_bytes
    offload = out_bytes if spec.engine.name == "peft" and spec.engine.offload_folder else 0
    report.disk = {
        "output_bytes": out_bytes,
        "download_bytes": report.download_bytes,
        "offload_bytes": offload,
        "needed_bytes": out_bytes + report.download_bytes + offload,
        "free": {},
    }
    if spec.output.dir:
        free = _free_bytes(Path(spec.output.dir))
        if free is not None:
            report.disk["free"]["output"] = free
            if free < out_bytes:
                report.notices.append(
                    f"{spec.output.dir}: {_size(free)} free, the output needs {_size(out_bytes)}"
                )
    if report.download_bytes:
        from huggingface_hub import constants

        free = _free_bytes(Path(constants.HF_HUB_CACHE))
        if free is not None:
            report.disk["free"]["cache"] = free
            if free < report.download_bytes:
                report.notices.append(
                    f"{constants.HF_HUB_CACHE}: {_size(free)} free, the download needs "
                    f"{_size(report.download_bytes)}"
                )
    report.memory = [
        stream_memory(plan, spec.engine.workers, spec.engine.device, out_bytes),
        peft_memory(out_bytes, spec, _adapter_bytes(adapters)),
    ]
    report.seconds = {
        "stream": stream_seconds(plan, report, spec, rates),
        "peft": peft_seconds(plan, report, spec, rates),
    }


def _adapter_bytes(adapter_dirs: list[Path]) -> int:
    total = 0
    for adapter_dir in adapter_dirs:
        with suppress(MergeJobError, OSError):
            total += adapter_weights_path(adapter_dir).stat().st_size
    return total


def stream_buffers(plan: Any) -> int:
    """Bytes of the buffers one stream worker holds at its peak for ``plan``.

    The worker reads, works and writes in row blocks of at most ``CHUNK_BYTES`` of fp32
    (``LIVE_BLOCKS`` of them alive at the peak) and copies unchanged tensors in
    ``COPY_BYTES`` steps; a DoRA tensor is worked on whole, with several fp32 copies of it
    alive inside PEFT's formula. Adapter factors of the tensor at hand are kept in fp32.
    """
    from mergejob.engines.stream_compute import CHUNK_BYTES, COPY_BYTES

    if plan is None:
        return 4 * CHUNK_BYTES
    copy = 0
    work = 0
    for tensor in plan.tensors:
        numel = math.prod(tensor.shape) if tensor.shape else 1
        if tensor.byte_copy:
            copy = max(copy, min(COPY_BYTES, tensor.nbytes))
            continue
        fp32 = numel * 4
        if any(op.kind == "dora" for op in tensor.ops):
            need = 6 * fp32  # whole tensor: w32 plus PEFT's formula's temporaries
        else:
            block = min(CHUNK_BYTES, fp32)
            need = LIVE_BLOCKS * block if tensor.ops else 2 * block
        factors = sum(
            4 * math.prod(ref.shape)
            for op in tensor.ops
            for ref in (op.a, op.b, op.magnitude)
            if ref is not None
        )
        work = max(work, need + factors)
    return copy + work


def stream_memory(plan: Any, workers: int, device: str, out_bytes: int) -> MemoryEstimate:
    """Peak RSS of the stream engine: the process, plus each worker's buffers."""
    buffers = stream_buffers(plan)
    if workers <= 1 or device != "cpu":
        host = BASE_RSS + RECIPE_HASH_BYTES + buffers
        gpu = buffers if device != "cpu" else 0
        note = "one process" if device == "cpu" else "per GPU worker process"
        return MemoryEstimate("stream", host, gpu, note)
    host = BASE_RSS + RECIPE_HASH_BYTES + workers * (WORKER_RSS + buffers)
    return MemoryEstimate("stream", host, 0, f"{workers} worker processes")


def peft_memory(out_bytes: int, spec: MergeSpec, adapter_bytes: int) -> MemoryEstimate:
    """Peak memory of the peft engine: the whole model in the output dtype and the adapters
    (PEFT keeps them in fp32); spread over the GPUs with device auto."""
    # save_pretrained makes no extra copy (measured); the recipe then hashes the files.
    save = RECIPE_HASH_BYTES
    engine = spec.engine
    if engine.device == "cpu":
        note = "disk offload lowers this" if engine.offload_folder else ""
        return MemoryEstimate("peft", PEFT_BASE_RSS + out_bytes + adapter_bytes + save, 0, note)
    if engine.device == "auto":
        gpus = _visible_gpus()
        if gpus:
            per_gpu = math.ceil((out_bytes + adapter_bytes) / gpus)
            return MemoryEstimate(
                "peft", PEFT_BASE_RSS + save, per_gpu, f"device auto over {gpus} GPU(s)"
            )
        return MemoryEstimate(
            "peft",
            PEFT_BASE_RSS + out_bytes + adapter_bytes + save,
            0,
            "device auto, no GPU visible here: all on CPU",
        )
    return MemoryEstimate("peft", PEFT_BASE_RSS + save, out_bytes + adapter_bytes, "one GPU")


def _visible_gpus() -> int:
    with suppress(Exception):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    return 0


def stream_seconds(plan: Any, report: PlanReport, spec: MergeSpec, rates: Throughput) -> float:
    """Download + (read + compute + write) / workers + hashing for the recipe."""
    out_bytes = report.output_bytes
    changed_bytes = sum(t.nbytes for t in plan.tensors if t.changed) if plan is not None else 0
    flops = plan.lora_flops if plan is not None else 0
    read = (plan.input_bytes if plan is not None else out_bytes) / rates.read_bps
    gpu = spec.engine.device != "cpu" and _visible_gpus() > 0
    compute = flops / (rates.gpu_flops if gpu else rates.cpu_flops)
    work = changed_bytes / rates.convert_bps + compute
    parallel = max(1, spec.engine.workers if not gpu else _visible_gpus())
    cores = os.cpu_count() or 1
    parallel = min(parallel, cores) if not gpu else parallel
    write = out_bytes / rates.write_bps
    return (
        rates.startup_s
        + report.download_bytes / rates.download_bps
        + (read + work) / parallel
        + write
        + _hashed_input_bytes(plan, report) / rates.hash_bps
    )


def _hashed_input_bytes(plan: Any, report: PlanReport) -> int:
    """Bytes the recipe hashes: local inputs (Hub files are named by their sha256)."""
    if report.download_bytes or plan is None:
        return 0
    return plan.input_bytes


def peft_seconds(plan: Any, report: PlanReport, spec: MergeSpec, rates: Throughput) -> float:
    """Download + load + merge (the changed weights, once per adapter) + save + hashing."""
    out_bytes = report.output_bytes
    changed = sum(t.nbytes for t in plan.tensors if t.changed) if plan is not None else out_bytes
    merge = len(spec.adapters) * changed / rates.convert_bps
    return (
        rates.startup_s
        + report.download_bytes / rates.download_bps
        + out_bytes / rates.peft_load_bps
        + merge
        + out_bytes / rates.peft_save_bps
        + (out_bytes + _hashed_input_bytes(plan, report)) / rates.hash_bps
    )
