"""``seedtune audit``: an empirical lower bound on the epsilon of one release, set beside the accountant's.

The accountant *claims* an upper bound on what a release can leak. An audit runs the exact
mechanism many times on two neighbouring datasets and measures how well a test tells them apart;
any (epsilon, delta)-DP mechanism limits that, so a test that does too well refutes the claim.

The neighbours (Nasr et al. 2021, "Adversary Instantiation: Lower Bounds for Differentially
Private Machine Learning", IEEE S&P: the strongest adversary crafts the gradient itself):

* D: the per-example differences S (n x K) of a real batch, the first ``AUDIT_EXAMPLES`` training
  examples of the config's data, under the real model, round 0's probe seeds and the schedule's
  beta, computed once with the config's estimator.
* D' = D plus one canary row 10 C u, u = e_0 (probe 0's axis). Clipping scales it to exactly C u.

Why that canary is the worst case. Clipping maps every row to norm <= C, so one example moves the
clipped sum by at most C in L2; the canary moves it by exactly C u, as far as any example can. Its
raw norm is 10 C, so the audit also checks that clipping happens: unclipped, it would move the sum
by 10 C and the audit would report a violation.

* Gaussian noise, N(0, sigma^2 C^2 I_K): the pair is N(s, sigma^2 C^2 I) against N(s + C u, ...).
  The privacy loss depends on ||C u|| = C alone, so every unit u is equally bad, and the
  likelihood ratio is increasing in <release, u>: by Neyman-Pearson, thresholding the score
  <release, u> is the most powerful test of the pair.
* Discrete noise: the sum is rounded to the lattice g Z^K and each coordinate gets independent
  integer noise N_Z(0, (sigma D)^2) (see :mod:`seedtune.common.privacy.mechanism`). With u = e_0
  the canary moves coordinate 0 alone, by C / g lattice units (up to one unit of rounding); the
  other coordinates have the same distribution in both worlds, so coordinate 0 = <release, e_0>
  is a sufficient statistic, and the discrete Gaussian's likelihood ratio exp((2 z m - m^2) /
  (2 s^2)) is increasing in z, so the threshold test is again Neyman-Pearson's. The accountant
  charges D = C / g + ceil(sqrt K) + 1 units; the axis shift C / g falls short of it by at most
  (ceil(sqrt K) + 1) / 2^12 (C / g >= 2^12), 0.12% for K <= 16. A diagonal u could gain at most
  ~sqrt K units from rounding, the same fraction, far below what any feasible number of trials
  resolves.

The population n is public (docs/threat-model.md: the reply carries q n), so
both worlds divide by the same q n, that of D.

The test (Jagielski, Ullman, Oprea 2020, "Auditing Differentially Private Machine Learning: How
Private is Private SGD?", NeurIPS). Any test between M(D) and M(D') with false-positive rate
alpha (D' declared when D was run) and false-negative rate beta satisfies, if M is
(epsilon, delta)-DP (Kairouz, Oh, Viswanath 2015, the hypothesis-testing view of DP):

    alpha + e^epsilon beta >= 1 - delta    and    e^epsilon alpha + beta >= 1 - delta,
    so  epsilon >= max( log((1 - delta - beta) / alpha), log((1 - delta - alpha) / beta) ).

The test declares D' when <release, u> >= t. The first half of the trials of each world picks t
(the one whose bound, computed on that half, is largest); the second half, independent of the
choice, counts the false positives k_0 of m_0 and false negatives k_1 of m_1. Clopper-Pearson
(1934) upper bounds at level 1 - a each,

    alpha_ub = Beta^{-1}(1 - a; k_0 + 1, m_0 - k_0),   beta_ub likewise (1 when k = m),

hold together with probability >= 1 - 2a = ``confidence`` (a union bound), and then

    epsilon_lower = max( log((1 - delta - beta_ub) / alpha_ub), log((1 - delta - alpha_ub) / beta_ub), 0 )

is a lower bound on the true epsilon at that confidence. It is at most about log((1 - delta) m / c)
for m test trials (c = -log a when nothing is misclassified): more trials reach higher.

What it can and cannot show: a lower bound above the accountant's epsilon refutes the accountant
(or the implementation); one below it proves nothing, and one release at q = 1 tests neither
composition over rounds nor the amplification by sampling the accountant takes at q < 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.errors import ConfigError, SeedtuneError
from seedtune.common.estimator import ZerothOrderEstimator
from seedtune.common.privacy.accounting import calibrate_noise_multiplier, epsilon_for
from seedtune.common.privacy.mechanism import add_noise, clip_per_example
from seedtune.common.privacy.randomness import SecretRandomness
from seedtune.common.privacy.sampling import poisson_sample
from seedtune.common.protocol import probe_seeds
from tqdm.auto import tqdm

AUDIT_EXAMPLES = 64  # D: the first 64 training examples
CANARY_NORM = 10.0  # the canary's raw difference, in units of C: clipped to C
DEFAULT_TRIALS = 10_000  # per dataset: ~20 s on 2 CPU cores for the tiny preset (K = 4, discrete noise)
MIN_TRIALS = 100
ACCOUNTANT = "rdp"  # the only accountant for discrete noise; used for Gaussian noise too, for one scale


@dataclass(frozen=True)
class AuditResult:
    """One audit: the release audited, the test's counts on its held-out half, and the two epsilons."""

    noise: str  # "discrete", "gaussian" or "off"
    noise_multiplier: float  # sigma the accountant is told (0 with noise off)
    noise_multiplier_used: float  # sigma the release draws with: noise_multiplier * noise_scale
    sample_rate: float  # q of the audited release
    probes: int  # K
    clip_bound: float  # C
    delta: float
    examples: int  # n, the size of D (D' has n + 1)
    trials: int  # per dataset; half choose the threshold, half test it
    confidence: float
    threshold: float  # declare D' when <release, u> >= threshold
    false_positives: int  # of test_trials releases on D
    false_negatives: int  # of test_trials releases on D'
    test_trials: int
    fpr_upper: float  # Clopper-Pearson, at 1 - (1 - confidence) / 2
    fnr_upper: float
    epsilon_lower: float
    epsilon_accountant: float  # of this one release at q, sigma, delta (inf with noise off)
    wall_s: float

    @property
    def consistent(self) -> bool:
        return self.epsilon_lower <= self.epsilon_accountant

    @property
    def verdict(self) -> str:
        if self.consistent:
            return "consistent: lower bound ≤ accountant"
        return "VIOLATION: the mechanism leaks more than it is charged for"

    def to_dict(self) -> dict:
        """JSON-ready: an infinite epsilon is written as the string "inf" (float("inf") reads it back)."""
        values = {key: "inf" if isinstance(value, float) and math.isinf(value) else value
                  for key, value in asdict(self).items()}
        return {**values, "consistent": self.consistent, "verdict": self.verdict}


