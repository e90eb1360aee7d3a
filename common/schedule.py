"""Step-size, ZO-scale and proximal schedules: DPZero's constant one and DP-ZOSO's stagewise one.

DP-ZOSO (Liu et al., arXiv 2402.07818) splits training into S stages whose lengths double
(T0, 2 T0, 4 T0, ...). At each stage boundary the step size halves, the ZO scale beta moves
geometrically from beta_start to beta_end, and the proximal anchor theta_k is reset to the current
model; within stage k the objective is f(theta) + (lambda / 2) ||theta - theta_k||^2.
The constant schedule with lambda = 0 is DPZero (Zhang et al., arXiv 2310.09639).

Given a total of T steps, stage k covers steps [b_k, b_{k+1}) with
b_k = round(T (2^k - 1) / (2^S - 1)), so the stages double in length and sum to T exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """What the schedule prescribes for one step (0-based)."""

    step: int
    stage: int
    lr: float
    beta: float
    prox: float
    anchor_step: int  # the step whose starting model is the proximal anchor (stage start)

    @property
    def resets_anchor(self) -> bool:
        return self.prox > 0 and self.anchor_step == self.step


@dataclass(frozen=True)
class ConstantSchedule:
    """DPZero: the same step size and ZO scale for all ``steps`` steps, no proximal term."""

    steps: int
    lr: float
    beta: float

    def plan(self, step: int) -> StepPlan:
        _check_step(step, self.steps)
        return StepPlan(step, 0, self.lr, self.beta, 0.0, 0)

    def stage_starts(self) -> list[int]:
        return [0]


@dataclass(frozen=True)
class StagewiseSchedule:
    """DP-ZOSO: ``stages`` stages of doubling length over ``steps`` steps in all."""

    steps: int
    stages: int
    lr: float
    beta_start: float
    beta_end: float
    prox: float

    def stage_starts(self) -> list[int]:
        whole = (1 << self.stages) - 1
        return [round(self.steps * ((1 << k) - 1) / whole) for k in range(self.stages)]

    def stage_of(self, step: int) -> int:
        starts = self.stage_starts()
        return max(k for k, start in enumerate(starts) if start <= step)

    def plan(self, step: int) -> StepPlan:
        _check_step(step, self.steps)
        k = self.stage_of(step)
        fraction = k / (self.stages - 1) if self.stages > 1 else 0.0
        beta = self.beta_start * (self.beta_end / self.beta_start) ** fraction
        return StepPlan(step, k, self.lr / (1 << k), beta, self.prox, self.stage_starts()[k])


Schedule = ConstantSchedule | StagewiseSchedule


def _check_step(step: int, steps: int) -> None:
    if not 0 <= step < steps:
        raise IndexError(f"step {step} outside the schedule's {steps} steps")
