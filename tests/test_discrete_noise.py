"""The default noise: an exact discrete Gaussian on a lattice, and how dp-accounting counts it.

Invariants: the sampler draws the discrete Gaussian's exact law; a release is a lattice point
(no floating-point low bits); one example moves the rounded sum by at most the lattice
sensitivity; the Renyi divergences of the Poisson-sampled discrete Gaussian, summed exactly, never
exceed the continuous Gaussian's that the accountant charges; the accountant's epsilon for a
discrete release equals dp-accounting's for the same zCDP at sampling rate 1.
"""

from __future__ import annotations

import math
from fractions import Fraction

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_poisson_subsampled_gaussian
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import gammaln, logsumexp

from seedtune.common.config import load_config
from seedtune.common.errors import ConfigError
from seedtune.common.privacy.accounting import (
    INTEGER_ORDERS,
    DiscreteGaussianDpEvent,
    epsilon_for,
    epsilon_of,
    release_event,
)
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.mechanism import (
    LedgerKey,
    add_noise,
    clip_per_example,
    lattice_sensitivity,
    lattice_step,
    private_release,
)
from seedtune.common.privacy.randomness import SecretRandomness, SeededRandomness, sample_discrete_gaussian
from seedtune.common.protocol import ReleaseParameters


def _pmf(sigma_squared: float, support: np.ndarray) -> np.ndarray:
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma_squared))
    return weights / weights.sum()


# -- the sampler -------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_squared", [Fraction(1, 4), Fraction(2), Fraction(50)])
def test_sampler_draws_the_discrete_gaussians_exact_law(sigma_squared):
    randomness = SeededRandomness(11, quiet=True)
    draws = randomness.discrete_gaussian(20_000, sigma_squared)
    assert draws.dtype == np.int64
    support = np.arange(-int(12 * math.sqrt(sigma_squared)) - 2, int(12 * math.sqrt(sigma_squared)) + 3)
    empirical = np.array([(draws == z).mean() for z in support])
    total_variation = 0.5 * np.abs(empirical - _pmf(float(sigma_squared), support)).sum()
    assert total_variation < 0.025  # a wrong scale or shape (e.g. the Laplace proposal) is far above this
    assert abs(draws.var() / float(sigma_squared) - 1) < 0.1 or sigma_squared < 1  # N_Z variance < s^2 when s small


def test_sampler_uses_only_the_integer_source_it_is_given():
    calls = []

    def counting(n):
        calls.append(n)
        return (len(calls) * 2654435761) % n

    sample_discrete_gaussian(Fraction(9), counting)
    assert calls and all(isinstance(n, int) for n in calls)
    with pytest.raises(ValueError, match="sigma_squared"):
        sample_discrete_gaussian(Fraction(0), counting)


def test_secret_integers_are_uniform():
    draws = np.array([SecretRandomness().randbelow(6) for _ in range(6000)])
    counts = np.bincount(draws, minlength=6)
    assert draws.min() == 0 and draws.max() == 5
    assert np.all(np.abs(counts / 1000 - 1) < 0.15)


# -- the lattice release -------------------------------------------------------------------------
@given(clip_bound=st.floats(1e-3, 1e3), probes=st.integers(1, 64))
def test_lattice_step_is_a_power_of_two_and_inflates_the_noise_by_under_a_quarter_percent(clip_bound, probes):
    step = lattice_step(clip_bound)
    assert math.frexp(step)[0] == 0.5 and 2**12 <= clip_bound / step < 2**13
    assert float(lattice_sensitivity(clip_bound, probes)) * step / clip_bound - 1 < (math.sqrt(probes) + 2) / 2**12


@given(rows=st.lists(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), min_size=1, max_size=12),
       clip_bound=st.floats(1e-2, 50))
@settings(max_examples=60, deadline=None)
def test_one_example_moves_the_rounded_sum_by_at_most_the_lattice_sensitivity(rows, clip_bound):
    differences = torch.tensor(rows, dtype=torch.float64)
    step = lattice_step(clip_bound)
    with_all = clip_per_example(differences, clip_bound).sum(dim=0).numpy()
    without_last = clip_per_example(differences[:-1], clip_bound).sum(dim=0).numpy()
    moved = np.linalg.norm(np.rint(with_all / step) - np.rint(without_last / step))
    assert moved <= float(lattice_sensitivity(clip_bound, 3))


