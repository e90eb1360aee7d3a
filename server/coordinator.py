"""The coordinator of a run: plans each step, aggregates the replies, logs and applies the update.

It never sees data: it picks the public direction seeds and the schedule's values, combines the
silos' released scalars (``federation.aggregation``: the mean weighted by expected batch size,
the median or the trimmed mean; see ``common/aggregation.py``), commits the step to the update
log and only then applies it to its model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from seedtune.common.errors import SeedtuneError
from seedtune.common.protocol import ReleaseParameters, TrainReply, TrainRequest, probe_seeds
from seedtune.common.schedule import Schedule
from seedtune.common.updatelog import StepRecord, UpdateApplier, UpdateLog
from seedtune.common.aggregation import RuleCost, aggregate, describe, rule_named


class NonFiniteStep(SeedtuneError):
    """Finite replies whose aggregate is not finite (a mean of values near the float64 limit)."""


class Coordinator:
    def __init__(
        self,
        *,
        run_id: str,
        run_seed: int,
        probes: int,
        schedule: Schedule,
        release: ReleaseParameters,
        log: UpdateLog,
        applier: UpdateApplier,
        aggregation: str = "mean",
        trim: float = 0.2,
    ):
        rule_named(aggregation)  # fails here, not at the first round
        self.run_id = run_id
        self.run_seed = run_seed
        self.probes = probes
        self.schedule = schedule
        self.release = release  # the same for every round of the run
        self.log = log
        self.applier = applier
        self.aggregation = aggregation
        self.trim = trim

    @property
    def step(self) -> int:
        """The next step to run (= steps applied)."""
        return self.applier.step

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.steps

    def request(self) -> TrainRequest:
        plan = self.schedule.plan(self.step)
        return TrainRequest(
            run_id=self.run_id,
            step=self.step,
            probe_seeds=probe_seeds(self.run_seed, self.step, self.probes),
            beta=plan.beta,
            release=self.release,
        )

    def apply(self, request: TrainRequest, replies: Sequence[TrainReply]) -> StepRecord:
        """Aggregate, commit the step to the log, then update the model."""
        if not replies:
            raise ValueError(f"step {request.step}: no replies to aggregate")
        grads = aggregate(self.aggregation, [reply.projected_grads for reply in replies],
                          [reply.expected_batch_size for reply in replies], self.trim)
        if not all(math.isfinite(g) for g in grads):  # refused before the log: nothing half-applied
            raise NonFiniteStep(
                f"step {request.step}: the {self.aggregation} of the replies is not finite (a silo sent "
                "scalars near the float64 limit); the step was not logged or applied. "
                "federation.aggregation='trimmed-mean' or 'median' bounds what one silo can do")
        plan = self.schedule.plan(request.step)
        record = StepRecord(
            step=request.step,
            stage=plan.stage,
            probe_seeds=request.probe_seeds,
            projected_grads=grads,
            lr=plan.lr,
            beta=plan.beta,
            prox=plan.prox,
            anchor_step=plan.anchor_step,
        )
        self.log.append(record)  # durable first: the step counts once it is in the log
        self.applier.apply(record)
        return record

    def cost(self, replies: Sequence[TrainReply]) -> RuleCost:
        """The sensitivity and noise of this round's aggregate, for these replies' silos."""
        return describe(self.aggregation, [reply.expected_batch_size for reply in replies],
                        clip_bound=self.release.clip_bound, noise_multiplier=self.release.noise_multiplier,
                        trim=self.trim)
