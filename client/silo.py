"""A silo: private data, its own ledger, and the answer to a training request.

The private step reads top to bottom: sample -> estimate -> clip -> sum -> record -> noise ->
scale. Only the released scalars leave; the batch loss stays with the silo (``last_loss``).

A request the silo has already answered (same run, step and request digest; the values are in its
ledger) is answered again with the same values: a coordinator that crashed before logging the
step learns nothing new, and the silo is not charged twice.
"""

from __future__ import annotations

import time

import datasets
import numpy as np
from seedtune.common.errors import SeedtuneError
from seedtune.common.estimator import ZerothOrderEstimator, micro_batch_for, safe_micro_batch
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.mechanism import (
    LedgerKey,
    ShareRelease,
    nonprivate_release,
    private_release,
    share_event,
    share_release,
)
from seedtune.common.privacy.randomness import SecretRandomness
from seedtune.common.privacy.sampling import poisson_sample
from seedtune.common.protocol import TrainReply, TrainRequest, request_digest
from seedtune.common.tasks import Task


class ReleaseMismatch(SeedtuneError):
    """A request whose release parameters contradict the run's setup."""


PREFIX_CHUNK = 256  # examples computed ahead between two looks at the clock
# At most this long (past one chunk) computing the prefix ahead in one answer. A large shard's
# first round then stays well inside the coordinator's round timeout (a 10k-example shard took
# 76 s on two busy cores); what is left is computed in the next answers, and a step that samples
# an example not yet kept computes (and keeps) its micro-batch as it always could.
PREFIX_SECONDS = 30.0


