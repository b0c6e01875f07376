"""Check an extracted adapter against the base and the fine-tuned model it came from.

``mergejob verify OUT`` on a folder ``mergejob extract`` wrote (its recipe has an
``extract:`` section) re-reads both models, named by the recipe (or ``--base`` and
``--finetuned``), and checks:

- **the inputs**: their files' sha256 against the recipe's record (a file that changed
  since: :class:`~mergejob.errors.InputsChangedError`, exit 2, nothing checked);
- **the files**: ``adapter_model.safetensors``, ``adapter_config.json`` and
  ``extraction.json`` against the sha256 the recipe recorded (any byte changed; the checks
  below say what the change does);
- **adapter_config.json**: it loads with ``peft.LoraConfig`` (a LoRA config, with the types
  mergejob's own adapter reader requires), targets exactly the modules that have factors,
  gives each module its factors' rank (``rank_pattern``), lists exactly the saved modules in
  ``modules_to_save``, and sets ``lora_bias`` exactly when ``lora_B`` biases are saved;
- **each LoRA module**: the relative error ``‖ΔW - s·B·A‖_F / ‖ΔW‖_F`` of the factors as
  stored, as PEFT applies them (``s = lora_alpha / r`` of the module, from ``rank_pattern``
  and ``alpha_pattern`` through PEFT's own pattern lookup, ``/ sqrt(r)`` with rsLoRA; ``(B·A)ᵀ``
  for embeddings and with ``fan_in_fan_out``, i.e. Conv1D), recomputed in fp64 from ΔW formed
  in fp32 exactly as the engine forms it (:func:`~mergejob.extraction.engine.read_delta`),
  must equal ``extraction.json``'s error within the fp32 rounding bound of the engine's own
  computation (:func:`error_tolerance`), and its ``norm`` ‖ΔW‖_F likewise; a ``lora_B`` bias
  must be Δb rounded to its dtype, bit for bit. (A change of a lossy module's optimal
  factors moves its error only to second order, the residual being orthogonal to them: a
  small one may stay within the bound; the files check sees it);
- **modules_to_save**: every saved tensor is the fine-tune's, bit for bit (a tied head's
  copy: the fine-tune's input embeddings);
- **what is left out**: every tensor of the two models the adapter neither saves nor
  decomposes is identical in both, or ``extraction.json`` lists it as dropped (only with
  ``skip_undecomposable``), or its module as excluded (only if ``include``/``exclude`` leave
  it out).

The verdict and a line per failed item, as the merge's verify prints them; exit 0 when every
check holds, 1 when one fails, 2 for bad input (no recipe and no ``--base``/``--finetuned``,
an input missing or changed, no adapter in the folder).

Example::

    from mergejob.extraction.verify import verify_extraction
    report = verify_extraction("adapter")  # base and fine-tune from adapter/mergejob.yaml
    assert report.ok, report.summary()
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergejob import settings
from mergejob.errors import AdapterError, InputError, InputsChangedError, SpecError, listing
from mergejob.extraction.engine import read_delta
from mergejob.extraction.plan import few, included
from mergejob.extraction.svd import rows_per_block, squared_norm
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.headers import TensorRef, read_header
from mergejob.io.reader import FileReader
from mergejob.spec import ExtractSpec, SourceSpec
from mergejob.verify import spread

log = logging.getLogger(__name__)

# Unit roundoffs: the engine's fp32 products, verify's fp64 ones.
U32 = 2.0**-24
U64 = 2.0**-53
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("lora", "a"),
    ".lora_B.weight": ("lora", "b"),
    ".lora_embedding_A": ("embedding", "a"),
    ".lora_embedding_B": ("embedding", "b"),
}
_BIAS_SUFFIX = ".lora_B.bias"


# ---------------------------------------------------------------------------------------
# The report


@dataclass
class ItemCheck:
    """One checked item: a LoRA module, a saved tensor, a tensor left out, the config."""

    name: str
    kind: str  # lora | saved | left out | config | file
    ok: bool
    note: str = ""
    error: float | None = None  # lora: the recomputed relative error
    reported: float | None = None  # lora: extraction.json's
    tolerance: float | None = None  # lora: the fp32 rounding bound of the difference


@dataclass
class ExtractionVerifyReport:
    """Every item checked, and the problems found outside them."""

    output_dir: Path
    checks: list[ItemCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lora_total: int = 0  # LoRA modules in extraction.json (a sample may check fewer)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``mergejob verify --json``)."""
        return {
            "output_dir": str(self.output_dir),
            "task": "extract",
            "ok": self.ok,
            "lora_total": self.lora_total,
            "checked": len(self.checks),
            "failed": sum(not c.ok for c in self.checks),
            "problems": self.problems,
            "items": [asdict(c) for c in self.checks],
        }

    def summary(self) -> str:
        """The verdict (how many items failed, per kind), the tolerance, then a line per
        failed item and per problem."""
        bad = [c for c in self.checks if not c.ok]
        kinds = []
        for kind in ("lora", "saved", "left out", "config", "file"):
            of_kind = [c for c in self.checks if c.kind == kind]
            if of_kind:
                failed = sum(not c.ok for c in of_kind)
                kinds.append(
                    f"{kind}: {len(of_kind) - failed} ok" + (f", {failed} failed" if failed else "")
                )
        lora = sum(c.kind == "lora" for c in self.checks)
        if lora < self.lora_total:
            kinds.insert(0, f"a sample of {lora} of the {self.lora_total} LoRA modules")
        word = "OK" if self.ok else "FAILED"
        verdict = (
            f"{word}: {len(self.checks)} items of the extracted adapter checked, all agree"
            if not bad
            else f"{word}: {len(bad)} of {len(self.checks)} items of the extracted adapter disagree"
        )
        problems = f"; {len(self.problems)} problem(s)" if self.problems else ""
        widest = max((c.tolerance or 0.0 for c in self.checks if c.kind == "lora"), default=0.0)
        lines = [
            f"{verdict} ({'; '.join(kinds)}){problems}",
            "  tolerance: a LoRA module's error recomputed in fp64 agrees with extraction.json's "
            f"within the fp32 rounding bound of the engine's (largest {widest:.3g}); saved "
            "tensors: the fine-tune's bytes; tensors left out: identical in both models, or "
            "listed as dropped or excluded; files: the recipe's sha256",
        ]
        lines += [f"  {c.name}: {c.note}" for c in bad]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Rounding


