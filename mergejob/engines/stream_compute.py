"""The stream engine's arithmetic: one output tensor at a time, in bounded memory.

:class:`TensorComputer` turns an :class:`~mergejob.plan.work.OutputTensor` into its output bytes,
chunk by chunk, reusing a few buffers (allocating fresh tensors costs page faults, which
dominate on small machines):

- unchanged, same dtype: the stored bytes, read and handed on untouched;
- unchanged, other dtype: converted chunk by chunk;
- changed: rows read into an fp32 buffer (``W32 = W.float()``), every op applied in order
  (a replacing tensor; LoRA ``W32 += (B @ A) * coef``, transposed for Conv1D and
  embeddings; DoRA with PEFT's formula on the current ``W32``), rounded once to the output
  dtype and checked for NaN/inf.

The expressions are PEFT's own, in PEFT's order (``(B @ A) * scale``, then the add), so with
one adapter the result is bit-identical to PEFT's merge computed in fp32 and rounded once.
Plain LoRA is applied to row blocks of about ``CHUNK_BYTES`` in fp32, small enough to stay
in the CPU's cache through every op: each row's delta is the same dot products whichever
block it is in, provided no block is thinner than ``MIN_BLOCK`` (BLAS switches kernels for
very thin products). DoRA needs norms over whole rows or columns and is applied to the
whole tensor at once.

Row blocks are independent, so ``lanes`` threads compute the next blocks while one is
written (torch runs single-threaded in each: coarse blocks in threads beat torch's own
threads, whose per-op synchronisation costs more than it brings on small machines). Output
bytes are handed over in buffers of a :class:`BufferRing`: the shard writer hashes and
writes them in its own thread, in order.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mergejob.errors import AdapterError, DtypeRangeError, MergeFailedError
from mergejob.io.headers import TensorRef
from mergejob.io.reader import FileReader, byte_view
from mergejob.io.values import narrower, range_message, rounding_limit
from mergejob.plan.cost import CHUNK_BYTES, COPY_BYTES, EXPERT_FACTORS_KEPT
from mergejob.plan.work import OutputTensor, TensorOp

# BLAS picks other kernels, which sum in another order, for very thin products: a block of
# a LoRA product spans at least this many rows (or columns, when transposed), so that every
# block is summed as in the whole product (checked on thousands of shapes; see the tests).
MIN_BLOCK = 64
RING_SLOTS = 4  # buffers between computing and writing, besides one per lane
NOTHING_WRITTEN = "; nothing was written"


@dataclass
class Chunk:
    """Output bytes in slot ``slot`` of a :class:`BufferRing`; release the slot once written."""

    data: memoryview
    slot: int


class BufferRing:
    """A few reused byte buffers passed between the computing and the writing thread."""

    def __init__(self, slots: int = RING_SLOTS) -> None:
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """A free slot and a CPU byte buffer of ``nbytes`` in it (waits for one to be free)."""
        slot = self._free.get()
        with self._lock:
            buf = self._buffers[slot]
            if buf is None or buf.numel() < nbytes:
                buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
                self._buffers[slot] = buf
        return slot, buf[:nbytes]

    def release(self, slot: int) -> None:
        self._free.put(slot)


class TensorComputer:
    """Produces output tensors' bytes on one device, reusing its buffers between tensors."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        lanes: int = 1,
        reader: FileReader | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # Full fp32 products: TF32 would change far more than the last bit.
            torch.backends.cuda.matmul.allow_tf32 = False
            lanes = 1
        self.lanes = max(1, lanes)
        self.reader = reader or FileReader()
        self.ring = BufferRing(RING_SLOTS + self.lanes)
        self._buffers: dict[str, torch.Tensor] = {}
        self._factors: dict[tuple[str, int], torch.Tensor] = {}
        # Factors of expert LoRAs, kept across tensors: every expert tensor of a MoE layer
        # reads the same A and B (all experts' ranks), and reading them again for each of
        # hundreds of experts would cost far more than the merge. Most recent last.
        self._expert_keys: collections.OrderedDict[tuple[str, int], None] = (
            collections.OrderedDict()
        )
        self._pool: ThreadPoolExecutor | None = None
        if self.lanes > 1:
            self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="mergejob-lane")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.reader.close()
        self._buffers.clear()
        self._factors.clear()

    # -- buffers ---------------------------------------------------------------------------

    def _buffer(self, name: str, nbytes: int, device: torch.device) -> torch.Tensor:
        """A reused byte buffer of at least ``nbytes`` (grown, never shrunk), one per thread."""
        key = f"{name}@{device}#{threading.get_ident()}"
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._buffers[key] = buf
        return buf[:nbytes]

    def _typed(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        size = math.prod(shape) * _itemsize(dtype)
        return self._buffer(name, size, device).view(dtype).view(shape)

    def _read_rows(self, ref: TensorRef, row0: int, row1: int, cols: int) -> torch.Tensor:
        """Rows ``row0:row1`` of ``ref`` (viewed as rows x cols) in a reused CPU buffer."""
        dtype = getattr(torch, ref.dtype)
        item = _itemsize(dtype)
        raw = self._buffer("read", (row1 - row0) * cols * item, torch.device("cpu"))
        self.reader.read_into(ref.path, ref.offset + row0 * cols * item, byte_view(raw))
        return raw.view(dtype).view(row1 - row0, cols)

    def _factor(self, ref: TensorRef) -> torch.Tensor:
        """An adapter tensor as fp32 on the device (kept while one tensor is computed)."""
        key = (ref.path, ref.offset)
        cached = self._factors.get(key)
        if cached is None:
            cached = self.reader.tensor(ref).to(device=self.device, dtype=torch.float32)
            # Factors are small: checking them here costs nothing and names the bad tensor,
            # where a NaN found in the merged weight could only name the output tensor.
            check_finite(cached, ref)
            self._factors[key] = cached
        return cached

    # -- output bytes ----------------------------------------------------------------------

    def chunks(self, tensor: OutputTensor) -> Iterator[Chunk]:
        """The output bytes of ``tensor``, in order, in slots of the ring.

        The consumer releases each chunk's slot (``ring.release``) once it has used it.
        """
        try:
            if tensor.byte_copy:
                yield from self._copy(tensor)
            elif not tensor.ops:
                yield from self._convert(tensor)
            else:
                yield from self._merge(tensor)
        finally:
            self._keep_expert_factors(tensor)

    def _keep_expert_factors(self, tensor: OutputTensor) -> None:
        """Drop the factors of ``tensor`` once written, except the expert LoRAs' last few
        (the next expert tensors of the layer read them again); memory stays bounded."""
        for op in tensor.ops:
            for ref in (op.a, op.b) if op.experts else ():
                if ref is not None:
                    key = (ref.path, ref.offset)
                    self._expert_keys[key] = None
                    self._expert_keys.move_to_end(key)
        while len(self._expert_keys) > EXPERT_FACTORS_KEPT:
            self._expert_keys.popitem(last=False)
        for key in [k for k in self._factors if k not in self._expert_keys]:
            del self._factors[key]

    def _copy(self, tensor: OutputTensor) -> Iterator[Chunk]:
        source = tensor.source
        assert source is not None
        done = 0
        while done < source.nbytes:
            step = min(COPY_BYTES, source.nbytes - done)
            slot, raw = self.ring.acquire(step)
            view = byte_view(raw)
            try:
                self.reader.read_into(source.path, source.offset + done, view)
            except BaseException:
                self.ring.release(slot)
                raise
            yield Chunk(view, slot)
            done += step

    def _convert(self, tensor: OutputTensor) -> Iterator[Chunk]:
        source = tensor.source
        assert source is not None
        rows, cols = _rows_and_cols(tensor.shape)
        out_dtype = getattr(torch, tensor.dtype)
        check = narrower(tensor.dtype, source.dtype)  # float16 from bf16/fp32: may overflow
        for row0, row1 in row_blocks(rows, cols):
            src = self._read_rows(source, row0, row1, cols)
            slot, raw = self.ring.acquire((row1 - row0) * cols * _itemsize(out_dtype))
            out = raw.view(out_dtype).view(row1 - row0, cols)
            out.copy_(src)
            if check:
                try:
                    _check_converted(tensor, src, out)
                except BaseException:
                    self.ring.release(slot)
                    raise
            yield Chunk(byte_view(raw), slot)

    def _merge(self, tensor: OutputTensor) -> Iterator[Chunk]:
        rows, cols = _rows_and_cols(tensor.shape)
        whole = any(op.kind == "dora" for op in tensor.ops)
        blocks = [(0, rows)] if whole else row_blocks(rows, cols)
        for op in tensor.ops:  # loaded once, here; the lanes only read them
            for ref in (op.a, op.b, op.magnitude, op.source if op.kind == "rows" else None):
                if ref is not None:
                    self._factor(ref)
        if self._pool is None or len(blocks) == 1:
            for row0, row1 in blocks:
                yield self._merge_block(tensor, row0, row1, cols)
            return
        # Blocks are independent: the lanes compute the next ones while this one is written.
        pending: collections.deque[Future[Chunk]] = collections.deque()
        queued = iter(blocks)
        try:
            for row0, row1 in itertools.islice(queued, self.lanes):
                pending.append(self._pool.submit(self._merge_block, tensor, row0, row1, cols))
            while pending:
                chunk = pending.popleft().result()
                following = next(queued, None)
                if following is not None:
                    pending.append(self._pool.submit(self._merge_block, tensor, *following, cols))
                yield chunk
        finally:
            for future in pending:  # abandoned (an error downstream): give their slots back
                with contextlib.suppress(BaseException):
                    self.ring.release(future.result().slot)

    def _merge_block(self, tensor: OutputTensor, row0: int, row1: int, cols: int) -> Chunk:
        """Rows ``row0:row1`` of a changed tensor: read, every op in fp32, rounded once."""
        out_dtype = getattr(torch, tensor.dtype)
        w32 = self._typed("w32", torch.float32, (row1 - row0, cols), self.device)
        if tensor.source is not None:
            w32.copy_(self._read_rows(tensor.source, row0, row1, cols))
        for op in tensor.ops:
            self._apply(op, w32, row0, row1, cols)
        limit = rounding_limit(out_dtype)
        low, high = torch.aminmax(w32)  # NaN propagates; inf and overflow show here
        if not (-limit < float(low) and float(high) < limit):
            if math.isfinite(float(low)) and math.isfinite(float(high)):
                # Finite in fp32, beyond the output dtype: bad input (the dtype asked for).
                magnitude = max(abs(float(low)), abs(float(high)))
                raise DtypeRangeError(
                    range_message(tensor.name, tensor.dtype, magnitude, what=_merged(tensor))
                    + NOTHING_WRITTEN
                )
            raise MergeFailedError(_nan_message(tensor))
        slot, raw = self.ring.acquire((row1 - row0) * cols * _itemsize(out_dtype))
        out = raw.view(out_dtype).view(row1 - row0, cols)
        if self.device.type == "cpu":
            out.copy_(w32)
        else:
            rounded = self._typed("out-dev", out_dtype, (row1 - row0, cols), self.device)
            rounded.copy_(w32)
            out.copy_(rounded)
        return Chunk(byte_view(raw), slot)

    def _apply(self, op: TensorOp, w32: torch.Tensor, row0: int, row1: int, cols: int) -> None:
        if op.kind == "replace":
            assert op.source is not None
            rows = self._read_rows(op.source, row0, row1, cols)
            check_finite(rows, op.source)
            w32.copy_(rows)
            return
        if op.kind == "rows":
            # PEFT: W.index_copy(0, indices, trainable_tokens_delta): later rows win.
            assert op.source is not None
            values = self._factor(op.source)
            for i, token in enumerate(op.tokens):
                if row0 <= token < row1:
                    w32[token - row0].copy_(values[i])
            return
        if op.kind == "bias":
            # PEFT: bias += lora_B.bias * scale (in fp32 here, rounded once with the rest).
            assert op.b is not None
            w32.add_((self._factor(op.b)[row0:row1] * op.coef).view(row1 - row0, cols))
            return
        assert op.a is not None and op.b is not None
        a, b = self._factor(op.a), self._factor(op.b)
        if op.kind == "dora":
            assert op.magnitude is not None
            w32.copy_(dora_merge(w32, a, b, self._factor(op.magnitude), op.coef, op.transposed))
            return
        # PEFT: W += transpose(B @ A) * scale; the product first, then the scale, then the sum.
        if op.experts:
            # PEFT's ParamWrapper: A.reshape(E, r, in)[e] and B.reshape(out, r, E)[:, :, e]
            # give expert e's (out, in) delta of the fused parameter; this tensor is rows
            # op.rows of it (gate or up of gate_up_proj), of which rows row0:row1 here.
            rank = a.shape[0] // op.experts
            a_e = a.view(op.experts, rank, a.shape[1])[op.expert]
            b_e = b.view(b.shape[0], rank, op.experts)[:, :, op.expert]
            first = op.rows[0] + row0
            delta = self._typed("delta", torch.float32, (row1 - row0, a.shape[1]), self.device)
            torch.mm(b_e[first : first + row1 - row0], a_e, out=delta)
            delta.mul_(op.coef)
            w32.add_(delta)
        elif op.transposed:
            # The delta of rows row0:row1 is columns row0:row1 of B @ A, transposed.
            delta = self._typed("delta", torch.float32, (b.shape[0], row1 - row0), self.device)
            torch.mm(b, a[:, row0:row1], out=delta)
            delta.mul_(op.coef)
            w32.add_(delta.T)
        else:
            delta = self._typed("delta", torch.float32, (row1 - row0, a.shape[1]), self.device)
            torch.mm(b[row0:row1], a, out=delta)
            delta.mul_(op.coef)
            w32.add_(delta)


def check_finite(tensor: torch.Tensor, ref: TensorRef) -> None:
    """Refuse an adapter tensor holding NaN or inf (bad input: a retry reads the same bytes),
    naming its file and tensor."""
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterError(
            f"{ref.path}: tensor {ref.name} holds NaN or inf; the adapter is broken (a "
            "diverged training run?): retrain or re-save it; nothing was written"
        )


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _rows_and_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """Row ranges of about ``CHUNK_BYTES`` of fp32, none thinner than ``MIN_BLOCK`` rows
    (a short last block joins the one before), so each is one cache-sized step."""
    step = max(MIN_BLOCK, CHUNK_BYTES // max(1, cols * 4))
    bounds = [*range(0, rows, step), rows]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_BLOCK:
        del bounds[-2]
    return list(itertools.pairwise(bounds))


def lora_delta(a: torch.Tensor, b: torch.Tensor, coef: float, transposed: bool) -> torch.Tensor:
    """PEFT's ``get_delta_weight`` in fp32: ``transpose(B @ A, transposed) * coef``."""
    product = b @ a
    return (product.T if transposed else product) * coef


def dora_merge(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    magnitude: torch.Tensor,
    coef: float,
    transposed: bool,
) -> torch.Tensor:
    """PEFT's DoRA merge of one adapter into ``weight`` (fp32), expression for expression.

    ``delta = transpose(B @ A) * scale``; the norm is taken per output feature of
    ``W + delta`` (rows of a Linear weight, columns of a Conv1D or embedding weight), and
    ``W' = magnitude / norm * (W + delta)``.
    """
    delta = lora_delta(a, b, coef, transposed)
    oriented = weight.T if transposed else weight
    lora_weight = delta.T if transposed else delta
    norm = torch.linalg.norm(oriented + lora_weight, dim=1).to(oriented.dtype)
    factor = (magnitude / norm).view(-1, 1)
    if transposed:
        factor = factor.T
    return factor * (weight + delta)


def _merged(tensor: OutputTensor) -> str:
    adapters = ", ".join(str(op.adapter) for op in tensor.ops)
    return f"the merged tensor (after adapter(s) {adapters}, 0 = first)"


def _nan_message(tensor: OutputTensor) -> str:
    return (
        f"{tensor.name}: {_merged(tensor)} holds NaN or inf: an adapter's factors hold "
        "NaN/inf or make the weights explode; nothing was written"
    )


def _check_converted(tensor: OutputTensor, src: torch.Tensor, out: torch.Tensor) -> None:
    """Refuse an unchanged tensor whose conversion to a narrower dtype made a value inf
    (a value already NaN or inf in the base stays as the base has it, as a copy would)."""
    low, high = (float(v) for v in torch.aminmax(out))
    if math.isfinite(low) and math.isfinite(high):
        return
    overflow = torch.isfinite(src) & ~torch.isfinite(out)
    if bool(overflow.any()):
        magnitude = float(src[overflow].float().abs().max())
        raise DtypeRangeError(
            range_message(tensor.name, tensor.dtype, magnitude, what="the base tensor")
            + NOTHING_WRITTEN
        )
