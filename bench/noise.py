"""``seedtune bench noise``: what the default discrete Gaussian costs against floating-point noise.

Three prices, each measured in one process: the time to noise one release (the exact integer
sampler against Box-Muller on the same CSPRNG, alternated so that machine noise hits both), the
noise it adds beyond sigma C (the lattice's sensitivity inflation), and, on each preset, the
larger sigma its budget calibrates to because only integer Renyi orders count.

And what its running time tells an observer: the exact sampler is a rejection sampler whose
accepted draw costs more the larger |z| is (a geometric loop over |z| / t and a Bernoulli(exp(-g))
loop over g ~ (|z| - sigma^2/t)^2 / (2 sigma^2)), so the time of one draw is correlated with its
magnitude; ``timing`` gives the median time per band of |z| / sigma and the rank correlation,
at the default simulate preset's sigma (docs/threat-model.md reads them).
"""

from __future__ import annotations

import statistics
import time
from fractions import Fraction

import numpy as np
from scipy import stats
from tqdm import tqdm

from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.privacy.accounting import calibrate_noise_multiplier
from seedtune.common.privacy.mechanism import add_noise, lattice_sensitivity, lattice_step
from seedtune.common.privacy.randomness import SecretRandomness, sample_discrete_gaussian

PROBES = (1, 4, 8, 16)


def _time_release(total: np.ndarray, sigma: float, noise: str, randomness: SecretRandomness) -> float:
    start = time.perf_counter()
    add_noise(total, clip_bound=1.0, noise_multiplier=sigma, randomness=randomness, noise=noise)
    return time.perf_counter() - start


def bench_noise(*, repeats: int = 200, progress: bool = True) -> dict:
    randomness = SecretRandomness()
    rows = []
    for probes in tqdm(PROBES, desc="noise", disable=not progress):
        total = np.linspace(-3.0, 3.0, probes)
        sigma = 1.0
        pairs = [(_time_release(total, sigma, "discrete", randomness), _time_release(total, sigma, "gaussian", randomness))
                 for _ in range(repeats)]
        discrete = statistics.median(d for d, _ in pairs)
        gaussian = statistics.median(g for _, g in pairs)
        inflation = float(lattice_sensitivity(1.0, probes)) * lattice_step(1.0) - 1.0
        rows.append({"probes": probes, "discrete_ms": discrete * 1e3, "gaussian_ms": gaussian * 1e3,
                     "ratio": discrete / gaussian, "noise_inflation_pct": 100 * inflation})
    presets = []
    for preset in ("default", "tiny"):
        config = load_config(preset, command="simulate" if preset == "default" else "train")
        p = config.privacy
        steps = config.schedule.steps
        gaussian, discrete = (calibrate_noise_multiplier(p.epsilon, p.delta, p.sample_rate, steps, p.accountant,
                                                         also=components.planned_evaluation(config), noise=noise)
                              for noise in ("gaussian", "discrete"))
        presets.append({"preset": preset, "epsilon": p.epsilon, "sample_rate": p.sample_rate, "steps": steps,
                        "sigma_gaussian": gaussian, "sigma_discrete": discrete,
                        "sigma_increase_pct": 100 * (discrete / gaussian - 1)})
    return {
        "timing": timing_leak(draws=20 * repeats),
        "bench": "noise",
        "setup": {"repeats": repeats, "sigma": 1.0, "clip_bound": 1.0,
                  "what": "add_noise on a K-vector: exact discrete Gaussian vs Box-Muller, both from os.urandom"},
        "rows": rows,
        "presets": presets,
        "targets": [],  # the issue asks for the cost measured, not a limit
    }


BANDS = ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, float("inf")))


def timing_leak(*, draws: int) -> dict:
    """How the time of one exact discrete Gaussian draw varies with the draw's magnitude, at the
    scale the default simulate preset draws with (sigma D in lattice units)."""
    config = load_config("default", command="simulate")
    p = config.privacy
    sigma = Fraction(components.noise_multiplier(config)) * lattice_sensitivity(p.clip_bound, config.zo.probes)
    randomness = SecretRandomness()
    times, magnitudes = np.empty(draws), np.empty(draws)
    for i in range(draws):
        start = time.perf_counter_ns()
        value = sample_discrete_gaussian(sigma * sigma, randomness.randbelow)
        times[i] = (time.perf_counter_ns() - start) / 1e3
        magnitudes[i] = abs(value) / float(sigma)
    bands = []
    for low, high in BANDS:
        inside = (magnitudes >= low) & (magnitudes < high)
        if inside.any():
            bands.append({"low": low, "high": high, "draws": int(inside.sum()),
                          "median_us": float(np.median(times[inside]))})
    rho = stats.spearmanr(times, magnitudes).statistic
    return {"sigma_lattice_units": float(sigma), "draws": draws, "median_us": float(np.median(times)),
            "spearman_time_vs_magnitude": float(rho), "bands": bands}
