"""Rebuild a run's model from its log (``seedtune export``) and describe a run (``seedtune show``)."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from seedtune.common import components, runlock
from seedtune.common.config import Config
from seedtune.common.errors import RunDirError
from seedtune.common.models import fingerprint
from seedtune.common.paths import RunLayout, check_creatable
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.updatelog import UpdateApplier, UpdateLog
from tqdm.auto import tqdm

REPLAY_BATCH = 100  # steps applied piece by piece of the model at once (UpdateApplier.apply_all)


def _open_run(run_dir: Path) -> tuple[UpdateLog, Config]:
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    log = UpdateLog.open(RunLayout(run_dir).log)
    try:
        config = Config.from_dict(log.config)
    except Exception as error:  # a log written by another version, or edited by hand
        raise RunDirError(f"{run_dir}: the logged config is not readable: {error}") from None
    return log, config


def export(run_dir: Path, out: Path, *, progress: bool = True) -> int:
    """Replay the log on the base model and save the result to ``out``; returns the step count."""
    out = Path(out)
    check_creatable(out)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"--out {out} already exists and is not empty; choose a new directory")
    log, config = _open_run(Path(run_dir))
    base = log.base
    task = components.load_model(config, tuple(base["label_names"]), base)
    if fingerprint(task.module) != base["fingerprint"]:
        raise RunDirError(
            f"the base model {base['model']!r} installed here differs from the one {run_dir} was "
            "trained from (fingerprint mismatch); install the same version to export"
        )
    parts = components.model_parts(config, task, log.mask())
    applier = UpdateApplier(parts.trainable, parts.directions)
    records = list(log.steps())
    with tqdm(total=len(records), disable=not progress, unit="step", desc="replay") as bar:
        for start in range(0, len(records), REPLAY_BATCH):
            applier.apply_all(records[start : start + REPLAY_BATCH])
            bar.update(len(records[start : start + REPLAY_BATCH]))
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        task.save(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except OSError as error:  # a full disk, or --out changed under us: leave nothing half-written
        shutil.rmtree(staging, ignore_errors=True)
        raise RunDirError(f"cannot write --out {out}: {error}; choose another --out") from None
    finally:
        log.close()
    return len(records)


def describe(run_dir: Path) -> dict:
    """Everything ``seedtune show`` prints, as one JSON-able dict."""
    run_dir = Path(run_dir)
    log, config = _open_run(run_dir)
    privacy = {"enabled": config.privacy.enabled}
    if config.privacy.enabled:
        ledger_path = RunLayout(run_dir).ledger
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
    federation = _federation_report(run_dir, config)
    if federation is not None and config.privacy.enabled:
        privacy["epsilon_per_silo"] = {silo["silo"]: silo["epsilon"] for silo in federation["silos"]}
        privacy["epsilon"] = max(privacy["epsilon_per_silo"].values(), default=0.0)
        privacy["releases"] = sum(silo["releases"] for silo in federation["silos"])
        if config.federation.secure_aggregation:
            privacy["secure_aggregation"] = {"honest": config.federation.honest}
            privacy["epsilon_per_silo_if_all_collude"] = {silo["silo"]: silo.get("epsilon_if_all_collude", 0.0)
                                                          for silo in federation["silos"]}
        ledgers = silo_ledgers(run_dir, secure=config.federation.secure_aggregation)
        if ledgers:  # a simulation keeps each silo's own ledger: the authority, shown beside the view
            privacy["ledger_per_silo"] = ledgers
    status, driver = log.meta("status"), None
    if status != "finished":  # "running" in the log: is the process that writes it alive?
        driver = runlock.driver(RunLayout(run_dir).lock)
        status = "running" if driver is not None else "stopped"
    report = {
        "status": status,
        "driver": driver,  # the live process running it (pid, host, command), or None
        "command": log.meta("command"),
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
    if federation is not None:
        report["federation"] = federation
    log.close()
    return report


def silo_ledgers(run_dir: Path, secure: bool = False) -> dict[str, dict]:
    """Each simulated silo's own ledger (``RUN_DIR/silos/<name>/ledger.sqlite``): epsilon and
    releases; with ``secure`` (a run under secure aggregation) also the epsilon that holds if
    every other party colluded."""
    result = {}
    for path in RunLayout(run_dir).silo_ledgers():
        with PrivacyLedger.existing(path) as ledger:
            result[path.parent.name] = {"epsilon": ledger.spent(), "releases": ledger.releases}
            if secure:
                result[path.parent.name]["epsilon_if_all_collude"] = ledger.spent_if_all_collude()
    return result


def _federation_report(run_dir: Path, config: Config) -> dict | None:
    """Per-silo privacy (the coordinator's view, recomputed from reported events) and traffic."""
    from seedtune.server.store import FederationStore

    path = RunLayout(run_dir).store
    if not path.is_file():
        return None
    store = FederationStore(path)
    try:
        releases = store.releases()
        epsilons = store.epsilons(config.privacy.delta, config.privacy.accountant) if config.privacy.enabled else {}
        colluding = store.epsilons(config.privacy.delta, config.privacy.accountant, colluding=True) \
            if config.privacy.enabled and store.secure() else {}
        traffic = store.traffic()
        silos = []
        for name in store.silos():  # each silo once, by the name it asserts, across node ids and resumes
            moved = traffic.get(name, {"messages": 0, "bytes_up": 0, "bytes_down": 0})
            silos.append({"silo": name, "releases": releases.get(name, 0),
                          "epsilon": epsilons.get(name, float("inf")), **moved})
            if colluding:
                silos[-1]["epsilon_if_all_collude"] = colluding.get(name, float("inf"))
        rounds = {}
        for round, attempt, silo, down, up in store.traffic_rows():
            rounds.setdefault(str(round), []).append({"silo": silo, "attempt": attempt, "bytes_down": down,
                                                      "bytes_up": up})
        return {"silos": silos, "traffic_per_round": rounds, "rejections": store.rejections()}
    finally:
        store.close()