def error_tolerance(
    rank: int, factors_norm: float, residual_norm: float, delta_norm: float, elements: int
) -> float:
    """How far the engine's relative error ``e = ‖ΔW - B·A‖_F / ‖ΔW‖_F`` may lie from
    verify's, from rounding alone (both start from the same fp32 ΔW and the same factors).

    The engine computes ``fl32(ΔW - fl32(B·A))`` with inner dimension ``r``: whatever the
    order of the sums (BLAS blocking, FMA, a GPU's fp32 GEMM without TF32),
    ``|fl(B·A) - B·A| <= γ_r |B|·|A|`` elementwise with ``γ_r = r·u / (1 - r·u)``,
    ``u = 2^-24``, and the subtraction adds ``u`` of the result: so its residual differs
    from the exact one by at most ``γ_r (1 + u) ‖|B|·|A|‖_F + u ‖R‖_F`` in norm, and
    ``‖|B|·|A|‖_F <= ‖B‖_F ‖A‖_F`` (``factors_norm``). The norms are sums of ``N`` squares of
    fp32 values in fp64 (each square exact), off by at most ``N·2^-53`` relatively, so ``e``
    moves by at most ``e·N·2^-53`` for each of the two sums; the division and the root add a
    few fp64 roundings. Verify's own fp64 computation has the same bound with ``2^-53`` for
    ``u``. The sum of both is a bound, not an estimate: for a rank-32 module the first term
    is about 2e-6 x ‖B‖‖A‖/‖ΔW‖ (which is at most sqrt(r) for factors of a truncated SVD).
    """
    if delta_norm <= 0:
        return 0.0
    g32 = rank * U32 / (1 - rank * U32)
    g64 = rank * U64 / (1 - rank * U64)
    product = (g32 * (1 + U32) + g64 * (1 + U64)) * factors_norm
    rounding = (U32 + U64) * residual_norm
    e = residual_norm / delta_norm
    return (product + rounding) / delta_norm + e * (2 * elements + 4) * U64