# -- the statistics ------------------------------------------------------------------------------
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


def choose_threshold(null: np.ndarray, alternative: np.ndarray, delta: float, confidence: float) -> float:
    """The score threshold whose lower bound on these trials is largest (every observed score is a
    candidate). Choosing by the bound, not the raw ratio, avoids the empty tails where 0/0 looks
    infinitely good."""
    candidates = np.unique(np.concatenate([null, alternative]))
    false_positives, false_negatives = error_counts(null, alternative, candidates)
    bounds = epsilon_lower_bound(false_positives, len(null), false_negatives, len(alternative), delta, confidence)
    return float(candidates[int(np.argmax(bounds))])


# -- the mechanism under audit -----------------------------------------------------------------
def audit_batch(config: Config, examples: int = AUDIT_EXAMPLES) -> torch.Tensor:
    """D: the per-example differences (n x K, float64) of the first ``examples`` training examples,
    as a silo computes them in round 0 (the config's model, mask, estimator, probe seeds and beta)."""
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    sample = task.encode(data.train[:4]["text"], data.train[:4]["label"])
    parts = components.model_parts(config, task, components.choose_mask(config, task, sample))
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, parts.trainable, parts.directions)
    rows = data.train[: min(examples, len(data.train))]
    batch = task.encode(rows["text"], rows["label"])
    seeds = probe_seeds(config.seed, 0, config.zo.probes)
    beta = components.make_schedule(config).plan(0).beta
    return estimator.estimate(batch, len(rows["label"]), seeds, beta).differences.to(torch.float64)


