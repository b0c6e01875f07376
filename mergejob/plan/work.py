"""The plan of a merge: safetensors headers + adapter configs -> :class:`Plan`.

No weights are read. ``build_plan`` decides, for every tensor of the output, where its bytes
come from and what happens to them: copied unchanged (byte for byte), or read into fp32,
changed by each adapter in the order given (LoRA delta, DoRA, a replacing tensor), and rounded
once to the output dtype. It also decides the output's shard files, the tied/resized
embeddings and the config keys the merge changes, and it stops any job whose adapters do not
fit the base, listing every adapter tensor that maps to no base tensor or does not fit it.

The plan is a pure function of its inputs: every process of a job (local workers, the pods
of an Indexed Job, the finalising step) builds the same plan and the same ``plan_id``.

Example::

    from mergejob.plan.work import build_plan
    plan = build_plan("./base", [("./adapter-a", 1.0), ("./adapter-b", 0.5)],
                      output_dtype=None, max_shard_size=5 * 10**9)
    print(len(plan.shards), plan.changed_tensors, plan.config_updates)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergejob import settings
from mergejob.adapters import AdapterFactors, IgnoredTensor, LoraFactors, TokenRows, read_adapter
from mergejob.errors import IncompatibleAdapterError, ModelError, UnsupportedAdapterError
from mergejob.experts import (
    FusedParameter,
    fused_parameters,
    renamed_tensors,
    strip_base_layer,
    wrapper_target,
)
from mergejob.io.checkpoint import CheckpointIndex
from mergejob.io.headers import DTYPE_SIZES, FLOAT_DTYPES, TensorRef
from mergejob.io.shards import pack_shards, shard_file_names
from mergejob.sources import choose_tokenizer_source

log = logging.getLogger(__name__)

_INPUT_EMBEDDING_RE = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$"
)
_OUTPUT_EMBEDDING_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")

OpKind = Literal["replace", "lora", "dora", "bias", "rows"]


@dataclass(frozen=True)
class TensorOp:
    """One adapter's change to one tensor, applied in fp32.

    ``replace``: the tensor becomes ``source`` (modules_to_save, or a base copy PEFT loads);
    ``lora``: ``W += coef * (B @ A)`` (``.T`` when ``transposed``: Conv1D, embeddings);
    ``dora``: PEFT's DoRA merge of that delta and ``magnitude`` into the current ``W``;
    ``bias``: ``W += coef * B`` for a bias, ``b`` being lora_B's bias (``lora_bias``);
    ``rows``: rows ``tokens`` of ``W`` become the rows of ``source`` (trainable tokens).
    ``coef`` is the adapter's weight times its scale (alpha/r, or alpha/sqrt(r)).
    """

    adapter: int
    kind: OpKind
    source: TensorRef | None = None
    a: TensorRef | None = None
    b: TensorRef | None = None
    magnitude: TensorRef | None = None
    coef: float = 0.0
    transposed: bool = False
    # A parameter LoRA on fused experts (PEFT's ParamWrapper, target_parameters): A is
    # (r * experts, in), B is (out, r * experts); this tensor is rows ``rows`` of expert
    # ``expert``'s matrix in the fused run-time parameter (experts == 0: a plain LoRA).
    experts: int = 0
    expert: int = 0
    rows: tuple[int, int] = (0, 0)
    tokens: tuple[int, ...] = ()  # kind "rows": the embedding rows ``source`` replaces

    @property
    def rank(self) -> int:
        if self.a is None:
            return 0
        return self.a.shape[0] // self.experts if self.experts else self.a.shape[0]


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: where it starts from and what changes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the output dtype (torch name)
    source: TensorRef | None  # base bytes to start from; None when the first op replaces it
    ops: tuple[TensorOp, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def changed(self) -> bool:
        return bool(self.ops)

    @property
    def byte_copy(self) -> bool:
        """Copied byte for byte: no op and the stored dtype is the output dtype."""
        return not self.ops and self.source is not None and self.source.dtype == self.dtype


@dataclass(frozen=True)
class OutputShard:
    """One output file and the tensors it holds, in data order."""

    name: str
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class EmbeddingLayout:
    """The input and output embeddings of the base and whether they are tied."""

    input: str | None  # checkpoint name of the input embedding weight
    output: str | None  # the output embedding weight's name (as transformers saves it)
    tied: bool
    prefix: str | None  # base_model_prefix, e.g. "model" or "transformer"


@dataclass(frozen=True)
class Plan:
    """What the merge will write, decided from headers and configs only.

    ``shards`` is the output layout (a function of the plan alone, never of the worker
    count); ``config_updates`` are the config.json keys the merge decides
    (``tie_word_embeddings``, ``vocab_size``, ``dtype``); ``ignored`` lists adapter tensors
    PEFT does not use, with the reason; ``plan_id`` fingerprints all of it together with the
    identity of every input file, so finished-shard records of another plan are never trusted.
    """

    base_dir: str
    adapters: tuple[AdapterFactors, ...]
    output_dtype: str | None  # None: every tensor keeps its stored dtype
    max_shard_size: int
    shards: tuple[OutputShard, ...]
    embeddings: EmbeddingLayout
    config_updates: Mapping[str, Any]
    tokenizer_from: str | None
    ignored: tuple[tuple[int, IgnoredTensor], ...] = ()
    warnings: tuple[str, ...] = ()
    plan_id: str = ""
    input_identities: Mapping[str, str] = field(default_factory=dict)

    @property
    def tensors(self) -> list[OutputTensor]:
        return [t for shard in self.shards for t in shard.tensors]

    @property
    def changed_tensors(self) -> int:
        return sum(1 for t in self.tensors if t.changed)

    @property
    def output_bytes(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    @property
    def input_bytes(self) -> int:
        """Bytes of base tensors read (each at most once per output tensor)."""
        return sum(t.source.nbytes for t in self.tensors if t.source is not None)

    @property
    def largest_shard_bytes(self) -> int:
        return max((shard.nbytes for shard in self.shards), default=0)

    @property
    def largest_changed_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors if t.changed), default=0)

    @property
    def untied(self) -> bool:
        return self.config_updates.get("tie_word_embeddings") is False

    @property
    def lora_flops(self) -> int:
        """Multiply-adds of every LoRA product, times two (a time estimate's numerator)."""
        total = 0
        for tensor in self.tensors:
            for op in tensor.ops:
                if op.a is not None and op.b is not None:
                    out = op.rows[1] - op.rows[0] if op.experts else op.b.shape[0]
                    total += 2 * op.rank * op.a.shape[1] * out
        return total

    def shard_sizes(self) -> list[int]:
        return [shard.nbytes for shard in self.shards]

    def shard_inputs(self, index: int) -> dict[str, str]:
        """The input files shard ``index`` reads, as ``{label: path}``.

        A label names a file the same way on every machine (``base/NAME`` or
        ``adapter<i>/NAME``, never a local path): the shard records carry the sha256 of
        each under its label.
        """
        owners = {str(Path(self.base_dir)): "base"}
        for i, adapter in enumerate(self.adapters):
            owners.setdefault(str(Path(adapter.path)), f"adapter{i}")
        found: dict[str, str] = {}
        for path in _tensor_inputs(self.shards[index].tensors):
            where = Path(path)
            owner = owners.get(str(where.parent))
            found[f"{owner}/{where.name}" if owner else path] = path
        return dict(sorted(found.items()))

    def input_order(self, shards: Sequence[int]) -> list[str]:
        """The input files of ``shards``, in the order the merge first reads them (the
        adapters, small and read by most shards, first)."""
        adapters = [str(Path(a.path)) for a in self.adapters]
        order: dict[str, None] = {}
        for i in shards:
            for path in _tensor_inputs(self.shards[i].tensors):
                if str(Path(path).parent) in adapters:
                    order.setdefault(path)
        for i in shards:
            for path in _tensor_inputs(self.shards[i].tensors):
                order.setdefault(path)
        return list(order)

    def shard_named(self, name: str) -> OutputShard:
        for shard in self.shards:
            if shard.name == name:
                return shard
        raise KeyError(name)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest for logs, ``mergejob plan`` and the recipe."""
        return {
            "plan_id": self.plan_id,
            "base": self.base_dir,
            "adapters": [
                {
                    "path": a.path,
                    "weight": a.weight,
                    "lora_modules": len(a.loras),
                    "full_tensors": len(a.full),
                    "dora": a.use_dora,
                    "rslora": a.use_rslora,
                }
                for a in self.adapters
            ],
            "output_dtype": self.output_dtype or "as stored",
            "shards": len(self.shards),
            "output_bytes": self.output_bytes,
            "largest_shard_bytes": self.largest_shard_bytes,
            "tensors": len(self.tensors),
            "tensors_changed": self.changed_tensors,
            "config_updates": dict(self.config_updates),
            "tokenizer_from": self.tokenizer_from,
            "ignored": [
                {"adapter": i, "tensor": t.key, "reason": t.reason} for i, t in self.ignored
            ],
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------
# Building the plan


def build_plan(
    base_dir: Path | str,
    adapters: Sequence[tuple[Path | str, float]],
    *,
    output_dtype: str | None = None,
    max_shard_size: int = 5 * 10**9,
    trust_remote_code: bool = False,
    index: CheckpointIndex | None = None,
    identities: Mapping[str, str] | None = None,
) -> Plan:
    """Plan the merge of ``adapters`` (folder, weight), in order, into the base at ``base_dir``.

    ``index``: the base's layout when its shards are not on disk yet (a Hub base the stream
    engine fetches during the merge: :mod:`mergejob.fetch`), with ``identities`` naming
    those files by their content for the plan id.

    ``output_dtype`` None keeps every tensor's stored dtype; a dtype name converts every
    floating-point tensor to it. Raises :class:`IncompatibleAdapterError` listing every
    adapter tensor that maps to no base tensor or does not fit it, and
    :class:`UnsupportedAdapterError` for adapters the stream engine cannot express.
    """
    base_dir = Path(base_dir)
    config_path = base_dir / settings.CONFIG_FILE
    if not config_path.is_file():
        raise ModelError(f"{config_path}: missing; is this a model folder?")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path}: not valid JSON ({exc})") from None
    if index is None:
        index = CheckpointIndex.from_folder(base_dir)
    base: dict[str, TensorRef] = dict(index.tensors)
    if output_dtype is not None and output_dtype not in FLOAT_DTYPES:
        raise ModelError(f"output dtype {output_dtype}: not a floating-point dtype")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    factors = [read_adapter(p, weight=w, model_type=model_type) for p, w in adapters]
    for ask_transformers in (False, True):
        layout = embedding_layout(
            base_dir,
            config,
            base,
            trust_remote_code=trust_remote_code,
            ask_transformers=ask_transformers,
        )
        builder = _PlanBuilder(base, layout, model_type)
        for i, adapter in enumerate(factors):
            builder.add_adapter(i, adapter)
        if not builder.unmapped:
            break
    builder.raise_problems()
    return builder.finish(
        base_dir=base_dir,
        config=config,
        adapters=tuple(factors),
        output_dtype=output_dtype,
        max_shard_size=max_shard_size,
        identities=identities,
    )


class _PlanBuilder:
    """Collects each adapter's ops per base tensor, checking shapes as it goes."""

    def __init__(
        self, base: dict[str, TensorRef], layout: EmbeddingLayout, model_type: str | None = None
    ) -> None:
        self.base = base
        self.layout = layout
        self.model_type = model_type
        self._fused: dict[str, FusedParameter] | None = None
        self._renamed: dict[str, str] | None = None
        self.ops: dict[str, list[TensorOp]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {n: r.shape for n, r in base.items()}
        if layout.output is not None and layout.input is not None and layout.tied:
            self.shapes[layout.output] = base[layout.input].shape
        self.unmapped: list[str] = []
        self.misfit: list[str] = []
        self.ignored: list[tuple[int, IgnoredTensor]] = []
        self.warnings: list[str] = []

    def resolve(self, name: str) -> str | None:
        """The base tensor an adapter's ``module.param`` lands on (None: no such tensor)."""
        layout = self.layout
        if layout.tied and name == layout.output:
            return name
        if name in self.base:
            return name
        if self.model_type:
            if self._renamed is None:
                # Run-time names of the tensors transformers renames on load (its conversion
                # mapping for the base's model_type); read once, when a name is not on disk.
                self._renamed = renamed_tensors(self.model_type, list(self.base))
            if name in self._renamed:
                return self._renamed[name]
        prefix = layout.prefix
        if prefix:
            if name.startswith(f"{prefix}.") and name[len(prefix) + 1 :] in self.base:
                return name[len(prefix) + 1 :]
            if f"{prefix}.{name}" in self.base:
                return f"{prefix}.{name}"
        if layout.tied and layout.output and name == layout.output.removeprefix(f"{prefix}."):
            return layout.output
        return None

    def is_embedding(self, target: str) -> bool:
        return target in (self.layout.input, self.layout.output)

    def add_adapter(self, index: int, adapter: AdapterFactors) -> None:
        self.ignored.extend((index, t) for t in adapter.ignored)
        for full in adapter.full:
            target = self.resolve(full.target)
            if target is None:
                self.unmapped.append(f"{adapter.path}: {full.ref.name}")
                continue
            current = self.shapes[target]
            shape = full.ref.shape
            resized = (
                self.is_embedding(target)
                and full.param == "weight"
                and len(shape) == len(current) == 2
                and shape[1:] == current[1:]
            )
            if shape != current and not resized:
                self.misfit.append(
                    f"{adapter.path}: {full.ref.name} {list(shape)} does not fit {target} "
                    f"{list(current)}"
                )
                continue
            # A replacing tensor makes every earlier change of this tensor irrelevant.
            self.ops[target] = [TensorOp(adapter=index, kind="replace", source=full.ref)]
            self.shapes[target] = shape
        square_default = self._square_fan_in_fan_out(adapter)
        for lora in adapter.loras:
            target = self.resolve(f"{lora.module}.weight")
            if target is None and lora.parameter:
                self._add_parameter_lora(index, adapter, lora)
                continue
            if target is None:
                self.unmapped.extend(f"{adapter.path}: {key}" for key in lora.keys)
                continue
            transposed = self._orientation(adapter, lora, target, square_default)
            if transposed is None:
                continue
            kind: OpKind = "dora" if lora.magnitude is not None else "lora"
            self.ops.setdefault(target, []).append(
                TensorOp(
                    adapter=index,
                    kind=kind,
                    a=lora.a,
                    b=lora.b,
                    magnitude=lora.magnitude,
                    coef=adapter.weight * lora.scale,
                    transposed=transposed,
                )
            )
            if lora.bias is not None:
                self._add_lora_bias(index, adapter, lora)
        for tokens in adapter.tokens:
            self._add_token_rows(index, adapter, tokens)

    def _add_token_rows(self, index: int, adapter: AdapterFactors, tokens: TokenRows) -> None:
        """trainable_token_indices: PEFT's merge copies the trained rows over the weight's."""
        target = self.resolve(tokens.target)
        if target is None:
            self.unmapped.append(f"{adapter.path}: {tokens.ref.name}")
            return
        if self.layout.tied and target in (self.layout.input, self.layout.output):
            # PEFT ties the token adapter of lm_head to that of embed_tokens (both change);
            # mergejob unties changed embeddings, which would leave one of them unchanged.
            raise UnsupportedAdapterError(
                f"{adapter.path}: {tokens.ref.name}: trainable tokens on the tied embeddings of "
                "this base are not expressed by the stream engine (its untying of changed "
                "embeddings would change only one of the two matrices, where PEFT changes "
                "both); merge it with --engine peft"
            )
        shape = self.shapes[target]
        bad = [i for i in tokens.indices if not 0 <= i < shape[0]]
        if len(shape) != 2 or tokens.ref.shape[1] != shape[1] or bad:
            self.misfit.append(
                f"{adapter.path}: {tokens.ref.name} {list(tokens.ref.shape)} (rows {bad or ''}) "
                f"does not fit {target} {list(shape)}"
            )
            return
        self.ops.setdefault(target, []).append(
            TensorOp(adapter=index, kind="rows", source=tokens.ref, tokens=tokens.indices)
        )

    def _add_lora_bias(self, index: int, adapter: AdapterFactors, lora: LoraFactors) -> None:
        """lora_bias: PEFT adds ``scale * lora_B.bias`` to the layer's bias when it merges."""
        assert lora.bias is not None
        target = self.resolve(f"{lora.module}.bias")
        if target is None:
            self.misfit.append(
                f"{adapter.path}: {lora.bias.name}: {lora.module} has no bias in the base, so "
                "PEFT cannot merge its lora_bias either (retrain without lora_bias on it)"
            )
            return
        if self.shapes[target] != tuple(lora.bias.shape):
            self.misfit.append(
                f"{adapter.path}: {lora.bias.name} {list(lora.bias.shape)} does not fit "
                f"{target} {list(self.shapes[target])}"
            )
            return
        self.ops.setdefault(target, []).append(
            TensorOp(adapter=index, kind="bias", b=lora.bias, coef=adapter.weight * lora.scale)
        )

    def _add_parameter_lora(self, index: int, adapter: AdapterFactors, lora: LoraFactors) -> None:
        """A LoRA on a fused expert parameter: one op per expert tensor on disk, found with
        transformers' conversion mapping for the base's model_type (:mod:`mergejob.experts`)."""
        if self._fused is None:
            self._fused = fused_parameters(self.model_type, self.shapes)
        param = wrapper_target(adapter.config, lora.module, self._fused, lora.a.shape, lora.b.shape)
        if param is None:
            self.misfit.append(
                f"{adapter.path}: {lora.a.name} {list(lora.a.shape)} and {lora.b.name} "
                f"{list(lora.b.shape)}: target_parameters "
                f"{list(adapter.config.get('target_parameters') or [])} name no fused expert "
                f"parameter of {strip_base_layer(lora.module)} (transformers' conversion "
                f"mapping for model_type {self.model_type!r}) that they fit"
            )
            return
        for part in param.parts:
            self.ops.setdefault(part.disk, []).append(
                TensorOp(
                    adapter=index,
                    kind="lora",
                    a=lora.a,
                    b=lora.b,
                    coef=adapter.weight * lora.scale,
                    experts=param.experts,
                    expert=part.expert,
                    rows=part.rows,
                )
            )

    def _square_fan_in_fan_out(self, adapter: AdapterFactors) -> bool:
        """fan_in_fan_out for square weights, where shapes cannot tell.

        PEFT decides per module type (Conv1D: True, Linear: False) whatever the config says;
        when the adapter's non-square modules all contradict its config, follow them.
        """
        flag = bool(adapter.config.get("fan_in_fan_out", False))
        evidence: set[bool] = set()
        for lora in adapter.loras:
            target = self.resolve(f"{lora.module}.weight")
            if lora.embedding or target is None or len(self.shapes[target]) != 2:
                continue
            out_f, in_f = lora.b.shape[0], lora.a.shape[1]
            if out_f == in_f:
                continue
            if self.shapes[target] == (out_f, in_f):
                evidence.add(False)
            elif self.shapes[target] == (in_f, out_f):
                evidence.add(True)
        if evidence == {not flag}:
            self.warnings.append(
                f"{adapter.path}: fan_in_fan_out is {flag} in its config but the base's "
                f"weights are laid out for {not flag}; following the weights, as PEFT does"
            )
            return not flag
        return flag

    def _orientation(
        self, adapter: AdapterFactors, lora: LoraFactors, target: str, square_default: bool
    ) -> bool | None:
        """Whether the delta is (B @ A).T for this weight; None (and a problem) if it fits no way."""
        shape = self.shapes[target]
        out_f, in_f = lora.b.shape[0], lora.a.shape[1]
        if lora.magnitude is not None and lora.magnitude.shape != (out_f,):
            self.misfit.append(
                f"{adapter.path}: {lora.magnitude.name} {list(lora.magnitude.shape)} does not "
                f"fit B {list(lora.b.shape)}"
            )
            return None
        straight, transposed = shape == (out_f, in_f), shape == (in_f, out_f)
        if lora.embedding:
            straight = False
        if not straight and not transposed:
            self.misfit.append(
                f"{adapter.path}: {lora.a.name} {list(lora.a.shape)} and {lora.b.name} "
                f"{list(lora.b.shape)} do not fit {target} {list(shape)}"
            )
            return None
        if straight and transposed:
            return square_default
        return transposed

    def raise_problems(self) -> None:
        problems = [f"maps to no base tensor: {k}" for k in self.unmapped] + self.misfit
        if problems:
            raise IncompatibleAdapterError(
                _listing(
                    "adapters do not fit the base (trained on another model? otherwise "
                    "--engine peft shows what PEFT makes of them)",
                    problems,
                )
            )

    def finish(
        self,
        *,
        base_dir: Path,
        config: Mapping[str, Any],
        adapters: tuple[AdapterFactors, ...],
        output_dtype: str | None,
        max_shard_size: int,
        identities: Mapping[str, str] | None = None,
    ) -> Plan:
        layout = self.layout
        updates: dict[str, Any] = {}
        untie = (
            layout.tied
            and layout.input is not None
            and layout.output is not None
            and (layout.input in self.ops or layout.output in self.ops)
        )
        if untie:
            updates["tie_word_embeddings"] = False
        order = list(self.base)
        if untie and layout.output not in self.base:
            assert layout.input is not None and layout.output is not None
            order.insert(order.index(layout.input) + 1, layout.output)
        embedding_rows = self._check_vocab(adapters, untie)
        base_rows = self.base[layout.input].shape[0] if layout.input in self.base else None
        if embedding_rows is not None and embedding_rows != base_rows:
            updates["vocab_size"] = embedding_rows
        if output_dtype is not None and output_dtype != _config_dtype(config):
            updates["dtype"] = output_dtype

        tensors: list[OutputTensor] = []
        for name in order:
            source = self.base.get(name)
            if untie and name == layout.output:
                assert layout.input is not None
                source = self.base[layout.input]  # tied: the head is the input embedding
            assert source is not None
            ops = tuple(self.ops.get(name, ()))
            dtype = source.dtype
            if output_dtype is not None and dtype in FLOAT_DTYPES:
                dtype = output_dtype
            if ops and dtype not in FLOAT_DTYPES:
                raise IncompatibleAdapterError(
                    f"{name}: stored as {dtype}, which a merge cannot change (quantized base?)"
                )
            start = None if ops and ops[0].kind == "replace" else source
            tensors.append(
                OutputTensor(name=name, shape=self.shapes[name], dtype=dtype, source=start, ops=ops)
            )
        groups = pack_shards([t.nbytes for t in tensors], max_shard_size)
        names = shard_file_names(len(groups))
        shards = tuple(
            OutputShard(name=n, tensors=tuple(tensors[i] for i in group))
            for n, group in zip(names, groups, strict=True)
        )
        tokenizer_from = _tokenizer_source(base_dir, adapters)
        warnings = list(self.warnings)
        if "vocab_size" in updates and tokenizer_from == str(base_dir):
            warnings.append(
                f"the vocabulary grows to {updates['vocab_size']} but no adapter ships a "
                "tokenizer; the output takes the base's, which lacks the new tokens"
            )
        identities = _input_identities(tensors, identities)
        plan = Plan(
            base_dir=str(base_dir),
            adapters=adapters,
            output_dtype=output_dtype,
            max_shard_size=max_shard_size,
            shards=shards,
            embeddings=layout,
            config_updates=updates,
            tokenizer_from=tokenizer_from,
            ignored=tuple(self.ignored),
            warnings=tuple(warnings),
            input_identities=identities,
        )
        return _with_plan_id(plan)

    def _check_vocab(self, adapters: Sequence[AdapterFactors], untie: bool) -> int | None:
        """Rows of the input embeddings after the merge; both embeddings must agree."""
        layout = self.layout
        if layout.input is None:
            return None
        rows_in = self.shapes[layout.input][0]
        has_output = layout.output is not None and (layout.output in self.base or untie)
        if has_output and layout.output is not None:
            rows_out = self.shapes[layout.output][0]
            if rows_in != rows_out:
                grown = [
                    a.name
                    for i, a in enumerate(adapters)
                    if any(op.adapter == i for op in self.ops.get(layout.input, ()))
                    or any(op.adapter == i for op in self.ops.get(layout.output, ()))
                ]
                raise IncompatibleAdapterError(
                    f"after the merge {layout.input} has {rows_in} rows but {layout.output} "
                    f"has {rows_out}: adapter(s) {', '.join(grown)} resize one embedding "
                    "without saving the other, so the other's new rows would be undefined; "
                    "save both embeddings (modules_to_save) when resizing the vocabulary"
                )
        return rows_in


def _config_dtype(config: Mapping[str, Any]) -> str | None:
    value = config.get("dtype", config.get("torch_dtype"))
    return str(value) if value is not None else None


def _tokenizer_source(base_dir: Path, adapters: Sequence[AdapterFactors]) -> str | None:
    chosen = choose_tokenizer_source(base_dir, [Path(a.path) for a in adapters])
    return str(chosen) if chosen is not None else None


def embedding_layout(
    base_dir: Path,
    config: Mapping[str, Any],
    base: Mapping[str, TensorRef],
    *,
    trust_remote_code: bool = False,
    ask_transformers: bool = False,
) -> EmbeddingLayout:
    """Find the input/output embeddings and whether they are tied.

    From the tensor names first (``embed_tokens``/``wte``/... and ``lm_head``/``embed_out``);
    with ``ask_transformers``, from the architecture class's tied-weights map and
    ``base_model_prefix`` (no model is built; importing the modeling code costs seconds, so
    the plan asks only when some adapter tensor maps to nothing by names). Whether the
    embeddings are tied comes from config.json, or transformers' class default if absent.
    """
    input_name = next((n for n in base if _INPUT_EMBEDDING_RE.search(n)), None)
    output_name = next((n for n in _OUTPUT_EMBEDDING_NAMES if n in base), None)
    prefix = input_name.split(".")[0] if input_name and input_name.count(".") >= 2 else None
    if ask_transformers:
        architectures = config.get("architectures") or []
        try:
            import transformers

            cls = getattr(transformers, str(architectures[0])) if architectures else None
            tied_keys = getattr(cls, "_tied_weights_keys", None)
            prefix = getattr(cls, "base_model_prefix", None) or prefix
            if isinstance(tied_keys, Mapping) and tied_keys:
                out_key, in_key = next(iter(tied_keys.items()))
                output_name = out_key if output_name is None else output_name
                for candidate in (in_key, in_key.removeprefix(f"{prefix}.")):
                    if candidate in base:
                        input_name = candidate
                        break
        except Exception:  # unknown or remote-code architectures: keep the names found
            pass
    tied = input_name is not None and _tie_word_embeddings(
        base_dir, config, trust_remote_code=trust_remote_code
    )
    return EmbeddingLayout(
        input=input_name, output=output_name or "lm_head.weight", tied=tied, prefix=prefix
    )


def _tie_word_embeddings(
    base_dir: Path, config: Mapping[str, Any], *, trust_remote_code: bool
) -> bool:
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else None
    for part in (text, config):
        if part is not None and "tie_word_embeddings" in part:
            return bool(part["tie_word_embeddings"])
    try:
        from transformers import AutoConfig

        loaded = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
        text_config = loaded.get_text_config() if hasattr(loaded, "get_text_config") else loaded
        return bool(getattr(text_config, "tie_word_embeddings", True))
    except Exception:  # unreadable with transformers: its own default
        return True


def file_identity(path: str) -> str:
    """What identifies an input file across machines: its Hub blob (content hash) or size+mtime."""
    resolved = Path(path).resolve()
    if resolved.parent.name == "blobs":
        return f"blob:{resolved.name}"
    stat = resolved.stat()
    return f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}"


