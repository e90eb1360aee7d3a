"""Accounting for noise added in shares by several silos (secure aggregation's distributed noise).

Invariants: the bound charged for the sum of t shares is never below the exact Renyi divergence of
that sum, summed over the lattice, in either direction of adjacency, with or without Poisson
sampling; at one share it is the discrete Gaussian's own closed form; more honest shares never
cost more; and composing it with dp-accounting's events gives dp-accounting's own figure for those.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy.special import logsumexp

from seedtune.common.privacy.accounting import INTEGER_ORDERS, epsilon_for, epsilon_of, release_event
from seedtune.common.privacy.distributed import (
    DistributedDiscreteGaussianDpEvent,
    poisson_subsampled_rdp,
    rdp_curve,
    summed_rdp,
    tau,
)
from seedtune.common.privacy.mechanism import lattice_sensitivity

ORDERS = (2, 3, 5, 8, 16, 32)


def _log_share(s: float, reach: int) -> np.ndarray:
    axis = np.arange(-reach, reach + 1, dtype=np.float64)
    log_p = -(axis**2) / (2 * s * s)
    return log_p - logsumexp(log_p)


def _log_sum_of_shares(s: float, parties: int, reach: int) -> np.ndarray:
    """log PMF of the sum of ``parties`` independent N_Z(0, s^2), on -reach .. reach, by exact
    convolution (the tails beyond reach are below float64's resolution at these s)."""
    share = np.exp(_log_share(s, reach))
    total = share
    for _ in range(parties - 1):
        total = np.convolve(total, share)
    middle = len(total) // 2
    total = total[middle - reach : middle + reach + 1]
    with np.errstate(divide="ignore"):
        return np.log(total / total.sum())


def _exact_rdp(log_p: np.ndarray, shift: tuple[int, ...], q: float, alpha: int) -> tuple[float, float]:
    """D_a(M || P) and D_a(P || M) for P the product of ``log_p`` over len(shift) coordinates,
    Q = P shifted by ``shift``, M = (1 - q) P + q Q; exact sums over the grid."""
    grids = np.meshgrid(*[log_p] * len(shift), indexing="ij")
    log_joint = sum(grids)
    log_shifted = sum(np.roll(g, v, axis=i) for i, (g, v) in enumerate(zip(grids, shift)))
    keep = np.isfinite(log_joint) & np.isfinite(log_shifted)
    for i, v in enumerate(shift):  # drop the cells np.roll wrapped around
        index = [slice(None)] * len(shift)
        index[i] = slice(0, v) if v > 0 else slice(len(log_p) + v, None)
        keep[tuple(index)] = False
    log_p_all, log_q_all = log_joint[keep], log_shifted[keep]
    log_m = np.logaddexp(math.log1p(-q) + log_p_all, math.log(q) + log_q_all) if q < 1 else log_q_all
    remove = logsumexp(alpha * log_m + (1 - alpha) * log_p_all) / (alpha - 1)
    add = logsumexp(alpha * log_p_all + (1 - alpha) * log_m) / (alpha - 1)
    return float(remove), float(add)


def _event(s: float, parties: int, shift: tuple[int, ...]) -> DistributedDiscreteGaussianDpEvent:
    sensitivity = math.sqrt(sum(v * v for v in shift))
    return DistributedDiscreteGaussianDpEvent(s / sensitivity, parties, len(shift), sensitivity)


@pytest.mark.parametrize("parties", [2, 3, 5])
@pytest.mark.parametrize("s", [0.4, 0.7, 1.2])
@pytest.mark.parametrize("shift", [(1,), (2,), (1, 1), (2, 1)])
def test_the_bound_on_the_sum_of_shares_holds_by_exact_summation(parties, s, shift):
    """Small shares, where the sum is far from one discrete Gaussian (tau is not negligible), so the
    tau terms of the bound are what keeps it above the truth."""
    reach = int(14 * s * math.sqrt(parties)) + 40
    log_p = _log_sum_of_shares(s, parties, reach)
    event = _event(s, parties, shift)
    base = [math.inf, math.inf] + [summed_rdp(event, alpha) for alpha in range(2, max(ORDERS) + 1)]
    for q in (0.02, 0.2, 1.0):
        sampled = event if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, event)
        for alpha in ORDERS:
            general = poisson_subsampled_rdp(q, base, alpha)
            charged = rdp_curve(sampled, [alpha])[0]  # the smaller of the two bounds
            remove, add = _exact_rdp(log_p, shift, q, alpha)
            assert charged <= general * (1 + 1e-12)
            assert max(remove, add) <= charged * (1 + 1e-9) + 1e-12, (q, alpha, remove, add, charged)


