"""``seedtune audit``: real silos, a real canary, the epsilon they charge. The lower bounds stay
below what honest silos charge, and they catch silos that leak more: noise at half its sigma,
noise a coordinator can reproduce, a non-finite value let out."""

from __future__ import annotations

import itertools
import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld

from seedtune.common.privacy.audit import (
    clopper_pearson_upper,
    epsilon_lower_bound,
    gaussian_shift_lower,
    gdp_delta,
    gdp_epsilon,
)
from seedtune.jobs.audit import DEFAULT_TRIALS, run_audit
from seedtune.cli.main import main
from seedtune.common.config import load_config
from seedtune.common.privacy import mechanism
from seedtune.common.privacy.randomness import SeededRandomness


def _seeded():
    """A distinct seeded source for each silo the audit builds (test-only determinism)."""
    counter = itertools.count(100)
    return lambda: SeededRandomness(next(counter), quiet=True)


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny")


# -- the statistics ------------------------------------------------------------------------------
def test_clopper_pearson_bounds_match_their_closed_forms():
    m, level = 500, 0.975
    # no errors: P(0 of m) = (1 - p)^m = 1 - level at p = 1 - (1 - level)^(1/m)
    assert clopper_pearson_upper(0, m, level) == pytest.approx(1 - (1 - level) ** (1 / m), rel=1e-9)
    # one error: P(0 or 1 of m) = (1 - p)^m + m p (1 - p)^(m - 1) = 1 - level at the bound
    p = float(clopper_pearson_upper(1, m, level))
    assert (1 - p) ** m + m * p * (1 - p) ** (m - 1) == pytest.approx(1 - level, rel=1e-6)
    assert clopper_pearson_upper(m, m, level) == 1.0
    bounds = clopper_pearson_upper(np.arange(m + 1), m, level)
    assert np.all(np.diff(bounds) > 0) and np.all(bounds >= np.arange(m + 1) / m)


def test_perfect_separation_bounds_epsilon_by_the_number_of_trials_alone():
    delta, confidence = 1e-5, 0.95
    rate = 1 - ((1 - confidence) / 2) ** (1 / 1000)  # each rate's bound from 0 errors of 1000
    separated = epsilon_lower_bound(0, 1000, 0, 1000, delta, confidence)
    assert separated == pytest.approx(math.log((1 - delta - rate) / rate))
    assert epsilon_lower_bound(0, 4000, 0, 4000, delta, confidence) > separated  # more trials, higher ceiling
    assert epsilon_lower_bound(500, 1000, 500, 1000, delta, confidence) == 0.0  # a coin flip proves nothing


@pytest.mark.parametrize("sigma", [0.8, 2.15, 5.0])
def test_gdp_epsilon_is_the_gaussian_mechanisms_exact_epsilon(sigma):
    """mu-GDP with mu = 1/sigma is the Gaussian mechanism's exact privacy profile, which
    dp-accounting's PLD accountant computes independently."""
    accountant = pld.PLDAccountant(value_discretization_interval=1e-5)
    accountant.compose(dp_accounting.GaussianDpEvent(sigma))
    epsilon = gdp_epsilon(1 / sigma, 1e-5)
    assert epsilon == pytest.approx(accountant.get_epsilon(1e-5), abs=2e-3)
    assert gdp_delta(1 / sigma, epsilon) == pytest.approx(1e-5, rel=1e-6)
    assert gdp_epsilon(0.0, 1e-5) == 0.0 and math.isinf(gdp_epsilon(math.inf, 1e-5))


def test_the_gaussian_shift_bound_covers_the_true_shift_and_sees_reproduced_noise():
    rng = np.random.default_rng(0)
    covered = [gaussian_shift_lower(rng.normal(0, 2, 1000), rng.normal(1, 2, 1000), 0.95) <= 0.5
               for _ in range(200)]
    assert 0.9 <= np.mean(covered) < 1.0  # a 95% lower bound on mu = 0.5
    assert math.isinf(gaussian_shift_lower(np.zeros(10), np.ones(10), 0.95))  # no noise left at all
    assert gaussian_shift_lower(np.zeros(10), np.array([np.nan] * 10), 0.95) == 0.0  # not Gaussian: no claim


# -- honest silos --------------------------------------------------------------------------------
@pytest.mark.slow
def test_honest_silos_stay_below_what_they_charge(tiny):
    result = run_audit(tiny, trials=600, randomness=_seeded())
    assert result.noise == "discrete" and result.sample_rate == 1.0 and not result.refused
    assert result.releases_charged == 2 * 600  # every trial charged to a real ledger, D and D'
    assert result.epsilon_accountant == pytest.approx(2.0, rel=1e-3)  # read from the charged event
    assert result.canary_norm >= 1.0  # a real example at the clip bound
    assert result.epsilon_lower <= result.epsilon_accountant
    assert result.epsilon_gaussian <= result.epsilon_accountant and result.consistent
    assert result.epsilon_gaussian > 0.5  # the test has power: the canary shows through the noise
    assert 0.5 < result.flagged_scale < 1.0


