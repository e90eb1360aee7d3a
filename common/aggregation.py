"""How the coordinator combines the silos' released K-vectors: mean, median or trimmed mean.

Silo i releases g_i = (sum_b clip_C(S_b) + sigma C z_i) / (q n_i), z_i ~ N(0, I_K) (or the
discrete Gaussian, ``privacy.noise``, whose variance is the same to about 0.1 %), so its vector
carries noise of standard deviation s_i = sigma C / (q n_i) per coordinate, and one of its
records moves g_i by at most d_i = C / (q n_i) in L2 (clipping). ``expected_batch_size`` in
the reply is q n_i. The coordinator combines N such vectors with one of three rules, coordinate
by coordinate:

* ``mean``: sum_i w_i g_i with w_i = q n_i / sum_j q n_j (the rule seedtune always had);
* ``median``: the median of g_1[k] .. g_N[k] (the mean of the two middle values for even N);
* ``trimmed-mean``: drop the t = floor(trim N) largest and the t smallest of g_1[k] .. g_N[k]
  and average the N - 2t left (trim < 1/2 leaves at least one). trim = 0 is the unweighted
  mean; with trim = 0.2, 5 silos drop 1 at each end but 3 or 4 silos drop none.

The robust rules give every silo one vote: they ignore the weights q n_i, which a silo reports
itself (and could inflate to dominate the mean).

Privacy is unchanged by the rule. Each silo's g_i is (epsilon, delta)-DP for its own records by
its own noise, before it leaves the silo; whatever the coordinator computes from the g_i is
post-processing (Dwork & Roth 2014, Prop. 2.1). The rule changes the utility (the noise left in
the aggregate) and the robustness (how far one silo can move the step), never epsilon.

Sensitivity of the aggregate to one record of silo i (L2, over the K coordinates):

* mean: w_i d_i = C / sum_j q n_j, the same for every silo;
* median: at most d_i. Changing one input by delta moves every order statistic by at most
  |delta| (sorting is 1-Lipschitz coordinate-wise), so each coordinate of the median moves by at
  most |delta[k]| and the vector by at most ||delta||_2;
* trimmed mean: at most d_i / (N - 2t). Sorting is a contraction in l1, so the sum of the kept
  order statistics moves by at most |delta[k]|, and their mean by |delta[k]| / (N - 2t).

Standard deviation of the noise in the aggregate, per coordinate, when the silos agree on the
signal (the noise z_i independent):

* mean: sqrt(sum_i w_i^2 s_i^2) = sqrt(N) sigma C / sum_j q n_j;
* median and trimmed mean: the standard deviation of the rule applied to N independent
  N(0, s_i^2), from the order statistics of the silos' noises. For equal s_i = s and large N,
  Var(median) ~ (pi/2) s^2 / N and Var(alpha-trimmed mean) ~ s^2 / N * v(alpha), with
  v(alpha) = [(1 - 2 alpha) - 2 z phi(z) + 2 alpha z^2] / (1 - 2 alpha)^2, z = Phi^-1(1 - alpha)
  (Stigler 1973); v(0.2) = 1.144. Exact small-N values (std x sqrt(N) / s; the mean's is 1):

      N                     3      4      5      7      10     20     large
      median              1.160  1.092  1.198  1.214  1.177  1.212  1.253 (sqrt(pi/2))
      trimmed, trim=0.2   1.000  1.000  1.065  1.041  1.065  1.067  1.070 (sqrt(v(0.2)))

  (odd N: the median's density N!/(m!)^2 Phi^m (1 - Phi)^m phi, m = (N - 1)/2, integrated;
  the others by Monte Carlo over 4M draws.) With 3 or 4 silos trim=0.2 drops nothing (t = 0).

  :func:`describe` computes them for any s_i by Monte Carlo over a fixed ``numpy`` Generator
  (deterministic; relative error about 0.1 % at 5 silos).

Robustness: under the mean one silo moves the step without bound. Under the median, and the
trimmed mean while at most t silos misbehave, each coordinate of the aggregate stays within the
range of the honest silos' values. Inside that range a misbehaving silo still shifts it: by at
most (largest - smallest honest value) / (N - 2t) for the trimmed mean. One that always sends a
value beyond one end makes the rule drop an honest value at the other end: with 5 silos and
honest values spread N(mu, s^2), the trimmed mean (t = 1) becomes the mean of the 3 lowest of 4,
biased by -0.343 s (E[max of 4 N(0, 1)] / 3), and the median the 2nd of 4, biased by -0.297 s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MONTE_CARLO_SEED = 0
MONTE_CARLO_VALUES = 2_000_000  # draws x silos: 0.1 % at 5 silos, 16 MB an array

Vectors = Sequence[Sequence[float]]


def mean(vectors: Vectors, weights: Sequence[float]) -> tuple[float, ...]:
    """sum_i w_i g_i / sum_i w_i per coordinate, summed in the replies' order (bit for bit what
    the coordinator has always computed, so existing logs replay the same)."""
    weight = sum(weights)
    return tuple(sum(w * vector[k] for w, vector in zip(weights, vectors)) / weight
                 for k in range(len(vectors[0])))


def median(vectors: Vectors) -> tuple[float, ...]:
    """The median of each coordinate; for an even count, the mean of the two middle values."""
    return tuple(float(v) for v in np.median(np.asarray(vectors, dtype=np.float64), axis=0))


def trimmed_count(count: int, trim: float) -> int:
    """t = floor(trim N) values dropped at each end; trim in [0, 1/2) keeps N - 2t >= 1."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim={trim!r} must be in [0, 0.5)")
    return math.floor(trim * count)


