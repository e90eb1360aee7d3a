"""The private release of one round, as named steps: clip -> sum -> record -> noise -> scale.

Given the per-example differences S (B x K) of a Poisson-sampled batch:

    release = ( sum_i clip_C(S_i) + N(0, sigma^2 C^2 I_K) ) / (q n)

clip_C scales each example's K-vector to L2 norm at most C, so adding or removing one example
changes the sum by at most C in L2: the Gaussian mechanism with noise multiplier sigma, on a
Poisson sample at rate q, which is the event charged to the ledger. The noise comes from
:class:`~seedtune.common.privacy.randomness.SecretRandomness`, never from a public seed. The
event is committed to the ledger in this function, before the values are returned, and a
release the budget does not allow is refused before any noise is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import dp_accounting
import numpy as np
import torch
from seedtune.common.privacy.accounting import evaluation_event, release_event
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.randomness import SecretRandomness


@dataclass(frozen=True)
class Release:
    """What leaves the silo for one round: K noised, normalised projected gradients."""

    values: np.ndarray  # float64, shape (K,)
    event: dp_accounting.DpEvent | None  # None for a non-private run


def clip_per_example(differences: torch.Tensor, clip_bound: float) -> torch.Tensor:
    """Scale each row to L2 norm at most ``clip_bound``: S_i * min(1, C / ||S_i||)."""
    norms = torch.linalg.vector_norm(differences, dim=1, keepdim=True)
    factors = torch.clamp(clip_bound / norms.clamp(min=1e-300), max=1.0)
    return differences * factors


def private_release(
    differences: torch.Tensor,
    *,
    clip_bound: float,
    noise_multiplier: float,
    sample_rate: float,
    population: int,
    randomness: SecretRandomness,
    ledger: PrivacyLedger,
    round: int,
) -> Release:
    """Clip, sum, charge the ledger, add secret Gaussian noise, divide by q n."""
    clipped = clip_per_example(differences.to(torch.float64), clip_bound)
    total = clipped.sum(dim=0).numpy()
    event = release_event(sample_rate, noise_multiplier)
    release_id = ledger.charge(event, round=round)  # durable before anything leaves; refuses past budget
    noised = total + randomness.normal(total.shape[0]) * (noise_multiplier * clip_bound)
    values = noised / (sample_rate * population)
    ledger.attach(release_id, [float(v) for v in values])
    return Release(values, event)


def nonprivate_release(differences: torch.Tensor, *, sample_rate: float, population: int) -> Release:
    """The same normalisation without clipping or noise (non-private ZO, MeZO-style)."""
    total = differences.to(torch.float64).sum(dim=0).numpy()
    return Release(total / (sample_rate * population), None)


def private_counts(
    correct: int,
    count: int,
    *,
    noise_multiplier: float,
    randomness: SecretRandomness,
    ledger: PrivacyLedger,
    round: int,
) -> tuple[float, float]:
    """A silo's evaluation, released privately: (correct, count) + N(0, s^2 I_2), charged first
    as :func:`~seedtune.common.privacy.accounting.evaluation_event`."""
    release_id = ledger.charge(evaluation_event(noise_multiplier), round=round, note="evaluation")
    noise = randomness.normal(2) * noise_multiplier
    values = [float(correct + noise[0]), float(count + noise[1])]
    ledger.attach(release_id, values)
    return values[0], values[1]