@pytest.mark.slow
def test_with_its_default_trials_the_audit_flags_a_release_noised_at_half_its_sigma(tiny):
    """The negative control: silos whose noise is drawn at sigma / 2 while they charge sigma."""
    result = run_audit(tiny, noise_scale=0.5)
    assert result.trials == DEFAULT_TRIALS and result.flagged_scale > 0.5  # its own power says so too
    assert result.epsilon_accountant == pytest.approx(2.0, rel=1e-3)
    assert result.epsilon_gaussian > result.epsilon_accountant
    assert not result.consistent and result.verdict.startswith("VIOLATION")


@pytest.mark.slow
def test_without_noise_the_audit_reaches_its_ceiling(tiny):
    result = run_audit(tiny, noise_off=True, trials=300)
    assert math.isinf(result.epsilon_accountant) and result.releases_charged == 0
    assert result.false_positives == 0 and result.false_negatives == 0  # the canary always shows
    assert result.epsilon_lower == pytest.approx(result.epsilon_ceiling)


# -- attacks on the fixed silos, and the holes they find when put back ----------------------------
def test_a_setup_asking_for_seeded_noise_is_refused(tiny):
    result = run_audit(tiny, attack="noise-seed", trials=200)
    assert "privacy.noise_seed" in result.refused and result.releases_charged == 0 and result.consistent


@pytest.mark.slow
def test_silos_whose_noise_a_coordinator_can_reproduce_are_flagged(tiny):
    """Hole 1 put back: every silo, the adversary's shadows included, draws from the same seed."""
    result = run_audit(tiny, trials=200, randomness=lambda: SeededRandomness(7, quiet=True))
    assert result.statistic.endswith("-paired") and not result.consistent


@pytest.mark.slow
def test_a_crafted_non_finite_loss_is_zeroed_and_the_audit_passes(tiny):
    result = run_audit(tiny, attack="nonfinite", trials=300, randomness=_seeded())
    assert result.nonfinite_releases == 0 and result.rows_zeroed == 300  # the canary's row, in every D' release
    assert result.consistent


@pytest.mark.slow
def test_a_silo_that_lets_a_non_finite_row_through_is_flagged(tiny, monkeypatch):
    """Hole 2 put back: the mechanism without its non-finite guard."""
    monkeypatch.setattr(mechanism, "finite_rows", lambda rows: (rows, 0))
    monkeypatch.setattr(mechanism, "check_finite", lambda values, step: None)  # and without the final check
    result = run_audit(tiny, attack="nonfinite", trials=200)
    assert result.nonfinite_releases > 0 and not result.consistent


@pytest.mark.slow
def test_the_padding_attack_is_refused_below_the_beta_floor_and_harmless_above_it(tiny):
    refused = run_audit(tiny, attack="padding", trials=200)
    assert "min-beta" in refused.refused and refused.consistent
    at_floor = run_audit(tiny, attack="padding", beta=1e-4, trials=600, randomness=_seeded())
    assert not at_floor.refused and at_floor.consistent


# -- the command ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_command_reports_json_and_exits_by_its_verdict(capsys):
    code = main(["audit", "--preset", "tiny", "--set", "privacy.clip_bound=5", "--epsilon", "4",
                 "--trials", "400", "--json", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["consistent"] else 1)
    assert report["clip_bound"] == 5.0 and report["probes"] == 4 and report["examples"] == 64
    assert report["trials"] == 400 and report["test_trials"] == 200 and report["attack"] == "none"
    assert report["epsilon_accountant"] == pytest.approx(4.0, rel=1e-3)
    assert 0 <= report["epsilon_lower"] <= report["epsilon_ceiling"]


@pytest.mark.parametrize("args, fragment", [
    (["--trials", "50"], "--trials 50"),
    (["--confidence", "1"], "--confidence"),
    (["--epsilon", "0"], "--epsilon 0"),
    (["--sample-rate", "1.5"], "--sample-rate"),
    (["--beta", "-1"], "--beta -1"),
    (["--epsilon", "1", "--noise-off"], "--noise-off"),
    (["--set", "privacy.enabled=false"], "--noise-off"),
])
def test_bad_input_is_one_line_exit_2(args, fragment, capsys):
    code = main(["audit", "--preset", "tiny", "--no-progress", *args])
    error = capsys.readouterr().err
    assert code == 2
    assert fragment in error and error.count("\n") == 1 and error.startswith("seedtune: error:")
