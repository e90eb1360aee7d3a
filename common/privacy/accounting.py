"""Accounting with dp-accounting: the events a release makes, epsilon spent, sigma for a budget.

Each release of a round is one Poisson-subsampled additive-noise mechanism on the sum of
per-example vectors clipped to L2 norm C: under add/remove-one adjacency its L2 sensitivity is C,
so it is ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` whatever K is, or, with the default
discrete noise, ``PoissonSampledDpEvent(q, DiscreteGaussianDpEvent(sigma))``. Dividing by the
public q * n afterwards is post-processing.

dp-accounting has no discrete-Gaussian event, so :class:`DiscreteGaussianDpEvent` is one, and the
RDP accountant counts it as the continuous Gaussian with the same sigma, **at integer orders
only**. Why that is sound (Canonne, Kamath, Steinke 2020, "The Discrete Gaussian for Differential
Privacy", CKS20):

* Without sampling, the K-dimensional discrete Gaussian N_Z(0, s^2)^K with integer shifts of L2
  norm at most D has Renyi divergence at most alpha D^2 / (2 s^2) at every order (CKS20, the
  multivariate case of their concentrated-DP theorem):
  exactly the continuous Gaussian's curve at sigma = s / D.
* With Poisson sampling at rate q, the "remove" direction is E_P[(1 - q + q L)^alpha] with
  L = exp(<v, z>/s^2 - |v|^2/(2 s^2)) for the lattice shift v, |v| <= D. At an integer alpha the
  binomial expansion has non-negative terms in E_P[L^k], and E_P[L^k] = exp((k^2 - k)|v|^2/(2 s^2))
  exactly as for the continuous Gaussian: completing the square shifts the sum over Z^K by the
  lattice vector k v, which leaves the discrete Gaussian's normaliser unchanged. So at integer
  orders the remove direction *equals* the continuous Gaussian's at |v|, at most its value at D,
  which is what dp-accounting computes. At fractional orders dp-accounting uses a series
  specific to the continuous Gaussian, so those orders are left out.
* The "add" direction, E_P[(1 - q + q L)^(1 - alpha)], is at most the remove direction for the
  continuous Gaussian (Mironov, Talwar, Zhang 2019, "Renyi DP of the Sampled Gaussian
  Mechanism"). For the discrete Gaussian ``tests/test_discrete_noise.py`` checks it by exact
  summation over a grid of q, s, alpha and shifts in one and two dimensions: a check, not a proof.

The PLD accountant models the continuous Gaussian's exact privacy-loss distribution, which the
argument above does not cover, so it is refused for discrete noise. Integer orders cost a little
noise: the sigma a budget calibrates to grows by 1.7% on the default preset and 0.6% on the tiny
one (``seedtune bench noise``; ``seedtune budget --noise`` shows either).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable

import attr
import dp_accounting
import numpy as np
from dp_accounting import pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant
from seedtune.common.privacy.distributed import DistributedDiscreteGaussianDpEvent, rdp_curve

ACCOUNTANTS = ("rdp", "pld")
NOISES = ("discrete", "gaussian")  # the distribution a release draws its noise from
# Integer Renyi orders, where the discrete Gaussian is provably counted as the continuous one.
INTEGER_ORDERS = tuple(range(2, 257)) + (320, 384, 448, 512, 768, 1024)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DiscreteGaussianDpEvent(dp_accounting.DpEvent):
    """The discrete Gaussian mechanism on Z^K (CKS20): integer values with L2 sensitivity D,
    plus independent noise P(z) proportional to exp(-z^2 / (2 s^2)) per coordinate;
    ``noise_multiplier`` is s / D."""

    noise_multiplier: float


class _DropRdpConvergenceNotes(logging.Filter):
    """The RDP accountant logs a warning each time it skips an order alpha < 2 whose series does
    not converge (common at large q); it then uses the remaining orders, which is sound."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropRdpConvergenceNotes())


