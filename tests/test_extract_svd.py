"""The decomposition behind `mergejob extract`: against the Eckart-Young optimum.

The randomized path (block Krylov, Rayleigh-Ritz) must come as close to the optimum as fp32
can tell: within one fp32 ulp of the error (or no further than the full SVD in fp32, mergekit's
method, where rounding of ΔW leaves that one further), and so within 1e-4 everywhere, on the
spectra that make it work hardest: pure noise (a flat spectrum), a slowly decaying cluster,
power laws, a gap right at the rank, the low-rank-plus-noise shape of a real fine-tune, and
noise and a fine-tune-like delta the size of a 1.1B model's MLP weight (2048 x 5632). The rank
rules pick what they promise.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergejob.extraction.svd import (
    EPS32,
    RankRule,
    choose_rank,
    decompose,
    factors,
    numerical_rank,
    residual,
    uses_randomized,
)

M, N = 1024, 2048


def with_spectrum(values: list[float], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    k = len(values)
    u = torch.linalg.qr(torch.randn(M, k, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(N, k, generator=generator, dtype=torch.float64)).Q
    return ((u * torch.tensor(values, dtype=torch.float64)) @ v.T).float()


SPECTRA = {
    "noise": None,
    "cluster": [1.0 - 1e-3 * i for i in range(M)],
    "power-0.5": [(i + 1) ** -0.5 for i in range(M)],
    "power-1": [(i + 1) ** -1.0 for i in range(M)],
    "gap-at-the-rank": [1.0] * 30 + [0.99] * 4 + [0.5] * (M - 34),
    "low-rank-and-noise": [10.0] * 8 + [1e-3] * (M - 8),
    "geometric": [0.95**i for i in range(M)],
}


def matrix(name: str) -> torch.Tensor:
    values = SPECTRA[name]
    if values is None:
        return torch.randn(M, N, generator=torch.Generator().manual_seed(3))
    return with_spectrum(values)


def optimum(delta: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return math.sqrt(float((s[rank:] ** 2).sum() / (s**2).sum()))


def measured(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    err, total = residual(delta, b, a)
    return math.sqrt(err / total)


@pytest.mark.parametrize("name", list(SPECTRA))
def test_the_randomized_svd_stays_within_1e_4_of_the_optimum(name: str) -> None:
    delta = matrix(name)
    dec = decompose(delta, rank=32, method="randomized", seed=1)
    if name in ("cluster", "noise"):
        # Spectra that do not settle to fp32 resolution within half of a 1024-wide matrix
        # (10 blocks): the full SVD, exact. (2048 x 5632 noise settles: below.)
        assert dec.method == "exact" and dec.complete
    else:
        assert dec.method == "randomized" and not dec.complete
    for rank in (1, 8, 31, 32):
        b, a = factors(dec, rank)
        error = measured(delta, b, a)
        assert error - optimum(delta, rank) < 1e-4, (name, rank, dec.iterations)
        # What the report calls the kept fraction is what the factors keep.
        assert abs((1 - dec.kept_fraction(rank)) - error**2) < 1e-5


def ulp32(value: float) -> float:
    """The spacing of fp32 numbers at ``value`` (> 0): what an fp32 error can resolve."""
    return 2.0 ** (math.floor(math.log2(value)) - 23)


def large(name: str) -> torch.Tensor:
    """A 2048 x 5632 module (TinyLlama-1.1B's MLP): pure noise, or a fine-tune's delta as
    bench/bench_extract.py makes it (rank 16, σ = 0.5·0.8^i, plus full-rank noise)."""
    generator = torch.Generator().manual_seed(3)
    if name == "noise-2048x5632":
        return torch.randn(2048, 5632, generator=generator)
    u = torch.linalg.qr(torch.randn(2048, 16, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(5632, 16, generator=generator)).Q
    update = (u * torch.tensor([0.5 * 0.8**i for i in range(16)])) @ v.T
    return update + torch.randn(2048, 5632, generator=generator) * 2e-4


@pytest.mark.parametrize(
    "name",
    [
        *SPECTRA,
        pytest.param("noise-2048x5632", marks=pytest.mark.slow),
        pytest.param("finetune-2048x5632", marks=pytest.mark.slow),
    ],
)
def test_the_randomized_svd_is_as_close_to_the_optimum_as_fp32_can_tell(name: str) -> None:
    """Against the Eckart-Young optimum (fp64 singular values of the fp32 ΔW), the error of
    the factors is at most one fp32 ulp of the error above it. Where fp32 rounding of ΔW itself
    puts the full fp32 SVD (LAPACK, as mergekit) further away than that (a strong low-rank part
    over faint noise: ΔW's rounding is then large next to the error), no further than it."""
    delta = large(name) if name.endswith("2048x5632") else matrix(name)
    dec = decompose(delta, rank=32, method="randomized", seed=1)
    if name.endswith("2048x5632"):
        assert dec.method == "randomized" and dec.iterations <= 20, dec.iterations
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    exact = None
    for rank in (1, 8, 31, 32):
        best = math.sqrt(float(s2[rank:].sum() / s2.sum()))
        gap = measured(delta, *factors(dec, rank)) - best
        if gap <= ulp32(best):
            continue
        exact = exact or decompose(delta, rank=32, method="exact")
        lapack = measured(delta, *factors(exact, rank)) - best
        assert gap <= lapack, (name, rank, dec.iterations, gap / ulp32(best), lapack)


def test_auto_takes_the_full_svd_for_small_modules_and_the_randomized_one_for_large() -> None:
    assert not uses_randomized((384, 1024), 32, "auto")
    assert uses_randomized((1024, 2048), 32, "auto")
    assert uses_randomized((384, 1024), 32, "randomized")
    assert not uses_randomized((8192, 28672), 32, "exact")
    assert not uses_randomized((64, 128), 32, "randomized")  # two blocks pass half of it


@pytest.mark.parametrize("name", ["power-0.5", "low-rank-and-noise"])
def test_the_full_svd_reaches_the_optimum_and_knows_it(name: str) -> None:
    delta = matrix(name)
    dec = decompose(delta, rank=16, method="exact")
    assert dec.complete and dec.method == "exact"
    for rank in (1, 5, 16):
        b, a = factors(dec, rank)
        expected = optimum(delta, rank)
        assert abs(measured(delta, b, a) - expected) < 1e-5
        assert abs((dec.optimal_error(rank) or 0.0) - expected) < 1e-5


def test_the_randomized_sketch_is_deterministic_per_seed() -> None:
    delta = matrix("power-0.5")
    one = decompose(delta, rank=8, method="randomized", seed=5)
    two = decompose(delta, rank=8, method="randomized", seed=5)
    assert torch.equal(one.u, two.u) and torch.equal(one.vh, two.vh)


def test_an_exact_low_rank_delta_keeps_its_rank_not_the_rounding_noise() -> None:
    delta = with_spectrum([3.0, 2.0, 1.0, 0.5] + [0.0] * 60)
    dec = decompose(delta, rank=32, method="exact")
    assert numerical_rank(dec) == 4
    assert choose_rank(dec, RankRule(max_rank=32)) == 4
    b, a = factors(dec, 4)
    # LAPACK's backward error: about sqrt(n) fp32 epsilons of ‖ΔW‖ (1.1e-6 measured with the
    # one-thread SVD, 7.4e-7 with two threads: the rounding order differs).
    assert measured(delta, b, a) < math.sqrt(M) * EPS32


def test_min_energy_gives_the_smallest_rank_that_keeps_the_fraction() -> None:
    delta = matrix("power-0.5")
    dec = decompose(delta, rank=64, method="exact")
    s2 = (torch.linalg.svdvals(delta.double()) ** 2).tolist()
    total = sum(s2)
    for fraction in (0.1, 0.3, 0.5):
        rank = choose_rank(dec, RankRule(max_rank=64, min_energy=fraction))
        assert sum(s2[:rank]) / total >= fraction
        assert sum(s2[: rank - 1]) / total < fraction
    # Capped by max_rank when the fraction needs more.
    assert choose_rank(dec, RankRule(max_rank=10, min_energy=0.99)) == 10


def test_sv_epsilon_drops_the_small_singular_values() -> None:
    delta = with_spectrum([5.0, 4.0, 0.2, 0.1] + [0.0] * 10)
    dec = decompose(delta, rank=8, method="exact")
    assert choose_rank(dec, RankRule(max_rank=8, sv_epsilon=0.15)) == 3
    assert choose_rank(dec, RankRule(max_rank=8, sv_epsilon=1.0)) == 2


def test_the_scale_is_split_between_the_factors_or_put_in_b() -> None:
    delta = with_spectrum([4.0, 1.0])
    dec = decompose(delta, rank=2, method="exact")
    b, a = factors(dec, 2, distribute_scale=True)
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-5)  # sqrt(S) on each side
    b2, a2 = factors(dec, 2, distribute_scale=False)
    assert torch.allclose(a2.norm(dim=1), torch.ones(2), rtol=1e-5)  # Vᵀ: orthonormal rows
    assert torch.allclose(b @ a, b2 @ a2, atol=1e-5)
