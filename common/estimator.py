"""The zeroth-order estimate: per-example two-point differences along shared directions.

For a batch of examples i, probes k with directions z_k = z(seed_k) and ZO scale beta:

    s_ik = (l_i(theta + beta z_k) - l_i(theta - beta z_k)) / (2 beta)

s_ik is a finite-difference estimate of the directional derivative <grad l_i(theta), z_k>, so
E_z[s_ik z_k] -> grad l_i(theta) as beta -> 0 (MeZO, Malladi et al. 2023; DPZero, Zhang et al.
2024). Each example keeps its own row: privacy clips per example, so a loss averaged over the
batch before clipping would lose the per-example sensitivity the accountant assumes.

Cost: 2K forward passes over the batch and no backward pass; the weights are bit-identical after.
When the first layers hold no trainable coordinate (a head, a pruning mask in the top layers,
adapters), one pass computes them and the 2K perturbed passes start after them
(:mod:`seedtune.common.prefix`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from seedtune.common.perturb import Perturbation
from seedtune.common.prefix import PrefixCache
from seedtune.common.trainable import DirectionField, TrainableSet
from torch import nn

PerExampleLoss = Callable[[nn.Module, dict], torch.Tensor]


@dataclass(frozen=True)
class Estimate:
    """Per-example differences (B x K, float64) and the batch's mean loss (local only), the mean
    of the perturbed losses: within O(beta^2) of the loss at theta."""

    differences: torch.Tensor
    loss: float


class ZerothOrderEstimator:
    """Two-point per-example differences of ``loss_fn`` along seed-keyed directions."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: PerExampleLoss,
        trainable: TrainableSet,
        directions: DirectionField,
        *,
        cache_prefix: bool = True,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.perturbation = Perturbation(model, trainable, directions)
        self.prefix = PrefixCache(model, trainable) if cache_prefix else None

    @torch.no_grad()
    def estimate(self, batch: dict, batch_size: int, probe_seeds: Sequence[int], beta: float) -> Estimate:
        """s_ik for every example of ``batch`` (``batch_size`` rows) and every probe seed."""
        differences = torch.zeros(batch_size, len(probe_seeds), dtype=torch.float64)
        if batch_size == 0:
            return Estimate(differences, float("nan"))
        prefix = self.prefix
        if prefix is not None and prefix.modules is None:
            prefix.trace(lambda: self.loss_fn(self.model, batch))
        if prefix is None or not prefix.modules:
            prefix = None
        else:
            prefix.record(lambda: self.loss_fn(self.model, batch))
        loss_sum = 0.0
        try:
            for k, seed in enumerate(probe_seeds):
                losses = []
                for shift in (beta, -beta):
                    with self._replaying(prefix), self.perturbation.shifted(seed, shift):
                        losses.append(self.loss_fn(self.model, batch).to(torch.float64))
                plus, minus = losses
                differences[:, k] = (plus - minus).cpu() / (2.0 * beta)
                loss_sum += float((plus + minus).mean()) / 2.0
        finally:
            if prefix is not None:
                prefix.clear()
        return Estimate(differences, loss_sum / len(probe_seeds))

    @staticmethod
    def _replaying(prefix: PrefixCache | None):
        return prefix.replaying() if prefix is not None else contextlib.nullcontext()
