"""``seedtune train``: one silo and the coordinator in one process, no network.

It runs the federation's own parts (a :class:`~seedtune.client.silo.Silo` answering a
:class:`~seedtune.server.coordinator.Coordinator`), so a local run and a one-silo federation
execute the same estimator, privacy path and update.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import warnings
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from seedtune.cli import plots
from seedtune.client.silo import Silo
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.errors import BudgetExhausted, ConfigError, RunDirError
from seedtune.common.estimator import ZerothOrderEstimator
from seedtune.common.models import fingerprint
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.randomness import PublicRandomness, SecretRandomness, SeededRandomness
from seedtune.common.protocol import TrainReply, TrainRequest
from seedtune.common.tasks import evaluate
from seedtune.common.updatelog import UpdateApplier, UpdateLog
from seedtune.server.coordinator import Coordinator

LOG_FILE = "log.sqlite"


class NonPrivateRunWarning(UserWarning):
    """A run with privacy.enabled = false: nothing it releases is differentially private."""


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


def train(config: Config, run_dir: Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train one silo privately; everything lands in ``run_dir`` (see the README for its layout)."""
    run_dir = Path(run_dir)
    log: UpdateLog | None = None
    if resume:
        log = UpdateLog.open(run_dir / LOG_FILE)
        config = Config.from_dict(log.config)
        if log.meta("status") == "finished":
            raise RunDirError(f"{run_dir} is a finished run; nothing to resume")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"--out {run_dir} already exists and is not empty; choose a new directory or pass --resume")

    # Everything that can fail on bad input happens before the run directory is written.
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    sigma = log.meta("noise_multiplier") if log else components.noise_multiplier(config)
    planned = components.planned_epsilon(config, sigma)
    if config.privacy.enabled and planned > config.privacy.epsilon * (1 + 1e-9):
        raise ConfigError(
            f"privacy.noise_multiplier={sigma} spends epsilon={planned:.4g} over {config.schedule.steps} "
            f"steps, more than privacy.epsilon={config.privacy.epsilon}; raise it or leave it out to calibrate"
        )
    sample = task.encode(data.train[:4]["text"], data.train[:4]["label"])
    if log is None:
        reference = components.base_reference(config, task, data.label_names)
        mask = components.choose_mask(config, task, sample)
    else:
        reference, mask = log.base, log.mask()
        if fingerprint(task.module) != reference["fingerprint"]:
            raise RunDirError(f"the base model differs from the one {run_dir} was trained from; cannot resume")
    parts = components.model_parts(config, task, mask)
    schedule = components.make_schedule(config)

    if log is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = UpdateLog.create(
            run_dir / LOG_FILE,
            config=config.to_dict(),
            base=reference,
            mask=parts.trainable.mask(),
            numels={e.name: e.param.numel() for e in parts.trainable},
        )
        log.set_meta("noise_multiplier", sigma)
        log.set_meta("run_id", uuid.uuid4().hex)
        log.set_meta("trainable_coordinates", parts.trainable.dimension)
    applier = UpdateApplier(parts.trainable, parts.directions)
    for record in log.steps():  # resume: rebuild the model from the log
        applier.apply(record)

    ledger = None
    if config.privacy.enabled:
        ledger = PrivacyLedger(
            run_dir / LEDGER_FILE, epsilon=config.privacy.epsilon, delta=config.privacy.delta,
            accountant=config.privacy.accountant,
        )
    randomness = _randomness(config)
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, parts.trainable, parts.directions)
    silo = Silo(task, estimator, data.train, randomness, ledger)
    coordinator = Coordinator(
        run_id=log.meta("run_id"), run_seed=config.seed, probes=config.zo.probes, schedule=schedule,
        clip_bound=config.privacy.clip_bound, noise_multiplier=sigma,
        sample_rate=config.privacy.sample_rate, log=log, applier=applier,
    )

    def evaluation(split, limit):
        return evaluate(task, split, batch_size=config.eval.batch_size, max_examples=limit)

    before = log.meta("before") or evaluation(data.test, 0)
    log.set_meta("before", before)
    if coordinator.step == 0:
        log.record_metrics(0, {f"val_{k}": v for k, v in evaluation(data.validation, config.eval.max_examples).items()})

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
            reply = _recovered_reply(ledger, request, len(data.train))
            metrics = {}
            if reply is None:
                reply = silo.answer(request)
                metrics["train_loss"] = silo.last_loss
            coordinator.apply(request, [reply])
            step = coordinator.step
            now = time.monotonic()
            if ledger and (now - last_spent_update > 1.0 or coordinator.done):
                # The accountant costs ~20 ms a call: refresh epsilon about once a second.
                spent, last_spent_update = ledger.spent(), now
                metrics["epsilon"] = spent
            if config.eval.every and (step % config.eval.every == 0 or coordinator.done):
                metrics.update({f"val_{k}": v for k, v in evaluation(data.validation, config.eval.max_examples).items()})
            log.record_metrics(step, metrics)
            postfix = {"loss": f"{silo.last_loss:.4f}", "eps": f"{spent:.3f}" if ledger else "off"}
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

    after = evaluation(data.test, 0)
    log.set_meta("after", after)
    epsilon = ledger.spent() if ledger else math.inf
    _finish(run_dir, task, log, config, before, after, epsilon, sigma)
    if ledger:
        ledger.close()
    log.close()
    return TrainResult(run_dir, coordinator.step, epsilon, before, after)