class Silo:
    """Answers training requests over a private shard, charging every release to its ledger.

    ``public_size`` is N, the number the release is normalised by (q N): declared by the silo's
    operator, so that the exact number of records never leaves (default: the shard's size, for a
    shard of a public corpus or a local run whose size is not secret).

    ``micro_batch``: how many examples share one forward pass (in fixed shapes: see
    :mod:`seedtune.common.estimator`); 1 computes each example alone, which keeps every other
    example's row the same bits by construction; None picks a size from the public q N."""

    def __init__(
        self,
        task: Task,
        estimator: ZerothOrderEstimator,
        shard: datasets.Dataset,
        randomness: SecretRandomness,
        ledger: PrivacyLedger | None,
        noise: str = "discrete",
        public_size: int | None = None,
        micro_batch: int | None = None,
    ):
        self.task = task
        self.estimator = estimator
        self.shard = shard
        self.randomness = randomness
        self.ledger = ledger  # None: a non-private run, which releases without clipping or noise
        self.noise = noise  # "discrete" (exact lattice noise) or "gaussian" (floating point)
        self.public_size = len(shard) if public_size is None else int(public_size)
        self.micro_batch = micro_batch
        self.last_loss = float("nan")
        self.last_batch_size = 0
        self.last_compute_s = 0.0  # the forward passes of the last answer
        self.last_zeroed = 0  # rows of the last answer that were not finite and counted as zero
        self.last_reused = False  # the last answer repeated a release already made
        self.prefix_seconds = PREFIX_SECONDS
        self._prefix_done: dict[int, int] = {}  # per micro-batch size: the shard's rows computed ahead so far

    def answer(self, request: TrainRequest, digest: str | None = None) -> TrainReply:
        """One step's release. ``digest``: what the ledger keeps it under (default: the request's
        own; a local step's names the round's request and its position in it)."""
        asked = request.release
        self._check_noise(request)
        digest = digest or request_digest(request)
        reused = self._answered(request, digest)
        self.last_reused = reused is not None
        if reused is not None:
            self._nothing_computed()
            return reused
        estimate, chosen = self._estimate(request)
        if self.ledger is None:
            release = nonprivate_release(
                estimate.differences, sample_rate=asked.sample_rate, population=self.public_size
            )
        else:
            release = private_release(estimate.differences, asked, population=self.public_size,
                                      randomness=self.randomness, ledger=self.ledger,
                                      key=LedgerKey(request.step, request.run_id, digest))
        self.last_loss, self.last_batch_size, self.last_zeroed = estimate.loss, len(chosen), release.zeroed
        events = () if release.event is None else (release.event,)
        return TrainReply(
            step=request.step,
            projected_grads=tuple(float(v) for v in release.values),
            expected_batch_size=asked.sample_rate * self.public_size,
            events=events,
        )

    def share(self, request: TrainRequest, honest: int) -> ShareRelease:
        """This silo's part of a securely aggregated step (:func:`share_release`): its lattice
        point plus its share of the noise, in integers, charged as the sum of ``honest`` shares.
        The very request asked again (same participants and attempt) gets the same integers back,
        uncharged; a retried round is a new request, so fresh noise and a new charge."""
        if self.ledger is None:
            raise ReleaseMismatch("secure aggregation sums noised shares: it needs a private run")
        self._check_noise(request)
        digest = request_digest(request)
        previous = self._released(request, digest)
        self.last_reused = previous is not None
        if self.last_reused:
            self._nothing_computed()
            probes = len(request.probe_seeds)
            return ShareRelease(np.array(previous.values, dtype=np.int64), previous.event,
                                share_event(request.release, 1, probes))
        estimate, chosen = self._estimate(request)
        release = share_release(estimate.differences, request.release, honest=honest, randomness=self.randomness,
                                ledger=self.ledger, key=LedgerKey(request.step, request.run_id, digest))
        self.last_loss, self.last_batch_size, self.last_zeroed = estimate.loss, len(chosen), release.zeroed
        return release

    def _check_noise(self, request: TrainRequest) -> None:
        if request.release.noise != self.noise:  # the request and the run's setup must agree, or nothing is released
            raise ReleaseMismatch(f"the request asks for {request.release.noise!r} noise but this run's setup names "
                                  f"privacy.noise={self.noise!r}; nothing was released")

    def _nothing_computed(self) -> None:
        self.last_loss, self.last_batch_size, self.last_compute_s, self.last_zeroed = float("nan"), 0, 0.0, 0

    def _estimate(self, request: TrainRequest):
        """Sample -> estimate: the per-example directional differences, and the rows sampled."""
        asked = request.release
        chosen = poisson_sample(len(self.shard), asked.sample_rate, self.randomness)
        rows = self.shard[chosen] if len(chosen) else {"text": [], "label": []}
        micro_batch = safe_micro_batch(self.micro_batch or micro_batch_for(asked.sample_rate * self.public_size),
                                       self.task.module)
        start = time.perf_counter()
        self._keep_prefixes(micro_batch)
        estimate = self.estimator.estimate_examples(self.task, rows["text"], rows["label"], request.probe_seeds,
                                                    request.beta, micro_batch)
        self.last_compute_s = time.perf_counter() - start
        return estimate, chosen

    def _keep_prefixes(self, micro_batch: int) -> None:
        """The frozen prefix's outputs on the shard, computed ahead in micro-batches of this size
        and kept while the estimator's store has room: in shard order, a chunk at a time, for at
        most ``prefix_seconds`` (past the first chunk) per answer, resuming where the last answer
        stopped. The order and the amount depend on the shard's size and the clock, never on the
        sample."""
        done = self._prefix_done.get(micro_batch, 0)
        deadline = time.perf_counter() + self.prefix_seconds
        while done < len(self.shard):
            rows = self.shard[done : done + PREFIX_CHUNK]
            full = not self.estimator.keep_prefixes(self.task, rows["text"], rows["label"], micro_batch)
            done = len(self.shard) if full else min(len(self.shard), done + PREFIX_CHUNK)
            if time.perf_counter() >= deadline:
                break
        self._prefix_done[micro_batch] = done

    def _released(self, request: TrainRequest, digest: str):
        """The ledger's entry of the release already made for this very request (same digest,
        values kept), or None."""
        if self.ledger is None:
            return None
        previous = self.ledger.answered(request.run_id, request.step)
        if previous is None or previous.request != digest or previous.values is None:
            return None
        return previous

    def _answered(self, request: TrainRequest, digest: str) -> TrainReply | None:
        """The reply already released for this very request, if its values are in the ledger."""
        previous = self._released(request, digest)
        if previous is None:
            return None
        return TrainReply(
            step=request.step,
            projected_grads=tuple(previous.values),
            expected_batch_size=request.release.sample_rate * self.public_size,
            events=(previous.event,),
        )