def norm_tolerance(norm: float, elements: int) -> float:
    """How far two fp64 sums of the same ``elements`` squares of fp32 values (``‖ΔW‖_F``)
    may lie apart after the root: ``N·2^-53`` relatively each, plus the root's rounding."""
    return norm * (2 * elements + 2) * U64


# ---------------------------------------------------------------------------------------
# The adapter as PEFT reads it


@dataclass
class LoraFactors:
    """One module's saved factors (``a``: r x in, ``b``: out x r) and ``lora_B`` bias."""

    module: str
    kind: str  # lora | embedding
    a: TensorRef | None = None
    b: TensorRef | None = None
    bias: TensorRef | None = None


@dataclass
class AdapterLayout:
    """The adapter file's tensors by role (keys without PEFT's prefix)."""

    factors: dict[str, LoraFactors] = field(default_factory=dict)
    saved: dict[str, TensorRef] = field(default_factory=dict)  # tensor name -> ref
    unknown: list[str] = field(default_factory=list)


def adapter_layout(path: Path) -> AdapterLayout:
    """Sort ``adapter_model.safetensors``'s tensors into factors, biases and saved tensors."""
    layout = AdapterLayout()
    for key, ref in read_header(path).tensors().items():
        if not key.startswith(settings.PEFT_PREFIX):
            layout.unknown.append(key)
            continue
        name = key[len(settings.PEFT_PREFIX) :]
        if name.endswith(_BIAS_SUFFIX):
            module = name[: -len(_BIAS_SUFFIX)]
            layout.factors.setdefault(module, LoraFactors(module, "lora")).bias = ref
            continue
        for suffix, (kind, side) in _FACTOR_SUFFIXES.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                entry = layout.factors.setdefault(module, LoraFactors(module, kind))
                entry.kind = kind if kind == "embedding" else entry.kind
                setattr(entry, side, ref)
                break
        else:
            layout.saved[name] = ref
    return layout


@dataclass
class PeftView:
    """What PEFT makes of ``adapter_config.json``: each module's rank and scale, which
    modules it targets, ``fan_in_fan_out``, ``lora_bias`` and ``modules_to_save``."""

    config: Any  # peft.LoraConfig, or None when it does not load
    raw: dict[str, Any]

    def rank(self, module: str) -> int:
        from peft.utils.other import get_pattern_key

        pattern = self.raw.get("rank_pattern") or {}
        key = get_pattern_key(list(pattern), module)
        return int(pattern.get(key, self.raw.get("r", 8)))

    def scale(self, module: str) -> float:
        """PEFT's ``scaling``: ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``), per module."""
        from peft.utils.other import get_pattern_key

        r = self.rank(module)
        pattern = self.raw.get("alpha_pattern") or {}
        key = get_pattern_key(list(pattern), module)
        alpha = float(pattern.get(key, self.raw.get("lora_alpha", 8)))
        return alpha / math.sqrt(r) if self.raw.get("use_rslora") else alpha / r

    def targets(self, module: str) -> bool:
        from peft.tuners.tuners_utils import check_target_module_exists

        return self.config is not None and bool(check_target_module_exists(self.config, module))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.raw.get("fan_in_fan_out"))