def noise_event(noise_multiplier: float, noise: str = "gaussian") -> dp_accounting.DpEvent:
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; use one of {NOISES}")
    if noise == "discrete":
        return DiscreteGaussianDpEvent(noise_multiplier)
    return dp_accounting.GaussianDpEvent(noise_multiplier)


def release_event(sample_rate: float, noise_multiplier: float, noise: str = "gaussian") -> dp_accounting.DpEvent:
    """The event of one release: Poisson sampling at rate q, then the (discrete) Gaussian mechanism."""
    mechanism = noise_event(noise_multiplier, noise)
    if sample_rate >= 1.0:
        return mechanism
    return dp_accounting.PoissonSampledDpEvent(sample_rate, mechanism)


def make_accountant(kind: str, *, discrete: bool = False) -> dp_accounting.PrivacyAccountant:
    if kind == "rdp":
        return rdp.RdpAccountant(orders=INTEGER_ORDERS) if discrete else rdp.RdpAccountant()
    if kind == "pld":
        if discrete:
            raise ValueError("the PLD accountant models the continuous Gaussian only; account discrete noise "
                             "with 'rdp'")
        return pld.PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r}; use one of {ACCOUNTANTS}")


def as_dp_accounting(event: dp_accounting.DpEvent) -> tuple[dp_accounting.DpEvent, bool]:
    """``event`` with every discrete Gaussian written as the Gaussian dp-accounting counts it as
    (see the module docstring), and whether there was one."""
    if isinstance(event, DiscreteGaussianDpEvent):
        return dp_accounting.GaussianDpEvent(event.noise_multiplier), True
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        inner, discrete = as_dp_accounting(event.event)
        return dp_accounting.PoissonSampledDpEvent(event.sampling_probability, inner), discrete
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        inner, discrete = as_dp_accounting(event.event)
        return dp_accounting.SelfComposedDpEvent(inner, event.count), discrete
    if isinstance(event, dp_accounting.ComposedDpEvent):
        parts = [as_dp_accounting(e) for e in event.events]
        return dp_accounting.ComposedDpEvent([e for e, _ in parts]), any(d for _, d in parts)
    return event, False


def epsilon_of(events: Iterable[dp_accounting.DpEvent], delta: float, kind: str = "rdp") -> float:
    """epsilon at ``delta`` of the composition of ``events`` (identical events grouped)."""
    counts = Counter(events)
    if not counts:
        return 0.0
    if any(_has_distributed(event) for event in counts):
        return _epsilon_with_distributed(counts, delta, kind)
    translated = [(as_dp_accounting(event), count) for event, count in counts.items()]
    accountant = make_accountant(kind, discrete=any(discrete for (_, discrete), _ in translated))
    for (event, _), count in translated:
        if _is_noiseless(event):
            return math.inf
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))


def _parts(event: dp_accounting.DpEvent) -> list[dp_accounting.DpEvent]:
    """``event`` as the list of events it composes (a composition flattened, one level deep each)."""
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return [part for inner in event.events for part in _parts(inner)]
    return [event]


def _has_distributed(event: dp_accounting.DpEvent) -> bool:
    for part in _parts(event):
        while isinstance(part, (dp_accounting.PoissonSampledDpEvent, dp_accounting.SelfComposedDpEvent)):
            part = part.event
        if isinstance(part, DistributedDiscreteGaussianDpEvent):
            return True
    return False


def _epsilon_with_distributed(counts: Counter, delta: float, kind: str) -> float:
    """epsilon of events some of which are distributed discrete Gaussians: their RDP curves
    (:mod:`seedtune.common.privacy.distributed`) added to the curve dp-accounting composes for the
    others, at the integer orders, then converted as dp-accounting converts its own."""
    if kind != "rdp":
        raise ValueError("distributed noise is accounted with the 'rdp' accountant only")
    accountant = make_accountant("rdp", discrete=True)
    total = np.zeros(len(INTEGER_ORDERS))
    for event, count in counts.items():
        for part in _parts(event):
            if _has_distributed(part):
                total += count * rdp_curve(part, INTEGER_ORDERS)
                continue
            translated, _ = as_dp_accounting(part)
            if _is_noiseless(translated):
                return math.inf
            accountant.compose(translated, count)
    # dp-accounting keeps the composed curve in ``_rdp`` (one value per order; no public getter);
    # tests/test_distributed_noise.py checks that reading it gives dp-accounting's own epsilon.
    total += accountant._rdp
    return float(rdp_privacy_accountant.compute_epsilon(INTEGER_ORDERS, total, delta)[0])


