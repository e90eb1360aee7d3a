"""The zeroth-order estimate: per-example two-point differences along shared directions.

For a batch of examples i, probes k with directions z_k = z(seed_k) and ZO scale beta:

    s_ik = (l_i(theta + beta z_k) - l_i(theta - beta z_k)) / (2 beta)

s_ik is a finite-difference estimate of the directional derivative <grad l_i(theta), z_k>, so
E_z[s_ik z_k] -> grad l_i(theta) as beta -> 0 (MeZO, Malladi et al. 2023; DPZero, Zhang et al.
2024). Each example keeps its own row: privacy clips per example, so a loss averaged over the
batch before clipping would lose the per-example sensitivity the accountant assumes.

Shapes that do not depend on the sample. The privacy argument bounds the change one added or
removed example makes to the clipped sum by the clip bound C, which holds only if every OTHER
example's row stays exactly the same. Rows computed in one padded batch do not: the padded width
(the longest example sampled) and the batch size change the shapes of the matrix products,
reductions and softmaxes, hence the last bits of the losses, and the difference divides that
change by 2 beta (at beta = 1e-7 one added example moved the released sum by 2.2 C). The private
entry point, :meth:`ZerothOrderEstimator.estimate_examples`, takes raw rows and encodes them
itself (``Task.encode_fixed``), in one of two ways:

* ``micro_batch = 1`` (the default): each example alone, a batch of one at its own length. Every
  tensor its losses pass through has a shape fixed by that example, so its row is the same bits
  whichever other examples were sampled, by construction (same weights, machine and thread
  count; kernels are deterministic for a given shape).
* ``micro_batch = m > 1``: micro-batches of exactly m rows, each example padded to its own
  length bucket, filler rows completing the last micro-batch of a bucket. The shapes are fixed,
  but an example's position in its micro-batch varies with the sample, so its bits stay the same
  only if every kernel computes a row the same way at every position. That held on the CPUs the
  tests run on (tests/test_estimator.py adds and removes examples at varied positions), but no
  library promises it: check it on any new hardware before relying on it.

Measured on a 2-core CPU, against one dynamically padded batch (ratios within one run, one
thread). MiniLM, the default preset's head-only training (34 reviews, K = 8): alone 1.4-1.5x (a
batch-one matrix product is less efficient than the padding it saves, and a second thread
barely helps it: 2.4x against a batch on two), m = 8 0.8x, m = 16 1.3x. MiniLM, every parameter
(16 reviews, K = 1 / 2): alone 2.1x / 1.75x (each example's passes regenerate z), m = 8 1.7x /
1.4x. A tiny model, every parameter (80 examples, K = 4): alone 30-50x (its passes are all fixed
overhead, paid per example), m = 64 1.7-1.9x, m = 8 6x. On a GPU a batch-one pass is bound by
kernel-launch latency, not arithmetic: n examples alone cost about n latency-bound passes where
a batch cost about one (CUDA graphs captured per length would cut that and keep the guarantee);
micro-batches keep a GPU busy, but split-K and stream-K matrix products can make a row's bits
depend on its tile, i.e. on its position, so check them there first.

Cost: 2K forward passes over the examples and no backward pass; the weights are bit-identical
after. When the first layers hold no trainable coordinate (a head, a pruning mask in the top
layers, adapters), one pass per batch computes them and the 2K perturbed passes start after
them (:mod:`seedtune.common.prefix`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from seedtune.common.kernels import rows_position_invariant
from seedtune.common.perturb import Perturbation
from seedtune.common.prefix import PrefixCache, Recording, RecordingStore, row_keys
from seedtune.common.trainable import DirectionField, TrainableSet
from torch import nn

PerExampleLoss = Callable[[nn.Module, dict], torch.Tensor]


def micro_batch_for(expected_batch: float) -> int:
    """A micro-batch size from public values only (the expected batch q N): the power of two at
    or below half of it, in [1, 64]. Measured on the 2-core CPU against one dynamically padded
    batch: the default preset (q N = 34, m = 16) 0.9x; the tiny preset (q N = 80, m = 32) about
    2x, where alone (m = 1) costs 55x, its passes being all fixed overhead."""
    size = 1
    while size * 2 <= min(expected_batch / 2, 64):
        size *= 2
    return size


def safe_micro_batch(micro_batch: int, model: nn.Module) -> int:
    """``micro_batch``, or 1 (each example alone, independent by construction) when the model
    computes on a CPU whose kernels are known not to give a row the same bits at every position
    of a batch (:func:`~seedtune.common.kernels.rows_position_invariant`)."""
    if micro_batch == 1 or next(model.parameters()).device.type != "cpu" or rows_position_invariant() is not False:
        return micro_batch
    warnings.warn("this process's MKL does not run in strict reproducibility mode (MKL_CBWR=AUTO,STRICT was not "
                  "in effect before its first call), so a row's bits could depend on its neighbours in a "
                  "micro-batch; each example is computed alone instead (slower, independent by construction)",
                  KernelWarning, stacklevel=2)
    return 1


class KernelWarning(UserWarning):
    """Fixed-shape micro-batches are not safe on this process's kernels; examples run alone."""


class ExampleEncoder(Protocol):
    """What turns raw examples into batches whose shapes depend on no other example (``Task``)."""

    def encode_fixed(self, texts: list[str], labels: list[int], micro_batch: int) -> list[tuple[dict, list[int]]]: ...


