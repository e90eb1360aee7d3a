"""The private release of one round, as named steps: zero non-finite rows -> clip -> sum ->
record -> noise -> scale.

Given the per-example differences S (B x K) of a Poisson-sampled batch:

    release = ( sum_i clip_C(S_i) + noise ) / (q N)

A row with a NaN or infinite entry contributes zero (a coordinator that controls the model can
make one example's loss overflow; left in, its NaN would poison the sum whatever the noise, and
whether it does would tell whether that example was sampled). Zero is within the sensitivity
bound, and how many rows were zeroed is recorded in the silo's ledger, never released.
clip_C scales each example's K-vector to L2 norm at most C, so adding or removing one example
changes the sum by at most C in L2. N is the silo's *public size*, a number its operator declares
(``public-size``), never the count of its records: dividing by the exact count would release it,
and it changes when one record is added or removed (docs/threat-model.md). The noise is, by default (``privacy.noise = "discrete"``),
the discrete Gaussian on a lattice: the sum is rounded to g Z^K, with g a power of two near
C / 2^12, and integer noise N_Z(0, (sigma D)^2) is added per coordinate, where D = C / g +
ceil(sqrt K) + 1 bounds in lattice units how far rounding lets one example move the sum (sqrt K
for the two roundings, 1 for the floating-point sum). The released sum is an integer times g,
exact in float64, so nothing but the lattice point leaves: no low-order bits of a floating-point
sampler. That is the discrete Gaussian mechanism with noise multiplier sigma, on a Poisson sample
at rate q, the event charged to the ledger; its price is noise larger by D g / C - 1 (at most 0.13% for K <= 16).
``privacy.noise = "gaussian"`` adds N(0, sigma^2 C^2 I_K) in floating point instead.

The noise comes from :class:`~seedtune.common.privacy.randomness.SecretRandomness`, never from a
public seed. The event is committed to the ledger in this function, before the values are
returned, and a release the budget does not allow is refused before any noise is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import dp_accounting
import numpy as np
import torch
from seedtune.common.privacy.accounting import release_event
from seedtune.common.privacy.distributed import DistributedDiscreteGaussianDpEvent
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.randomness import SecretRandomness
from seedtune.common.protocol import ReleaseParameters


@dataclass(frozen=True)
class Release:
    """What leaves the silo for one round: K noised, normalised projected gradients."""

    values: np.ndarray  # float64, shape (K,)
    event: dp_accounting.DpEvent | None  # None for a non-private run
    zeroed: int = 0  # rows with a non-finite entry that contributed zero (not released)


@dataclass(frozen=True)
class LedgerKey:
    """Where a release is kept in the silo's ledger: the same key (run, step, and the digest of the
    request asked) lets the same request be answered again with the same values, uncharged."""

    step: int
    run_id: str = ""
    request: str = ""


class ReleaseError(RuntimeError):
    """A release that would not be finite: refused before anything leaves (a bug, never data)."""


def check_finite(values: np.ndarray, step: int) -> None:
    """Refuse to let a release out unless every value is finite (with finite rows, C and N it
    always is; a silo never lets one out if it is not)."""
    if not np.all(np.isfinite(values)):
        raise ReleaseError(f"step {step}: the release is not finite; nothing was sent")


def finite_rows(differences: torch.Tensor) -> tuple[torch.Tensor, int]:
    """S with every row that holds a NaN or an infinity set to zero, and how many were."""
    finite = torch.isfinite(differences).all(dim=1, keepdim=True)
    zeroed = int(differences.shape[0] - finite.sum())
    return torch.where(finite, differences, torch.zeros_like(differences)), zeroed


def clip_per_example(differences: torch.Tensor, clip_bound: float) -> torch.Tensor:
    """Scale each (finite) row to L2 norm at most ``clip_bound``: S_i * min(1, C / ||S_i||). A row
    whose norm overflows to infinity becomes zero, which is within the bound too."""
    norms = torch.linalg.vector_norm(differences, dim=1, keepdim=True)
    factors = torch.clamp(clip_bound / norms.clamp(min=1e-300), max=1.0)
    return differences * factors


def clipped_sum(differences: torch.Tensor, clip_bound: float) -> tuple[np.ndarray, int]:
    """The sum of the rows clipped to ``clip_bound`` (non-finite rows as zero), and how many
    rows were zeroed."""
    rows, zeroed = finite_rows(differences.to(torch.float64))
    return clip_per_example(rows, clip_bound).sum(dim=0).numpy(), zeroed


def private_release(
    differences: torch.Tensor,
    parameters: ReleaseParameters,
    *,
    population: int,
    randomness: SecretRandomness,
    ledger: PrivacyLedger,
    key: LedgerKey,
) -> Release:
    """Zero non-finite rows, clip, sum, charge the ledger, add secret noise, divide by q N.

    ``parameters``: C, sigma, q and the noise kind, as the request asked (the silo has checked
    them); ``population`` is N, the silo's public size; ``key`` keeps the release in the ledger, so
    that the same request can be answered again with the same values instead of a second charge."""
    p = parameters
    mechanism = NoiseMechanism.for_release(p.noise, p.noise_multiplier, p.clip_bound)
    total, zeroed = clipped_sum(differences, p.clip_bound)
    event = mechanism.event(p.sample_rate)
    # durable before anything leaves; refuses past the budget or the silo's limits
    release_id = ledger.charge(event, step=key.step, run_id=key.run_id, request=key.request, zeroed=zeroed)
    noised = mechanism.add(total, randomness)
    values = noised / (p.sample_rate * population)
    check_finite(values, key.step)
    ledger.attach(release_id, [float(v) for v in values])
    return Release(values, event, zeroed)


@dataclass(frozen=True)
class ShareRelease:
    """One silo's part of a securely aggregated round: its lattice point plus its share of the
    noise, as integers (units of g), before masking; never sent unmasked."""

    units: np.ndarray  # int64, shape (K,)
    event: dp_accounting.DpEvent  # charged: the sum of ``honest`` shares
    collusion: dp_accounting.DpEvent  # what holds if every other party colludes: this share alone
    zeroed: int = 0


def share_release(
    differences: torch.Tensor,
    parameters: ReleaseParameters,
    *,
    honest: int,
    randomness: SecretRandomness,
    ledger: PrivacyLedger,
    key: LedgerKey,
) -> ShareRelease:
    """Zero non-finite rows, clip, sum, round to the lattice, charge the ledger, add this silo's
    share N_Z(0, (s D)^2) of the noise, with s = ``parameters.noise_multiplier`` the multiplier of
    one share (:func:`~seedtune.common.privacy.accounting.calibrate_share_multiplier`).

    The charge is the sum of ``honest`` shares (the silo's assumption: at least that many
    participants, itself included, add theirs honestly), and the ledger records beside it the
    share alone, what this silo's noise guarantees if every other party colludes. Not divided
    by q N: the coordinator learns only the sum of the participants' releases and divides it by
    their summed q N."""
    p = parameters
    if p.noise != "discrete":
        raise ValueError("secure aggregation sums integers: it needs privacy.noise = 'discrete'")
    if honest < 1:
        raise ValueError(f"honest={honest}: a silo counts at least itself")
    total, zeroed = clipped_sum(differences, p.clip_bound)
    event, alone = share_event(p, honest, total.shape[0]), share_event(p, 1, total.shape[0])
    # durable before anything leaves; refuses past the budget or the silo's limits
    release_id = ledger.charge(event, step=key.step, run_id=key.run_id, request=key.request, zeroed=zeroed,
                               collusion=alone)
    noised = add_noise(total, clip_bound=p.clip_bound, noise_multiplier=p.noise_multiplier, randomness=randomness,
                       noise="discrete")
    units = (noised / lattice_step(p.clip_bound)).astype(np.int64)  # exact: lattice points, a power-of-two step
    ledger.attach(release_id, [int(v) for v in units])
    return ShareRelease(units, event, alone, zeroed)


def share_event(parameters: ReleaseParameters, parties: int, probes: int) -> dp_accounting.DpEvent:
    """One securely aggregated release, as charged: the Poisson-sampled sum of ``parties`` shares
    of multiplier ``parameters.noise_multiplier`` at the lattice sensitivity of K = ``probes``."""
    p = parameters
    sensitivity = float(lattice_sensitivity(p.clip_bound, probes))
    share = DistributedDiscreteGaussianDpEvent(p.noise_multiplier, parties, probes, sensitivity)
    return share if p.sample_rate >= 1 else dp_accounting.PoissonSampledDpEvent(p.sample_rate, share)


def share_scale(parameters: ReleaseParameters, probes: int) -> tuple[float, float]:
    """(C / g, s D): the clip bound and a share's standard deviation in lattice units, the two
    public numbers that bound a secure round's sums (:func:`seedtune.common.secagg.sum_bits`)."""
    p = parameters
    return p.clip_bound / lattice_step(p.clip_bound), p.noise_multiplier * float(lattice_sensitivity(p.clip_bound, probes))


