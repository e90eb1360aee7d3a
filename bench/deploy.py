"""``seedtune bench deploy``: a deployed round against a simulated one, the same job, one run.

Each case runs one job twice on this machine, one after the other:

* **simulated**: ``seedtune simulate``, Flower's simulation engine (each silo in a Ray worker with
  one CPU), in a fresh process;
* **deployed**: a real loopback deployment (bench/loopback.py): ``flower-superlink`` with TLS and
  node authentication, and per silo a resident engine (``seedtune silo serve``, one torch thread
  as a Ray worker has) and its SuperNode (``seedtune silo supernode``), whose ClientApp forwards
  to the engine; the run from ``flwr run`` with the same settings, passed as its run config.

Seconds per round: the median time between consecutive rounds' commits in the run's update log;
the first round, which also starts the silos, is left out, and evaluation is off in both. The
deployed rounds are then taken apart from the silos' own records: the engine's time (the
ClientApp's message log, in to out), the way back (last reply out to the step's commit: the
SuperNode's push, the SuperLink, the coordinator's pull and its durable log) and the way out
(commit to the next message in a ClientApp: the SuperNode's poll and pull, the SuperExec's poll, a
fresh ``flwr-clientapp`` process and its Flower imports, timed alone as ``clientapp_import_s``).

Cases: the tiny preset, and the default preset at tau = 1 and tau = 6 (federation.local_steps),
each on its ``simulate`` preset's silos; with ``--full`` runs also the tiny case with Flower's
stock ``flower-supernode``, which is what client/supernode.py saves. The report's top-level
``ratio`` is the default preset's (tau = 1), deployed over simulated seconds per round.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from seedtune.bench.cost import _progress, _target, in_fresh_process

RATIO_LIMIT = 1.3  # docs/performance.md: a deployed round costs at most 1.3x a simulated one
JOB_MINUTES_LIMIT = 25  # the default job at tau = 6, deployed on a 2-core machine


@dataclass(frozen=True)
class Case:
    name: str
    preset: str
    local_steps: int
    rounds: int
    stock: bool = False  # Flower's own flower-supernode, not seedtune silo supernode
    extra: tuple[str, ...] = ()  # --set, for every run (the case's own settings below win)

    def overrides(self) -> list[str]:
        return [*self.extra, "eval.every=0", f"federation.local_steps={self.local_steps}",
                f"schedule.steps={self.rounds * self.local_steps}"]


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("tiny", "tiny", 1, 6), Case("default", "default", 1, 8), Case("default, tau 6", "default", 6, 3)]
    return [Case("tiny", "tiny", 1, 16), Case("tiny, stock SuperNode", "tiny", 1, 8, stock=True),
            Case("default", "default", 1, 12), Case("default, tau 6", "default", 6, 5)]


def bench_deploy(quick: bool = False, progress: bool = True, overrides: tuple[str, ...] = ()) -> dict:
    rows = []
    for case in _progress([replace(case, extra=overrides) for case in cases(quick)], progress, "deploy"):
        simulated = in_fresh_process(simulate_rounds, case)
        deployed = deploy_rounds(case)
        rows.append({"case": case.name, "preset": case.preset, "local_steps": case.local_steps,
                     "rounds": case.rounds, "silos": deployed["silos"], "supernode": "stock" if case.stock else "seedtune",
                     "simulated_s": simulated["round_s"], "deployed_s": deployed["round_s"],
                     "ratio": deployed["round_s"] / simulated["round_s"],
                     **{key: deployed[key] for key in ("engine_s", "way_back_s", "way_out_s")}})
    imports = clientapp_import_s()
    main = next((row for row in rows if row["case"] == "default"), rows[0])
    return {"bench": "deploy", "ratio": main["ratio"],
            "setup": {"clientapp_import_s": imports, "timing": "median seconds between rounds' commits, "
                                                               "the first round left out"},
            "rows": rows,
            "targets": [_target(f"deployed over simulated seconds per round, {row['case']}", row["ratio"], RATIO_LIMIT)
                        for row in rows if row["supernode"] == "seedtune"]}


def _config(case: Case):
    from seedtune.common.config import load_config

    return load_config(case.preset, overrides=case.overrides(), command="simulate")


def round_seconds(log_path: Path, local_steps: int) -> tuple[float, dict[int, float]]:
    """The median round from the update log's commit times (a round's steps commit together), and
    each round's commit time, keyed by its first step."""
    with sqlite3.connect(log_path) as db:
        rows = db.execute("SELECT step, created FROM steps ORDER BY step").fetchall()
    commits = {step - local_steps + 1: created for step, created in rows if (step + 1) % local_steps == 0}
    stamps = [commits[first] for first in sorted(commits)]
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(durations), commits