@dataclass(frozen=True)
class Estimate:
    """Per-example differences (B x K, float64) and the batch's mean loss (local only), the mean
    of the perturbed losses: within O(beta^2) of the loss at theta."""

    differences: torch.Tensor
    loss: float


class ZerothOrderEstimator:
    """Two-point per-example differences of ``loss_fn`` along seed-keyed directions.

    ``micro_batch``: how :meth:`estimate_examples` groups examples (see the module docstring).
    ``keep_prefix_mib``: how much memory may hold examples' prefix outputs across calls
    (:class:`~seedtune.common.prefix.RecordingStore`); 0 computes the prefix afresh every call.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: PerExampleLoss,
        trainable: TrainableSet,
        directions: DirectionField,
        *,
        cache_prefix: bool = True,
        micro_batch: int = 1,
        keep_prefix_mib: float = 0,
    ):
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch} must be at least 1")
        self.model = model
        self.loss_fn = loss_fn
        self.micro_batch = micro_batch
        self.perturbation = Perturbation(model, trainable, directions)
        self.prefix = PrefixCache(model, trainable) if cache_prefix else None
        self.store = RecordingStore(int(keep_prefix_mib * 2**20)) if cache_prefix and keep_prefix_mib > 0 else None

    @torch.no_grad()
    def estimate_examples(
        self, task: ExampleEncoder, texts: Sequence[str], labels: Sequence[int], probe_seeds: Sequence[int],
        beta: float, micro_batch: int | None = None,
    ) -> Estimate:
        """s_ik for every example (text_i, label_i) and every probe seed, row i in the order given;
        each row's bits do not depend on which other examples are given. The estimate whose rows a
        silo clips and releases. ``micro_batch``: this call's grouping (default: the estimator's);
        it must come from public values only, never from the sample."""
        batches = task.encode_fixed(list(texts), list(labels), micro_batch or self.micro_batch)
        return self._estimate(batches, len(texts), probe_seeds, beta)

    @torch.no_grad()
    def keep_prefixes(self, task: ExampleEncoder, texts: Sequence[str], labels: Sequence[int],
                      micro_batch: int | None = None) -> bool:
        """Compute and keep these examples' prefix outputs now, in the micro-batches of
        ``micro_batch`` rows a step forms, so that steps which sample them only replay them.
        A step that meets an example not kept computes its whole micro-batch, so without this a
        store fills slowly: a micro-batch of m rows is replayed only once all m were seen.
        False when nothing more can be kept (no store, or it is full)."""
        if self.store is None:
            return False
        for batch, _ in task.encode_fixed(list(texts), list(labels), micro_batch or self.micro_batch):
            if self.store is None or not self.store.has_room(len(next(iter(batch.values())))):
                return False
            self._record(batch)
            if not self.prefix.modules:
                return False  # nothing is frozen ahead of the trainable coordinates: nothing to keep
        return self.store is not None

    @torch.no_grad()
    def estimate(self, batch: dict, batch_size: int, probe_seeds: Sequence[int], beta: float) -> Estimate:
        """s_ik for every example of one encoded ``batch`` (``batch_size`` rows). The rows depend
        on the batch's padding and size, so they are not fit for release: a silo calls
        :meth:`estimate_examples`."""
        return self._estimate([(batch, list(range(batch_size)))] if batch_size else [], batch_size, probe_seeds, beta)

    def _estimate(self, batches: list[tuple[dict, list[int]]], size: int, probe_seeds: Sequence[int],
                  beta: float) -> Estimate:
        """``batches``: each with the rows of the result its first rows go to (the rest: filler)."""
        differences = torch.zeros(size, len(probe_seeds), dtype=torch.float64)
        if size == 0:
            return Estimate(differences, float("nan"))
        recordings = [self._record(batch) for batch, _ in batches]
        loss_sum = 0.0
        for k, seed in enumerate(probe_seeds):
            losses = []
            for shift in (beta, -beta):
                loss = torch.empty(size, dtype=torch.float64)
                with self.perturbation.shifted(seed, shift):
                    for (batch, rows), recording in zip(batches, recordings):
                        loss[rows] = self._loss(batch, recording)[: len(rows)].to(torch.float64).cpu()
                losses.append(loss)
            plus, minus = losses
            differences[:, k] = (plus - minus) / (2.0 * beta)
            loss_sum += float((plus + minus).mean()) / 2.0
        return Estimate(differences, loss_sum / len(probe_seeds))

    def _record(self, batch: dict) -> Recording | None:
        """The frozen prefix's outputs on ``batch``, computed once at theta (None: no prefix)."""
        prefix = self.prefix
        if prefix is None:
            return None
        if prefix.modules is None:
            prefix.trace(lambda: self.loss_fn(self.model, batch))
        if not prefix.modules:
            return None
        if self.store is None:
            return prefix.record(lambda: self.loss_fn(self.model, batch))
        keys = row_keys(batch)
        kept = self.store.lookup(keys)
        if kept is not None:
            return kept
        # Computed in the very batch a step formed, so a row's bits are the same whichever way it
        # is reached (the position invariance micro-batches rely on), never in a smaller batch
        # whose size would depend on which rows happened to be kept.
        recording = prefix.record(lambda: self.loss_fn(self.model, batch))
        if not self.store.keep(keys, recording):
            self.store = None  # outputs without a row per example: computed per batch from now on
        return recording

    def _loss(self, batch: dict, recording: Recording | None) -> torch.Tensor:
        replay = contextlib.nullcontext() if recording is None else self.prefix.replaying(recording)
        with replay:
            return self.loss_fn(self.model, batch)
