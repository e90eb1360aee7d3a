"""Split a training set across silos: IID, label-skewed, or quantity-skewed by Dirichlet(alpha).

Every assignment here is a function of the record alone. A keyed hash of each record's text and
label, h = BLAKE2b_key(text, label) read as u in [0, 1), decides where it goes; the key is derived
from a purpose ("split", "partition", ...) and the seed, so every party derives the same
assignment, different purposes are independent (a record's silo says nothing about its split),
and another seed gives another assignment. Adding or removing one record changes only that
record's place: the add/remove-one adjacency under which a silo's privacy guarantee is stated
holds for the data each silo actually sees. (A seeded permutation of the whole pool, as used
before, moved many other records when one was added.) What it costs: sizes are random, not
exact: Multinomial(n, shares), so a silo's count is Binomial(n, share).

* iid: u picks one of the partitions uniformly.
* label skew (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification"): for each class c, proportions p_c ~ Dirichlet(alpha 1) over
  the partitions; a record of class c goes to the bucket of the cumulative sums of p_c that holds
  its u. Small alpha means each silo sees mostly one class. p_c is drawn from a generator seeded
  by (seed, c) only: public values, never counts, so no record moves another's shares.
* quantity skew (Li et al. 2022, "Federated Learning on Non-IID Data Silos: An Experimental
  Study"): silo shares q ~ Dirichlet(alpha 1) from the seeded generator, then u picks the bucket;
  the label mix stays IID, the amount of data per silo does not. A silo left empty is an error
  (hashing cannot promise each silo a record): choose a larger alpha or fewer silos.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from seedtune.common.errors import ConfigError

SCHEMES = ("iid", "label-skew", "quantity-skew")


def record_hashes(texts: Sequence[str], labels: Sequence, *, purpose: str, seed: int) -> np.ndarray:
    """BLAKE2b (64-bit digest), keyed by ``purpose`` and ``seed``, of each record's text and
    label, as uint64. The text is length-prefixed, so no (text, label) pair collides by framing."""
    key = f"seedtune/{purpose}/{int(seed)}".encode()
    out = np.empty(len(texts), dtype=np.uint64)
    for position, (text, label) in enumerate(zip(texts, labels, strict=True)):
        body = str(text).encode("utf-8")
        digest = hashlib.blake2b(len(body).to_bytes(8, "little") + body + str(label).encode("utf-8"),
                                 key=key, digest_size=8).digest()
        out[position] = int.from_bytes(digest, "little")
    return out


def unit_interval(hashes: np.ndarray) -> np.ndarray:
    """u = floor(h / 2^11) / 2^53: the top 53 bits of each hash, exactly, as a float in [0, 1)."""
    return (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53


def partition_indices(
    texts: Sequence[str], labels: Sequence[int], partitions: int, *,
    scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
) -> list[np.ndarray]:
    """Sorted indices of the records (``texts[i]``, ``labels[i]``) in each partition."""
    if partitions < 1:
        raise ValueError(f"need at least one partition, got {partitions}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; use one of {SCHEMES}")
    if scheme != "iid" and alpha <= 0:
        raise ValueError(f"{scheme} alpha must be > 0, got {alpha}")
    labels = np.asarray(labels, dtype=np.int64)
    u = unit_interval(record_hashes(texts, labels.tolist(), purpose="partition", seed=seed))
    if scheme == "iid":
        silo = np.minimum((u * partitions).astype(np.int64), partitions - 1)
    elif scheme == "quantity-skew":
        shares = np.random.default_rng(np.random.SeedSequence([seed, 0])).dirichlet(np.full(partitions, alpha))
        silo = _bucket(u, shares)
    else:
        silo = np.empty(len(labels), dtype=np.int64)
        for label in np.unique(labels):
            members = labels == label
            # Seeded by (seed, class) alone: public values, so no record's presence moves the shares.
            rng = np.random.default_rng(np.random.SeedSequence([seed, 1, int(label)]))
            silo[members] = _bucket(u[members], rng.dirichlet(np.full(partitions, alpha)))
    parts = [np.flatnonzero(silo == index) for index in range(partitions)]
    if scheme == "quantity-skew":
        empty = next((index for index, part in enumerate(parts) if len(part) == 0), None)
        if empty is not None:
            raise ConfigError(
                f"quantity-skew (alpha={alpha}) leaves silo {empty} of {partitions} with none of the {len(labels)} "
                "examples; use a larger federation.alpha or fewer federation.silos"
            )
    return parts


def _bucket(u: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """The partition whose interval of the cumulative ``shares`` holds each u."""
    edges = np.cumsum(shares)[:-1]
    return np.searchsorted(edges, u, side="right").astype(np.int64)
