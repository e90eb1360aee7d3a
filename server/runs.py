"""A run directory from the coordinator's side: create or resume it, and finish it.

``seedtune train`` and the federation's ServerApp both go through here, so a local run and a
federated run have the same log, the same starting model, the same mask and the same σ.
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from seedtune.common import components
from seedtune.common.components import ModelParts
from seedtune.common.config import Config
from seedtune.common.data import TextData
from seedtune.common.errors import ConfigError, RunDirError
from seedtune.common.models import fingerprint
from seedtune.common.paths import RunLayout, check_creatable, check_resumable
from seedtune.common.protocol import ReleaseParameters
from seedtune.common.runlock import RunLock
from seedtune.common.schedule import Schedule
from seedtune.common.tasks import evaluate
from seedtune.common.updatelog import UpdateApplier, UpdateLog
from seedtune.common.wire import Setup
from seedtune.server import plots
from seedtune.server.coordinator import Coordinator



@dataclass
class Run:
    """Everything the coordinator needs, rebuilt from the log when resuming."""

    run_dir: Path
    config: Config
    data: TextData
    parts: ModelParts
    schedule: Schedule
    sigma: float
    log: UpdateLog
    coordinator: Coordinator
    lock: RunLock  # this process drives the run until close()

    @property
    def task(self):
        return self.parts.task

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def run_id(self) -> str:
        return self.log.meta("run_id")

    def setup(self) -> Setup:
        """What a silo needs once to build the same starting model."""
        return Setup(self.run_id, self.config.to_dict(), self.log.base, self.log.mask())

    def close(self) -> None:
        """Close the log and stop driving the run (another process may resume it)."""
        self.log.close()
        self.lock.release()

    def evaluate(self, split: str, limit: int | None = None) -> dict:
        dataset = getattr(self.data, split)
        limit = self.config.eval.max_examples if limit is None else limit
        return evaluate(self.task, dataset, batch_size=self.config.eval.batch_size, max_examples=limit)


def open_run(config: Config, run_dir: Path, *, resume: bool, command: str = "seedtune train") -> Run:
    """Create a run directory, or reopen an unfinished one. Bad input fails before any write."""
    run_dir = Path(run_dir)
    log: UpdateLog | None = None
    lock: RunLock | None = None
    if resume:
        log = UpdateLog.open(RunLayout(run_dir).log)
        config = Config.from_dict(log.config)
        if log.meta("status") == "finished":
            raise RunDirError(f"{run_dir} is a finished run; nothing to resume")
        check_resumable(run_dir)
        try:
            lock = RunLock.acquire(RunLayout(run_dir).lock, command)
        except RunDirError:
            log.close()
            raise
    else:
        check_creatable(run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunDirError(f"--out {run_dir} already exists and is not empty; choose a new directory or pass "
                              "--resume")

    try:
        return _build(config, run_dir, log, lock, command)
    except BaseException:
        if lock is not None:  # a resumed run that cannot go on: another process may try
            lock.release()
            log.close()
        raise


def _build(config: Config, run_dir: Path, log: UpdateLog | None, lock: RunLock | None, command: str) -> Run:
    """open_run's model, data, mask and coordinator, from ``log`` when resuming (else a new log)."""
    data = components.load_data(config)
    task = components.load_model(config, data.label_names, log.base if log else None)
    sigma = log.meta("noise_multiplier") if log else components.noise_multiplier(config)
    planned = components.planned_epsilon(config, sigma)
    if config.privacy.enabled and planned > config.privacy.epsilon * (1 + 1e-9):
        raise ConfigError(
            f"privacy.noise_multiplier={sigma} spends epsilon={planned:.4g} over {config.schedule.steps} "
            f"steps, more than privacy.epsilon={config.privacy.epsilon}; raise it or leave it out to calibrate"
        )
    if log is None:
        reference = components.base_reference(config, task, data.label_names)
        mask = components.mask_for(config, task, data)
    else:
        reference, mask = log.base, log.mask()
        if fingerprint(task.module) != reference["fingerprint"]:
            raise RunDirError(f"the base model differs from the one {run_dir} was trained from; cannot resume")
    parts = components.model_parts(config, task, mask)
    schedule = components.make_schedule(config)

    if log is None:
        log = _create_log(run_dir, config, reference, parts, sigma, command)
        try:
            lock = RunLock.acquire(RunLayout(run_dir).lock, command)
            return _coordinate(run_dir, config, data, parts, schedule, sigma, log, lock)
        except BaseException:  # the new run exists and can be resumed: stop driving it
            if lock is not None:
                lock.release()
            log.close()
            raise
    return _coordinate(run_dir, config, data, parts, schedule, sigma, log, lock)


