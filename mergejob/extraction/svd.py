"""The decomposition of one module's ΔW: a truncated SVD in fp32, and the rank it keeps.

``decompose`` gives the leading singular triplets of ``delta``: the full SVD
(``torch.linalg.svd``) for small modules or when asked (``method="exact"``), else a randomized
block Krylov iteration with a Rayleigh-Ritz step (Halko, Martinsson and Tropp, 2011; Musco and
Musco, 2015), grown until what more blocks could still gain is below fp32 resolution of the
error (``_settled``), and the full SVD after all if it does not settle within half the matrix.
Its error is then within a quarter of an fp32 ulp of the Eckart-Young optimum
``sqrt(Σ discarded σ²) / ‖ΔW‖_F`` by the stopping rule's estimate, so no closer to it than the
full SVD in fp32 (what mergekit runs) can be told apart at fp32 resolution:
``tests/test_extract_svd.py`` checks that the gap is at most one fp32 ulp of the error (or the
full fp32 SVD's own gap, where fp32 rounding of ΔW makes that larger) on hard spectra, pure
noise of a 2048 x 5632 MLP weight at rank 32 included. It costs a fraction of the full SVD: a
full SVD of a 8192 x 28672 MLP weight is O(m²n); the randomized one is 10-20 pairs of products
with blocks of ``rank + rank/2`` columns.

``choose_rank`` applies the rank rules (``max_rank``, ``sv_epsilon``, ``min_energy``, and the
numerical rank: singular values at fp32 rounding level are noise); ``factors`` splits the
kept triplets into PEFT's ``lora_B`` and ``lora_A``; ``residual`` measures the relative error
``‖ΔW - B A‖_F / ‖ΔW‖_F`` of the factors as stored, block by block.

On the CPU the LAPACK steps (SVD, QR, eigh) run on one thread: MKL's results change with
the thread count (the products with ΔW and the fp64 norms do not), and the adapter's bytes
must not depend on ``engine.workers`` or on the machine's cores.

Example::

    dec = decompose(delta, rank=32, method="auto", seed=7)
    r = choose_rank(dec, RankRule(max_rank=32, min_energy=0.9))
    b, a = factors(dec, r, distribute_scale=True)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from mergejob.engines.worker import torch_threads

SvdMethod = Literal["auto", "exact", "randomized"]

# fp32 machine epsilon: singular values below sigma_1 * max(m, n) * EPS are rounding noise
# (numpy's matrix_rank tolerance).
EPS32 = float(torch.finfo(torch.float32).eps)
# Below this smaller dimension the full SVD is cheap enough (and exact).
RANDOMIZED_MIN_DIM = 1024
OVERSAMPLE_MIN = 16
# At most this many Krylov blocks (then the full SVD): a settled space needs fewer.
MAX_KRYLOV_BLOCKS = 32
# The randomized method stops when the steps still to come would lower the error by at most
# this many fp32 ulps of it (estimated from the last two steps' gains, ``_settled``).
SETTLED_ULPS = 0.25
# Norms and residuals go through blocks of about this many elements (16 MB of fp32).
BLOCK_ELEMENTS = 2**22


@dataclass
class Decomposition:
    """The leading singular triplets of one ΔW (``u`` m x k, ``s`` k, ``vh`` k x n, in fp32).

    ``total`` is ‖ΔW‖_F² in fp64; ``complete`` is true when ``s`` holds every singular value
    (the full SVD), so the optimum error at any rank is known exactly.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    total: float
    method: Literal["exact", "randomized"]
    complete: bool
    iterations: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.u.shape[0]), int(self.vh.shape[1]))

    def energies(self) -> list[float]:
        """σ_i² of the computed triplets, in fp64."""
        return [float(x) ** 2 for x in self.s.double().tolist()]

    def kept_fraction(self, rank: int) -> float:
        """The fraction of ‖ΔW‖² the first ``rank`` triplets hold."""
        if self.total <= 0:
            return 1.0
        return min(1.0, sum(self.energies()[:rank]) / self.total)

    def optimal_error(self, rank: int) -> float | None:
        """The Eckart-Young optimum ``sqrt(Σ_{i>rank} σ_i²) / ‖ΔW‖_F`` (full SVD only)."""
        if not self.complete or self.total <= 0:
            return None
        tail = sum(self.energies()[rank:])
        return math.sqrt(max(tail, 0.0) / self.total)