def _tensor_inputs(tensors: Sequence[OutputTensor]) -> list[str]:
    """The files ``tensors`` read, in the order they first read them."""
    paths: dict[str, None] = {}
    for tensor in tensors:
        if tensor.source is not None:
            paths.setdefault(tensor.source.path)
        for op in tensor.ops:
            for ref in (op.source, op.a, op.b, op.magnitude):
                if ref is not None:
                    paths.setdefault(ref.path)
    return list(paths)


def _input_identities(
    tensors: Sequence[OutputTensor], known: Mapping[str, str] | None = None
) -> dict[str, str]:
    known = known or {}
    return {
        path: known[path] if path in known else file_identity(path)
        for path in sorted(_tensor_inputs(tensors))
    }


def _ref_id(ref: TensorRef | None, identities: Mapping[str, str]) -> Any:
    if ref is None:
        return None
    return [identities[ref.path], ref.name, ref.dtype, list(ref.shape)]


def _with_plan_id(plan: Plan) -> Plan:
    """The plan with its fingerprint: layout, ops and input identities, no local paths."""
    ids = plan.input_identities
    content = {
        "output_dtype": plan.output_dtype,
        "config_updates": dict(plan.config_updates),
        "shards": [
            {
                "name": shard.name,
                "tensors": [
                    [
                        t.name,
                        list(t.shape),
                        t.dtype,
                        _ref_id(t.source, ids),
                        [
                            [
                                op.adapter,
                                op.kind,
                                repr(op.coef),
                                op.transposed,
                                _ref_id(op.source, ids),
                                _ref_id(op.a, ids),
                                _ref_id(op.b, ids),
                                _ref_id(op.magnitude, ids),
                                *([op.experts, op.expert, list(op.rows)] if op.experts else []),
                                *([list(op.tokens)] if op.tokens else []),
                            ]
                            for op in t.ops
                        ],
                    ]
                    for t in shard.tensors
                ],
            }
            for shard in plan.shards
        ],
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return Plan(**{**plan.__dict__, "plan_id": digest[:32]})


def _listing(title: str, items: Sequence[str], limit: int = 30) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title}:\n  {shown}{more}"