def simulate_rounds(case: Case) -> dict:
    """``seedtune simulate`` of the case, in this (fresh) process."""
    from seedtune.common.paths import RunLayout
    from seedtune.jobs.simulate import simulate

    config = _config(case)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        simulate(config, run_dir, progress=False)
        median, _ = round_seconds(RunLayout(run_dir).log, case.local_steps)
    return {"round_s": median}


@contextmanager
def loopback(config, scratch: Path, stock: bool = False):
    """A loopback deployment for ``config``'s silos, each its engine and SuperNode, all online;
    everything it started is stopped on the way out."""
    from seedtune.bench.loopback import Loopback

    silos = config.federation.silos
    deployment = Loopback(scratch, silos=silos, epsilon=config.privacy.epsilon)
    try:
        deployment.start_superlink()
        for silo in range(silos):
            deployment.register(silo)
            deployment.start_engine(silo, seconds=600)
            deployment.start_supernode(silo, engine=True, stock=stock)
        deployment.wait_online(silos)
        yield deployment
    finally:
        left = deployment.close()
        if left:
            raise RuntimeError(f"processes left running after the bench: {left}")


def run_deployed(deployment, config, run_dir: Path) -> None:
    """``flwr run`` of ``config`` (every setting, as run config) to its end."""
    from seedtune.common.paths import RunLayout

    settings = " ".join(f"{key}={json.dumps(value)}" for key, value in config.to_flat().items())
    result = deployment.run(f'{settings} run-dir="{run_dir}"', timeout=4 * 3600)
    if not RunLayout(run_dir).metrics.exists():
        raise RuntimeError(f"the deployed run did not finish:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def deploy_rounds(case: Case) -> dict:
    """The same job on a loopback deployment with resident engines."""
    from seedtune.common.paths import RunLayout

    config = _config(case)
    with tempfile.TemporaryDirectory() as scratch, loopback(config, Path(scratch), case.stock) as deployment:
        run_dir = Path(scratch) / "run"
        run_deployed(deployment, config, run_dir)
        median, commits = round_seconds(RunLayout(run_dir).log, case.local_steps)
        logs = [deployment.root / f"silo-{silo}" / "messages.jsonl" for silo in range(config.federation.silos)]
        parts = _round_parts(logs, commits)
    return {"round_s": median, "silos": config.federation.silos, **parts}


def bench_deploy_job(overrides: tuple[str, ...] = ()) -> dict:
    """The default preset's whole job (as ``seedtune simulate --preset default``, with
    ``overrides``) on a loopback deployment: its wall time from ``flwr run`` to the end, evaluations
    included, and what it reached."""
    from seedtune.common.config import load_config

    config = load_config("default", overrides=list(overrides), command="simulate")
    with tempfile.TemporaryDirectory() as scratch, loopback(config, Path(scratch)) as deployment:
        run_dir = Path(scratch) / "run"
        start = time.perf_counter()
        run_deployed(deployment, config, run_dir)
        wall = time.perf_counter() - start
        metrics = json.loads((run_dir / "metrics.json").read_text())
    steps, tau = config.schedule.steps, config.federation.local_steps
    row = {"case": f"default job, tau {tau}", "silos": config.federation.silos, "steps": steps,
           "rounds": -(-steps // tau), "wall_s": wall, "wall_min": wall / 60,
           "test_before": metrics["test_before"]["accuracy"], "test_after": metrics["test_after"]["accuracy"],
           "epsilon": max(metrics["epsilon"].values())}
    return {"bench": "deploy-job", "setup": {"preset": "default", "overrides": list(overrides)}, "rows": [row],
            "targets": [_target("deployed default job, minutes", row["wall_min"], JOB_MINUTES_LIMIT)]}


def _round_parts(message_logs: list[Path], commits: dict[int, float]) -> dict:
    """Medians over rounds (the first left out) of where a deployed round's time goes."""
    into, out_of = {}, {}  # first step -> [time a ClientApp got it], [time it replied], per silo
    for path in message_logs:
        entering = None
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["direction"] == "in" and entry["type"] == "train":
                entering = entry["records"]["request"]["values"]["step"]
                into.setdefault(entering, []).append(entry["time"])
            elif entry["direction"] == "out" and entering is not None:
                out_of.setdefault(entering, []).append(entry["time"])
                entering = None
    firsts = sorted(step for step in commits if step in into and step in out_of)[1:]
    following = dict(zip(sorted(commits), sorted(commits)[1:]))
    engine = [statistics.median(b - a for a, b in zip(into[s], out_of[s])) for s in firsts]
    back = [commits[s] - max(out_of[s]) for s in firsts]
    out = [min(into[following[s]]) - commits[s] for s in firsts if following.get(s) in into]
    return {"engine_s": statistics.median(engine), "way_back_s": statistics.median(back),
            "way_out_s": statistics.median(out)}


def clientapp_import_s(repeats: int = 3) -> float:
    """What a fresh ``flwr-clientapp`` process spends importing Flower before it can ask anything."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import flwr.supernode.cli"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
