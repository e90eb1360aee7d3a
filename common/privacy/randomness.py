"""Secret randomness for sampling and noise, kept apart from every public seed.

The privacy of a release rests on two secrets: which examples Poisson sampling picked, and the
Gaussian noise. DPZero's public code drew its noise from the global RNG right after re-seeding it
with the step's perturbation seed, so anyone who knows the (public) seed can subtract the noise.
Here the directions come from :mod:`seedtune.common.directions` (public, seed-keyed) and this
module draws only from the operating system's CSPRNG (``os.urandom``), never from a seed of the
run. A fixed seed exists for tests alone, and says so loudly.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np


class InsecureRandomnessWarning(UserWarning):
    """Sampling and noise are reproducible from a seed: no privacy guarantee."""


class SecretRandomness:
    """Uniforms and Gaussians from ``os.urandom``: unpredictable from anything public."""

    seeded = False

    def uniform(self, n: int) -> np.ndarray:
        """n independent uniforms on [0, 1) with 53 random bits each."""
        words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def normal(self, n: int) -> np.ndarray:
        """n independent standard normals by Box-Muller on CSPRNG uniforms."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 - u in (0, 1]: finite
        angle = 2.0 * math.pi * u[pairs:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


class SeededRandomness(SecretRandomness):
    """Sampling and noise from a fixed seed. For tests only: it voids the privacy guarantee."""

    seeded = True

    def __init__(self, seed: int, *, quiet: bool = False):
        if not quiet:
            warnings.warn(
                f"privacy.noise_seed={seed}: Poisson sampling and DP noise are reproducible from "
                "this seed, so the released values carry NO privacy guarantee. Use it only in "
                "tests; remove privacy.noise_seed to draw them from the OS's secure source.",
                InsecureRandomnessWarning,
                stacklevel=2,
            )
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def uniform(self, n: int) -> np.ndarray:
        return self._rng.random(n)

    def normal(self, n: int) -> np.ndarray:
        return self._rng.standard_normal(n)


class PublicRandomness(SeededRandomness):
    """Sampling keyed by a public seed, for non-private runs (privacy.enabled = false)."""

    def __init__(self, seed: int):
        super().__init__(seed, quiet=True)
