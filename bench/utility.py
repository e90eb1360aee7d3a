"""``seedtune bench utility``: test accuracy at a privacy budget, method against method.

On one model, one dataset with fixed splits, the same number of steps and the same sampling
rate q, it runs

* ``zero-shot`` — the starting model, untrained;
* ``ceiling`` — the same trainable set (the cosine head) trained without privacy by exact,
  full-batch first-order optimisation to the minimum of the training loss
  (:mod:`seedtune.bench.ceiling`): what every private method on that set reads as a fraction of;
* ``mezo`` — non-private zeroth-order (MeZO): constant schedule, the DP-ZOSO trainable subset;
* ``dpzero`` — DPZero: constant schedule, every parameter (no pruning), Gaussian directions on
  the sphere;
* ``dp-zoso`` — DP-ZOSO: the stagewise schedule (whatever the preset's) and the preset's pruning mask;
* ``dp-sgd`` — DP-SGD through Opacus (per-example gradients, clipping, Gaussian noise) on the
  same trainable tensors as DP-ZOSO, with sigma calibrated by seedtune's own accountant for the
  same epsilon, delta, q and number of steps;
* ``federated`` — DP-ZOSO over 3 silos on Flower's simulation engine, epsilon per silo;

each private method at every epsilon, each method over several seeds (direction seeds; the
noise is secret and fresh in every run). Every run is a fresh process, so its peak memory (the
maximum resident set size of that process, model and libraries included) and wall time (load,
train, evaluate) are its own. Results go to ``utility.json`` and ``utility.png`` in the output
folder, and a table to stdout.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from seedtune.common.config import Config, load_config, with_changes
from seedtune.common.errors import SeedtuneError

METHODS = ("zero-shot", "ceiling", "mezo", "dpzero", "dp-zoso", "dp-sgd", "federated")
ONCE = ("zero-shot", "ceiling")  # deterministic: one run, whatever the seeds
PRIVATE = ("dpzero", "dp-zoso", "dp-sgd", "federated")


@dataclass(frozen=True)
class Plan:
    """What a benchmark runs: the base settings of every method and the grid over them."""

    overrides: tuple[str, ...]
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]
    dpsgd_lr: float  # DP-SGD's step size (its gradients are not the zeroth-order estimates)
    dpzero_lr: float  # DPZero's: it moves every parameter, so its step is far smaller than the head's
    federated_clients: int = 3


# The full table: MiniLM on Rotten Tomatoes, the default preset's model and trainable subset
# (the cosine head), shortened so that all methods x epsilons x seeds fit 90 minutes on 2 cores.
FULL = Plan(
    overrides=("schedule.steps=300", "eval.every=0"),
    epsilons=(2.0, 6.0), seeds=(0, 1, 2), dpsgd_lr=2.0, dpzero_lr=1e-5,
)
# --quick: the same pipeline on slices (500 training and 200 test examples), one seed.
QUICK = Plan(
    overrides=("schedule.steps=24", "schedule.stages=2", "privacy.sample_rate=0.04", "eval.every=0",
               "data.max_train_examples=500", "eval.test_examples=200", "zo.probes=4"),
    epsilons=(2.0, 6.0), seeds=(0,), dpsgd_lr=2.0, dpzero_lr=1e-5,
)


def method_config(base: Config, method: str, epsilon: float | None, seed: int, plan: Plan = FULL) -> Config:
    """``base`` changed into ``method`` at ``epsilon`` with direction seed ``seed``."""
    privacy = {"epsilon": epsilon or base.privacy.epsilon, "noise_multiplier": None}
    config = replace(with_changes(base, privacy=privacy), seed=seed).validate()
    constant = {"kind": "constant", "stages": 1, "prox": 0.0}
    if method == "mezo":
        return with_changes(config, privacy={"enabled": False}, schedule=constant)
    if method == "ceiling":
        return with_changes(config, privacy={"enabled": False})
    if method == "dp-zoso":
        return with_changes(config, schedule={"kind": "stagewise"})
    if method == "dpzero":
        # One direction per step, over every parameter. Rademacher directions lie on DPZero's
        # sphere of radius sqrt(d) and have E[zz^T] = I, as its analysis needs, at a fraction of
        # a Gaussian's generation cost.
        return with_changes(config, schedule={**constant, "lr": plan.dpzero_lr}, prune={"enabled": False},
                            lora={"enabled": False}, zo={"distribution": "rademacher", "probes": 1})
    if method == "federated":
        return with_changes(config, federation={"silos": plan.federated_clients, "min_silos": 1})
    return config


def run_one(method: str, settings: dict, run_dir: str, dpsgd_lr: float, baseline: dict | None = None) -> dict:
    """One run in this (fresh) process: test metrics, epsilon spent, peak memory, wall time.
    (A federated run's silos live in Ray worker processes: its peak memory is the coordinator's.)"""
    warnings.simplefilter("ignore")  # e.g. MeZO's non-private warning: the table says so
    config = Config.from_dict(settings)
    start = time.perf_counter()
    if method == "zero-shot":
        from seedtune.common import components
        from seedtune.common.tasks import evaluate

        data = components.load_data(config)
        task = components.load_model(config, data.label_names)
        metrics, epsilon = evaluate(task, data.test, batch_size=config.eval.batch_size,
                                    max_examples=config.eval.test_examples), 0.0
    elif method == "ceiling":
        from seedtune.bench.ceiling import head_ceiling

        metrics, epsilon = head_ceiling(config), math.inf
    elif method == "dp-sgd":
        from seedtune.bench.dpsgd import dp_sgd

        metrics, epsilon = dp_sgd(config, lr=dpsgd_lr)
    elif method == "federated":
        from seedtune.jobs.simulate import simulate

        result = simulate(config, Path(run_dir), progress=False)
        metrics = result.federation.after
        epsilon = max(ledger["epsilon"] for ledger in result.silo_ledgers.values())
    else:
        from seedtune.jobs.train import train

        result = train(config, Path(run_dir), progress=False, baseline=baseline)
        metrics, epsilon = result.after, result.epsilon
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    extra = {"opacus_epsilon": metrics["opacus_epsilon"]} if "opacus_epsilon" in metrics else {}
    return {"accuracy": metrics["accuracy"], "loss": metrics["loss"],
            "epsilon_spent": epsilon if math.isfinite(epsilon) else None,  # None: not private
            **extra,
            "peak_memory_mib": peak, "wall_s": wall}


def grid(plan: Plan, methods: tuple[str, ...]) -> list[tuple[str, float | None, int]]:
    """(method, epsilon or None, seed) for every run."""
    runs = []
    for method in methods:
        if method in ONCE:
            runs.append((method, None, plan.seeds[0]))
            continue
        for epsilon in (plan.epsilons if method in PRIVATE else (None,)):
            runs.extend((method, epsilon, seed) for seed in plan.seeds)
    return runs


def bench_utility(out: Path, *, quick: bool = False, preset: str = "default", overrides: tuple[str, ...] = (),
                  methods: tuple[str, ...] = METHODS, seeds: int | None = None, dpzero_lr: float | None = None,
                  dpsgd_lr: float | None = None, progress: bool = True) -> dict:
    plan = QUICK if quick else FULL
    for flag, value in (("--dpzero-lr", dpzero_lr), ("--dpsgd-lr", dpsgd_lr)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise SeedtuneError(f"{flag} {value} must be a finite number > 0")
    plan = replace(plan, dpzero_lr=dpzero_lr or plan.dpzero_lr, dpsgd_lr=dpsgd_lr or plan.dpsgd_lr)
    if seeds is not None:
        if seeds < 1:
            raise SeedtuneError(f"--seeds {seeds} must be >= 1")
        plan = replace(plan, seeds=tuple(range(seeds)))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SeedtuneError(f"--methods {','.join(unknown)}: unknown; choose from {','.join(METHODS)}")
    base = load_config(preset, None, [*plan.overrides, *overrides])
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SeedtuneError(f"--out {out} already exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    runs = grid(plan, methods)
    records = []
    baseline = None
    started = time.perf_counter()
    context = get_context("spawn")
    with tqdm(total=len(runs), disable=not progress, unit="run", desc="bench utility") as bar:
        for method, epsilon, seed in runs:
            config = method_config(base, method, epsilon, seed, plan)
            name = f"{method}-eps{epsilon:g}-seed{seed}" if epsilon else f"{method}-seed{seed}"
            bar.set_postfix_str(name)
            # A fresh process per run: its peak memory is its own, and nothing leaks between runs.
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(run_one, method, config.to_dict(), str(out / "runs" / name),
                                     plan.dpsgd_lr, baseline).result()
            if method == "zero-shot":  # every run starts from this model: measured once
                baseline = {"accuracy": result["accuracy"], "loss": result["loss"]}
            records.append({"method": method, "epsilon": epsilon, "seed": seed, **result})
            _write(out, base, plan, quick, records, time.perf_counter() - started, complete=False)
            bar.update(1)
    summary = _write(out, base, plan, quick, records, time.perf_counter() - started, complete=True)
    utility_plot(summary, out / "utility.png")
    return summary


def summarize(records: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds, per method and epsilon."""
    rows = []
    keys = sorted({(r["method"], r["epsilon"]) for r in records},
                  key=lambda k: (METHODS.index(k[0]), k[1] or math.inf))
    for method, epsilon in keys:
        group = [r for r in records if r["method"] == method and r["epsilon"] == epsilon]
        row = {"method": method, "epsilon": epsilon, "runs": len(group)}
        for field in ("accuracy", "loss", "peak_memory_mib", "wall_s", "epsilon_spent"):
            values = [r[field] for r in group if r[field] is not None]
            row[field] = statistics.fmean(values) if values else None
            row[f"{field}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _write(out: Path, base: Config, plan: Plan, quick: bool, records: list[dict], wall: float,
           complete: bool) -> dict:
    import platform

    import torch

    summary = {
        "complete": complete,
        "quick": quick,
        "wall_s": wall,
        "machine": {"cpus": _cpus(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "plan": {"epsilons": list(plan.epsilons), "seeds": list(plan.seeds), "dpsgd_lr": plan.dpsgd_lr,
                 "dpzero_lr": plan.dpzero_lr,
                 "federated_clients": plan.federated_clients, "delta": base.privacy.delta},
        "config": base.to_dict(),
        "table": summarize(records),
        "runs": records,
    }
    staging = out / "utility.json.partial"
    staging.write_text(json.dumps(summary, indent=2))
    staging.replace(out / "utility.json")  # never a half-written file
    return summary


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def utility_plot(summary: dict, path: Path) -> None:
    """Test accuracy against epsilon, one line per method (non-private ones as levels)."""
    from seedtune.server.plots import plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    table = summary["table"]
    epsilons = summary["plan"]["epsilons"]
    for method in METHODS:
        rows = [r for r in table if r["method"] == method]
        if not rows:
            continue
        if rows[0]["epsilon"] is None:  # zero-shot, the ceiling, MeZO: no epsilon
            style = {"zero-shot": ("--", "grey", "no training"), "ceiling": ("-", "black", "first-order, not private")}
            line, color, what = style.get(method, (":", "black", "not private"))
            axis.axhline(rows[0]["accuracy"], linestyle=line, color=color, label=f"{method} ({what})")
            continue
        xs = [r["epsilon"] for r in rows]
        axis.errorbar(xs, [r["accuracy"] for r in rows], yerr=[r["accuracy_std"] for r in rows], marker="o",
                      capsize=3, label=method)
    axis.set_xticks(epsilons)
    axis.set_xlabel("epsilon (per silo for federated), delta = %g" % summary["plan"]["delta"])
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    config = summary["config"]
    axis.set_title(f"{config['model']['name']} on {config['data']['name']}, {config['schedule']['steps']} steps"
                   + (" (quick)" if summary["quick"] else ""))
    axis.legend(fontsize="small", loc="best")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