def test_one_share_is_the_discrete_gaussians_closed_form():
    event = DistributedDiscreteGaussianDpEvent(1.3, 1, 64, 4100.0)
    assert tau(1.3 * 4100.0, 1) == 0.0
    for alpha in ORDERS:
        assert summed_rdp(event, alpha) == pytest.approx(alpha / (2 * 1.3**2), rel=1e-12)


def test_shares_as_large_as_seedtunes_cost_what_their_summed_variance_does():
    """At the lattice's scale (s in the thousands of units) tau underflows: t shares of multiplier
    sigma / sqrt(t) cost exactly what one discrete Gaussian of multiplier sigma does, unsampled."""
    sensitivity = float(lattice_sensitivity(3.0, 64))
    for parties in (2, 3, 10, 50):
        event = DistributedDiscreteGaussianDpEvent(1.6 / math.sqrt(parties), parties, 64, sensitivity)
        assert tau(event.noise_multiplier * sensitivity, parties) == 0.0
        assert summed_rdp(event, 8) == pytest.approx(8 / (2 * 1.6**2), rel=1e-12)


def test_sampling_never_costs_more_than_the_unsampled_mechanism_and_more_shares_never_cost_more():
    sensitivity = 5.0
    for parties in (1, 2, 4, 8):
        few = DistributedDiscreteGaussianDpEvent(0.3, parties, 3, sensitivity)
        more = DistributedDiscreteGaussianDpEvent(0.3, parties + 1, 3, sensitivity)
        sampled = rdp_curve(dp_accounting.PoissonSampledDpEvent(0.1, few), INTEGER_ORDERS[:40])
        whole = rdp_curve(few, INTEGER_ORDERS[:40])
        assert np.all(sampled <= whole) and np.all(sampled > 0)
        assert np.all(rdp_curve(more, INTEGER_ORDERS[:40]) <= whole)


@pytest.mark.parametrize("parties", [1, 3, 10])
def test_shares_as_large_as_seedtunes_are_charged_what_one_silos_own_noise_of_their_sum_is(parties):
    """At the lattice's scale tau is 0, so t sampled shares of multiplier sigma / sqrt(t) are charged
    exactly the sampled discrete Gaussian of multiplier sigma (the curve a silo's own release is
    charged by), where Zhu and Wang's general bound alone lies above it, a fifth more epsilon at the
    default's parameters and far more at epsilon 2 (the noise it needed there was twelve times)."""
    sigma, q, steps = 1.623, 0.05, 1200
    sensitivity = float(lattice_sensitivity(3.0, 64))
    share = DistributedDiscreteGaussianDpEvent(sigma / math.sqrt(parties), parties, 64, sensitivity)
    charged = epsilon_of([dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, share), steps)],
                         1e-5)
    exact = epsilon_for(sigma, q, steps, 1e-5, noise="discrete")
    assert charged == pytest.approx(exact, rel=1e-9)
    base = [math.inf, math.inf] + [summed_rdp(share, alpha) for alpha in range(2, 65)]
    assert poisson_subsampled_rdp(q, base, 64) > rdp_curve(dp_accounting.PoissonSampledDpEvent(q, share), [64])[0]


def test_composing_with_dp_accountings_events_gives_its_own_figure_for_them():
    """The RDP curve read out of dp-accounting's accountant converts to the epsilon it reports."""
    evaluation = release_event(1.0, 3.0, "discrete")
    training = dp_accounting.SelfComposedDpEvent(release_event(0.05, 1.6, "discrete"), 300)
    alone = epsilon_of([training, evaluation], 1e-5)
    negligible = DistributedDiscreteGaussianDpEvent(1e6, 3, 64, 4100.0)  # adds about 1e-12 of RDP
    assert epsilon_of([training, evaluation, negligible], 1e-5) == pytest.approx(alone, rel=1e-6)
    shares = DistributedDiscreteGaussianDpEvent(2.0, 3, 64, 4100.0)
    assert epsilon_of([training, evaluation, shares], 1e-5) > alone
    with pytest.raises(ValueError, match="'rdp'"):
        epsilon_of([shares], 1e-5, kind="pld")


