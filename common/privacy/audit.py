"""The statistics of a privacy audit: lower bounds on epsilon from how well a test tells two
neighbouring datasets' releases apart (``seedtune audit`` runs the experiment: :mod:`seedtune.jobs.audit`).

**Two bounds**, each from trials not used to choose the statistic and threshold:

* *assumption-free* (Jagielski, Ullman, Oprea 2020, NeurIPS): the test "D' when score >= t" has
  false-positive rate alpha and false-negative rate beta; any (epsilon, delta)-DP release has
  alpha + e^eps beta >= 1 - delta and e^eps alpha + beta >= 1 - delta (Kairouz, Oh, Viswanath
  2015), so with Clopper-Pearson upper bounds on both rates (each at 1 - (1 - c)/2, together at
  confidence c) epsilon >= max(log((1 - delta - beta_ub) / alpha_ub), log((1 - delta - alpha_ub) /
  beta_ub), 0). It tops out near log(m / 3.7) for m test trials and is loose below that.
* *Gaussian* (the parametric audit of Nasr et al. 2023, "Tight Auditing of Differentially Private
  Machine Learning", USENIX Security): the claimed mechanism adds Gaussian (or discrete Gaussian)
  noise, so the two worlds' scores are N(0, s^2) and N(mu s, s^2). The lower confidence bound on
  mu = (mean' - mean) / s (normal approximation, standard error sqrt(2/m + mu^2/(4m))) gives a
  pair of releases that is mu-GDP, whose epsilon at delta (Dong, Roth, Su 2022) is a lower bound
  on the release's. Far more powerful than the first at the same number of trials; it assumes the
  noise is the Gaussian the mechanism claims to add.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats

__all__ = ["choose_threshold", "clopper_pearson_upper", "epsilon_lower_bound", "error_counts",
           "expected_flagged_scale", "gaussian_shift_lower", "gdp_delta", "gdp_epsilon"]


def clopper_pearson_upper(errors, trials: int, level: float) -> np.ndarray:
    """The exact one-sided upper bound on a binomial rate p from ``errors`` of ``trials``:
    Beta^{-1}(level; k + 1, m - k), and 1 when k = m (Clopper & Pearson 1934). It covers p with
    probability >= ``level``."""
    errors = np.asarray(errors)
    bound = stats.beta.ppf(level, errors + 1, np.maximum(trials - errors, 1))
    return np.where(errors >= trials, 1.0, bound)


def epsilon_lower_bound(false_positives, null_trials: int, false_negatives, alternative_trials: int,
                        delta: float, confidence: float) -> np.ndarray:
    """max(log((1 - delta - FNR_ub) / FPR_ub), log((1 - delta - FPR_ub) / FNR_ub), 0), each rate's
    Clopper-Pearson bound at 1 - (1 - confidence) / 2, so that both hold at ``confidence``."""
    level = 1.0 - (1.0 - confidence) / 2.0
    fpr = clopper_pearson_upper(false_positives, null_trials, level)
    fnr = clopper_pearson_upper(false_negatives, alternative_trials, level)
    with np.errstate(divide="ignore"):  # log 0 = -inf: that side gives no bound
        one = np.log(np.maximum(1.0 - delta - fnr, 0.0) / fpr)
        two = np.log(np.maximum(1.0 - delta - fpr, 0.0) / fnr)
    return np.maximum(np.maximum(one, two), 0.0)


def error_counts(null: np.ndarray, alternative: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the test "D' when score >= t", at each t: false positives (null scores >= t) and false
    negatives (alternative scores < t)."""
    false_positives = len(null) - np.searchsorted(np.sort(null), thresholds, side="left")
    false_negatives = np.searchsorted(np.sort(alternative), thresholds, side="left")
    return false_positives, false_negatives


def choose_threshold(null: np.ndarray, alternative: np.ndarray, delta: float, confidence: float) -> tuple[float, float]:
    """The score threshold whose lower bound on these trials is largest (every observed score is a
    candidate), and that bound. Choosing by the bound, not the raw ratio, avoids the empty tails
    where 0/0 looks infinitely good."""
    candidates = np.unique(np.concatenate([null, alternative]))
    false_positives, false_negatives = error_counts(null, alternative, candidates)
    bounds = epsilon_lower_bound(false_positives, len(null), false_negatives, len(alternative), delta, confidence)
    best = int(np.argmax(bounds))
    return float(candidates[best]), float(bounds[best])


def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su
    2022, Corollary 2.13), the second term in log space so that large epsilon does not overflow."""
    first = stats.norm.cdf(-epsilon / mu + mu / 2)
    # e^eps Phi(b) <= Phi(a) <= 1 exactly; clamp the log so that rounding at extreme mu cannot overflow
    second = math.exp(min(epsilon + float(stats.norm.logcdf(-epsilon / mu - mu / 2)), 0.0))
    return first - second


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon >= 0 at which mu-GDP is (epsilon, delta)-DP."""
    if not mu > 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(mu, high) > delta:
        high *= 2
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, high, xtol=1e-10))


def gaussian_shift_lower(null: np.ndarray, alternative: np.ndarray, confidence: float) -> float:
    """A lower confidence bound on mu = (mean(alternative) - mean(null)) / s for two samples
    assumed N(0, s^2) and N(mu s, s^2): the estimate minus z_c standard errors, with the standard
    error of a standardised mean difference, sqrt(1/m0 + 1/m1 + mu^2 / (2 (m0 + m1))). Equal
    samples with no spread at all (noise the adversary reproduced exactly) give inf."""
    if not (np.all(np.isfinite(null)) and np.all(np.isfinite(alternative))):
        return 0.0  # not Gaussian: the assumption-free bound speaks for such releases
    m0, m1 = len(null), len(alternative)
    shift = float(np.mean(alternative) - np.mean(null))
    spread = math.sqrt((np.var(null, ddof=1) * (m0 - 1) + np.var(alternative, ddof=1) * (m1 - 1)) / (m0 + m1 - 2))
    if spread == 0.0:
        return math.inf if shift > 0 else 0.0
    mu = shift / spread
    error = math.sqrt(1 / m0 + 1 / m1 + mu * mu / (2 * (m0 + m1)))
    return max(mu - stats.norm.ppf(confidence) * error, 0.0)


def expected_flagged_scale(shift_units: float, epsilon_accountant: float, delta: float,
                           test_trials: int, confidence: float) -> float:
    """Power: the largest noise scale s for which a release noised at s * sigma would, at the
    expected values of the test half's statistics, be flagged by the Gaussian bound. The shift is
    the canary's, ``shift_units`` noise standard deviations at s = 1."""

    def flagged(scale: float) -> bool:
        mu = shift_units / scale
        error = math.sqrt(2 / test_trials + mu * mu / (4 * test_trials))
        return gdp_epsilon(max(mu - stats.norm.ppf(confidence) * error, 0.0), delta) > epsilon_accountant

    if not flagged(1e-6):
        return 0.0
    if flagged(1.0):
        return 1.0
    return float(optimize.brentq(lambda s: (1.0 if flagged(s) else -1.0), 1e-6, 1.0, xtol=1e-4))
