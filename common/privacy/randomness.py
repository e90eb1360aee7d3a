"""Secret randomness for sampling and noise, kept apart from every public seed.

The privacy of a release rests on two secrets: which examples Poisson sampling picked, and the
noise. DPZero's public code drew its noise from the global RNG right after re-seeding it
with the step's perturbation seed, so anyone who knows the (public) seed can subtract the noise.
Here the directions come from :mod:`seedtune.common.directions` (public, seed-keyed) and this
module draws only from the operating system's CSPRNG (``os.urandom``), never from a seed of the
run. A fixed seed exists for tests alone, built by the test itself (no config key or message
can ask a silo for one), and it says so loudly.

The default noise is the discrete Gaussian, sampled exactly with integer and rational arithmetic
(Canonne, Kamath, Steinke 2020, Algorithms 1-3): floating-point Gaussian samplers release values
whose low-order bits depend on the secret (Mironov 2012; Jin et al. 2022), an integer sample has
no such bits.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable
from fractions import Fraction

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

    def randbelow(self, n: int) -> int:
        """A uniform integer in [0, n), any size of n: the top bits of ``os.urandom`` bytes, by
        rejection (what ``secrets.randbelow`` does, but through the same source as the rest)."""
        if n < 1:
            raise ValueError(f"randbelow needs n >= 1, got {n}")
        bits = n.bit_length()
        size = (bits + 7) // 8
        while True:
            value = int.from_bytes(os.urandom(size), "big") >> (8 * size - bits)
            if value < n:
                return value

    def discrete_gaussian(self, n: int, sigma_squared: Fraction) -> np.ndarray:
        """n independent integers with P(z) proportional to exp(-z^2 / (2 sigma_squared)), exactly."""
        return np.array([sample_discrete_gaussian(sigma_squared, self.randbelow) for _ in range(n)], dtype=np.int64)


class SeededRandomness(SecretRandomness):
    """Sampling and noise from a fixed seed. For tests only: it voids the privacy guarantee."""

    seeded = True

    def __init__(self, seed: int, *, quiet: bool = False):
        if not quiet:
            warnings.warn(
                f"SeededRandomness({seed}): Poisson sampling and DP noise are reproducible from "
                "this seed, so the released values carry NO privacy guarantee. Only tests build one; "
                "a silo's own randomness is SecretRandomness, from the OS's secure source.",
                InsecureRandomnessWarning,
                stacklevel=2,
            )
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._integers = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._integers.randrange(n)

    def uniform(self, n: int) -> np.ndarray:
        return self._rng.random(n)

    def normal(self, n: int) -> np.ndarray:
        return self._rng.standard_normal(n)


class PublicRandomness(SeededRandomness):
    """Sampling keyed by a public seed, for non-private runs (privacy.enabled = false)."""

    def __init__(self, seed: int):
        super().__init__(seed, quiet=True)


# -- exact discrete Gaussian (CKS20) ----------------------------------------------------------
def _bernoulli(p: Fraction, randbelow: Callable[[int], int]) -> bool:
    """True with probability p in [0, 1], exactly."""
    return randbelow(p.denominator) < p.numerator


def _bernoulli_exp(gamma: Fraction, randbelow: Callable[[int], int]) -> bool:
    """True with probability exp(-gamma), gamma >= 0 (CKS20, Algorithm 1): for gamma <= 1, the
    first k with Bernoulli(gamma / k) false is odd with probability exp(-gamma)."""
    while gamma > 1:  # exp(-gamma) = exp(-1)^floor(gamma) * exp(-frac(gamma))
        if not _bernoulli_exp(Fraction(1), randbelow):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(gamma / k, randbelow):
        k += 1
    return k % 2 == 1


def _discrete_laplace(t: int, randbelow: Callable[[int], int]) -> int:
    """P(x) proportional to exp(-|x| / t) on the integers, t >= 1 (CKS20, Algorithm 2)."""
    while True:
        u = randbelow(t)
        if not _bernoulli_exp(Fraction(u, t), randbelow):
            continue
        v = 0
        while _bernoulli_exp(Fraction(1), randbelow):
            v += 1
        magnitude = u + t * v
        negative = randbelow(2) == 1
        if negative and magnitude == 0:
            continue
        return -magnitude if negative else magnitude


def sample_discrete_gaussian(sigma_squared: Fraction, randbelow: Callable[[int], int]) -> int:
    """One draw of N_Z(0, sigma^2): P(z) proportional to exp(-z^2 / (2 sigma^2)) on the integers,
    by rejection from a discrete Laplace of scale t = floor(sigma) + 1 (CKS20, Algorithm 3)."""
    sigma_squared = Fraction(sigma_squared)
    if sigma_squared <= 0:
        raise ValueError(f"sigma_squared must be > 0, got {sigma_squared}")
    t = math.isqrt(sigma_squared.numerator // sigma_squared.denominator) + 1  # floor(sqrt(x)) = isqrt(floor(x))
    while True:
        y = _discrete_laplace(t, randbelow)
        if _bernoulli_exp((abs(y) - sigma_squared / t) ** 2 / (2 * sigma_squared), randbelow):
            return y