@pytest.mark.parametrize("honest", [1, 3, 10])
def test_a_calibrated_share_never_overshoots_and_shrinks_as_the_square_root_of_the_honest(honest):
    from seedtune.common.privacy.accounting import calibrate_share_multiplier

    sensitivity, q, steps = float(lattice_sensitivity(3.0, 64)), 0.05, 300
    share = calibrate_share_multiplier(6.0, 1e-5, q, steps, honest=honest, dimension=64, sensitivity=sensitivity)
    event = DistributedDiscreteGaussianDpEvent(share, honest, 64, sensitivity)
    spent = epsilon_of([dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, event), steps)], 1e-5)
    assert 6.0 * (1 - 1e-4) <= spent <= 6.0
    single = calibrate_share_multiplier(6.0, 1e-5, q, steps, honest=1, dimension=64, sensitivity=sensitivity)
    assert share * math.sqrt(honest) == pytest.approx(single, rel=1e-5)  # tau = 0 here: the sum's variance is what counts


# -- a silo's share --------------------------------------------------------------------------------
def _share_setup(tmp_path, epsilon=1e9):
    import torch

    from seedtune.common.privacy.ledger import PrivacyLedger
    from seedtune.common.privacy.randomness import SeededRandomness

    return (PrivacyLedger(tmp_path / "l.sqlite", epsilon=epsilon, delta=1e-5), SeededRandomness(5, quiet=True),
            torch.full((7, 256), 0.01, dtype=torch.float64))


def test_a_share_is_integers_with_the_shares_noise_and_the_ledger_keeps_both_figures(tmp_path):
    from seedtune.common.privacy.mechanism import LedgerKey, lattice_step, share_release
    from seedtune.common.protocol import ReleaseParameters

    ledger, randomness, differences = _share_setup(tmp_path)
    parameters = ReleaseParameters(clip_bound=3.0, noise_multiplier=0.9, sample_rate=0.05)
    share = share_release(differences, parameters, honest=4, randomness=randomness, ledger=ledger, key=LedgerKey(0))
    assert share.units.dtype == np.int64
    clipped = differences.sum(dim=0).numpy() * min(1.0, 3.0 / float(differences[0].norm()))
    noise = share.units - np.rint(clipped / lattice_step(3.0))
    expected = 0.9 * float(lattice_sensitivity(3.0, 256))
    assert abs(noise.std() / expected - 1) < 0.15  # 256 draws: a tenth of a share's std is 2.9 sigmas
    sensitivity = float(lattice_sensitivity(3.0, 256))
    assert share.event == dp_accounting.PoissonSampledDpEvent(
        0.05, DistributedDiscreteGaussianDpEvent(0.9, 4, 256, sensitivity))
    assert ledger.events() == [share.event]
    assert ledger.history()[0]["released"] == [int(v) for v in share.units]
    assert ledger.spent() == pytest.approx(epsilon_of([share.event], 1e-5))
    assert ledger.spent_if_all_collude() == pytest.approx(epsilon_of([share.collusion], 1e-5))
    assert ledger.spent_if_all_collude() > 1.5 * ledger.spent()  # one share alone is a quarter of the variance


def test_a_share_past_the_budget_draws_no_noise_and_records_nothing(tmp_path):
    from seedtune.common.errors import BudgetExhausted
    from seedtune.common.privacy.mechanism import LedgerKey, share_release
    from seedtune.common.protocol import ReleaseParameters

    ledger, randomness, differences = _share_setup(tmp_path, epsilon=0.5)
    draws = []
    randomness.discrete_gaussian = lambda n, s2: draws.append(n)
    with pytest.raises(BudgetExhausted):
        share_release(differences, ReleaseParameters(3.0, 0.05, 0.5), honest=2, randomness=randomness,
                      ledger=ledger, key=LedgerKey(0))
    assert draws == [] and ledger.releases == 0 and ledger.spent_if_all_collude() == 0.0
    with pytest.raises(ValueError, match="privacy.noise = 'discrete'"):
        share_release(differences, ReleaseParameters(3.0, 1.0, 0.5, "gaussian"), honest=2, randomness=randomness,
                      ledger=ledger, key=LedgerKey(0))


def test_the_share_event_survives_the_ledgers_json_and_the_codec_still_refuses_strangers():
    from seedtune.common.privacy import events

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, DistributedDiscreteGaussianDpEvent(0.9, 4, 64, 4105.0)), 3)
    assert events.loads(events.dumps(event)) == event
    with pytest.raises(events.EventDecodeError):
        events.loads('{"type": "LaplaceDpEvent", "parameter": 1.0}')
