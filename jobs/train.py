"""``seedtune train``: one silo and the coordinator in one process, no network.

It runs the federation's own parts (a :class:`~seedtune.client.silo.Silo` answering a
:class:`~seedtune.server.coordinator.Coordinator`), so a local run and a one-silo federation
execute the same estimator, privacy path and update.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from seedtune.client.silo import Silo
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.errors import BudgetExhausted, RunDirError
from seedtune.common.estimator import ZerothOrderEstimator
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.randomness import SecretRandomness
from seedtune.server.runs import LOG_FILE, finish_run, open_run
from tqdm.auto import tqdm

__all__ = ["LEDGER_FILE", "LOG_FILE", "train"]

LEDGER_FILE = "ledger.sqlite"


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
    config, data, log, coordinator, sigma = run.config, run.data, run.log, run.coordinator, run.sigma
    if log.meta("public_size") is None:  # public: it scales every logged step
        log.set_meta("public_size", int(public_size or len(data.train)))
    public_size = log.meta("public_size")
    task, parts, schedule, run_dir = run.task, run.parts, run.schedule, run.run_dir
    ledger = None
    if config.privacy.enabled:
        ledger = PrivacyLedger(
            run_dir / LEDGER_FILE, epsilon=config.privacy.epsilon, delta=config.privacy.delta,
            accountant=config.privacy.accountant,
        )
    randomness = randomness or _randomness(config)
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, parts.trainable, parts.directions)
    silo = Silo(task, estimator, data.train, randomness, ledger, config.privacy.noise, public_size=public_size)

    def evaluation(split, limit):
        return run.evaluate(split, limit)

    before = log.meta("before") or baseline or evaluation("test", config.eval.test_examples)
    log.set_meta("before", before)
    if coordinator.step == 0:
        log.record_metrics(0, {f"val_{k}": v for k, v in evaluation("validation", None).items()})

    if progress:
        privacy = (f"sigma={sigma:.4g} for epsilon={config.privacy.epsilon:g}, delta={config.privacy.delta:g}"
                   if config.privacy.enabled else "NOT private")
        print(f"seedtune: {config.model.name} on {config.data.name} ({len(data.train)} training examples), "
              f"{parts.trainable.dimension} trainable coordinates, {privacy}, {schedule.steps} steps -> {run_dir}",
              file=sys.stderr)
    bar = tqdm(total=schedule.steps, initial=coordinator.step, disable=not progress, unit="step",
               dynamic_ncols=True, desc="train")
    spent = ledger.spent() if ledger else math.inf
    last_spent_update = 0.0
    try:
        while not coordinator.done:
            request = coordinator.request()
            reply = silo.answer(request)  # a release made before a crash is answered again, not charged again
            metrics = {}  # the batch's loss is private (a function of the secret sample): only on the bar
            coordinator.apply(request, [reply])
            step = coordinator.step
            now = time.monotonic()
            if ledger and (now - last_spent_update > 1.0 or coordinator.done):
                # The accountant costs ~20 ms a call: refresh epsilon about once a second.
                spent, last_spent_update = ledger.spent(), now
                metrics["epsilon"] = spent
            if config.eval.every and (step % config.eval.every == 0 or coordinator.done):
                metrics.update({f"val_{k}": v for k, v in evaluation("validation", None).items()})
            log.record_metrics(step, metrics)
            postfix = {"loss": f"{silo.last_loss:.4f}", "eps": f"{spent:.3f}" if ledger else "off"}
            if silo.last_reused:
                postfix["loss"] = "reused"
            if "val_accuracy" in metrics:
                postfix["val_acc"] = f"{metrics['val_accuracy']:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
    except BudgetExhausted as error:
        # Only a release lost in a crash can get here (sigma was calibrated for the planned
        # steps); the model so far is still a valid private model, so finish with it.
        bar.close()
        warnings.warn(f"stopped after {coordinator.step} of {schedule.steps} steps: {error}", stacklevel=2)
    except KeyboardInterrupt:
        bar.close()
        raise RunDirError(
            f"interrupted at step {coordinator.step}; the log holds every finished step: "
            f"resume with seedtune train --resume --out {run_dir}"
        ) from None
    bar.close()

    after = evaluation("test", config.eval.test_examples)
    log.set_meta("after", after)
    epsilon = ledger.spent() if ledger else math.inf
    finish_run(run, before, after, epsilon)
    if ledger:
        ledger.close()
    log.close()
    return TrainResult(run_dir, coordinator.step, epsilon, before, after)


def _randomness(config: Config) -> SecretRandomness:
    if not config.privacy.enabled:
        warnings.warn(
            "privacy.enabled=false: a non-private run; the released values are not clipped or "
            "noised and carry no differential-privacy guarantee. Remove the setting to train privately.",
            NonPrivateRunWarning,
            stacklevel=3,
        )
    return components.randomness(config)