def _coordinate(run_dir: Path, config: Config, data: TextData, parts: ModelParts, schedule, sigma: float,
                log: UpdateLog, lock: RunLock) -> Run:
    """The run's model rebuilt from ``log`` (nothing to replay when new), and its coordinator."""
    applier = UpdateApplier(parts.trainable, parts.directions)
    applier.apply_all(list(log.steps()))  # resume: rebuild the model from the log
    coordinator = Coordinator(
        run_id=log.meta("run_id"), run_seed=config.seed, probes=config.zo.probes, schedule=schedule,
        release=ReleaseParameters(config.privacy.clip_bound, sigma, config.privacy.sample_rate, config.privacy.noise),
        log=log, applier=applier,
        aggregation=config.federation.aggregation, trim=config.federation.trim,
        local_steps=config.federation.local_steps,
    )
    return Run(run_dir, config, data, parts, schedule, sigma, log, coordinator, lock)


def _create_log(run_dir: Path, config: Config, reference: dict, parts: ModelParts, sigma: float,
                command: str) -> UpdateLog:
    """The new run's directory and log, or nothing at all: a failed write removes what it made."""
    made = not run_dir.exists()
    log = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = UpdateLog.create(
            RunLayout(run_dir).log,
            config=config.to_dict(),
            base=reference,
            mask=parts.trainable.mask(),
            numels={e.name: e.param.numel() for e in parts.trainable},
        )
        log.set_meta("noise_multiplier", sigma)
        log.set_meta("run_id", uuid.uuid4().hex)
        log.set_meta("trainable_coordinates", parts.trainable.dimension)
        log.set_meta("command", command)
    except (OSError, sqlite3.Error) as error:
        if log is not None:
            log.close()
        if made:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            for leftover in run_dir.glob(RunLayout(run_dir).log.name + "*"):
                leftover.unlink(missing_ok=True)
        raise RunDirError(f"cannot create the run in --out {run_dir}: {error}; make it writable or choose another "
                          "--out") from None
    return log


def finish_run(run: Run, before: dict, after: dict, epsilon: float | dict, extra: dict | None = None,
               names: dict[str, str] | None = None) -> None:
    """Write final/, metrics.json and the plot, each through a temporary name; mark it finished."""
    layout = run.layout
    final = layout.final
    staging = layout.staging(final)
    shutil.rmtree(staging, ignore_errors=True)
    run.task.save(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    config = run.config
    summary = {
        "steps": run.log.num_steps,
        "epsilon": epsilon,
        "delta": config.privacy.delta if config.privacy.enabled else None,
        "noise_multiplier": run.sigma,
        "sample_rate": config.privacy.sample_rate,
        "test_before": before,
        "test_after": after,
        **(extra or {}),
        "series": run.log.metrics(),
    }
    temporary = layout.staging(layout.metrics)
    temporary.write_text(json.dumps(summary, indent=2, default=_json_default))
    temporary.rename(layout.metrics)
    worst = max(epsilon.values(), default=0.0) if isinstance(epsilon, dict) else epsilon
    plots.training_plot(run.log.metrics(), layout.training_plot, title=_title(config, worst, before, after),
                        names=names)
    run.log.set_meta("status", "finished")


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
