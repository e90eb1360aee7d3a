"""A silo's durable node: its run setups, its model replica, its ledger, and its answers.

State directory layout (the node's own disk; nothing here leaves it):

    <state>/ledger.sqlite                  every release this silo ever made, and its budget
    <state>/runs/<run_id>/replica.sqlite   the run's setup and the updates applied, in order
    <state>/runs/<run_id>/checkpoint.pt    trainable coordinates received instead of a replay
    <state>/timings.jsonl                  per request: seconds catching up, in forward passes, in all

The model is rebuilt from the base model, the checkpoint (if any) and the replica's records, so a
restarted node comes back to the exact model it had, and its ledger still binds it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import dp_accounting
from seedtune.client.limits import Limits, RequestRefused
from seedtune.client.placement import CPU_FLOAT32, Placement
from seedtune.client.secure import SecureSettings, check_round, masking_key, own_participant
from seedtune.client.silo import Silo
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.errors import SeedtuneError
from seedtune.common.estimator import ZerothOrderEstimator, safe_micro_batch
from seedtune.common.models import fingerprint
from seedtune.common.paths import LEDGER_FILE
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.mechanism import LedgerKey, NoiseMechanism, private_counts, share_event
from seedtune.common.privacy.randomness import SecretRandomness
from seedtune.common.protocol import EvaluationRequest, Participant, TrainReply, TrainRequest, request_digest
from seedtune.common.secagg import mask
from seedtune.common.tasks import evaluate
from seedtune.common.updatelog import Checkpoint, StepRecord, UpdateApplier, UpdateLog
from seedtune.common.wire import Setup, Sync

log = logging.getLogger(__name__)

ShardLoader = Callable[[Config, tuple[str, ...], str], datasets.Dataset]  # (config, label names, split) -> shard


CHECKPOINT_EVERY = 50  # steps between a replica's own checkpoints
TIMINGS_FILE = "timings.jsonl"


class SyncError(SeedtuneError):
    """The silo cannot reach the model (the step) a request needs."""


class _Run:
    """One run's model replica on this node."""

    def __init__(self, directory: Path, setup: Setup | None, where: Placement = CPU_FLOAT32):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "replica.sqlite"
        if path.exists():
            self.log = UpdateLog.open(path)
        elif setup is None:
            raise SyncError("this silo has no setup for the run; the coordinator must send it")
        else:
            numels = {name: 0 for name in setup.mask}
            self.log = UpdateLog.create(path, config=setup.config, base=setup.base, mask=setup.mask, numels=numels)
            self.log.set_meta("run_id", setup.run_id)
        self.directory = directory
        self.config = Config.from_dict(self.log.config)
        self.label_names = tuple(self.log.base["label_names"])
        self.task = components.load_model(self.config, self.label_names, self.log.base)
        if fingerprint(self.task.module) != self.log.base["fingerprint"]:
            raise SyncError(f"this silo's base model {self.config.model.name!r} differs from the coordinator's")
        if not where.default:  # checked as float32 on the CPU, then moved (client/placement.py)
            self.task.module.to(device=where.device, dtype=where.dtype)
        self.parts = components.model_parts(self.config, self.task, self.log.mask())
        self.applier = UpdateApplier(self.parts.trainable, self.parts.directions)
        checkpoint = directory / "checkpoint.pt"
        self._first_step = self.log.first_step
        start = 0
        if checkpoint.exists():
            start = self._restore(Checkpoint.load(checkpoint))
        self._checkpointed = start
        self.applier.apply_all(list(self.log.steps(start)))
        self.estimator = ZerothOrderEstimator(
            self.task.module, self.task.per_example_loss, self.parts.trainable, self.parts.directions,
            keep_prefix_mib=self.config.zo.keep_prefix_mib,
        )

    @property
    def step(self) -> int:
        """The steps this replica has applied."""
        return self.applier.step

    def _restore(self, checkpoint: Checkpoint) -> int:
        self.applier = checkpoint.restore(self.parts.trainable, self.parts.directions)
        return checkpoint.step

    def refresh(self) -> bool:
        """Apply steps another process serving this silo logged; False if it must be rebuilt
        (the replica restarted from a checkpoint meanwhile)."""
        if self.log.first_step != self._first_step:
            return False
        self.applier.apply_all(list(self.log.steps(self.step)))
        return True

    def _save_checkpoint(self, checkpoint: Checkpoint) -> None:
        checkpoint.save(self.directory / "checkpoint.pt")
        self._checkpointed = checkpoint.step

    def checkpoint_now(self) -> None:
        """Keep the replica's own checkpoint near its head: Flower's deployment engine starts a
        fresh ClientApp process for every message, and each would otherwise replay the whole log."""
        self._save_checkpoint(Checkpoint.of(self.parts.trainable, self.applier))

    def catch_up(self, sync: Sync) -> None:
        if sync.checkpoint is not None and sync.checkpoint.step > self.step:
            self._save_checkpoint(sync.checkpoint)
            self.log.restart_at(sync.checkpoint.step)
            self._first_step = self.log.first_step
            self._restore(sync.checkpoint)
        if sync.start_step > self.step:
            raise SyncError(f"updates start at step {sync.start_step} but this silo's model has {self.step} steps")
        # Durable before any is applied; steps another process serving this silo logged are kept.
        self.log.extend([record for record in sync.records if record.step >= self.log.next_step])
        self.applier.apply_all([record for record in sync.records if record.step >= self.step])
        if self.step - self._checkpointed >= CHECKPOINT_EVERY:
            self.checkpoint_now()


