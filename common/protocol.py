"""What a coordinator asks of a silo each round, and what the silo answers.

A request carries only public values; a reply carries only the K released scalars and the
privacy events they cost. No weights, no gradients, no per-example values, no losses.
"""

from __future__ import annotations

from dataclasses import dataclass

from seedtune.common.directions import mix_int


@dataclass(frozen=True)
class TrainRequest:
    run_id: str
    round: int  # = the step this round produces
    model_version: int  # steps the silo's model must have applied before answering
    probe_seeds: tuple[int, ...]
    beta: float
    clip_bound: float
    noise_multiplier: float  # 0 when the run is not private
    sample_rate: float


@dataclass(frozen=True)
class TrainReply:
    round: int
    projected_grads: tuple[float, ...]
    expected_batch_size: float  # q * n: the aggregation weight
    events: tuple[dict, ...]  # serialized DP events charged for this reply


def probe_seeds(run_seed: int, step: int, probes: int) -> tuple[int, ...]:
    """The public direction seeds of a step: a pure function of the run seed and the step."""
    root = mix_int(mix_int(run_seed) ^ mix_int(step + 1))
    return tuple(mix_int(root ^ mix_int(k + 1)) >> 1 for k in range(probes))  # 63 bits: JSON/SQLite-safe