def with_canary(differences: torch.Tensor, clip_bound: float) -> torch.Tensor:
    """D' = D plus a row 10 C e_0: far past the clip bound along probe 0's axis."""
    canary = torch.zeros(1, differences.shape[1], dtype=torch.float64)
    canary[0, 0] = CANARY_NORM * clip_bound
    return torch.cat([differences, canary])


def validate(*, epsilon: float | None, trials: int, sample_rate: float, noise_off: bool, confidence: float) -> None:
    """The audit's own settings, checked before anything is loaded."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SeedtuneError(message)

    need(trials >= MIN_TRIALS, f"--trials {trials} must be >= {MIN_TRIALS} (default {DEFAULT_TRIALS})")
    need(0 < confidence < 1, f"--confidence {confidence} must be in (0, 1), e.g. 0.95")
    need(0 < sample_rate <= 1, f"--sample-rate {sample_rate} must be in (0, 1]; 1 gives the sharpest test")
    if epsilon is not None:
        need(epsilon > 0 and math.isfinite(epsilon), f"--epsilon {epsilon} must be a finite number > 0")
        need(not noise_off, "--noise-off releases without noise: there is no sigma for --epsilon to calibrate; "
                            "drop one of them")


def run_audit(
    config: Config,
    *,
    epsilon: float | None = None,
    trials: int = DEFAULT_TRIALS,
    sample_rate: float = 1.0,
    noise_off: bool = False,
    confidence: float = 0.95,
    randomness: SecretRandomness | None = None,
    noise_scale: float = 1.0,
    differences: torch.Tensor | None = None,
    progress: bool = False,
) -> AuditResult:
    """Audit one release of ``config``'s mechanism at sampling rate ``sample_rate``.

    sigma: calibrated so that one release at ``sample_rate`` spends ``epsilon`` at the config's
    delta, or, without ``epsilon``, the sigma of the config's run. The accountant's epsilon is that
    of the same single release (RDP; infinite with ``noise_off``).

    ``randomness``: sampling and noise (default: the config's, secret unless privacy.noise_seed).
    ``differences``: D, when the caller has it (default: :func:`audit_batch`).
    ``noise_scale``: a test hook, not on the command line: the release draws with
    sigma * noise_scale while the accountant is told sigma. Below 1 it under-noises, the negative
    control a sound audit must catch.
    """
    validate(epsilon=epsilon, trials=trials, sample_rate=sample_rate, noise_off=noise_off, confidence=confidence)
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be > 0, got {noise_scale}")
    started = time.perf_counter()
    p = config.privacy
    if noise_off:
        sigma = 0.0
    elif epsilon is not None:
        sigma = calibrate_noise_multiplier(epsilon, p.delta, sample_rate, 1, ACCOUNTANT, noise=p.noise)
    else:
        sigma = components.noise_multiplier(config)
        if sigma == 0:
            raise ConfigError("privacy.enabled=false: the config releases without noise; audit that with "
                              "--noise-off, or give --epsilon E to audit a release calibrated to E")
    epsilon_accountant = math.inf if noise_off else epsilon_for(sigma, sample_rate, 1, p.delta, ACCOUNTANT, p.noise)
    if randomness is None:
        randomness = components.randomness(config) if p.enabled else SecretRandomness()
    if differences is None:
        differences = audit_batch(config)
    neighbours = (differences.to(torch.float64), with_canary(differences.to(torch.float64), p.clip_bound))
    population = len(differences)  # public: both worlds divide by the same q n
    used = sigma * noise_scale

    def release(rows: torch.Tensor) -> np.ndarray:
        """One round's release, the exact mechanism: sample -> clip -> sum -> noise -> scale."""
        chosen = torch.from_numpy(poisson_sample(len(rows), sample_rate, randomness))
        total = clip_per_example(rows[chosen], p.clip_bound).sum(dim=0).numpy()
        if not noise_off:
            total = add_noise(total, clip_bound=p.clip_bound, noise_multiplier=used, randomness=randomness,
                              noise=p.noise)
        return total / (sample_rate * population)

    scores = np.empty((2, trials))  # row 0: D, row 1: D'; score = <release, e_0>
    for trial in tqdm(range(trials), disable=not progress, unit="trial", desc="audit", dynamic_ncols=True):
        for world, rows in enumerate(neighbours):
            scores[world, trial] = release(rows)[0]

    half = trials // 2
    threshold = choose_threshold(scores[0, :half], scores[1, :half], p.delta, confidence)
    test = scores[:, half:]
    false_positives, false_negatives = (int(c[0]) for c in error_counts(test[0], test[1], np.array([threshold])))
    test_trials = trials - half
    level = 1.0 - (1.0 - confidence) / 2.0
    return AuditResult(
        noise="off" if noise_off else p.noise,
        noise_multiplier=sigma,
        noise_multiplier_used=used,
        sample_rate=sample_rate,
        probes=differences.shape[1],
        clip_bound=p.clip_bound,
        delta=p.delta,
        examples=population,
        trials=trials,
        confidence=confidence,
        threshold=threshold,
        false_positives=false_positives,
        false_negatives=false_negatives,
        test_trials=test_trials,
        fpr_upper=float(clopper_pearson_upper(false_positives, test_trials, level)),
        fnr_upper=float(clopper_pearson_upper(false_negatives, test_trials, level)),
        epsilon_lower=float(epsilon_lower_bound(false_positives, test_trials, false_negatives, test_trials,
                                                p.delta, confidence)),
        epsilon_accountant=epsilon_accountant,
        wall_s=time.perf_counter() - started,
    )


def print_report(result: AuditResult, config: Config, epsilon: float | None) -> None:
    r = result
    if r.noise == "off":
        noise = "no noise (--noise-off)"
    else:
        source = f"calibrated to epsilon={epsilon:g}" if epsilon is not None else "the config's run sigma"
        kind = {"discrete": "discrete Gaussian noise", "gaussian": "Gaussian noise (floating point)"}[r.noise]
        noise = f"{kind}, sigma={r.noise_multiplier:.4f} ({source})"
        if r.noise_multiplier_used != r.noise_multiplier:
            noise += f", drawn with sigma={r.noise_multiplier_used:.4f}"
    level = 100 * (1 - (1 - r.confidence) / 2)
    print(f"audit of one release: {config.model.name} on {config.data.name}, D = {r.examples} examples, "
          f"D' = D + 1 canary at the clip bound")
    print(f"mechanism:     Poisson q={r.sample_rate:g}, clip C={r.clip_bound:g}, K={r.probes} probes, {noise}")
    print(f"trials:        {r.trials} per dataset ({r.trials - r.test_trials} choose the threshold, "
          f"{r.test_trials} test it)")
    print(f"test:          D' when <release, e_0> >= {r.threshold:.6g}")
    print(f"               false positives {r.false_positives}/{r.test_trials} (FPR <= {r.fpr_upper:.4g}), "
          f"false negatives {r.false_negatives}/{r.test_trials} (FNR <= {r.fnr_upper:.4g}), "
          f"each at {level:g}%")
    accountant = "inf (no noise)" if math.isinf(r.epsilon_accountant) else f"{r.epsilon_accountant:.4f}"
    print(f"epsilon:       lower bound {r.epsilon_lower:.4f} ({100 * r.confidence:g}% confidence)   "
          f"accountant ({ACCOUNTANT}) {accountant}   at delta={r.delta:g}")
    print(r.verdict)