LATTICE_BITS = 12  # the lattice step g is C / 2^12 to C / 2^13


def lattice_step(clip_bound: float) -> float:
    """g: the power of two with C / g in [2^12, 2^13)."""
    return math.ldexp(1.0, math.frexp(clip_bound)[1] - 1 - LATTICE_BITS)


def lattice_sensitivity(clip_bound: float, probes: int) -> Fraction:
    """D = C / g + ceil(sqrt K) + 1: a bound, in lattice units, on how far adding or removing one
    example moves the rounded sum (C / g itself, sqrt K from rounding either sum, and a whole unit
    for the floating-point error of summing and clipping)."""
    ceil_sqrt = math.isqrt(probes - 1) + 1
    return Fraction(clip_bound) / Fraction(lattice_step(clip_bound)) + ceil_sqrt + 1


def add_noise(total: np.ndarray, *, clip_bound: float, noise_multiplier: float, randomness: SecretRandomness,
              noise: str) -> np.ndarray:
    """The sum plus noise whose multiplier is ``noise_multiplier`` at L2 sensitivity ``clip_bound``."""
    if noise == "gaussian":
        return total + randomness.normal(total.shape[0]) * (noise_multiplier * clip_bound)
    if noise != "discrete":
        raise ValueError(f"unknown noise {noise!r}; use 'discrete' or 'gaussian'")
    step = lattice_step(clip_bound)
    std_units = Fraction(noise_multiplier) * lattice_sensitivity(clip_bound, total.shape[0])  # in lattice units
    units = np.rint(total / step)  # exact: step is a power of two
    return (units + randomness.discrete_gaussian(total.shape[0], std_units * std_units)) * step


