"""The coordinator of a run: plans each step, aggregates the replies, logs and applies the update.

It never sees data: it picks the public direction seeds and the schedule's values, combines the
silos' released scalars (``federation.aggregation``: the mean weighted by expected batch size,
the median or the trimmed mean; see ``common/aggregation.py``), commits the step to the update
log and only then applies it to its model.

With ``local_steps`` = tau > 1 a round asks for tau steps: each silo takes them on its own shard,
from the round's model along its own trajectory (client/node.py), and returns tau x K scalars.
The coordinator combines them step by step (the scalars of one shared seed, across silos), logs
the tau steps in one transaction and applies them: everyone rebuilds the same model from the log.
The silos' scalars for step j > 0 were measured at their own models, not at the model the log
applies them to; that drift is what local steps trade for fewer rounds (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from seedtune.common.errors import SeedtuneError
from seedtune.common.privacy.mechanism import lattice_step
from seedtune.common.protocol import LocalStep, ReleaseParameters, TrainReply, TrainRequest, probe_seeds
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
        local_steps: int = 1,
    ):
        rule_named(aggregation)  # fails here, not at the first round
        if local_steps < 1:
            raise ValueError(f"local_steps={local_steps} must be >= 1")
        self.local_steps = local_steps
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
        request = TrainRequest(
            run_id=self.run_id,
            step=self.step,
            probe_seeds=probe_seeds(self.run_seed, self.step, self.probes),
            beta=plan.beta,
            release=self.release,
        )
        steps = min(self.local_steps, self.schedule.steps - self.step)
        if steps == 1:
            return request  # one step per round: the request it always was
        return dataclasses.replace(request, local=tuple(self._local(step) for step in range(self.step, self.step + steps)))

    def _local(self, step: int) -> LocalStep:
        plan = self.schedule.plan(step)
        return LocalStep(step, plan.stage, probe_seeds(self.run_seed, step, self.probes), plan.lr, plan.beta,
                         plan.prox, plan.anchor_step)

    def apply(self, request: TrainRequest, replies: Sequence[TrainReply]) -> list[StepRecord]:
        """Aggregate step by step, commit the round's steps to the log, then update the model."""
        if not replies:
            raise ValueError(f"step {request.step}: no replies to aggregate")
        weights = [reply.expected_batch_size for reply in replies]
        aggregated = []
        for position in range(request.steps):
            width = len(request.probe_seeds)
            scalars = [reply.projected_grads[position * width:(position + 1) * width] for reply in replies]
            aggregated.append(aggregate(self.aggregation, scalars, weights, self.trim))
        return self.commit(request, aggregated)

    def apply_sum(self, request: TrainRequest, total: np.ndarray, weight: float) -> list[StepRecord]:
        """Secure aggregation: the round's step from the unmasked sum of the participants' releases
        (integers in lattice units) and their summed q N; the weighted mean of the replies that
        :meth:`apply` computes, had the coordinator seen them one by one."""
        if request.steps != 1:
            raise ValueError("secure aggregation takes one step a round")
        step = lattice_step(self.release.clip_bound)  # exact: a power of two
        return self.commit(request, [tuple(float(v) for v in total.astype(np.float64) * step / weight)])

    def commit(self, request: TrainRequest, aggregated: Sequence[Sequence[float]]) -> list[StepRecord]:
        """The round's steps (one aggregate of K scalars each) into the log, then into the model."""
        records = []
        for position, grads in enumerate(aggregated):
            asked = request.one_step(position)
            if not all(math.isfinite(g) for g in grads):  # refused before the log: nothing half-applied
                raise NonFiniteStep(
                    f"step {asked.step}: the {self.aggregation} of the replies is not finite (a silo sent "
                    "scalars near the float64 limit); the round was not logged or applied. "
                    "federation.aggregation='trimmed-mean' or 'median' bounds what one silo can do")
            plan = self.schedule.plan(asked.step)
            records.append(StepRecord(step=asked.step, stage=plan.stage, probe_seeds=asked.probe_seeds,
                                      projected_grads=tuple(grads), lr=plan.lr, beta=plan.beta, prox=plan.prox,
                                      anchor_step=plan.anchor_step))
        self.log.extend(records)  # durable first: the steps count once they are in the log
        self.applier.apply_all(records)
        return records

    def cost(self, replies: Sequence[TrainReply]) -> RuleCost:
        """The sensitivity and noise of this round's aggregate, for these replies' silos."""
        return describe(self.aggregation, [reply.expected_batch_size for reply in replies],
                        clip_bound=self.release.clip_bound, noise_multiplier=self.release.noise_multiplier,
                        trim=self.trim)