class SiloNode:
    """Answers a coordinator's requests for one silo, from its state directory.

    ``budget``: (epsilon, delta, accountant), the silo's own; without it a private run takes the
    budget from the run's setup, which only a silo whose operator runs the coordinator too may do
    (``budget_required=False``: ``seedtune simulate``). ``public_size``: N of the release's q N,
    the operator's declared size (default: the shard's size). ``randomness``: for tests only, a
    factory of the sampling and noise source (default: the OS's CSPRNG, or public sampling for a
    non-private run); nothing a coordinator sends can choose it. ``micro_batch``: examples per
    fixed-shape forward pass (:class:`~seedtune.client.silo.Silo`). ``where``: the device and
    precision the model computes in (client/placement.py)."""

    def __init__(
        self,
        state_dir: str | Path,
        shard: ShardLoader,
        *,
        budget: tuple[float, float, str] | None = None,
        partition: int | None = None,
        name: str | None = None,
        limits: Limits | None = None,
        public_size: int | None = None,
        budget_required: bool = False,
        randomness: Callable[[], SecretRandomness] | None = None,
        micro_batch: int | None = None,
        where: Placement = CPU_FLOAT32,
        secure: SecureSettings | None = None,
    ):
        self.state_dir = Path(state_dir)
        self.secure = secure or SecureSettings()  # client/secure.py: the operator's secure-aggregation settings
        self.where = where
        self.limits = limits or Limits()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._shard_loader = shard
        self._budget = budget
        self._budget_required = budget_required
        self._public_size = public_size
        self._randomness = randomness
        self._micro_batch = micro_batch  # None: from the public q N; 1: each example alone
        self.partition = partition
        self.name = name or (f"partition-{partition}" if partition is not None else self.state_dir.name)
        self._runs: dict[str, _Run] = {}
        self._silos: dict[str, Silo] = {}
        self.ledger: PrivacyLedger | None = None

    def run(self, run_id: str, setup: Setup | None = None) -> _Run:
        if run_id in self._runs and not self._runs[run_id].refresh():
            self._runs.pop(run_id).log.close()  # rebuilt below, from the checkpoint
            self._silos.pop(run_id, None)
        if run_id not in self._runs:
            if setup is not None and setup.run_id != run_id:
                raise SyncError("setup is for another run")
            self._runs[run_id] = _Run(self.state_dir / "runs" / _safe(run_id), setup, self.where)
        return self._runs[run_id]

    def answer(self, request: TrainRequest, sync: Sync) -> TrainReply:
        """Catch up, then sample -> estimate -> clip -> sum -> record -> noise -> scale."""
        start = time.perf_counter()
        run = self.run(request.run_id, sync.setup)
        for position in range(request.steps):  # every step within the limits, before anything is drawn
            self.limits.check_training(request.one_step(position), private=run.config.privacy.enabled,
                                       noise=run.config.privacy.noise)
        run.catch_up(sync)
        caught_up = time.perf_counter()
        if run.step != request.step:
            raise SyncError(f"asked to answer after {request.step} steps, but this silo's model has {run.step}")
        silo = self._silo(request.run_id, run)
        if request.secure is not None:
            reply = self._answer_securely(run, silo, request)
        else:
            if silo.ledger is not None:  # refused here costs nothing; the ledger checks again as it charges
                asked = request.release
                mechanism = NoiseMechanism.for_release(silo.noise, asked.noise_multiplier, asked.clip_bound)
                self.limits.admit(mechanism.event(asked.sample_rate), 0)
            reply = self._answer_locally(run, silo, request) if request.local else silo.answer(request)
        self._record_timing(request.step, {
            "setup_and_catch_up_s": caught_up - start, "forward_s": silo.last_compute_s,
            "total_s": time.perf_counter() - start, "replayed": len(sync.records), "zeroed": silo.last_zeroed,
            "reused": silo.last_reused})
        return reply

    def participant(self, run_id: str, sync: Sync) -> Participant:
        """How this silo takes part in the run's secure rounds: its masking key (made once per run
        and kept), signed if its operator gave it a signing key, and its public size."""
        run = self.run(run_id, sync.setup)
        silo = self._silo(run_id, run)
        return own_participant(self.name, masking_key(self.state_dir, run_id), self.secure, run_id, silo.public_size)

    def _answer_securely(self, run: _Run, silo: Silo, request: TrainRequest) -> TrainReply:
        """A secure round: every check first (participants, keys, bits, limits; refused costs
        nothing), then this silo's share release, masked with every peer's pairwise mask."""
        if request.local:
            raise SyncError("secure aggregation takes one step a round (federation.local_steps=1)")
        key = masking_key(self.state_dir, request.run_id)
        own = own_participant(self.name, key, self.secure, request.run_id, silo.public_size)
        peers = check_round(request, own, self.secure, deployed=self._budget_required)
        honest = int(self.secure.honest)
        probes = len(request.probe_seeds)
        self.limits.admit(share_event(request.release, honest, probes), 0)  # the ledger checks again as it charges
        release = silo.share(request, honest)
        secure = request.secure
        masked = mask(release.units, own=self.name, key=key, peers=peers,
                      context=secure.context(request.run_id, request.step), bits=secure.bits)
        return TrainReply(request.step, (), request.release.sample_rate * silo.public_size, (release.event,),
                          tuple(int(v) for v in masked), (release.collusion,))

    @staticmethod
    def _answer_locally(run: _Run, silo: Silo, request: TrainRequest) -> TrainReply:
        """A round of local steps: a release for each step in turn, each at the model the silo's
        own earlier releases moved it to; then the replica returns to the round's model exactly
        (its values were copied, not recomputed), to apply the steps the coordinator aggregates."""
        round_model = Checkpoint.of(run.parts.trainable, run.applier)
        digest = request_digest(request)
        grads, events, compute = [], [], 0.0
        try:
            for position, local in enumerate(request.local):
                part = silo.answer(request.one_step(position), digest=f"{digest}/{position}")
                grads.extend(part.projected_grads)
                events.extend(part.events)
                compute += silo.last_compute_s
                if position + 1 < len(request.local):
                    run.applier.apply(StepRecord(local.step, local.stage, local.probe_seeds, part.projected_grads,
                                                 local.lr, local.beta, local.prox, local.anchor_step))
        finally:
            run.applier = round_model.restore(run.parts.trainable, run.parts.directions)
        silo.last_compute_s = compute
        return TrainReply(request.step, tuple(grads), part.expected_batch_size, tuple(events))

    def _record_timing(self, step: int, timing: dict) -> None:
        """Where this silo's time went, per request, in ``timings.jsonl`` of its state directory
        (local only; ``seedtune bench scale`` reads it)."""
        line = json.dumps({"step": step, "time": time.time(), "pid": os.getpid(), **timing})
        with (self.state_dir / TIMINGS_FILE).open("a") as file:
            file.write(line + "\n")

    def evaluate(self, request: EvaluationRequest, sync: Sync) -> tuple[float, float, tuple[dp_accounting.DpEvent, ...]]:
        """Accuracy counts on this silo's own held-out examples: noised and charged when private."""
        private = request.private
        run = self.run(request.run_id, sync.setup)
        self.limits.check_evaluation(private=private, noise=run.config.privacy.noise)
        run.catch_up(sync)
        if run.step != request.step:
            raise SyncError(f"asked to evaluate after {request.step} steps, but this silo's model has {run.step}")
        silo = self._silo(request.run_id, run)
        mechanism = NoiseMechanism.for_counts(silo.noise, request.noise_std)
        event = mechanism.event()
        if private:
            if silo.ledger is None:
                raise SyncError("a private evaluation in a non-private run")
            self.limits.admit(event, 0)  # against the sigma it is charged at: s / sqrt 2 per count
            digest = request_digest(request, kind="evaluate")
            previous = silo.ledger.answered(request.run_id, request.step, "evaluation")
            if previous is not None and previous.request == digest and previous.values is not None:
                return previous.values[0], previous.values[1], (previous.event,)
        shard = self._shard_loader(run.config, run.label_names, "validation")
        # Fixed shapes: whether one example counts as correct must not depend on which others are here.
        metrics = evaluate(run.task, shard, micro_batch=safe_micro_batch(self._micro_batch or run.config.eval.batch_size,
                                                                         run.task.module))
        correct, count = metrics["accuracy"] * len(shard), float(len(shard))
        if not private:
            return correct, count, ()
        noisy = private_counts(round(correct), int(count), mechanism=mechanism, randomness=silo.randomness,
                               ledger=silo.ledger, key=LedgerKey(request.step, request.run_id, digest))
        return noisy[0], noisy[1], (event,)

    def _silo(self, run_id: str, run: _Run) -> Silo:
        if run_id not in self._silos:
            config = run.config
            ledger = None
            if config.privacy.enabled:
                if self._budget is None and self._budget_required:
                    raise RequestRefused(
                        "request refused: this silo has no privacy budget of its own, and a budget the "
                        "coordinator sends binds nothing; its operator sets node config epsilon (and delta), "
                        "or SEEDTUNE_EPSILON in its environment")
                epsilon, delta, accountant = self._budget or (
                    config.privacy.epsilon, config.privacy.delta, config.privacy.accountant)
                if self.ledger is None:
                    self.ledger = PrivacyLedger(self.state_dir / LEDGER_FILE, epsilon=epsilon, delta=delta,
                                                accountant=accountant, admit=self.limits.admit)
                ledger = self.ledger
            randomness = self._randomness() if self._randomness else components.randomness(config, self.partition or 0)
            shard = self._shard_loader(config, run.label_names, "train")
            self._silos[run_id] = Silo(run.task, run.estimator, shard, randomness, ledger, config.privacy.noise,
                                       public_size=self._public_size, micro_batch=self._micro_batch)
        return self._silos[run_id]

    def close(self) -> None:
        for run in self._runs.values():
            run.log.close()
        if self.ledger is not None:
            self.ledger.close()


def _safe(run_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in run_id)[:64] or "run"
