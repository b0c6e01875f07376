"""The decomposition of one module's ΔW: a truncated SVD in fp32, and the rank it keeps.

``decompose`` gives the leading singular triplets of ``delta``: the full SVD
(``torch.linalg.svd``) for small modules or when asked (``method="exact"``), else a randomized
block Krylov iteration with a Rayleigh-Ritz step (Halko, Martinsson and Tropp, 2011; Musco and
Musco, 2015), grown until the captured energy stops growing, and the full SVD after all if it
does not settle within half the matrix. Its error stays within 1e-4 of the Eckart-Young
optimum (``tests/test_extract_svd.py`` checks it against the full SVD on hard spectra) at a
fraction of the cost: a full SVD of a 8192 x 28672 MLP weight is O(m²n); the randomized one
is a few products with blocks of ``rank + rank/2`` columns.

``choose_rank`` applies the rank rules (``max_rank``, ``sv_epsilon``, ``min_energy``, and the
numerical rank: singular values at fp32 rounding level are noise); ``factors`` splits the
kept triplets into PEFT's ``lora_B`` and ``lora_A``; ``residual`` measures the relative error
``‖ΔW - B A‖_F / ‖ΔW‖_F`` of the factors as stored, block by block.

Example::

    dec = decompose(delta, rank=32, method="auto", seed=7)
    r = choose_rank(dec, RankRule(max_rank=32, min_energy=0.9))
    b, a = factors(dec, r, distribute_scale=True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

SvdMethod = Literal["auto", "exact", "randomized"]

# fp32 machine epsilon: singular values below sigma_1 * max(m, n) * EPS are rounding noise
# (numpy's matrix_rank tolerance).
EPS32 = float(torch.finfo(torch.float32).eps)
# Below this smaller dimension the full SVD is cheap enough (and exact).
RANDOMIZED_MIN_DIM = 1024
OVERSAMPLE_MIN = 16
# At most this many Krylov blocks (then the full SVD): a settled space needs far fewer.
MAX_KRYLOV_BLOCKS = 16
# The randomized method stops when one more block captures less than this fraction of
# ‖ΔW‖² (or 2e-6 x the error left; its error then sits within 1e-4 of the optimum).
ENERGY_TOLERANCE = 1e-9
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
    """The leading ``rank`` (at least) singular triplets of the fp32 matrix ``delta``.

    ``seed`` makes the randomized sketch deterministic (a rerun writes the same bytes).
    """
    if delta.dim() != 2:
        raise ValueError(f"decompose needs a matrix, got shape {list(delta.shape)}")
    delta = delta.float()
    total = squared_norm(delta)
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    if uses_randomized(shape, rank, method):
        return _randomized(delta, rank, total, seed)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return Decomposition(u=u, s=s, vh=vh, total=total, method="exact", complete=True)


def _rows_per_block(matrix: torch.Tensor) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, int(matrix.shape[1])))


def squared_norm(matrix: torch.Tensor) -> float:
    """‖matrix‖_F² summed in fp64 a block of rows at a time (no fp64 copy of a module)."""
    total = 0.0
    block_rows = _rows_per_block(matrix)
    for start in range(0, matrix.shape[0], block_rows):
        block = matrix[start : start + block_rows]
        total += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
    return total


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix, mode="reduced").Q


def _randomized(delta: torch.Tensor, rank: int, total: float, seed: int) -> Decomposition:
    """Randomized block Krylov iteration with Rayleigh-Ritz, until the top-``rank`` energy
    stops growing (Musco and Musco, 2015: unlike plain power iterations it converges fast on
    the flat noise tails of real fine-tuning deltas).

    The Krylov space grows by one block of ``rank + max(rank // 2, 16)`` columns per step:
    two products with ΔW (``Aᵀ Q`` is also the Ritz step's matrix), the new block made
    orthogonal to all the others (twice, for fp32). When the space would pass half the
    smaller dimension without settling, the full SVD is as cheap and exact: it is used.
    """
    m, n = delta.shape
    if n > m:  # the Ritz matrix Aᵀ Q is then the smaller side
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
    # Q (m x K) and Z = Aᵀ Q (n x K), filled block by block: K grows by ``width`` a step.
    # Q is kept in fp64: once the strong directions are in it, a new block is a small
    # remainder, and orthogonalising that in fp32 would let the basis drift (energies above
    # ‖ΔW‖²). The products with ΔW, the cost, stay in fp32.
    basis = torch.empty(m, most * width, dtype=torch.float64, device=delta.device)
    ritz = torch.empty(n, most * width, dtype=torch.float32, device=delta.device)
    basis[:, :width] = _orthonormal((delta @ omega).double())
    blocks = 1
    previous = -1.0
    while True:
        done, cols = (blocks - 1) * width, blocks * width
        ritz[:, done:cols] = delta.T @ basis[:, done:cols].float()  # new rows of (Qᵀ A)ᵀ
        z = ritz[:, :cols].double()
        # σ² of Qᵀ A are the eigenvalues of ZᵀZ (small, fp64): far cheaper than an SVD of
        # the tall Z, and exact enough for the leading ones.
        energies = torch.linalg.eigvalsh(z.T @ z).flip(0).clamp_min(0)
        captured = float(energies[:rank].sum())
        # The optimum's error exceeds ours by about gain / (2 err): a gain this small
        # (relative to the error left) means the subspace has settled.
        error = math.sqrt(max(total - captured, 0.0) / total) if total > 0 else 0.0
        if captured - previous <= max(ENERGY_TOLERANCE, 2e-5 * error) * total:
            break
        if blocks == most or captured > total * (1 + 1e-5):
            # Not settled within half the matrix (the full SVD is as cheap then), or the
            # basis lost orthogonality: the full SVD, exact.
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            return Decomposition(u=u, s=s, vh=vh, total=total, method="exact", complete=True)
        previous = captured
        y = (delta @ ritz[:, done:cols]).double()
        q = basis[:, :cols]
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            y -= q @ (q.T @ y)
        basis[:, cols : cols + width] = _orthonormal(y)
        blocks += 1
    # Qᵀ A = Zᵀ = U_b S Vh with ZᵀZ = U_b S² U_bᵀ and Vh = (Z U_b / S)ᵀ  ->  A ≈ (Q U_b) S Vh
    cols = blocks * width
    z = ritz[:, :cols].double()
    energies, ub = torch.linalg.eigh(z.T @ z)
    energies, ub = energies.flip(0).clamp_min(0), ub.flip(1)
    s = energies.sqrt()
    vh = (z @ ub / torch.where(s > 0, s, torch.ones_like(s))).T
    return Decomposition(
        u=(basis[:, :cols] @ ub).float(),
        s=s.float(),
        vh=vh.float().contiguous(),
        total=total,
        method="randomized",
        complete=False,
        iterations=blocks,
    )


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
    block_rows = _rows_per_block(delta)
    for start in range(0, delta.shape[0], block_rows):
        rows = delta[start : start + block_rows]
        err += squared_norm(rows - bf[start : start + block_rows] @ af)
        norm += squared_norm(rows)
    return err, norm