def _recovered_reply(ledger: PrivacyLedger | None, request: TrainRequest, population: int) -> TrainReply | None:
    """After a crash between a release and its log row, the release made for this round.

    It was charged and its values recorded, so using it again spends nothing new; asking the
    silo again would charge the round twice.
    """
    if ledger is None:
        return None
    values = ledger.released(request.round)
    if values is None or len(values) != len(request.probe_seeds):
        return None
    return TrainReply(request.round, tuple(values), request.sample_rate * population, ())


def _randomness(config: Config) -> SecretRandomness:
    if not config.privacy.enabled:
        warnings.warn(
            "privacy.enabled=false: a non-private run; the released values are not clipped or "
            "noised and carry no differential-privacy guarantee. Remove the setting to train privately.",
            NonPrivateRunWarning,
            stacklevel=3,
        )
        return PublicRandomness(config.seed)
    if config.privacy.noise_seed is not None:
        return SeededRandomness(config.privacy.noise_seed)
    return SecretRandomness()


def _finish(run_dir, task, log, config, before, after, epsilon, sigma) -> None:
    """Write final/, metrics.json and the plot; each through a temporary name, then renamed."""
    final = run_dir / "final"
    staging = run_dir / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    task.save(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    summary = {
        "steps": log.num_steps,
        "epsilon": epsilon,
        "delta": config.privacy.delta if config.privacy.enabled else None,
        "noise_multiplier": sigma,
        "sample_rate": config.privacy.sample_rate,
        "test_before": before,
        "test_after": after,
        "series": log.metrics(),
    }
    temporary = run_dir / ".metrics.json.partial"
    temporary.write_text(json.dumps(summary, indent=2, default=_json_default))
    temporary.rename(run_dir / "metrics.json")
    plots.training_plot(log.metrics(), run_dir / "training.png", title=_title(config, epsilon, before, after))
    log.set_meta("status", "finished")


def _title(config: Config, epsilon: float, before: dict, after: dict) -> str:
    privacy = f"ε={epsilon:.2f}, δ={config.privacy.delta:g}" if config.privacy.enabled else "non-private"
    text = f"{config.model.name} · {config.data.name} · {config.schedule.kind} · {privacy}"
    if "accuracy" in before:
        text += f"\ntest accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f}"
    return text


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(type(value))
