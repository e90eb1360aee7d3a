"""Poisson sampling: each example joins the batch independently with probability q.

The subsampled-Gaussian accountant assumes exactly this sampler; DPZero's public code shuffled
fixed-size batches while accounting for Poisson sampling. The realised batch size varies from
step to step (it can be 0) and is never used as a divisor: the private sum is divided by the
expected batch size q * n instead, which is public.
"""

from __future__ import annotations

import numpy as np
from seedtune.common.privacy.randomness import SecretRandomness


def poisson_sample(population: int, sample_rate: float, randomness: SecretRandomness) -> np.ndarray:
    """Sorted indices of the examples drawn, each independently with probability ``sample_rate``
    (in (0, 1]: checked where it enters, by the config and by the wire)."""
    if sample_rate == 1.0:
        return np.arange(population)
    return np.flatnonzero(randomness.uniform(population) < sample_rate)