@dataclass(frozen=True)
class NoiseMechanism:
    """The (discrete) Gaussian mechanism: it adds the noise and names the DP event that noise is
    charged as. A training release (:meth:`for_release`), a silo's private evaluation counts
    (:meth:`for_counts`) and the audit's expected noise all go through it.

    ``noise_multiplier`` is sigma, the noise's standard deviation over the L2 sensitivity: C for a
    release (plus the lattice's rounding slack, see :func:`lattice_sensitivity`), sqrt(2) for the
    counts (correct, examples), which one example moves by at most 1 each. Counts are integers
    already, so their discrete noise is drawn with variance exactly ``count_std``^2, on step 1."""

    noise: str  # "discrete" or "gaussian"
    noise_multiplier: float  # sigma
    clip_bound: float | None = None  # C of a release; None for counts
    count_std: float | None = None  # s of counts; None for a release

    @classmethod
    def for_release(cls, noise: str, noise_multiplier: float, clip_bound: float) -> NoiseMechanism:
        if noise not in ("discrete", "gaussian"):
            raise ValueError(f"unknown noise {noise!r}; use 'discrete' or 'gaussian'")
        return cls(noise, noise_multiplier, clip_bound=clip_bound)

    @classmethod
    def for_counts(cls, noise: str, count_std: float) -> NoiseMechanism:
        if noise not in ("discrete", "gaussian"):
            raise ValueError(f"unknown noise {noise!r}; use 'discrete' or 'gaussian'")
        return cls(noise, count_std / math.sqrt(2), count_std=count_std)

    def event(self, sample_rate: float = 1.0) -> dp_accounting.DpEvent:
        """What one use costs, on a Poisson sample at ``sample_rate`` (1: no sampling)."""
        return release_event(sample_rate, self.noise_multiplier, self.noise)

    def add(self, total: np.ndarray, randomness: SecretRandomness) -> np.ndarray:
        """``total`` plus this mechanism's noise, drawn from ``randomness`` (never a public seed)."""
        if self.count_std is not None:
            if self.noise == "discrete":
                drawn = randomness.discrete_gaussian(total.shape[0], Fraction(self.count_std) ** 2)
                return total + drawn.astype(np.float64)
            return total + randomness.normal(total.shape[0]) * self.count_std
        return add_noise(total, clip_bound=self.clip_bound, noise_multiplier=self.noise_multiplier,
                         randomness=randomness, noise=self.noise)

    def std(self, dimension: int) -> float:
        """The noise's standard deviation per coordinate, in the units of the sum."""
        if self.count_std is not None:
            return self.count_std
        if self.noise == "discrete":
            return (self.noise_multiplier * float(lattice_sensitivity(self.clip_bound, dimension))
                    * lattice_step(self.clip_bound))
        return self.noise_multiplier * self.clip_bound


def nonprivate_release(differences: torch.Tensor, *, sample_rate: float, population: int) -> Release:
    """The same normalisation without clipping or noise (non-private ZO, MeZO-style)."""
    total = differences.to(torch.float64).sum(dim=0).numpy()
    return Release(total / (sample_rate * population), None)


def private_counts(
    correct: int,
    count: int,
    *,
    mechanism: NoiseMechanism,
    randomness: SecretRandomness,
    ledger: PrivacyLedger,
    key: LedgerKey,
) -> tuple[float, float]:
    """A silo's evaluation, released privately: (correct, count) plus noise of std s per count
    (integer N_Z(0, s^2) by default: the counts are already on the lattice Z^2), charged first
    as :func:`~seedtune.common.privacy.accounting.evaluation_event`."""
    release_id = ledger.charge(mechanism.event(), step=key.step, note="evaluation", run_id=key.run_id,
                               request=key.request)
    noised = mechanism.add(np.array([correct, count], dtype=np.float64), randomness)
    values = [float(noised[0]), float(noised[1])]
    ledger.attach(release_id, values)
    return values[0], values[1]