def test_a_discrete_release_is_a_lattice_point_with_the_promised_noise(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", epsilon=1e9, delta=1e-5)
    clip_bound, sigma, probes = 0.7, 1.5, 4
    differences = torch.full((9, probes), 0.1, dtype=torch.float64)
    randomness = SeededRandomness(3, quiet=True)
    released = np.array([
        private_release(differences, ReleaseParameters(clip_bound, sigma, 1.0), population=9,
                        randomness=randomness, ledger=ledger, key=LedgerKey(r)).values * 9
        for r in range(1500)])
    step = lattice_step(clip_bound)
    units = released / step
    assert np.array_equal(units, np.rint(units))  # nothing below the lattice leaves
    noise = released - 0.9
    expected_std = sigma * float(lattice_sensitivity(clip_bound, probes)) * step
    assert expected_std > sigma * clip_bound
    assert abs(noise.std() / expected_std - 1) < 0.05 and abs(noise.mean()) < 4 * expected_std / math.sqrt(noise.size)
    assert ledger.events()[0] == DiscreteGaussianDpEvent(sigma)


def test_gaussian_noise_is_still_available_and_charged_as_such(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", epsilon=1e9, delta=1e-5)
    private_release(torch.ones(4, 2, dtype=torch.float64), ReleaseParameters(1.0, 1.0, 0.5, "gaussian"),
                    population=8, randomness=SecretRandomness(), ledger=ledger, key=LedgerKey(0))
    assert ledger.events() == [release_event(0.5, 1.0, "gaussian")]
    with pytest.raises(ValueError, match="unknown noise"):
        add_noise(np.zeros(2), clip_bound=1.0, noise_multiplier=1.0, randomness=SecretRandomness(), noise="uniform")


# -- accounting ----------------------------------------------------------------------------------
def _log_binomial(n: int, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def _discrete_rdp_both_directions(q: float, s: float, shift: tuple[int, ...], alpha: int) -> tuple[float, float]:
    """The Poisson-sampled discrete Gaussian's Renyi divergences D_a(M || P) and D_a(P || M), summed
    exactly over the lattice: P = N_Z(0, s^2)^d, Q = P shifted by ``shift``, M = (1 - q) P + q Q."""
    reach = int(14 * s) + alpha * max(abs(v) for v in shift) + 2  # the integrand peaks near alpha * shift
    axis = np.arange(-reach, reach + 1, dtype=np.float64)
    grid = np.stack(np.meshgrid(*[axis] * len(shift), indexing="ij"), axis=-1).reshape(-1, len(shift))
    log_p = -(grid**2).sum(1) / (2 * s * s)
    log_p -= logsumexp(log_p)
    log_q = -((grid - np.array(shift)) ** 2).sum(1) / (2 * s * s)
    log_q -= logsumexp(log_q)
    log_m = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_q) if q < 1 else log_q
    remove = logsumexp(alpha * log_m + (1 - alpha) * log_p) / (alpha - 1)
    add = logsumexp(alpha * log_p + (1 - alpha) * log_m) / (alpha - 1)
    return float(remove), float(add)


def _continuous_rdp(q: float, sigma: float, alpha: int) -> float:
    """The Poisson-sampled Gaussian at an integer order, by the binomial expansion (Mironov,
    Talwar, Zhang 2019): log sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2)) / (a - 1)."""
    k = np.arange(alpha + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        terms = _log_binomial(alpha, k) + (alpha - k) * np.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
    return float(logsumexp(terms) / (alpha - 1))


def test_the_closed_form_is_what_dp_accounting_computes():
    for q, sigma, alpha in [(0.01, 0.8, 2), (0.1, 1.5, 7), (0.5, 2.0, 32), (0.003, 0.6, 128)]:
        ours = _continuous_rdp(q, sigma, alpha)
        theirs = _compute_rdp_poisson_subsampled_gaussian(q, sigma, [float(alpha)])[0]
        assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("shift", [(1,), (3,), (1, 1), (2, 1)])
@pytest.mark.parametrize("s", [1.0, 2.5, 6.0])
def test_both_directions_of_the_sampled_discrete_gaussian_are_within_the_charged_rdp(shift, s):
    sensitivity = math.sqrt(sum(v * v for v in shift))
    sigma = s / sensitivity  # the noise multiplier the ledger records
    for q in (0.01, 0.1, 0.5, 1.0):
        for alpha in (2, 3, 5, 8, 16, 32):
            charged = _continuous_rdp(q, sigma, alpha) if q < 1 else alpha / (2 * sigma**2)
            remove, add = _discrete_rdp_both_directions(q, s, shift, alpha)
            # at integer shifts the remove direction is the continuous Gaussian's exactly (CKS20's
            # theta-function identity), so the test has no slack to hide an over-claim in
            assert remove == pytest.approx(charged, rel=1e-7, abs=1e-12), (q, alpha, remove, charged)
            assert add <= charged * (1 + 1e-9) + 1e-12, (q, alpha, add, charged)


def test_at_sampling_rate_one_the_discrete_event_is_counted_as_its_zcdp():
    sigma = 1.3
    accountant = dp_accounting.rdp.RdpAccountant(orders=INTEGER_ORDERS)
    accountant.compose(dp_accounting.ZCDpEvent(rho=1 / (2 * sigma**2)), 10)  # CKS20: (1 / 2 sigma^2)-zCDP
    assert epsilon_of([DiscreteGaussianDpEvent(sigma)] * 10, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))


def test_discrete_noise_costs_at_most_a_percent_of_epsilon_and_is_never_cheaper():
    for sigma, q, steps in [(0.8, 0.003, 1000), (1.0, 0.05, 300), (1.2, 1.0, 1), (0.6, 0.003, 400)]:
        gaussian = epsilon_for(sigma, q, steps, 1e-5, noise="gaussian")
        discrete = epsilon_for(sigma, q, steps, 1e-5, noise="discrete")
        assert gaussian <= discrete <= gaussian * 1.01


def test_pld_with_discrete_noise_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="privacy.accountant='pld'.*privacy.noise='gaussian'"):
        load_config("tiny", overrides=["privacy.accountant=pld"], command="train")
    load_config("tiny", overrides=["privacy.accountant=pld", "privacy.noise=gaussian"], command="train")
    with pytest.raises(ConfigError, match="privacy.noise='laplace'"):
        load_config("tiny", overrides=["privacy.noise=laplace"], command="train")


# -- one mechanism for releases, evaluation counts and the audit ---------------------------------
@pytest.mark.parametrize("noise", ["discrete", "gaussian"])
def test_one_mechanism_names_the_event_its_noise_is_charged_as(noise):
    from seedtune.common.privacy.accounting import evaluation_event, release_event
    from seedtune.common.privacy.mechanism import NoiseMechanism, lattice_sensitivity, lattice_step

    release = NoiseMechanism.for_release(noise, 0.9, 2.0)
    assert release.event(0.01) == release_event(0.01, 0.9, noise)
    counts = NoiseMechanism.for_counts(noise, 5.0)
    assert counts.event() == evaluation_event(5.0, noise)  # sensitivity sqrt 2: sigma = s / sqrt 2
    expected = 0.9 * float(lattice_sensitivity(2.0, 8)) * lattice_step(2.0) if noise == "discrete" else 0.9 * 2.0
    assert release.std(8) == pytest.approx(expected, rel=1e-12) and counts.std(2) == 5.0
    with pytest.raises(ValueError, match="unknown noise 'laplace'"):
        NoiseMechanism.for_release("laplace", 1.0, 1.0)


@pytest.mark.parametrize("noise", ["discrete", "gaussian"])
def test_noised_counts_have_the_variance_the_event_is_charged_for(noise):
    from seedtune.common.privacy.mechanism import NoiseMechanism
    from seedtune.common.privacy.randomness import SeededRandomness

    mechanism = NoiseMechanism.for_counts(noise, 3.0)
    randomness = SeededRandomness(5, quiet=True)
    draws = np.array([mechanism.add(np.array([40.0, 100.0]), randomness) for _ in range(4000)])
    if noise == "discrete":  # counts are integers, and so are their noised values: nothing else leaks
        assert np.all(draws == np.rint(draws))
    noise_drawn = draws - np.array([40.0, 100.0])
    assert abs(noise_drawn.mean()) < 0.15 and noise_drawn.std() == pytest.approx(3.0, rel=0.04)
