"""What a coordinator asks of a silo each round, and what the silo answers.

A request carries only public values; a reply carries only the K released scalars and the
privacy events they cost. No weights, no gradients, no per-example values, no losses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import dp_accounting

from seedtune.common.directions import mix_int

# The smallest ZO scale a silo accepts unless its operator lowers it (node config min-beta): below
# it, a float32 finite difference is mostly rounding (client/limits.py says why it is a floor).
MIN_BETA = 1e-4


NOISES = ("discrete", "gaussian")  # privacy.noise: exact lattice noise, or floating-point Gaussian


@dataclass(frozen=True)
class ReleaseParameters:
    """How a silo is asked to release: one object, so that every value is checked together (the
    silo refuses a noise kind other than its run's setup names, and its limits bound the rest)."""

    clip_bound: float  # C: each example's row is clipped to L2 norm C
    noise_multiplier: float  # sigma, a multiple of C (never a standard deviation); 0 when not private
    sample_rate: float  # q: each example joins the batch independently with probability q
    noise: str = "discrete"  # one of NOISES


@dataclass(frozen=True)
class LocalStep:
    """One of the steps a silo takes on its own shard in a round with local steps: the schedule's
    public values for it; the silo's own released scalars complete it into its local update."""

    step: int
    stage: int
    probe_seeds: tuple[int, ...]
    lr: float
    beta: float
    prox: float
    anchor_step: int


@dataclass(frozen=True)
class Participant:
    """One silo of a securely aggregated round, as every participant must see it: its name, its
    masking public key for the run (X25519, raw), that key's signature by its operator's roster
    key (empty when unsigned), and the public size its release is normalised by."""

    name: str
    public: bytes
    signature: bytes
    public_size: int


@dataclass(frozen=True)
class SecureRound:
    """Secure aggregation's part of a request: who takes part, the modulus 2^bits of the masked
    replies, the attempt (a retried round masks and noises afresh, and is charged again), and t,
    the honest participants the share multiplier was calibrated for."""

    attempt: int
    bits: int
    honest: int
    participants: tuple[Participant, ...]

    @property
    def names(self) -> list[str]:
        return [participant.name for participant in self.participants]

    def context(self, run_id: str, step: int) -> bytes:
        """What binds a round's masks: the run, the step and the attempt (never two replies)."""
        return f"{run_id}/{step}/{self.attempt}".encode()


@dataclass(frozen=True)
class TrainRequest:
    run_id: str
    step: int  # the step this request contributes to: the silo answers on the model after exactly `step` steps
    probe_seeds: tuple[int, ...]
    beta: float
    release: ReleaseParameters
    # federation.local_steps > 1: the round's steps, ``step`` first. The silo releases K scalars for
    # each in turn, moving its own copy of the model by its own released scalars in between
    # (each step sampled and charged as its own release), then returns to the round's model.
    local: tuple[LocalStep, ...] = ()
    secure: SecureRound | None = None  # federation.secure_aggregation: the masked round's participants

    @property
    def steps(self) -> int:
        """How many steps this request asks scalars for (K each)."""
        return len(self.local) or 1

    def one_step(self, position: int) -> TrainRequest:
        """The request for the round's ``position``-th step alone (what the silo releases for it)."""
        if not self.local:
            return self
        local = self.local[position]
        return TrainRequest(self.run_id, local.step, local.probe_seeds, local.beta, self.release)


@dataclass(frozen=True)
class EvaluationRequest:
    """Accuracy counts on a silo's own held-out data, for the model after ``step`` steps."""

    run_id: str
    step: int  # the silo evaluates the model after exactly `step` steps
    private: bool  # noised and charged; False asks for exact counts, which a silo gives only if allowed
    noise_std: float  # per count, when private: charged as noise multiplier noise_std / sqrt 2


@dataclass(frozen=True)
class TrainReply:
    step: int  # the request's step: the silo answered on the model after exactly this many steps
    projected_grads: tuple[float, ...]  # empty under secure aggregation
    expected_batch_size: float  # q * n: the aggregation weight
    events: tuple[dp_accounting.DpEvent, ...]  # the DP events charged for this reply (the wire serialises them)
    # Secure aggregation: the masked integers mod 2^bits (K of them), and what the release costs
    # this silo if every other party colludes (its own share alone; charged: ``events``).
    masked: tuple[int, ...] = ()
    collusion: tuple[dp_accounting.DpEvent, ...] = ()


def probe_seeds(run_seed: int, step: int, probes: int) -> tuple[int, ...]:
    """The public direction seeds of a step: a pure function of the run seed and the step."""
    root = mix_int(mix_int(run_seed) ^ mix_int(step + 1))
    return tuple(mix_int(root ^ mix_int(k + 1)) >> 1 for k in range(probes))  # 63 bits: JSON/SQLite-safe


def request_digest(request: TrainRequest | EvaluationRequest, kind: str = "train") -> str:
    """A digest of everything a request asks: the same digest means the same question, which a
    silo may answer again with the same release instead of a new one."""
    fields = asdict(request)
    if not fields.get("local", True):
        del fields["local"]  # one step per round: the digest it always had
    if fields.get("secure", 0) is None:
        del fields["secure"]  # likewise without secure aggregation
    text = json.dumps({"kind": kind, **fields}, sort_keys=True, default=lambda value: value.hex())
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