def _is_noiseless(event: dp_accounting.DpEvent) -> bool:
    while isinstance(event, (dp_accounting.PoissonSampledDpEvent, dp_accounting.SelfComposedDpEvent)):
        event = event.event
    return isinstance(event, dp_accounting.GaussianDpEvent) and event.noise_multiplier == 0


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, kind: str = "rdp",
    noise: str = "gaussian",
) -> float:
    """epsilon of ``steps`` releases at the given sigma and q."""
    if noise_multiplier == 0:
        return math.inf
    if steps == 0:
        return 0.0
    event = dp_accounting.SelfComposedDpEvent(release_event(sample_rate, noise_multiplier, noise), steps)
    return epsilon_of([event], delta, kind)


def evaluation_event(noise_multiplier: float, noise: str = "gaussian") -> dp_accounting.DpEvent:
    """A silo's noised evaluation counts: (correct, examples) + noise of std s per count. Adding or
    removing one example moves both counts by at most 1, an L2 sensitivity of sqrt(2), so it is the
    (discrete) Gaussian mechanism with noise multiplier s / sqrt(2)."""
    return noise_event(noise_multiplier / math.sqrt(2), noise)


def calibrate_noise_multiplier(
    epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp",
    also: dp_accounting.DpEvent | None = None, noise: str = "gaussian",
) -> float:
    """The smallest sigma (to 1e-6) whose ``steps`` releases (and the event ``also``, such as a
    final private evaluation) spend at most ``epsilon``.

    dp-accounting's bisection returns the end of its final bracket whose epsilon is below the
    target, so the result never overshoots the budget.
    """

    def event(sigma: float) -> dp_accounting.DpEvent:
        training = dp_accounting.SelfComposedDpEvent(release_event(sample_rate, sigma, noise), steps)
        return as_dp_accounting(training if also is None else dp_accounting.ComposedDpEvent([training, also]))[0]

    if also is not None and epsilon_of([also], delta, kind) >= epsilon:
        raise ValueError(f"the evaluation alone spends epsilon >= {epsilon}")
    discrete = noise == "discrete" or (also is not None and as_dp_accounting(also)[1])
    return float(dp_accounting.calibrate_dp_mechanism(lambda: make_accountant(kind, discrete=discrete), event,
                                                      epsilon, delta))


def calibrate_share_multiplier(
    epsilon: float, delta: float, sample_rate: float, steps: int, *, honest: int, dimension: int,
    sensitivity: float, also: dp_accounting.DpEvent | None = None,
) -> float:
    """The smallest multiplier s / D of one silo's noise share (to 1e-6 relative) such that
    ``steps`` sums carrying ``honest`` shares (and the event ``also``) spend at most ``epsilon``.

    Bisection on the multiplier, keeping the end whose epsilon is within the budget, so the result
    never overshoots it (as dp-accounting's own calibration does for its events)."""

    def spent(multiplier: float) -> float:
        share = DistributedDiscreteGaussianDpEvent(multiplier, honest, dimension, sensitivity)
        training = dp_accounting.SelfComposedDpEvent(
            share if sample_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, share), steps)
        return epsilon_of([training] if also is None else [training, also], delta)

    if also is not None and epsilon_of([also], delta) >= epsilon:
        raise ValueError(f"the evaluation alone spends epsilon >= {epsilon}")
    low, high = 1e-3, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no share of noise reaches epsilon = {epsilon} in {steps} steps")
    while high - low > 1e-6 * high:
        middle = (low + high) / 2
        low, high = (low, middle) if spent(middle) <= epsilon else (middle, high)
    return high