@dataclass(frozen=True)
class RankRule:
    """How many triplets a module keeps: at most ``max_rank``; none below ``sv_epsilon``
    (an absolute singular value, as mergekit's ``--sv-epsilon``); with ``min_energy`` F the
    smallest rank keeping a fraction F of ‖ΔW‖²; never one at fp32 rounding level."""

    max_rank: int = 32
    sv_epsilon: float = 0.0
    min_energy: float | None = None


def uses_randomized(shape: tuple[int, int], rank: int, method: SvdMethod) -> bool:
    """Whether ``decompose`` takes the randomized path for a module of ``shape``."""
    if method == "exact":
        return False
    if 2 * (rank + max(rank // 2, OVERSAMPLE_MIN)) > min(shape) // 2:
        return False  # two blocks would pass half the matrix: the full SVD is as cheap
    return method == "randomized" or min(shape) >= RANDOMIZED_MIN_DIM


def decompose(
    delta: torch.Tensor, *, rank: int, method: SvdMethod = "auto", seed: int = 0
) -> Decomposition:
    """The leading ``rank`` singular triplets of the fp32 matrix ``delta`` (all of them from
    the full SVD, exactly ``rank`` from the randomized one).

    ``seed`` makes the randomized sketch deterministic (a rerun writes the same bytes).
    """
    if delta.dim() != 2:
        raise ValueError(f"decompose needs a matrix, got shape {list(delta.shape)}")
    delta = delta.float()
    total = squared_norm(delta)
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    if uses_randomized(shape, rank, method):
        return _randomized(delta, rank, total, seed)
    with _lapack(delta):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return Decomposition(u=u, s=s, vh=vh, total=total, method="exact", complete=True)


def rows_per_block(matrix: torch.Tensor) -> int:
    """Rows of ``matrix`` per block of about ``BLOCK_ELEMENTS`` elements."""
    return max(1, BLOCK_ELEMENTS // max(1, int(matrix.shape[1])))


def squared_norm(matrix: torch.Tensor) -> float:
    """‖matrix‖_F² summed in fp64 a block of rows at a time (no fp64 copy of a module)."""
    total = 0.0
    block_rows = rows_per_block(matrix)
    for start in range(0, matrix.shape[0], block_rows):
        block = matrix[start : start + block_rows]
        total += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
    return total


def _lapack(tensor: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """One thread for a LAPACK call on the CPU, whose result depends on the thread count
    (MKL); on a GPU nothing changes (and no process-wide setting is touched)."""
    return torch_threads(1) if tensor.device.type == "cpu" else contextlib.nullcontext()


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    with _lapack(matrix):
        return torch.linalg.qr(matrix, mode="reduced").Q


def _randomized(delta: torch.Tensor, rank: int, total: float, seed: int) -> Decomposition:
    """Randomized block Krylov iteration with Rayleigh-Ritz, until the rest of the way to the
    optimum is below fp32 resolution (Musco and Musco, 2015: unlike plain power iterations it
    converges fast on the flat noise tails of real fine-tuning deltas).

    The Krylov space grows by one block of ``rank + max(rank // 2, 16)`` columns per step:
    two products with ΔW (``Aᵀ Q`` is also the Ritz step's matrix), the new block made
    orthogonal to all the others (twice, for fp32), the Gram matrix of the Ritz step grown by
    its new columns only. Each step's gain in captured energy shrinks geometrically once the
    space has found the leading directions; the rest of the way is estimated from the last
    two gains (see ``_settled``). When the space would pass half the smaller dimension (or
    ``MAX_KRYLOV_BLOCKS``) without settling, the full SVD is as cheap and exact: it is used.

    The basis Q lives on the smaller side of ΔW: keeping it orthogonal (four fp64 products
    with Q a step) is then the cheaper part, and Z, on the larger side, only borders G.
    """
    m, n = delta.shape
    if m > n:  # Q on the smaller side
        flipped = _randomized(delta.T, rank, total, seed)
        return Decomposition(
            u=flipped.vh.T,
            s=flipped.s,
            vh=flipped.u.T,
            total=total,
            method=flipped.method,
            complete=flipped.complete,
            iterations=flipped.iterations,
        )
    width = rank + max(rank // 2, OVERSAMPLE_MIN)
    most = max(1, min(min(m, n) // 2 // width, MAX_KRYLOV_BLOCKS))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32).to(delta.device)
    # Q (m x K), Z = Aᵀ Q (n x K) and G = ZᵀZ (K x K), filled block by block: K grows by
    # ``width`` a step. Q is kept in fp64: once the strong directions are in it, a new block
    # is a small remainder, and orthogonalising that in fp32 would let the basis drift
    # (energies above ‖ΔW‖²). The products with ΔW, the cost, stay in fp32; Z holds their
    # fp32 results, widened to fp64 so G is exact to fp64 rounding.
    size = most * width
    basis = torch.empty(m, size, dtype=torch.float64, device=delta.device)
    ritz = torch.empty(n, size, dtype=torch.float64, device=delta.device)
    gram = torch.empty(size, size, dtype=torch.float64, device=delta.device)
    basis[:, :width] = _orthonormal((delta @ omega).double())
    blocks = 1
    gains: list[float] = []
    captured = 0.0
    while True:
        done, cols = (blocks - 1) * width, blocks * width
        ritz[:, done:cols] = (delta.T @ basis[:, done:cols].float()).double()  # new rows of QᵀA
        # G grows by a border (its old entries stay): the Ritz energies can only grow, and a
        # step's gain is what the new block adds, not rounding.
        gram[:cols, done:cols] = ritz[:, :cols].T @ ritz[:, done:cols]
        gram[done:cols, :done] = gram[:done, done:cols].T
        # σ² of Qᵀ A are the eigenvalues of G (small, fp64): far cheaper than an SVD of the
        # tall Z, and exact enough for the leading ones.
        with _lapack(gram):
            energies = torch.linalg.eigvalsh(gram[:cols, :cols]).flip(0).clamp_min(0)
        previous, captured = captured, float(energies[:rank].sum())
        if blocks > 1:
            gains.append((captured - previous) / total if total > 0 else 0.0)
        if _settled(gains, captured, total):
            break
        if blocks == most or captured > total * (1 + 1e-5):
            # Not settled within half the matrix (the full SVD is as cheap then), or the
            # basis lost orthogonality: the full SVD, exact.
            with _lapack(delta):
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            return Decomposition(u=u, s=s, vh=vh, total=total, method="exact", complete=True)
        y = (delta @ ritz[:, done:cols].float()).double()
        q = basis[:, :cols]
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            y -= q @ (q.T @ y)
        basis[:, cols : cols + width] = _orthonormal(y)
        blocks += 1
    # Qᵀ A = Zᵀ = U_b S Vh with ZᵀZ = U_b S² U_bᵀ and Vh = (Z U_b / S)ᵀ  ->  A ≈ (Q U_b) S Vh;
    # only the leading ``rank`` triplets are formed (the rest are not asked for).
    cols = blocks * width
    with _lapack(gram):
        energies, ub = torch.linalg.eigh(gram[:cols, :cols])
    energies, ub = energies.flip(0)[:rank].clamp_min(0), ub.flip(1)[:, :rank]
    s = energies.sqrt()
    vh = (ritz[:, :cols] @ ub / torch.where(s > 0, s, torch.ones_like(s))).T
    return Decomposition(
        u=(basis[:, :cols] @ ub).float(),
        s=s.float(),
        vh=vh.float().contiguous(),
        total=total,
        method="randomized",
        complete=False,
        iterations=blocks,
    )


def _settled(gains: list[float], captured: float, total: float) -> bool:
    """Whether the Krylov space is as good as the full SVD's at fp32 resolution.

    ``gains`` are the steps' gains in captured energy, as fractions of ‖ΔW‖². Once the
    leading directions are in the space they shrink geometrically (by a ratio ρ of about
    0.2-0.35 on the spectra of tests/test_extract_svd.py), so what the steps still to come
    would add is about ``gain · ρ / (1 - ρ)``, ρ the ratio of the last two gains, and the
    error ``e`` would fall by that over ``2e``. The space has settled when that fall is at
    most ``SETTLED_ULPS`` of e's fp32 spacing (``ulp(e) ≥ e · eps / 2``): the rest of the way
    to the Eckart-Young optimum is below what an fp32 error can show. A gain below eps² of
    ‖ΔW‖² is settled whatever the ratio: fp32 cannot resolve it (the error is then at fp32
    rounding level of ΔW itself).
    """
    if not gains:
        return False
    gain = gains[-1]
    if gain <= EPS32 * EPS32:
        return True
    if len(gains) < 2 or gains[-2] <= 0:
        return False
    ratio = gain / gains[-2]
    if ratio >= 1:
        return False  # not yet shrinking: the leading directions are still being found
    rest = gain * ratio / (1 - ratio)
    error = math.sqrt(max(total - captured, 0.0) / total) if total > 0 else 0.0
    return rest / (2 * error) <= SETTLED_ULPS * error * EPS32 / 2 if error > 0 else True


def numerical_rank(dec: Decomposition) -> int:
    """Singular values above fp32 rounding noise (``σ_1 · max(m, n) · eps``)."""
    if dec.s.numel() == 0 or float(dec.s[0]) <= 0:
        return 0
    tolerance = float(dec.s[0]) * max(dec.shape) * EPS32
    return int((dec.s > tolerance).sum())


def choose_rank(dec: Decomposition, rule: RankRule) -> int:
    """The rank a module keeps under ``rule`` (0 when ΔW is zero)."""
    rank = min(rule.max_rank, numerical_rank(dec))
    if rule.sv_epsilon > 0:
        rank = min(rank, int((dec.s > rule.sv_epsilon).sum()))
    if rule.min_energy is not None and dec.total > 0:
        kept = 0.0
        for i, energy in enumerate(dec.energies()[:rank]):
            kept += energy
            # The smallest rank that keeps the fraction asked (fp64 sums; a hair of slack for
            # a fraction that is reached exactly, e.g. 1.0 on an exact low-rank ΔW).
            if kept >= rule.min_energy * dec.total * (1 - 1e-12):
                return i + 1
    return rank


def factors(
    dec: Decomposition, rank: int, *, distribute_scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A`` the rank-``rank`` truncation: ``B = U·sqrt(S)``,
    ``A = sqrt(S)·Vᵀ`` (mergekit's ``distribute_scale``), or ``B = U·S``, ``A = Vᵀ``."""
    u, s, vh = dec.u[:, :rank], dec.s[:rank], dec.vh[:rank]
    if distribute_scale:
        root = s.sqrt()
        return (u * root).contiguous(), (root[:, None] * vh).contiguous()
    return (u * s).contiguous(), vh.contiguous()


def residual(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """``(‖ΔW - B A‖_F², ‖ΔW‖_F²)`` in fp64, with the factors as given (their stored dtype
    counts), a block of rows at a time so no second module-sized matrix is held."""
    bf, af = b.float(), a.float()
    err = 0.0
    norm = 0.0
    block_rows = rows_per_block(delta)
    for start in range(0, delta.shape[0], block_rows):
        rows = delta[start : start + block_rows]
        err += squared_norm(rows - bf[start : start + block_rows] @ af)
        norm += squared_norm(rows)
    return err, norm
