"""A silo: private data, its own ledger, and the answer to a training request.

The private step reads top to bottom: sample -> estimate -> clip -> sum -> record -> noise ->
scale. Only the released scalars leave; the batch loss stays with the silo (``last_loss``).
"""

from __future__ import annotations

import time

import datasets
from seedtune.common.estimator import ZerothOrderEstimator
from seedtune.common.privacy import events as event_codec
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.mechanism import nonprivate_release, private_release
from seedtune.common.privacy.randomness import SecretRandomness
from seedtune.common.privacy.sampling import poisson_sample
from seedtune.common.protocol import TrainReply, TrainRequest
from seedtune.common.tasks import Task


class Silo:
    """Answers training requests over a private shard, charging every release to its ledger."""

    def __init__(
        self,
        task: Task,
        estimator: ZerothOrderEstimator,
        shard: datasets.Dataset,
        randomness: SecretRandomness,
        ledger: PrivacyLedger | None,
        noise: str = "discrete",
    ):
        self.task = task
        self.estimator = estimator
        self.shard = shard
        self.randomness = randomness
        self.ledger = ledger  # None: a non-private run, which releases without clipping or noise
        self.noise = noise  # "discrete" (exact lattice noise) or "gaussian" (floating point)
        self.last_loss = float("nan")
        self.last_batch_size = 0
        self.last_compute_s = 0.0  # the forward passes of the last answer

    def answer(self, request: TrainRequest) -> TrainReply:
        population = len(self.shard)
        chosen = poisson_sample(population, request.sample_rate, self.randomness)
        rows = self.shard[chosen] if len(chosen) else {"text": [], "label": []}
        batch = self.task.encode(rows["text"], rows["label"]) if len(chosen) else {}
        start = time.perf_counter()
        estimate = self.estimator.estimate(batch, len(chosen), request.probe_seeds, request.beta)
        self.last_compute_s = time.perf_counter() - start
        if self.ledger is None:
            release = nonprivate_release(
                estimate.differences, sample_rate=request.sample_rate, population=population
            )
        else:
            release = private_release(
                estimate.differences,
                clip_bound=request.clip_bound,
                noise_multiplier=request.noise_multiplier,
                sample_rate=request.sample_rate,
                population=population,
                randomness=self.randomness,
                ledger=self.ledger,
                round=request.round,
                noise=self.noise,
            )
        self.last_loss, self.last_batch_size = estimate.loss, len(chosen)
        events = () if release.event is None else (event_codec.event_to_dict(release.event),)
        return TrainReply(
            round=request.round,
            projected_grads=tuple(float(v) for v in release.values),
            expected_batch_size=request.sample_rate * population,
            events=events,
        )