def trimmed_mean(vectors: Vectors, trim: float) -> tuple[float, ...]:
    """Per coordinate: sort, drop the t = floor(trim N) smallest and largest, average the rest."""
    t = trimmed_count(len(vectors), trim)
    ordered = np.sort(np.asarray(vectors, dtype=np.float64), axis=0)
    return tuple(float(v) for v in ordered[t:len(vectors) - t].mean(axis=0))


def aggregate(rule: str, vectors: Vectors, weights: Sequence[float], trim: float = 0.2) -> tuple[float, ...]:
    """The aggregate of the silos' K-vectors under ``rule`` (``weights``: only the mean uses them)."""
    if len(vectors) == 0:
        raise ValueError("no vectors to aggregate")
    return rule_named(rule).combine(vectors, weights, trim)


@dataclass(frozen=True)
class Rule:
    """One aggregation rule: how it combines the silos' K-vectors, and how far one record of each
    silo moves the result (L2; see the module docstring for the bounds)."""

    name: str
    combine: Callable[[Vectors, Sequence[float], float], tuple[float, ...]]  # (vectors, weights, trim)
    sensitivity: Callable[[list[float], float, float], tuple[float, ...]]  # (q n_i per silo, C, trim)
    trims: bool = False  # drops values at each end (trim)


def _trimmed_sensitivity(sizes: list[float], clip_bound: float, trim: float) -> tuple[float, ...]:
    kept = len(sizes) - 2 * trimmed_count(len(sizes), trim)
    return tuple(clip_bound / size / kept for size in sizes)


# The one list of rules: the config's validation, the coordinator and the benchmarks read it here.
RULES: dict[str, Rule] = {
    "mean": Rule("mean", lambda vectors, weights, trim: mean(vectors, weights),
                 lambda sizes, clip_bound, trim: tuple(clip_bound / sum(sizes) for _ in sizes)),
    "median": Rule("median", lambda vectors, weights, trim: median(vectors),
                   lambda sizes, clip_bound, trim: tuple(clip_bound / size for size in sizes)),
    "trimmed-mean": Rule("trimmed-mean", lambda vectors, weights, trim: trimmed_mean(vectors, trim),
                         _trimmed_sensitivity, trims=True),
}