# ---------------------------------------------------------------------------------------
# The plan of a prepared job


def plan_for_job(job: Any) -> Plan:
    """The stream engine's plan for a :class:`~mergejob.job.PreparedJob` (cached per inputs)."""
    spec = job.spec
    adapters = tuple(
        (str(resolved.local_dir), float(a.weight))
        for resolved, a in zip(job.adapters, spec.adapters, strict=True)
    )
    output_dtype = None if spec.output.dtype == "auto" else spec.output.dtype
    streamed = getattr(job, "streamed", None)
    # A streamed Hub base is named by its commit: its folder fills up during the merge.
    base_stamp: Any = (
        ("hub", streamed.repo_id, streamed.commit)
        if streamed is not None
        else _folder_stamp(Path(job.base.local_dir))
    )
    stamp = (base_stamp, *(_folder_stamp(Path(a)) for a, _ in adapters))
    return _cached_plan(
        str(job.base.local_dir),
        adapters,
        output_dtype,
        spec.output.max_shard_bytes,
        bool(spec.base.trust_remote_code),
        stamp,
        streamed,
    )


def _folder_stamp(folder: Path) -> tuple[tuple[str, int, int, int, int], ...]:
    # The change time and inode too: a file rewritten in place with its old size and mtime
    # (os.utime) has a new ctime, which no one can set back.
    entries = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            entries.append(
                (path.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
            )
    return tuple(entries)


@functools.lru_cache(maxsize=4)
def _cached_plan(
    base_dir: str,
    adapters: tuple[tuple[str, float], ...],
    output_dtype: str | None,
    max_shard_size: int,
    trust_remote_code: bool,
    stamp: tuple[Any, ...],
    streamed: Any = None,
) -> Plan:
    del stamp  # part of the cache key only: a changed input file makes a new plan
    return build_plan(
        base_dir,
        adapters,
        output_dtype=output_dtype,
        max_shard_size=max_shard_size,
        trust_remote_code=trust_remote_code,
        index=streamed.index if streamed is not None else None,
        identities=streamed.identities() if streamed is not None else None,
    )