def read_peft_config(folder: Path) -> tuple[PeftView, list[str]]:
    """``adapter_config.json`` as PEFT loads it, and what is wrong with it (empty: loads)."""
    from peft import LoraConfig

    from mergejob.adapter_config import read_adapter_config

    path = folder / settings.ADAPTER_CONFIG_FILE
    failures: list[str] = []
    try:
        raw = read_adapter_config(folder)
    except AdapterError as exc:
        failures.append(str(exc).removeprefix(f"{path}: "))
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return PeftView(None, {}), failures
        raw = raw if isinstance(raw, dict) else {}
    config = None
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = LoraConfig.from_pretrained(str(folder))
    except Exception as exc:  # whatever PEFT raises is the answer: it does not load
        failures.append(f"peft.LoraConfig cannot load it ({type(exc).__name__}: {exc})")
    if config is not None and not isinstance(config, LoraConfig):
        failures.append(f"peft loads it as {type(config).__name__}, not LoraConfig")
        config = None
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        failures.append(f"peft_type is {raw.get('peft_type')!r}, not LORA")
    return PeftView(config, raw), failures


# ---------------------------------------------------------------------------------------
# The inputs


def is_extraction_output(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds an extracted adapter: its recipe has an ``extract:`` section
    or, without a recipe, it holds ``extraction.json``."""
    from mergejob.recipe import read_recipe

    out = Path(folder)
    if (out / settings.RECIPE_FILE).is_file():
        try:
            return read_recipe(out).get("extract") is not None
        except InputError:  # a broken recipe: the merge's verify says so (or does without)
            return False
    return (out / settings.EXTRACTION_REPORT_FILE).is_file()


def _read_report(out: Path) -> dict[str, Any]:
    path = out / settings.EXTRACTION_REPORT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{path}: missing; {out} is not an adapter written by mergejob extract"
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
        raise InputError(f"{path}: not an extraction report (no modules list)")
    return data


@dataclass
class _Inputs:
    base: Path
    tuned: Path
    settings: ExtractSpec
    outputs: dict[str, str] = field(default_factory=dict)  # the recipe's file -> sha256


def _inputs(
    out: Path,
    report: Mapping[str, Any],
    base: str | os.PathLike[str] | None,
    finetuned: str | os.PathLike[str] | None,
    token: str | None,
) -> _Inputs:
    """Both models (given, or the recipe's, resolved as the extraction resolved them) with
    their files checked against the recipe's sha256, and the extraction's settings."""
    from mergejob import recipe
    from mergejob.sources import BASE_PATTERNS, resolve_source
    from mergejob.spec import RECIPE_KEY, build_spec

    recipe_path = out / settings.RECIPE_FILE
    if not recipe_path.is_file():
        if base is None or finetuned is None:
            raise InputError(
                f"{recipe_path}: missing; give --base and --finetuned to verify {out} anyway"
            )
        raw = dict(report.get("settings") or {})
        try:
            extract = ExtractSpec.model_validate({**raw, "finetuned": str(finetuned)})
        except ValueError as exc:
            raise InputError(f"{out / settings.EXTRACTION_REPORT_FILE}: settings: {exc}") from None
        return _Inputs(Path(base), Path(finetuned), extract)
    document = recipe.read_recipe(out)
    record = document.pop(RECIPE_KEY, None)
    spec = build_spec(document, origin=str(recipe_path))
    if spec.extract is None:
        raise SpecError(f"{recipe_path}: a merge's recipe, not an extraction's")
    base_spec = SourceSpec(path=str(base)) if base is not None else spec.base
    tuned_spec = (
        SourceSpec(path=str(finetuned)) if finetuned is not None else spec.extract.finetuned
    )
    base_source = resolve_source(base_spec, role="base model", patterns=BASE_PATTERNS, token=token)
    tuned_source = resolve_source(
        tuned_spec, role="fine-tuned model", patterns=BASE_PATTERNS, token=token
    )
    recorded = record.get("inputs") if isinstance(record, dict) else None
    if isinstance(recorded, list):
        current = [
            recipe.source_record("base", base_source, BASE_PATTERNS),
            recipe.source_record("finetuned", tuned_source, BASE_PATTERNS),
        ]
        changes = recipe.input_changes([r for r in recorded if isinstance(r, dict)], current)
        if changes:
            raise InputsChangedError(
                f"the inputs differ from those {recipe_path} recorded ({len(changes)} "
                f"file(s)):{listing(changes)}\nthe adapter cannot be checked against them; "
                "restore those files (or give --base/--finetuned to check it against others)"
            )
        log.info("verify: both inputs match the recipe's sha256")
    outputs = record.get("outputs") if isinstance(record, dict) else None
    return _Inputs(
        base_source.local_dir,
        tuned_source.local_dir,
        spec.extract,
        dict(outputs) if isinstance(outputs, dict) else {},
    )


# ---------------------------------------------------------------------------------------
# The check


def verify_extraction(
    output_dir: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    finetuned: str | os.PathLike[str] | None = None,
    sample: int | None = None,
    token: str | None = None,
) -> ExtractionVerifyReport:
    """Check the extracted adapter in ``output_dir`` (see the module doc); ``sample``
    recomputes that many LoRA modules, spread over the model, instead of every one."""
    out = Path(output_dir)
    if not out.is_dir():
        raise InputError(f"{out}: no such folder")
    report_data = _read_report(out)
    weights = out / settings.ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(f"{weights}: missing; {out} holds no adapter")
    inputs = _inputs(out, report_data, base, finetuned, token)
    base_index = CheckpointIndex.from_folder(inputs.base)
    tuned_index = CheckpointIndex.from_folder(inputs.tuned)
    layout = adapter_layout(weights)
    peft_view, config_failures = read_peft_config(out)
    report = ExtractionVerifyReport(output_dir=out)
    report.problems += [f"{key}: in the adapter without PEFT's prefix" for key in layout.unknown]
    recorded_settings = report_data.get("settings")
    expected_settings = inputs.settings.model_dump(mode="json", exclude={"finetuned"})
    if isinstance(recorded_settings, dict) and recorded_settings != expected_settings:
        differ = sorted(
            k
            for k in set(recorded_settings) | set(expected_settings)
            if recorded_settings.get(k) != expected_settings.get(k)
        )
        report.problems.append(
            f"{settings.EXTRACTION_REPORT_FILE}: settings differ from the recipe's ({', '.join(differ)})"
        )
    rows = [r for r in report_data["modules"] if isinstance(r, dict)]
    by_status: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_status.setdefault(str(row.get("status")), []).append(row)
    extracted = {str(r.get("module")): r for r in by_status.get("extracted", [])}
    full = {str(r.get("module")): r for r in by_status.get("full", [])}
    report.lora_total = len(extracted)

    reader = FileReader()
    try:
        covered: set[str] = set()
        # The config against the adapter's files.
        report.checks.append(_config_check(peft_view, config_failures, layout, base_index))
        # LoRA modules.
        for module in sorted(set(layout.factors) - set(extracted)):
            report.checks.append(
                ItemCheck(
                    module,
                    "lora",
                    False,
                    "the adapter holds factors that "
                    f"{settings.EXTRACTION_REPORT_FILE} does not list as extracted",
                )
            )
        names = sorted(extracted)
        chosen = set(names if sample is None else spread(names, sample))
        for module in names:
            weight = f"{module}.weight"
            covered.add(weight)
            bias = layout.factors.get(module, LoraFactors(module, "lora")).bias
            if bias is not None:
                covered.add(f"{module}.bias")
            if module not in chosen:
                continue
            report.checks.append(
                _lora_check(
                    module, extracted[module], layout, peft_view, base_index, tuned_index, reader
                )
            )
        # Saved modules (modules_to_save).
        report.checks += _saved_checks(full, layout, tuned_index, reader, covered)
        # Everything left out.
        report.checks += _left_out_checks(
            report_data, inputs.settings, base_index, tuned_index, reader, covered, report
        )
        report.checks += _file_checks(out, inputs.outputs)
    finally:
        reader.close()
    log.info(
        "verify: %d items of %s checked, %d failed",
        len(report.checks),
        out,
        sum(not c.ok for c in report.checks),
    )
    return report


# The files whose meaning verify checks: their bytes are checked against the recipe too.
CHECKED_FILES = (
    settings.ADAPTER_WEIGHTS_FILE,
    settings.ADAPTER_CONFIG_FILE,
    settings.EXTRACTION_REPORT_FILE,
)


def _file_checks(out: Path, recorded: Mapping[str, str]) -> list[ItemCheck]:
    """The adapter's files against the sha256 the recipe recorded when it wrote them."""
    from mergejob.recipe import sha256_file

    checks = []
    for name in CHECKED_FILES:
        if name not in recorded:
            continue
        same = sha256_file(out / name) == recorded[name]
        note = "as the recipe recorded it" if same else "sha256 differs from the recipe's"
        checks.append(ItemCheck(name, "file", same, note))
    return checks


def _config_check(
    view: PeftView,
    failures: list[str],
    layout: AdapterLayout,
    base: CheckpointIndex,
) -> ItemCheck:
    problems = list(failures)
    if view.config is not None:
        modules = sorted({n.rpartition(".")[0] for n in base.tensors if n.endswith(".weight")})
        targeted = {m for m in modules if view.targets(m)}
        with_factors = set(layout.factors)
        if extra := sorted(targeted - with_factors):
            problems.append(
                f"target_modules matches {len(extra)} module(s) without factors in the adapter "
                f"({few(extra)}): PEFT would start them at zero"
            )
        if missing := sorted(with_factors - targeted):
            problems.append(
                f"target_modules misses {len(missing)} module(s) the adapter has factors for "
                f"({few(missing)}): PEFT would not load them"
            )
        saved_modules = {n.rpartition(".")[0] for n in layout.saved}
        listed = set(view.raw.get("modules_to_save") or [])
        if listed != saved_modules:
            problems.append(
                f"modules_to_save lists {few(sorted(listed)) or 'none'}, the adapter saves "
                f"{few(sorted(saved_modules)) or 'none'}"
            )
        biases = any(f.bias is not None for f in layout.factors.values())
        if bool(view.raw.get("lora_bias")) != biases:
            problems.append(
                f"lora_bias is {bool(view.raw.get('lora_bias'))}, but the adapter "
                f"{'holds' if biases else 'holds no'} lora_B biases"
            )
        elif biases and (lacking := sorted(m for m, f in layout.factors.items() if f.bias is None)):
            problems.append(f"lora_bias: no lora_B bias for {few(lacking)}")
        for module, factors in sorted(layout.factors.items()):
            rank = factors.a.shape[0] if factors.a is not None else None
            if rank is not None and view.rank(module) != rank:
                problems.append(
                    f"{module}: rank {view.rank(module)} by r/rank_pattern, its factors have "
                    f"rank {rank}"
                )
    note = "; ".join(problems)
    return ItemCheck(settings.ADAPTER_CONFIG_FILE, "config", not problems, note)


def _lora_check(
    module: str,
    row: Mapping[str, Any],
    layout: AdapterLayout,
    view: PeftView,
    base: CheckpointIndex,
    tuned: CheckpointIndex,
    reader: FileReader,
) -> ItemCheck:
    factors = layout.factors.get(module)
    weight = f"{module}.weight"
    if factors is None or factors.a is None or factors.b is None:
        return ItemCheck(module, "lora", False, "extracted by the report, no lora_A/lora_B saved")
    if weight not in base.tensors or weight not in tuned.tensors:
        return ItemCheck(module, "lora", False, f"{weight}: not in both models")
    if factors.kind != row.get("kind"):
        note = f"saved as {factors.kind} factors, the report says {row.get('kind')}"
        return ItemCheck(module, "lora", False, note)
    a = reader.tensor(factors.a).double()
    b = reader.tensor(factors.b).double()
    delta = read_delta(reader, base.tensors[weight], tuned.tensors[weight])
    # PEFT's delta: (B @ A).T for an embedding and with fan_in_fan_out (Conv1D); compare
    # it with ΔW in B @ A's orientation, (out, in), as the engine decomposed it.
    transposed = factors.kind == "embedding" or view.fan_in_fan_out
    if delta.dim() != 2 or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        return ItemCheck(module, "lora", False, "factors or weight are not matrices of one rank")
    work = delta.T if transposed else delta
    if tuple(work.shape) != (b.shape[0], a.shape[1]):
        shape = [b.shape[0], a.shape[1]]
        note = (
            f"B·A is {shape}{' transposed' if transposed else ''}, the weight {list(delta.shape)}"
        )
        return ItemCheck(module, "lora", False, note)
    rank = int(a.shape[0])
    scale = view.scale(module)
    b = b * scale
    residual = _residual64(work, b, a)
    delta_norm = math.sqrt(squared_norm(work))
    factors_norm = float(torch.linalg.vector_norm(b)) * float(torch.linalg.vector_norm(a))
    error = (
        math.sqrt(residual) / delta_norm if delta_norm > 0 else (0.0 if residual == 0 else math.inf)
    )
    tolerance = error_tolerance(rank, factors_norm, math.sqrt(residual), delta_norm, work.numel())
    problems = []
    reported = _number(row.get("error"))
    if reported is None:
        problems.append("the report gives no error")
    elif not abs(reported - error) <= tolerance:
        problems.append(
            f"relative error {error:.6g}, {settings.EXTRACTION_REPORT_FILE} reports "
            f"{reported:.6g} (|diff| {abs(reported - error):.3g} > tolerance {tolerance:.3g})"
        )
    norm = _number(row.get("norm"))
    if norm is not None and not abs(norm - delta_norm) <= norm_tolerance(delta_norm, work.numel()):
        problems.append(f"‖ΔW‖ {delta_norm:.6g}, the report says {norm:.6g}")
    if row.get("rank") != rank:
        problems.append(f"rank {rank} saved, the report says {row.get('rank')}")
    if factors.bias is not None:
        problems += _bias_problems(module, factors.bias, scale, base, tuned, reader)
    scale_note = f" at scale {scale:g}" if scale != 1 else ""
    note = "; ".join(problems) or f"relative error {error:.6g}{scale_note}"
    return ItemCheck(module, "lora", not problems, note, error, reported, tolerance)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _residual64(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """``‖ΔW - B A‖_F²`` in fp64 (``b``, ``a`` fp64), a block of rows at a time (no
    module-sized fp64 matrix is held)."""
    err = 0.0
    step = rows_per_block(delta)
    for start in range(0, delta.shape[0], step):
        rows = delta[start : start + step].double()
        err += float(torch.sum((rows - b[start : start + step] @ a) ** 2))
    return err


def _bias_problems(
    module: str,
    ref: TensorRef,
    scale: float,
    base: CheckpointIndex,
    tuned: CheckpointIndex,
    reader: FileReader,
) -> list[str]:
    """A ``lora_B`` bias must be Δb (fp32, as the engine forms it) / scale rounded once to
    its dtype: PEFT's merge adds it times the scale to the layer's bias."""
    name = f"{module}.bias"
    if name not in base.tensors or name not in tuned.tensors:
        return [f"a lora_B bias, but {name} is not in both models"]
    want = (read_delta(reader, base.tensors[name], tuned.tensors[name]) / scale).to(
        getattr(torch, ref.dtype)
    )
    got = reader.tensor(ref)
    if not _same_bytes(got, want):
        return [f"lora_B bias differs from the change of {name} (rounded to {ref.dtype})"]
    return []


def _same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return bool(torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)))


def _identical(x: torch.Tensor, y: torch.Tensor) -> bool:
    """As the engine compares the models: the bytes for one dtype, values across dtypes."""
    if x.dtype == y.dtype:
        return _same_bytes(x, y)
    if x.is_floating_point() and y.is_floating_point() and x.shape == y.shape:
        return bool(torch.equal(x.double(), y.double()))
    return False


def _saved_checks(
    full: Mapping[str, Mapping[str, Any]],
    layout: AdapterLayout,
    tuned: CheckpointIndex,
    reader: FileReader,
    covered: set[str],
) -> list[ItemCheck]:
    """Every saved tensor is the fine-tune's, bit for bit; every tensor of a module the
    report saves whole is saved. Adds what it checks to ``covered``."""
    checks: list[ItemCheck] = []
    expected: dict[str, str] = {}  # saved name -> the fine-tune's tensor it must be
    for module, row in full.items():
        own = [n for n in tuned.tensors if n.rpartition(".")[0] == module]
        if not own:
            note = "saved whole by the report, but not in the fine-tuned model"
            checks.append(ItemCheck(module, "saved", False, note))
        for name in own:
            expected[name] = name
            covered.add(name)
        mirror = row.get("mirror")
        if isinstance(mirror, str) and f"{module}.weight" in tuned.tensors:
            expected[f"{mirror}.weight"] = f"{module}.weight"
            covered.add(f"{mirror}.weight")
    for name in sorted(set(expected) - set(layout.saved)):
        note = "its module is saved whole by the report, but the tensor is not in the adapter"
        checks.append(ItemCheck(name, "saved", False, note))
    for name, ref in sorted(layout.saved.items()):
        source = expected.get(name)
        if source is None:
            note = (
                f"saved in the adapter, but {settings.EXTRACTION_REPORT_FILE} does not save "
                "its module whole"
            )
            checks.append(ItemCheck(name, "saved", False, note))
            continue
        got, want = reader.tensor(ref), reader.tensor(tuned.tensors[source])
        if _same_bytes(got, want):
            checks.append(ItemCheck(name, "saved", True, "the fine-tune's bytes"))
        else:
            what = "bytes" if source == name else f"{source} (a tied head's copy)"
            note = (
                f"not the fine-tune's {what} ({got.dtype} {list(got.shape)} vs "
                f"{want.dtype} {list(want.shape)}{_diff_note(got, want)})"
            )
            checks.append(ItemCheck(name, "saved", False, note))
    return checks


def _diff_note(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape or not (got.is_floating_point() and want.is_floating_point()):
        return ""
    diff = (got.double() - want.double()).abs()
    return f", {int((diff > 0).sum())} element(s) differ, max |diff| {float(diff.max()):.3g}"


def _left_out_checks(
    report_data: Mapping[str, Any],
    extract: ExtractSpec,
    base: CheckpointIndex,
    tuned: CheckpointIndex,
    reader: FileReader,
    covered: set[str],
    report: ExtractionVerifyReport,
) -> list[ItemCheck]:
    """Every tensor neither saved nor decomposed: identical in both models, or dropped
    (listed, with skip_undecomposable) or excluded (listed, and include/exclude do)."""
    dropped = set(_strings(report_data.get("dropped")))
    excluded = set(_strings(report_data.get("excluded")))
    checks: list[ItemCheck] = []
    for name in sorted(set(base.tensors) ^ set(tuned.tensors)):
        if name not in covered:
            side = "the base" if name in base.tensors else "the fine-tuned model"
            report.problems.append(f"{name}: only {side} has it")
    for name in sorted((set(base.tensors) & set(tuned.tensors)) - covered):
        module = name.rpartition(".")[0]
        if name in dropped:
            ok = extract.skip_undecomposable
            note = "dropped (skip_undecomposable)"
            if not ok:
                note = "listed as dropped, but skip_undecomposable is off"
            checks.append(ItemCheck(name, "left out", ok, note))
            continue
        if module in excluded:
            ok = not included(module, extract)
            note = "excluded by include/exclude"
            if not ok:
                note = "listed as excluded, but include/exclude keep its module"
            checks.append(ItemCheck(name, "left out", ok, note))
            continue
        same = _identical(reader.tensor(base.tensors[name]), reader.tensor(tuned.tensors[name]))
        note = "identical in both models"
        if not same:
            note = (
                "differs between the base and the fine-tune, but the adapter leaves it out "
                f"({settings.EXTRACTION_REPORT_FILE} neither extracts, saves, drops nor excludes it)"
            )
        checks.append(ItemCheck(name, "left out", same, note))
    return checks


def _strings(value: Any) -> Iterable[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