def rule_named(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown aggregation rule {name!r}; use one of {', '.join(RULES)}") from None


@dataclass(frozen=True)
class RuleCost:
    """What a rule costs for a given set of silos (see the module docstring for the formulas)."""

    rule: str
    trimmed: int  # t: values dropped at each end of every coordinate (0 but for trimmed-mean)
    sensitivity: tuple[float, ...]  # per silo: how far one of its records moves the aggregate (L2)
    noise_std: float  # per coordinate: standard deviation of the noise left in the aggregate
    mean_noise_std: float  # the same for the mean, for comparison

    def summary(self) -> str:
        extra = f", t={self.trimmed} dropped at each end" if self.rule == "trimmed-mean" else ""
        ratio = f" ({self.noise_std / self.mean_noise_std:.3f} x the mean's)" if self.mean_noise_std > 0 else ""
        low, high = min(self.sensitivity), max(self.sensitivity)
        spread = f"{low:.4g}" if low == high else f"{low:.4g}..{high:.4g} (by silo)"
        return (f"aggregation={self.rule}{extra}: noise std {self.noise_std:.4g} per coordinate{ratio}; "
                f"sensitivity to one record {spread}; epsilon unchanged (post-processing)")


def describe(rule: str, expected_batch_sizes: Sequence[float], *, clip_bound: float, noise_multiplier: float,
             trim: float = 0.2) -> RuleCost:
    """Sensitivity and noise of ``rule`` over silos whose replies report ``expected_batch_sizes``."""
    t = trimmed_count(len(expected_batch_sizes), trim) if rule_named(rule).trims else 0
    return RuleCost(rule, t, sensitivities(rule, expected_batch_sizes, clip_bound=clip_bound, trim=trim),
                    noise_std(rule, expected_batch_sizes, clip_bound=clip_bound, noise_multiplier=noise_multiplier,
                              trim=trim),
                    noise_std("mean", expected_batch_sizes, clip_bound=clip_bound, noise_multiplier=noise_multiplier))


def sensitivities(rule: str, expected_batch_sizes: Sequence[float], *, clip_bound: float,
                  trim: float = 0.2) -> tuple[float, ...]:
    """Per silo i, how far one of its records moves the aggregate in L2: with d_i = C / (q n_i),
    w_i d_i = C / sum_j q n_j (mean), d_i (median), d_i / (N - 2t) (trimmed mean)."""
    sizes = [float(size) for size in expected_batch_sizes]
    return rule_named(rule).sensitivity(sizes, clip_bound, trim)


def noise_std(rule: str, expected_batch_sizes: Sequence[float], *, clip_bound: float, noise_multiplier: float,
              trim: float = 0.2) -> float:
    """Per coordinate, the standard deviation of the noise in the aggregate, silo i's noise being
    N(0, s_i^2), s_i = sigma C / (q n_i): sqrt(sum_i w_i^2 s_i^2) for the mean; for the median and
    the trimmed mean, the rule applied to the noises, by Monte Carlo."""
    stds = tuple(noise_multiplier * clip_bound / float(size) for size in expected_batch_sizes)
    if rule_named(rule).name == "mean":
        total = sum(float(size) for size in expected_batch_sizes)
        return math.sqrt(sum((float(size) / total * s) ** 2 for size, s in zip(expected_batch_sizes, stds)))
    return _monte_carlo_std(rule, stds, trim)


@functools.lru_cache(maxsize=64)
def _monte_carlo_std(rule: str, stds: tuple[float, ...], trim: float) -> float:
    """Std of ``rule`` over independent N(0, s_i^2), from a fixed Generator (deterministic)."""
    draws = max(2_000, MONTE_CARLO_VALUES // len(stds))  # 1,000 silos: 2,000 draws, 1.6 %
    noise = np.random.default_rng(MONTE_CARLO_SEED).standard_normal((len(stds), draws)) * np.array(stds)[:, None]
    return float(np.std(aggregate(rule, noise, [1.0] * len(stds), trim)))  # draws as coordinates: one call
