"""Check a merged output against its base and adapters, tensor by tensor.

For each sampled tensor (``all_tensors`` for every one) the expected value is recomputed
from the base and the adapters' safetensors with PEFT's formulas, in fp32, and rounded once
to the output's dtype; the difference is measured in units in the last place (ulps) of that
dtype. The tolerance follows from the engine the recipe records (:func:`default_tolerance`,
:func:`share_limit`): the stream engine rounds once, so 1 ulp whatever the number of adapters;
the peft engine rounds after each adapter, so 1 ulp per adapter. Within that bound the share
of a tensor's elements off by one ulp or more must also be a share rounding explains: a tensor
scaled by 1.01 moves nearly every element by one or two ulps and fails on its share even
where the ulp bound allows it. Tensors no adapter touches must be the base's bytes. An
optional logits check runs a few tokens through the output and through
the base with the adapters applied by PEFT (unmerged), when both fit in memory.

Example::

    from mergejob.verify import verify_output
    report = verify_output("merged")            # base and adapters from merged/mergejob.yaml
    assert report.ok, report.summary()

The module reads only the tensors it checks (safetensors opens files lazily).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergejob import settings
from mergejob.adapter_config import adapter_weights_path, read_adapter_config
from mergejob.errors import InputError, ModelError
from mergejob.experts import fused_parameters, wrapper_target
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.headers import read_tensors

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 24


# ---------------------------------------------------------------------------------------
# One adapter, read into what each target tensor receives


@dataclass
class ModuleDelta:
    """What one adapter does to one module of the base."""

    module: str
    lora_a: torch.Tensor | None = None  # (r, in) or, for embeddings, (r, vocab)
    lora_b: torch.Tensor | None = None  # (out, r) or, for embeddings, (dim, r)
    scale: float = 1.0
    embedding: bool = False
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None  # DoRA
    bias: torch.Tensor | None = None  # lora_B bias (lora_bias=True)
    # Full tensors by leaf name (weight, bias): modules_to_save, or saved embedding layers.
    replacement: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class AdapterWeights:
    """An adapter folder as per-module deltas, and its weight in the merge."""

    name: str
    weight: float
    modules: dict[str, ModuleDelta]
    # Parameter LoRA on fused MoE experts, by expert tensor on disk: (the wrapper's delta,
    # experts, this tensor's expert, its rows in the fused matrix): see add_expert_parts.
    experts: dict[str, list[tuple[ModuleDelta, int, int, tuple[int, int]]]] = field(
        default_factory=dict
    )

    @property
    def uses_dora(self) -> bool:
        """Whether any module of this adapter is DoRA (its merge depends on the weight)."""
        return any(m.magnitude is not None for m in self.modules.values())


def pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module's full name or a
    suffix of it (the first key that matches wins), as ``get_pattern_key`` does."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


def load_adapter(
    adapter_dir: Path, *, weight: float = 1.0, name: str | None = None
) -> AdapterWeights:
    """Read an adapter's config and safetensors into per-module deltas (fp32)."""
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(
            f"{adapter_dir}: verify recomputes LoRA adapters only; this one is {peft_type}"
        )
    tensors = load_file(str(adapter_weights_path(adapter_dir)))
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules: dict[str, ModuleDelta] = {}

    def entry(module: str) -> ModuleDelta:
        if module not in modules:
            modules[module] = ModuleDelta(module=module)
        return modules[module]

    replacements: dict[tuple[str, str], tuple[int, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        key = key.removeprefix(settings.PEFT_PREFIX)
        value = tensor.float()
        for suffix, attr in (
            (".lora_A.weight", "lora_a"),
            (".lora_B.weight", "lora_b"),
            (".lora_embedding_A", "lora_a"),
            (".lora_embedding_B", "lora_b"),
            (".lora_magnitude_vector", "magnitude"),
            (".lora_magnitude_vector.weight", "magnitude"),
            (".lora_B.bias", "bias"),
        ):
            if key.endswith(suffix):
                delta = entry(key[: -len(suffix)])
                setattr(delta, attr, value)
                delta.embedding = delta.embedding or "embedding" in suffix
                break
        else:
            # Full tensors: a plain copy, modules_to_save, or the base_layer PEFT saves.
            if ".original_module." in key:
                continue
            head, _, leaf = key.rpartition(".")
            rank = 0  # a plain copy (save_embedding_layers): PEFT loads it over the rest
            for marker, marker_rank in ((".modules_to_save", 1), (".base_layer", 2)):
                if head.endswith(marker):
                    head, rank = head[: -len(marker)], marker_rank
                    break
            current = replacements.get((head, leaf))
            if current is None or rank < current[0]:
                replacements[(head, leaf)] = (rank, value)
    for (module, leaf), (_rank, value) in replacements.items():
        entry(module).replacement[leaf] = value
    for module, delta in modules.items():
        if delta.lora_a is None:
            continue
        r = pattern_value(rank_pattern, module, r_default)
        alpha = pattern_value(alpha_pattern, module, alpha_default)
        delta.scale = alpha / math.sqrt(r) if rslora else alpha / r
        delta.fan_in_fan_out = fan_in_fan_out and not delta.embedding
        if delta.lora_b is None:
            raise InputError(f"{adapter_dir}: {module} has lora_A but no lora_B")
    return AdapterWeights(name=name or str(adapter_dir), weight=weight, modules=modules)


@dataclass
class Expected:
    """The merged value of one tensor in fp32, and the largest magnitude each element had
    on the way (base, then after each adapter): the scale its rounding steps were at."""

    value: torch.Tensor
    scale: torch.Tensor


def expected_tensor(
    name: str, base: torch.Tensor | None, adapters: list[AdapterWeights]
) -> Expected | None:
    """The merged value of tensor ``name``, or None when no adapter touches it.

    ``W' = W + sum_i w_i * scale_i * (B_i @ A_i)`` (transposed for fan_in_fan_out and for
    embeddings), DoRA rescaling rows to the magnitude vector, in the order given, in fp32.
    """
    module, _, leaf = name.rpartition(".")
    value = base.float() if base is not None else None
    scale = value.abs() if value is not None else None
    touched = False
    for adapter in adapters:
        for part in adapter.experts.get(name, ()):
            if value is None:
                raise ModelError(f"{name}: not in the base checkpoint")
            before = value.abs()
            value = value + _expert_update(*part, adapter.weight)
            scale = torch.maximum(before if scale is None else scale, value.abs())
            touched = True
        delta = adapter.modules.get(module)
        if delta is None:
            continue
        if leaf in delta.replacement:
            value = delta.replacement[leaf].clone()
            scale = value.abs()
            touched = True
        if leaf == "weight" and delta.lora_a is not None:
            if value is None:
                raise ModelError(f"{name}: not in the base checkpoint")
            value = _apply_lora(value, delta, adapter.weight)
            touched = True
        elif leaf == "bias" and delta.bias is not None and value is not None:
            value = value + adapter.weight * delta.scale * delta.bias
            touched = True
        else:
            continue
        scale = value.abs() if scale is None or scale.shape != value.shape else scale
        scale = torch.maximum(scale, value.abs())
    if not touched or value is None or scale is None:
        return None
    return Expected(value=value, scale=scale)


def _expert_update(
    delta: ModuleDelta, experts: int, expert: int, rows: tuple[int, int], w: float
) -> torch.Tensor:
    """PEFT's ParamWrapper delta of one expert (A is ``(r * experts, in)``, B is
    ``(out, r * experts)``), rows ``rows`` of it: the part one tensor on disk holds."""
    assert delta.lora_a is not None and delta.lora_b is not None
    rank = delta.lora_a.shape[0] // experts
    a = delta.lora_a.view(experts, rank, -1)[expert]
    b = delta.lora_b.view(delta.lora_b.shape[0], rank, experts)[:, :, expert]
    return (b[rows[0] : rows[1]] @ a) * (w * delta.scale)


def add_expert_parts(
    adapter: AdapterWeights, adapter_dir: Path, base_dir: Path, base_index: CheckpointIndex
) -> None:
    """Map the adapter's parameter LoRAs (``target_parameters``) to the expert tensors on
    disk, with transformers' conversion mapping for the base's model_type
    (:mod:`mergejob.experts`), so that those tensors are checked like any merged tensor."""
    config = read_adapter_config(adapter_dir)
    if not config.get("target_parameters"):
        return
    model_type = json.loads((base_dir / settings.CONFIG_FILE).read_text()).get("model_type")
    fused = fused_parameters(model_type, {n: t.shape for n, t in base_index.tensors.items()})
    for module, delta in adapter.modules.items():
        if delta.lora_a is None or delta.lora_b is None or f"{module}.weight" in base_index.tensors:
            continue
        param = wrapper_target(
            config, module, fused, list(delta.lora_a.shape), list(delta.lora_b.shape)
        )
        if param is None:
            continue
        for part in param.parts:
            entry = (delta, param.experts, part.expert, part.rows)
            adapter.experts.setdefault(part.disk, []).append(entry)


def _apply_lora(weight: torch.Tensor, delta: ModuleDelta, w: float) -> torch.Tensor:
    assert delta.lora_a is not None and delta.lora_b is not None
    product = delta.lora_b @ delta.lora_a
    if delta.embedding or delta.fan_in_fan_out:
        product = product.T
    # Resized vocabularies: the LoRA covers the adapter's rows; never more than the weight.
    if product.shape != weight.shape:
        raise ModelError(
            f"{delta.module}: LoRA delta {list(product.shape)} does not fit the weight "
            f"{list(weight.shape)}"
        )
    # PEFT's expression, (B @ A) * scale, with the adapter's weight folded into the scale
    # (the stream engine's coef), so one adapter reproduces it bit for bit.
    update = product * (w * delta.scale)
    if delta.magnitude is None:
        return weight + update
    # DoRA: scale each output row of (W + dW) to the trained magnitude.
    combined = weight + update
    rows = combined.T if delta.fan_in_fan_out else combined
    norm = torch.linalg.norm(rows, dim=1)
    factor = (delta.magnitude / norm).view(-1, 1)
    result = factor * rows
    return result.T if delta.fan_in_fan_out else result


# ---------------------------------------------------------------------------------------
# Units in the last place


def ulp_of(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at the magnitude of each element of ``x`` (fp64)."""
    info = torch.finfo(dtype)
    mag = x.double().abs()
    _mantissa, exponent = torch.frexp(mag)
    spacing = torch.ldexp(torch.full_like(mag, info.eps), exponent - 1)
    smallest = info.smallest_normal * info.eps
    return spacing.clamp_min(smallest)


def weight_ulps(
    got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """|got - want| in ulps of the output dtype at the weight's magnitude (the larger of
    |want| and ``scale``, the base weight), elementwise, in fp64.

    Measuring at the weight's magnitude, not the result's, is what "one rounding step per
    adapter" means when an adapter cancels most of a weight: PEFT rounds the delta to the
    output dtype before adding it, an error of half an ulp of the delta, which can be many
    ulps of a result near zero but never more than one of the weight.
    """
    magnitude = want.double().abs()
    if scale is not None and scale.shape == want.shape:
        magnitude = torch.maximum(magnitude, scale.double().abs())
    return (got.double() - want.double()).abs() / ulp_of(magnitude, got.dtype)


# ---------------------------------------------------------------------------------------
# The check


@dataclass
class TensorCheck:
    """The largest difference found in one tensor."""

    name: str
    kind: str  # merged | untouched | replaced
    max_abs: float
    max_ulps: float  # at the weight's magnitude, see weight_ulps
    tolerance_ulps: float
    ok: bool
    note: str = ""
    share_off: float = 0.0  # elements that differ from the reference: 1 ulp or more off
    share_limit: float | None = None  # the most rounding explains (None: not checked)


@dataclass
class VerifyReport:
    """Every tensor checked, and the logits check if it ran."""

    output_dir: Path
    tolerance_ulps: float
    checks: list[TensorCheck] = field(default_factory=list)
    tensors_total: int = 0
    logits: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    engine: str | None = None  # the engine the recipe records; None when unknown
    share_limit: float | None = None  # for a large tensor (small ones get some room)

    @property
    def ok(self) -> bool:
        """Every tensor within tolerance, no missing tensor, and the logits agree."""
        logits_ok = self.logits is None or self.logits.get("ok", True)
        return not self.problems and all(c.ok for c in self.checks) and logits_ok

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``mergejob verify --json``)."""
        return {
            "output_dir": str(self.output_dir),
            "ok": self.ok,
            "tolerance_ulps": self.tolerance_ulps,
            "engine": self.engine,
            "share_limit": self.share_limit,
            "tensors_total": self.tensors_total,
            "tensors_failed": sum(not c.ok for c in self.checks),
            "tensors_checked": len(self.checks),
            "problems": self.problems,
            "tensors": [c.__dict__ for c in self.checks],
            "logits": self.logits,
        }

    def summary(self) -> str:
        """A few lines for people: the verdict (how many tensors failed, per kind, and the
        logits), the tolerance, then every tensor beyond it and every problem."""
        bad = [c for c in self.checks if not c.ok]
        checked = len(self.checks)
        kinds = []
        for kind in ("merged", "replaced", "untouched"):
            of_kind = [c for c in self.checks if c.kind == kind]
            if of_kind:
                failed = sum(not c.ok for c in of_kind)
                kinds.append(
                    f"{kind}: {len(of_kind) - failed} ok" + (f", {failed} failed" if failed else "")
                )
        if checked < self.tensors_total:
            kinds.insert(0, f"a sample of the {self.tensors_total}")
        word = "OK" if self.ok else "FAILED"
        verdict = (
            f"{word}: {checked} of {self.tensors_total} tensors checked, all within tolerance"
            if not bad
            else f"{word}: {len(bad)} of {checked} tensors checked beyond tolerance"
        )
        problems = f"; {len(self.problems)} problem(s)" if self.problems else ""
        lines = [f"{verdict} ({'; '.join(kinds)}){problems}; logits: {self._logits_word()}"]
        share = self.share_limit
        lines.append(
            f"  tolerance ({self.engine or 'unknown'} engine): {self.tolerance_ulps:g} ulp of the "
            "output dtype at the weight's magnitude"
            + (
                f", and at most {share:.1%} of a tensor's elements off by 1 ulp or more (more "
                "for small tensors)"
                if share is not None
                else ""
            )
            + "; tensors no adapter touches: the base's bytes"
        )
        for c in bad:
            share_text = ""
            if c.share_limit is not None:
                share_text = (
                    f", {c.share_off:.1%} of elements off by 1 ulp or more "
                    f"(rounding explains {c.share_limit:.1%})"
                )
            lines.append(
                f"  {c.name}: {c.max_ulps:.3g} ulp (tolerance {c.tolerance_ulps:g}){share_text}, "
                f"max |diff| {c.max_abs:.3g} {c.note}".rstrip()
            )
        lines += [f"  {p}" for p in self.problems]
        if self.logits is not None:
            lines.append(f"  logits: {self.logits.get('message', '')}")
        return "\n".join(lines)

    def _logits_word(self) -> str:
        if self.logits is None:
            return "not run"
        if self.logits.get("skipped"):
            return "skipped"
        return "ok" if self.logits.get("ok", True) else "FAILED"


def default_tolerance(engine: str | None, adapters: list[AdapterWeights]) -> int:
    """Most ulps an element of a merged tensor may be off, for the engine that merged it.

    The stream engine sums every adapter in fp32 and rounds once, as verify's reference does,
    so on a CPU it matches bit for bit; still 1 ulp, whatever the number of adapters, since
    its fp32 sums may run in another order than verify's (another BLAS, a GPU's matmul, DoRA's
    norm), and a last-bit difference in fp32 flips the rounding of an element that lies right
    at a rounding boundary of the output dtype. The peft engine rounds to the output dtype
    after each adapter: 1 ulp per adapter. Unknown engine: the peft engine's, the looser.
    """
    if engine == "stream":
        return 1
    return max(1, len(adapters))


# The stream engine's share bound (16-bit outputs). Its fp32 value and verify's differ by a
# few fp32 ulps at most, so an element rounds to another bf16 (fp16) value only where its
# exact value lies within those few fp32 ulps of a rounding boundary: about k * 2**-16
# (2**-13) of the elements for k fp32 ulps, under 0.1 % even for k = 8. 1 % leaves ten times
# that room, and a corruption the ulp bound lets through moves far more: scaling a tensor
# by 1.003 moves about half its bf16 elements by one ulp.
STREAM_SHARE_LIMIT = 0.01


def share_limit(
    engine: str | None, adapters: int, dtype: torch.dtype, numel: int | None = None
) -> float | None:
    """The largest share of a merged tensor's elements that may be off by 1 ulp or more, for
    ``adapters`` merged by ``engine`` into ``dtype``; None where rounding explains any share.

    - stream, 16-bit output: :data:`STREAM_SHARE_LIMIT`. A float32 output has no rounding
      step to hide fp32 order differences: they show as 1-ulp differences in any share, so
      only the ulp bound holds there.
    - peft (or unknown): PEFT rounds the running sum after each adapter, each time by an
      error within half an ulp. An element ends on another value than the once-rounded
      reference when the summed error S carries it across a rounding boundary, with a
      probability of about E|S| <= sqrt(E[S**2]) = sqrt(n / 12) for n roundings (an upper
      bound: the first adapter's rounding is the reference's own). Measured on bf16: 28 % for
      2 adapters (bound 41 %), 48 % for 5 (bound 65 %); scaling by 1.01 moves over 90 %. From
      12 adapters on the bound reaches 100 %: nothing to check.

    Given ``numel``, plus three standard deviations of a binomial count, so that a small
    tensor (a bias of 64 elements) is not failed for the one element chance puts beyond the
    expectation.
    """
    if engine == "stream":
        if dtype == torch.float32:
            return None
        limit = STREAM_SHARE_LIMIT
    else:
        limit = math.sqrt(max(1, adapters) / 12)
    if limit >= 1.0:
        return None
    if numel is None:
        return limit
    return min(1.0, limit + 3 * math.sqrt(limit * (1 - limit) / max(1, numel)))


def choose_sample(names: list[str], touched: set[str], count: int) -> list[str]:
    """``count`` tensors spread over the checkpoint, mostly ones the adapters change, and
    always the embeddings and head when touched (where untying and resizing happen)."""
    changed = sorted(n for n in names if n in touched)
    untouched = sorted(n for n in names if n not in touched)
    special = [n for n in changed if any(t in n for t in ("embed", "lm_head", "wte"))]
    n_untouched = min(len(untouched), max(1, count // 6))
    n_changed = max(0, count - n_untouched - len(special))
    picked = set(special) | set(spread(changed, n_changed)) | set(spread(untouched, n_untouched))
    return sorted(picked)


def spread(items: Sequence[str], count: int) -> list[str]:
    """``count`` of ``items`` spread evenly over the list (all of them when it is short)."""
    if count <= 0 or not items:
        return []
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def verify_output(
    output_dir: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    adapters: list[str | os.PathLike[str]] | None = None,
    weights: list[float] | None = None,
    all_tensors: bool = False,
    sample: int = DEFAULT_SAMPLE,
    tolerance_ulps: int | None = None,
    logits: bool = True,
    engine: str | None = None,
) -> VerifyReport:
    """Check ``output_dir`` against base + adapters (from its recipe unless given)."""
    from safetensors import safe_open

    out = Path(output_dir)
    base_dir, adapter_dirs, weights, recorded_engine = _inputs(out, base, adapters, weights)
    engine = engine or recorded_engine
    adapter_weights = [
        load_adapter(d, weight=w, name=str(d)) for d, w in zip(adapter_dirs, weights, strict=True)
    ]
    tolerance = (
        default_tolerance(engine, adapter_weights) if tolerance_ulps is None else tolerance_ulps
    )
    out_index = CheckpointIndex.from_folder(out)
    base_index = CheckpointIndex.from_folder(base_dir)
    for adapter, adapter_dir in zip(adapter_weights, adapter_dirs, strict=True):
        add_expert_parts(adapter, Path(adapter_dir), Path(base_dir), base_index)
    report = VerifyReport(
        output_dir=out,
        tolerance_ulps=tolerance,
        tensors_total=len(out_index.tensors),
        engine=engine,
    )
    report.share_limit = share_limit(
        engine, len(adapter_weights), getattr(torch, out_index.stored_dtype())
    )

    missing = sorted(set(base_index.tensors) - set(out_index.tensors))
    if missing:
        report.problems.append(f"the output lacks {len(missing)} base tensors, e.g. {missing[0]}")
    touched = {
        n for n in out_index.tensors if n.rpartition(".")[0] in _touched_modules(adapter_weights)
    } | {n for a in adapter_weights for n in a.experts if n in out_index.tensors}
    names = sorted(out_index.tensors)
    chosen = names if all_tensors else choose_sample(names, touched, sample)
    log.info("verify: checking %d of %d tensors of %s", len(chosen), len(names), out)

    handles: dict[Path, Any] = {}

    def read(index: CheckpointIndex, name: str) -> torch.Tensor:
        path = index.folder / index.tensors[name].shard
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    embed_name = _embedding_name(base_index)
    for name in chosen:
        got = read(out_index, name)
        base_name = name if name in base_index.tensors else None
        if base_name is None and name.endswith("lm_head.weight") and embed_name:
            base_name = embed_name  # tied embeddings, untied by the merge
        base_tensor = read(base_index, base_name) if base_name else None
        expected = expected_tensor(name, base_tensor, adapter_weights)
        if expected is None:
            if base_tensor is None:
                report.problems.append(f"{name}: in the output but not in the base or adapters")
                continue
            # Untouched weights are the base's bytes (rounded once if --dtype changed them).
            same = base_tensor if got.dtype == base_tensor.dtype else base_tensor.to(got.dtype)
            report.checks.append(_compare(name, "untouched", got, same, 0, exact=True))
            continue
        want = expected.value.to(got.dtype)
        limit = share_limit(engine, len(adapter_weights), got.dtype, got.numel())
        report.checks.append(
            _compare(name, "merged", got, want, tolerance, scale=expected.scale, share=limit)
        )
    if logits:
        report.logits = logits_check(out, base_dir, adapter_dirs, weights)
    return report


def _compare(
    name: str,
    kind: str,
    got: torch.Tensor,
    want: torch.Tensor,
    tolerance: float,
    *,
    scale: torch.Tensor | None = None,
    exact: bool = False,
    share: float | None = None,
) -> TensorCheck:
    if got.shape != want.shape:
        note = f"shape {list(got.shape)}, expected {list(want.shape)}"
        return TensorCheck(name, kind, math.inf, math.inf, tolerance, False, note)
    if not got.is_floating_point() or exact:
        equal = got.dtype == want.dtype and torch.equal(got, want)
        note = "" if equal else "(not byte-identical to the base)"
        diff = 0.0 if equal else _max_abs(got, want)
        return TensorCheck(name, kind, diff, 0.0 if equal else math.inf, 0, equal, note)
    if not torch.isfinite(got).all():
        return TensorCheck(name, kind, math.inf, math.inf, tolerance, False, "non-finite values")
    if got.numel() == 0:
        return TensorCheck(name, kind, 0.0, 0.0, tolerance, True)
    ulps = float(weight_ulps(got, want, scale).max())
    # Off by one ulp or more at the element's own magnitude: any other value of the dtype.
    off = float((got != want).double().mean())
    ok = ulps <= tolerance and (share is None or off <= share)
    return TensorCheck(name, kind, _max_abs(got, want), ulps, tolerance, ok, "", off, share)


def _max_abs(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape or not got.is_floating_point():
        return math.inf
    return float((got.double() - want.double()).abs().max()) if got.numel() else 0.0


def _touched_modules(adapters: list[AdapterWeights]) -> set[str]:
    return {m for a in adapters for m in a.modules}


def _embedding_name(index: CheckpointIndex) -> str | None:
    for name in sorted(index.tensors):
        if name.endswith(
            ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
        ):
            return name
    return None


def _inputs(
    out: Path,
    base: str | os.PathLike[str] | None,
    adapters: list[str | os.PathLike[str]] | None,
    weights: list[float] | None,
) -> tuple[Path, list[Path], list[float], str | None]:
    """Base and adapter folders: given, or from the output's recipe (resolved locally); and
    the engine the recipe records (``recipe.engine.name``), whichever inputs were given."""
    from mergejob.recipe import read_recipe

    engine = None
    if base is not None and adapters and (out / settings.RECIPE_FILE).is_file():
        try:
            engine = _recorded_engine(read_recipe(out))
        except InputError:  # inputs given: a broken recipe only costs the engine's tolerance
            engine = None
    if base is None or not adapters:
        from mergejob.sources import ADAPTER_PATTERNS, BASE_PATTERNS, resolve_source
        from mergejob.spec import MergeSpec

        data = read_recipe(out)
        engine = _recorded_engine(data)
        data.pop("recipe", None)
        spec = MergeSpec.model_validate(data)
        engine = engine or spec.engine.name
        if base is None:
            base = resolve_source(spec.base, role="base model", patterns=BASE_PATTERNS).local_dir
        if not adapters:
            adapters = [
                resolve_source(a, role="adapter", patterns=ADAPTER_PATTERNS).local_dir
                for a in spec.adapters
            ]
            weights = weights or [a.weight for a in spec.adapters]
    adapter_dirs = [Path(a) for a in adapters]
    weights = list(weights) if weights else [1.0] * len(adapter_dirs)
    if len(weights) != len(adapter_dirs):
        raise InputError(f"--weights: {len(weights)} weights for {len(adapter_dirs)} adapters")
    return Path(base), adapter_dirs, weights, engine


def _recorded_engine(data: dict[str, Any]) -> str | None:
    """The engine that made the output, as the recipe records it (``recipe.engine.name``)."""
    recorded = data.get("recipe")
    engine = recorded.get("engine") if isinstance(recorded, dict) else None
    name = engine.get("name") if isinstance(engine, dict) else None
    return str(name) if name else None


# ---------------------------------------------------------------------------------------
# Logits


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _fits_in_memory(*folders: Path) -> bool:
    # Both models are loaded in fp32: twice the bytes of a 16-bit checkpoint each, plus room.
    need = sum(p.stat().st_size for folder in folders for p in Path(folder).glob("*.safetensors"))
    avail = available_memory()
    return avail is not None and need * 3 < avail


def logits_check(
    out: Path, base_dir: Path, adapter_dirs: list[Path], weights: list[float]
) -> dict[str, Any]:
    """Logits of a few tokens: the output vs the base with the adapters applied by PEFT
    (unmerged, fp32). Skipped when the models would not fit in memory."""
    if not _fits_in_memory(out, base_dir):
        return {"ok": True, "skipped": True, "message": "skipped: the model does not fit in memory"}
    try:
        return _logits_check(out, base_dir, adapter_dirs, weights)
    except Exception as exc:  # a model transformers cannot run here: report, do not fail
        log.warning("verify: logits check skipped: %s", exc)
        return {"ok": True, "skipped": True, "message": f"skipped: {type(exc).__name__}: {exc}"}


def _logits_check(
    out: Path, base_dir: Path, adapter_dirs: list[Path], weights: list[float]
) -> dict[str, Any]:
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        vocab = _embedding_rows(merged)
        reference: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        if _touches_embeddings(adapter_dirs) and _base_ties_embeddings(base_dir):
            # The merge unties a tied head before changing either side: the head starts as a
            # copy of the input embeddings. An untied base (Llama-3-70B) keeps its own head.
            reference.config.tie_word_embeddings = False
            out_emb = reference.get_output_embeddings()
            if out_emb is not None:
                out_emb.weight = torch.nn.Parameter(
                    reference.get_input_embeddings().weight.detach().clone()
                )
        if _embedding_rows(reference) != vocab:
            reference.resize_token_embeddings(vocab, mean_resizing=False)
        for i, (adapter_dir, weight) in enumerate(zip(adapter_dirs, weights, strict=True)):
            reference = PeftModel.from_pretrained(reference, str(adapter_dir), adapter_name=f"a{i}")
            if weight != 1.0:
                _scale_adapter(reference, f"a{i}", weight)
            reference = reference.merge_and_unload()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, 8), generator=generator)
    with torch.no_grad():
        got = merged(tokens).logits.float()
        want = reference(tokens).logits.float()
    diff = float((got - want).abs().max())
    scale = float(want.abs().max()) + 1e-6
    dtype = str(json.loads((out / settings.CONFIG_FILE).read_text()).get("dtype", "bfloat16"))
    rel_tol = 5e-2 if dtype in ("bfloat16", "float16") else 1e-4
    ok = diff <= rel_tol * scale
    return {
        "ok": ok,
        "tokens": tokens.shape[1],
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "tolerance": rel_tol * scale,
        "message": f"{'ok' if ok else 'FAILED'}: max |logit diff| {diff:.3g} over {tokens.shape[1]} "
        f"tokens (tolerance {rel_tol * scale:.3g})",
    }


def _base_ties_embeddings(base_dir: Path) -> bool:
    """Whether the base's head is its input embeddings: its config ties them
    (``tie_word_embeddings``, in ``text_config`` for multimodal configs), or it stores no
    head of its own, so that transformers builds the head from the embeddings."""
    config = json.loads((Path(base_dir) / settings.CONFIG_FILE).read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    tie = text.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    if tie:
        return True
    names = CheckpointIndex.from_folder(base_dir).tensors
    return not any(n.endswith(("lm_head.weight", "embed_out.weight")) for n in names)


def _touches_embeddings(adapter_dirs: list[Path]) -> bool:
    for adapter_dir in adapter_dirs:
        names = read_tensors(adapter_weights_path(adapter_dir))
        if any(t in name for name in names for t in ("embed", "lm_head", "wte")):
            return True
    return False


def _scale_adapter(model: Any, adapter_name: str, weight: float) -> None:
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter_name in scaling:
            scaling[adapter_name] *= weight


def _embedding_rows(model: Any) -> int:
    """Rows of a model's input embedding matrix (its vocabulary as the weights hold it)."""
    return int(model.get_input_embeddings().weight.shape[0])
