"""``seedtune bench noise``: what the default discrete Gaussian costs against floating-point noise.

Three prices, each measured in one process: the time to noise one release (the exact integer
sampler against Box-Muller on the same CSPRNG, alternated so that machine noise hits both), the
noise it adds beyond sigma C (the lattice's sensitivity inflation), and, on each preset, the
larger sigma its budget calibrates to because only integer Renyi orders count.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from tqdm import tqdm

from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.privacy.accounting import calibrate_noise_multiplier
from seedtune.common.privacy.mechanism import add_noise, lattice_sensitivity, lattice_step
from seedtune.common.privacy.randomness import SecretRandomness

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
        "bench": "noise",
        "setup": {"repeats": repeats, "sigma": 1.0, "clip_bound": 1.0,
                  "what": "add_noise on a K-vector: exact discrete Gaussian vs Box-Muller, both from os.urandom"},
        "rows": rows,
        "presets": presets,
        "targets": [],  # the issue asks for the cost measured, not a limit
    }
