"""The parameter update rebuilt from seeds and released scalars.

    theta <- theta - lr * ( (1/K) sum_k g_k z_k  +  prox * (theta - theta_anchor) )

on the trainable coordinates only, where g_k is the released (clipped, noised, normalised)
projected gradient for probe seed k. The proximal term of DP-ZOSO is public and deterministic,
so it is applied exactly rather than through the random direction (the published code multiplied
it by z, which makes it vanish in expectation). Both the live run and a replay of the update log
call this one function with the same arguments, in the same order, so on the same device and
dtype they produce the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from seedtune.common.trainable import DirectionField, TrainableSet


@torch.no_grad()
def apply_update(
    trainable: TrainableSet,
    directions: DirectionField,
    probe_seeds: Sequence[int],
    projected_grads: Sequence[float],
    lr: float,
    prox: float = 0.0,
    anchor: Sequence[torch.Tensor] | None = None,
) -> None:
    """Apply one step in place. ``anchor`` holds the stage-start values when ``prox > 0``."""
    if len(probe_seeds) != len(projected_grads) or not probe_seeds:
        raise ValueError("need one projected gradient per probe seed, and at least one probe")
    if prox > 0 and anchor is None:
        raise ValueError("a proximal step needs its anchor")
    for position, entry in enumerate(trainable):
        # Piece by piece, so the working memory is one chunk of z whatever the tensor's size;
        # every operation is elementwise, so the result does not depend on the chunking.
        for offset, length in directions.chunks(entry):
            if entry.index is None:
                target = entry.flat[offset : offset + length]  # a view: updated in place
            else:
                index = entry.index[offset : offset + length]
                target = entry.flat[index]  # a copy, written back below
            piece_anchor = anchor[position][offset : offset + length] if prox > 0 else None
            step_piece(target, directions, entry, offset, directions.buffer(entry, length),
                       probe_seeds, projected_grads, lr, prox, piece_anchor)
            if entry.index is not None:
                entry.flat[index] = target


def step_piece(
    target: torch.Tensor,
    directions: DirectionField,
    entry,
    offset: int,
    z: torch.Tensor,
    probe_seeds: Sequence[int],
    projected_grads: Sequence[float],
    lr: float,
    prox: float,
    anchor: torch.Tensor | None,
) -> None:
    """One step on one piece of one trainable tensor, in place: the arithmetic every update path
    shares (the live step, replay one step at a time, and replay of many steps piece by piece),
    so that they agree bit for bit. ``z`` is a workspace of the piece's length."""
    drift = target - anchor if prox > 0 else None  # at theta_t
    # Several seeds' pieces of z at once where that is cheaper (the same values); added one seed
    # at a time in order either way, so the sum rounds the same.
    for values, g in zip(directions.fill_each(entry, list(probe_seeds), offset, z), projected_grads, strict=True):
        target.add_(values, alpha=-lr * float(g) / len(probe_seeds))
    if drift is not None:
        target.add_(drift, alpha=-lr * prox)
