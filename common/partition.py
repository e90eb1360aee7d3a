"""Split a training set across silos: IID, or label-skewed by a Dirichlet(alpha) prior.

Partitions are a pure function of (labels, number of partitions, scheme, seed), so every party
derives the same split; every example lands in exactly one partition. Label skew follows the
usual recipe (Hsu et al. 2019): for each class, draw proportions p ~ Dirichlet(alpha 1) over the
partitions and deal that class's examples out accordingly; small alpha means each silo sees
mostly one class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCHEMES = ("iid", "label-skew")


def partition_indices(
    labels: Sequence[int], partitions: int, *, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Sorted example indices of each partition."""
    if partitions < 1:
        raise ValueError(f"need at least one partition, got {partitions}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(labels))
        return [np.sort(part) for part in np.array_split(order, partitions)]
    if scheme != "label-skew":
        raise ValueError(f"unknown partition scheme {scheme!r}; use one of {SCHEMES}")
    if alpha <= 0:
        raise ValueError(f"label-skew alpha must be > 0, got {alpha}")
    parts: list[list[np.ndarray]] = [[] for _ in range(partitions)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(partitions, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for position, piece in enumerate(np.split(members, cuts)):
            parts[position].append(piece)
    return [np.sort(np.concatenate(pieces)) for pieces in parts]
