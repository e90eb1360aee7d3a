"""Accounting with dp-accounting: the events a release makes, epsilon spent, sigma for a budget.

Each release of a round is one Poisson-subsampled Gaussian mechanism on the sum of per-example
vectors clipped to L2 norm C, with noise N(0, sigma^2 C^2 I_K): under add/remove-one adjacency its
sensitivity is C, so it is ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` whatever K is.
Dividing by the public q * n afterwards is post-processing.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")


class _DropRdpConvergenceNotes(logging.Filter):
    """The RDP accountant logs a warning each time it skips an order alpha < 2 whose series does
    not converge (common at large q); it then uses the remaining orders, which is sound."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropRdpConvergenceNotes())


def release_event(sample_rate: float, noise_multiplier: float) -> dp_accounting.DpEvent:
    """The event of one release: Poisson sampling at rate q, then the Gaussian mechanism."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)


def make_accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r}; use one of {ACCOUNTANTS}")


def epsilon_of(events: Iterable[dp_accounting.DpEvent], delta: float, kind: str = "rdp") -> float:
    """epsilon at ``delta`` of the composition of ``events`` (identical events grouped)."""
    counts = Counter(events)
    if not counts:
        return 0.0
    accountant = make_accountant(kind)
    for event, count in counts.items():
        if _is_noiseless(event):
            return math.inf
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))


def _is_noiseless(event: dp_accounting.DpEvent) -> bool:
    while isinstance(event, (dp_accounting.PoissonSampledDpEvent, dp_accounting.SelfComposedDpEvent)):
        event = event.event
    return isinstance(event, dp_accounting.GaussianDpEvent) and event.noise_multiplier == 0


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, kind: str = "rdp"
) -> float:
    """epsilon of ``steps`` releases at the given sigma and q."""
    if noise_multiplier == 0:
        return math.inf
    if steps == 0:
        return 0.0
    event = dp_accounting.SelfComposedDpEvent(release_event(sample_rate, noise_multiplier), steps)
    return epsilon_of([event], delta, kind)


def evaluation_event(noise_multiplier: float) -> dp_accounting.DpEvent:
    """A silo's noised evaluation counts: (correct, examples) + N(0, s^2 I_2). Adding or removing
    one example moves both counts by at most 1, an L2 sensitivity of sqrt(2), so it is the
    Gaussian mechanism with noise multiplier s / sqrt(2)."""
    return dp_accounting.GaussianDpEvent(noise_multiplier / math.sqrt(2))


def calibrate_noise_multiplier(
    epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp",
    also: dp_accounting.DpEvent | None = None,
) -> float:
    """The smallest sigma (to 1e-6) whose ``steps`` releases (and the event ``also``, such as a
    final private evaluation) spend at most ``epsilon``.

    dp-accounting's bisection returns the end of its final bracket whose epsilon is below the
    target, so the result never overshoots the budget.
    """

    def event(sigma: float) -> dp_accounting.DpEvent:
        training = dp_accounting.SelfComposedDpEvent(release_event(sample_rate, sigma), steps)
        return training if also is None else dp_accounting.ComposedDpEvent([training, also])

    if also is not None and epsilon_of([also], delta, kind) >= epsilon:
        raise ValueError(f"the evaluation alone spends epsilon >= {epsilon}")
    return float(dp_accounting.calibrate_dp_mechanism(lambda: make_accountant(kind), event, epsilon, delta))
