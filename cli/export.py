"""Rebuild a run's model from its log (``seedtune export``) and describe a run (``seedtune show``)."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from seedtune.cli.train import LEDGER_FILE, LOG_FILE
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.errors import RunDirError
from seedtune.common.models import fingerprint
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.updatelog import UpdateApplier, UpdateLog


def _open_run(run_dir: Path) -> tuple[UpdateLog, Config]:
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    log = UpdateLog.open(run_dir / LOG_FILE)
    try:
        config = Config.from_dict(log.config)
    except Exception as error:  # a log written by another version, or edited by hand
        raise RunDirError(f"{run_dir}: the logged config is not readable: {error}") from None
    return log, config


def export(run_dir: Path, out: Path, *, progress: bool = True) -> int:
    """Replay the log on the base model and save the result to ``out``; returns the step count."""
    log, config = _open_run(Path(run_dir))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"--out {out} already exists and is not empty; choose a new directory")
    base = log.base
    task = components.load_model(config, tuple(base["label_names"]))
    if fingerprint(task.module) != base["fingerprint"]:
        raise RunDirError(
            f"the base model {base['model']!r} installed here differs from the one {run_dir} was "
            "trained from (fingerprint mismatch); install the same version to export"
        )
    parts = components.model_parts(config, task, log.mask())
    applier = UpdateApplier(parts.trainable, parts.directions)
    total = log.num_steps
    for record in tqdm(log.steps(), total=total, disable=not progress, unit="step", desc="replay"):
        applier.apply(record)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    task.save(staging)
    if out.exists():
        out.rmdir()
    staging.rename(out)
    log.close()
    return total


def describe(run_dir: Path) -> dict:
    """Everything ``seedtune show`` prints, as one JSON-able dict."""
    run_dir = Path(run_dir)
    log, config = _open_run(run_dir)
    privacy = {"enabled": config.privacy.enabled}
    if config.privacy.enabled:
        ledger_path = run_dir / LEDGER_FILE
        if ledger_path.is_file():
            ledger = PrivacyLedger(ledger_path, epsilon=config.privacy.epsilon, delta=config.privacy.delta,
                                   accountant=config.privacy.accountant)
            epsilon, releases = ledger.spent(), ledger.releases
            ledger.close()
        else:
            epsilon, releases = 0.0, 0
        privacy.update(
            epsilon=epsilon, budget_epsilon=config.privacy.epsilon, delta=config.privacy.delta,
            noise_multiplier=log.meta("noise_multiplier"), sample_rate=config.privacy.sample_rate,
            clip_bound=config.privacy.clip_bound, accountant=config.privacy.accountant, releases=releases,
        )
    report = {
        "status": log.meta("status"),
        "steps": log.num_steps,
        "planned_steps": config.schedule.steps,
        "trainable_coordinates": log.meta("trainable_coordinates"),
        "base": log.base,
        "config": config.to_dict(),
        "privacy": privacy,
        "test_before": log.meta("before"),
        "test_after": log.meta("after"),
        "steps_detail": [asdict(record) for record in log.steps()],
    }
    log.close()
    return report
