"""``seedtune simulate``: the federation on one machine, on Flower's simulation engine.

The coordinator (a ServerApp) and N silos (ClientApps on virtual SuperNodes, each with its own
shard of the training set and its own ledger under ``RUN_DIR/silos/``) talk through Flower's
real message passing; only seeds and noised scalars cross. Everything the simulation started
(Ray and its workers) is stopped when it ends, fails, or is interrupted.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from seedtune.common.config import Config, FederationConfig, with_changes
from seedtune.common.errors import RunDirError, SeedtuneError
from seedtune.common.paths import RunLayout
from seedtune.jobs.export import silo_ledgers
from seedtune.server.federation import FederationResult
from seedtune.server.runs import open_run


@dataclass
class SimulationResult:
    run_dir: Path
    federation: FederationResult
    silo_ledgers: dict[str, dict]  # silo -> {"epsilon", "releases"} from its own ledger


def simulate(config: Config, run_dir: Path, *, silos: int | None = None, rounds: int | None = None,
             resume: bool = False, progress: bool = True) -> SimulationResult:
    run_dir = Path(run_dir)
    changes = {}
    if silos is not None:
        changes["federation"] = {"silos": silos}
    if rounds is not None:
        changes["schedule"] = {"steps": rounds}
    if changes and not resume:
        config = with_changes(config, **changes)
    # Validate and create the run here, before any Flower or Ray machinery starts: bad input is
    # a one-line error with nothing left behind; the ServerApp then resumes this run.
    run = open_run(config, run_dir, resume=resume, command="seedtune simulate")
    config = run.config
    run.close()

    from flwr.simulation import run_simulation
    from seedtune.client.app import make_client_app
    from seedtune.server.app import Outcome, Stopped, make_server_app

    outcome = Outcome()
    cpus = os.cpu_count() or 1
    server_app = make_server_app(config, run_dir, progress=progress, outcome=outcome,
                                 turns=answer_turns(config.federation, cpus), command="seedtune simulate")
    # Simulated silos share one operator: under secure aggregation each counts on the t honest
    # participants the run was calibrated for (a deployed silo's operator sets its own).
    settings = {"secure-honest": config.federation.honest} if config.federation.secure_aggregation else None
    client_app = make_client_app(state_root=RunLayout(run_dir).silos, settings=settings)
    backend = simulation_backend(config.federation, cpus)
    # Flower announces that run_simulation is deprecated in favour of `flwr run` (which also works
    # with these apps, see the README); Ray warns about a future default. Neither is actionable here.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # nothing leaves this machine uninvited
    # Flower's simulation runtime deadlocks when Ctrl-C lands in its main loop (its workers wait
    # for a stop event that is only set after they are joined). So Ctrl-C only asks the ServerApp
    # to stop; it raises at its next poll, and Flower then winds its runtime down itself.
    previous = signal.getsignal(signal.SIGINT) if _main_thread() else None
    if previous is not None:
        signal.signal(signal.SIGINT, lambda number, frame: outcome.stop.set())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=config.federation.silos, backend_config=backend)
    except (KeyboardInterrupt, Stopped):
        outcome.stop.set()
        raise RunDirError(f"interrupted; every finished round is in the log: resume with "
                          f"seedtune simulate --resume --out {run_dir}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        _stop_ray()
    if outcome.stop.is_set():
        raise RunDirError(f"interrupted; every finished round is in the log: resume with "
                          f"seedtune simulate --resume --out {run_dir}")
    if outcome.result is None:
        raise SeedtuneError(f"the simulation stopped before finishing; see the log above. Finished rounds are "
                            f"in {run_dir}: resume with seedtune simulate --resume --out {run_dir}")
    return SimulationResult(run_dir, outcome.result, silo_ledgers(run_dir, secure=config.federation.secure_aggregation))


def simulation_backend(federation: FederationConfig, cpus: int) -> dict:
    """Flower's Ray backend for ``federation.workers`` processes sharing ``cpus`` cores.

    Flower starts as many workers as Ray's CPUs hold clients' ``num_cpus``, and Ray gives each
    worker's torch that many threads (OMP_NUM_THREADS). So a worker a core by default (at most one
    a silo: a fourth worker would idle with three silos), and with ``workers = 1`` one process
    using every core, in which each silo is built, and keeps its prefixes, once.
    """
    workers = processes(federation, cpus)
    threads = max(1, cpus // workers)
    return {"client_resources": {"num_cpus": threads, "num_gpus": 0.0},
            "init_args": {"num_cpus": workers * threads, "include_dashboard": False,
                          "logging_level": logging.ERROR, "log_to_driver": False}}


def processes(federation: FederationConfig, cpus: int) -> int:
    """The processes a simulation's silos answer in: ``federation.workers``, or one a core and at most one a silo."""
    return federation.workers or max(1, min(cpus, federation.silos))


def answer_turns(federation: FederationConfig, cpus: int) -> int:
    """How many answers one process gives one after another in a round: with fewer processes than silos
    asked, a round lasts that many answers, and waits ``round_timeout`` for each."""
    return math.ceil(federation.asked / processes(federation, cpus))


def _stop_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
