"""Split a training set across silos: IID, label-skewed, or quantity-skewed by Dirichlet(alpha).

Partitions are a pure function of (labels, number of partitions, scheme, seed), so every party
derives the same split; every example lands in exactly one partition.

* label skew (Hsu et al. 2019): for each class, draw proportions p ~ Dirichlet(alpha 1) over the
  partitions and deal that class's examples out accordingly; small alpha means each silo sees
  mostly one class.
* quantity skew (Li et al. 2022, "Federated Learning on Non-IID Data Silos: An Experimental
  Study"): draw silo sizes from q ~ Dirichlet(alpha 1), then deal shuffled examples out by size;
  the label mix stays IID, the amount of data per silo does not. Every silo keeps at least one
  example: sizes are 1 + Multinomial(n - partitions, q).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCHEMES = ("iid", "label-skew", "quantity-skew")


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
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; use one of {SCHEMES}")
    if alpha <= 0:
        raise ValueError(f"{scheme} alpha must be > 0, got {alpha}")
    if scheme == "quantity-skew":
        if len(labels) < partitions:
            raise ValueError(f"{len(labels)} examples cannot give each of {partitions} partitions one")
        sizes = 1 + rng.multinomial(len(labels) - partitions, rng.dirichlet(np.full(partitions, alpha)))
        order = rng.permutation(len(labels))
        return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]
    parts: list[list[np.ndarray]] = [[] for _ in range(partitions)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(partitions, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for position, piece in enumerate(np.split(members, cuts)):
            parts[position].append(piece)
    return [np.sort(np.concatenate(pieces)) for pieces in parts]
