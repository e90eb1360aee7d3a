"""``seedtune train``: one silo and the coordinator in one process, no network.

It runs the federation's own parts (a :class:`~seedtune.client.silo.Silo` answering a
:class:`~seedtune.server.coordinator.Coordinator`), so a local run and a one-silo federation
execute the same estimator, privacy path and update.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from seedtune.client.silo import Silo
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.errors import RunDirError
from seedtune.common.estimator import ZerothOrderEstimator
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.randomness import SecretRandomness
from seedtune.server.rounds import Played, run_rounds
from seedtune.server.runs import Run, finish_run, open_run

__all__ = ["train"]


class NonPrivateRunWarning(UserWarning):
    """A run with privacy.enabled = false: nothing it releases is differentially private."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epsilon: float
    before: dict
    after: dict


def train(config: Config, run_dir: Path, *, resume: bool = False, progress: bool = True,
          baseline: dict | None = None, public_size: int | None = None,
          randomness: SecretRandomness | None = None) -> TrainResult:
    """Train one silo privately; everything lands in ``run_dir`` (see the README for its layout).

    ``baseline``: the starting model's test metrics, when the caller already has them (a
    benchmark running many methods from the same start); otherwise they are measured.
    ``public_size``: N of the releases' q N (default: the training set's size, which the log and
    the model then reveal; give a published number to keep the exact size private).
    ``randomness``: tests only, a seeded source for sampling and noise (default: the OS's CSPRNG).
    """
    run = open_run(config, run_dir, resume=resume)
    try:  # however it ends, another process may then resume the run
        coordinator, run_dir = run.coordinator, run.run_dir
        coordinator.local_steps = 1  # one silo in this process: a step at a time (local steps are a federation's)
        silo, ledger = _local_silo(run, public_size, randomness)
        if progress:
            _announce(run)

        def play() -> Played:
            request = coordinator.request()
            reply = silo.answer(request)  # a release made before a crash is answered again, not charged again
            coordinator.apply(request, [reply])
            # The batch's loss is private (a function of the secret sample): on the bar, never in the log.
            return Played(postfix={"loss": "reused" if silo.last_reused else f"{silo.last_loss:.4f}"})

        def epsilons() -> dict[str, float]:
            return {"epsilon": ledger.spent()} if ledger else {}

        try:
            loop = run_rounds(run, play, epsilons, progress=progress, desc="train", unit="step", baseline=baseline)
        except KeyboardInterrupt:
            raise RunDirError(
                f"interrupted at step {coordinator.step}; the log holds every finished step: "
                f"resume with seedtune train --resume --out {run_dir}"
            ) from None
        if loop.stopped_early:
            # Only a release lost in a crash can get here (sigma was calibrated for the planned
            # steps); the model so far is still a valid private model, so the run finishes with it.
            warnings.warn(loop.stopped_early, stacklevel=2)
        epsilon = ledger.spent() if ledger else math.inf
        finish_run(run, loop.before, loop.after, epsilon)
        if ledger:
            ledger.close()
        return TrainResult(run_dir, coordinator.step, epsilon, loop.before, loop.after)
    finally:
        run.close()


def _local_silo(run: Run, public_size: int | None, randomness: SecretRandomness | None) -> tuple[Silo, PrivacyLedger | None]:
    """The run's one silo, over the whole training set, with its ledger in the run directory."""
    config, log, data = run.config, run.log, run.data
    if log.meta("public_size") is None:  # public: it scales every logged step
        log.set_meta("public_size", int(public_size or len(data.train)))
    ledger = None
    if config.privacy.enabled:
        ledger = PrivacyLedger(run.layout.ledger, epsilon=config.privacy.epsilon, delta=config.privacy.delta,
                               accountant=config.privacy.accountant)
    randomness = randomness or _randomness(config)
    parts = run.parts
    estimator = ZerothOrderEstimator(run.task.module, run.task.per_example_loss, parts.trainable, parts.directions,
                                     keep_prefix_mib=config.zo.keep_prefix_mib)
    silo = Silo(run.task, estimator, data.train, randomness, ledger, config.privacy.noise,
                public_size=log.meta("public_size"))
    return silo, ledger


def _announce(run: Run) -> None:
    config, privacy = run.config, run.config.privacy
    guarantee = (f"sigma={run.sigma:.4g} for epsilon={privacy.epsilon:g}, delta={privacy.delta:g}"
                 if privacy.enabled else "NOT private")
    print(f"seedtune: {config.model.name} on {config.data.name} ({len(run.data.train)} training examples), "
          f"{run.parts.trainable.dimension} trainable coordinates, {guarantee}, {run.schedule.steps} steps -> "
          f"{run.run_dir}", file=sys.stderr)


def _randomness(config: Config) -> SecretRandomness:
    if not config.privacy.enabled:
        warnings.warn(
            "privacy.enabled=false: a non-private run; the released values are not clipped or "
            "noised and carry no differential-privacy guarantee. Remove the setting to train privately.",
            NonPrivateRunWarning,
            stacklevel=3,
        )
    return components.randomness(config)
