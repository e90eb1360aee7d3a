"""The coordinator of a run: plans each step, aggregates the replies, logs and applies the update.

It never sees data: it picks the public direction seeds and the schedule's values, combines the
silos' released scalars (mean weighted by expected batch size), commits the step to the update
log and only then applies it to its model.
"""

from __future__ import annotations

from collections.abc import Sequence

from seedtune.common.protocol import TrainReply, TrainRequest, probe_seeds
from seedtune.common.schedule import Schedule
from seedtune.common.updatelog import StepRecord, UpdateApplier, UpdateLog


class Coordinator:
    def __init__(
        self,
        *,
        run_id: str,
        run_seed: int,
        probes: int,
        schedule: Schedule,
        clip_bound: float,
        noise_multiplier: float,
        sample_rate: float,
        log: UpdateLog,
        applier: UpdateApplier,
    ):
        self.run_id = run_id
        self.run_seed = run_seed
        self.probes = probes
        self.schedule = schedule
        self.clip_bound = clip_bound
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.log = log
        self.applier = applier

    @property
    def step(self) -> int:
        """The next step to run (= steps applied)."""
        return self.applier.version

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.steps

    def request(self) -> TrainRequest:
        plan = self.schedule.plan(self.step)
        return TrainRequest(
            run_id=self.run_id,
            round=self.step,
            model_version=self.applier.version,
            probe_seeds=probe_seeds(self.run_seed, self.step, self.probes),
            beta=plan.beta,
            clip_bound=self.clip_bound,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
        )

    def apply(self, request: TrainRequest, replies: Sequence[TrainReply]) -> StepRecord:
        """Aggregate, commit the step to the log, then update the model."""
        if not replies:
            raise ValueError(f"round {request.round}: no replies to aggregate")
        weight = sum(reply.expected_batch_size for reply in replies)
        grads = tuple(
            sum(reply.expected_batch_size * reply.projected_grads[k] for reply in replies) / weight
            for k in range(len(request.probe_seeds))
        )
        plan = self.schedule.plan(request.round)
        record = StepRecord(
            step=request.round,
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
