"""``seedtune audit``: the lower bound stays below the accountant for honest releases, and catches
releases that leak more than they are charged for (no noise, too little noise)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from seedtune.cli.audit import (
    DEFAULT_TRIALS,
    audit_batch,
    clopper_pearson_upper,
    epsilon_lower_bound,
    run_audit,
)
from seedtune.cli.main import main
from seedtune.common.config import load_config
from seedtune.common.privacy.randomness import SeededRandomness


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset and D, its 64 examples' round-0 differences, computed once."""
    config = load_config("tiny")
    return config, audit_batch(config)


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


# -- the mechanism -------------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [1.0, 4.0])
def test_releases_calibrated_to_epsilon_stay_below_the_accountant(tiny, epsilon):
    config, differences = tiny
    result = run_audit(config, epsilon=epsilon, trials=2000, differences=differences,
                       randomness=SeededRandomness(int(epsilon), quiet=True))
    assert result.noise == "discrete" and result.sample_rate == 1.0
    assert result.epsilon_accountant == pytest.approx(epsilon, rel=1e-3)  # sigma calibrated to this release
    assert result.epsilon_lower <= result.epsilon_accountant and result.consistent
    if epsilon == 4.0:  # the test has power: at sigma ~ 1.2 the canary is visible through the noise
        assert result.epsilon_lower > 0


def test_without_noise_the_audit_reports_a_large_epsilon(tiny):
    config, differences = tiny
    result = run_audit(config, noise_off=True, differences=differences)
    assert result.trials == DEFAULT_TRIALS and math.isinf(result.epsilon_accountant)
    assert result.false_positives == 0 and result.false_negatives == 0  # the canary always shows
    assert result.epsilon_lower > 5


def test_an_under_noised_release_is_caught(tiny):
    """The negative control: noise at a quarter of the sigma the accountant is told of."""
    config, differences = tiny
    result = run_audit(config, epsilon=1.0, noise_scale=0.25, trials=4000, differences=differences,
                       randomness=SeededRandomness(0, quiet=True))
    assert result.noise_multiplier_used == pytest.approx(result.noise_multiplier / 4)
    assert result.epsilon_accountant == pytest.approx(1.0, rel=1e-3)
    assert result.epsilon_lower > result.epsilon_accountant
    assert not result.consistent and result.verdict.startswith("VIOLATION")


# -- the command ---------------------------------------------------------------------------------
def test_the_command_audits_the_configured_release_with_secret_noise(capsys):
    code = main(["audit", "--preset", "tiny", "--set", "privacy.clip_bound=5", "--epsilon", "4",
                 "--trials", "400", "--json", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["consistent"] else 1) == 0
    assert report["clip_bound"] == 5.0 and report["probes"] == 4 and report["examples"] == 64
    assert report["trials"] == 400 and report["test_trials"] == 200
    assert report["false_positives"] <= 200 and report["false_negatives"] <= 200
    assert report["epsilon_accountant"] == pytest.approx(4.0, rel=1e-3)
    assert 0 <= report["epsilon_lower"] <= report["epsilon_accountant"]


@pytest.mark.parametrize("args, fragment", [
    (["--trials", "50"], "--trials 50"),
    (["--confidence", "1"], "--confidence"),
    (["--epsilon", "0"], "--epsilon 0"),
    (["--sample-rate", "1.5"], "--sample-rate"),
    (["--epsilon", "1", "--noise-off"], "--noise-off"),
    (["--set", "privacy.enabled=false"], "--noise-off"),
])
def test_bad_input_is_one_line_exit_2(args, fragment, capsys):
    code = main(["audit", "--preset", "tiny", "--no-progress", *args])
    error = capsys.readouterr().err
    assert code == 2
    assert fragment in error and error.count("\n") == 1 and error.startswith("seedtune: error:")
