"""``seedtune bench utility``: test accuracy at a privacy budget, method against method.

On one model, one dataset with fixed splits, the same number of steps and the same sampling
rate q, all on the same trainable set (the preset's: the default's cosine head), it runs

* ``zero-shot`` — the starting model, untrained;
* ``ceiling`` — the same trainable set trained without privacy by first-order optimisation
  (:mod:`seedtune.bench.ceiling`): a linear readout (the cosine head, a prompt classifier's final
  norm) to the minimum of the training loss by full-batch L-BFGS, any other set (a mask, LoRA,
  every tensor) by AdamW fine-tuning, its epoch chosen on validation: what every private method
  on that set reads as a fraction of (the table's "of ceiling": the share of the
  zero-shot-to-ceiling gap a run closes);
* ``mezo`` — non-private zeroth-order (MeZO): the preset's probes and a constant step;
* ``dpzero`` — DPZero's estimator: one direction a step (Rademacher, on DPZero's sphere of radius
  sqrt(d)), its scalar clipped and noised, a constant step of its own size (``--dpzero-lr``,
  chosen on the validation split with ``seedtune bench recipe``);
* ``dp-zoso`` — DP-ZOSO's stagewise schedule of step size, beta and proximal term, the preset's
  probes and pruning mask;
* ``dp-sgd`` — DP-SGD through Opacus (per-example gradients, clipping, Gaussian noise) on the
  same trainable tensors (on a readout, over features computed once), with sigma calibrated by
  seedtune's own accountant for the same epsilon, delta, q and number of steps;
* ``one-silo`` — the preset's recipe as it is, on one silo holding all the data (``seedtune
  train``'s run);
* ``federated`` — the preset's recipe over 3 silos on Flower's simulation engine, epsilon per
  silo (with the default preset: ``seedtune simulate --preset default``'s run);

each private method at every epsilon, each method over the plan's seeds (direction seeds; the
noise is secret and fresh in every run). Every run is a fresh process, so its peak memory (the
maximum resident set size of that process, model and libraries included) and wall time (load,
train, evaluate) are its own; with ``jobs`` > 1 that many run at once (the federated runs
excepted: they run alone), each on its share of the cores, and their wall times say so (``jobs``
in the JSON). Results go to ``utility.json`` and ``utility.png`` in the output folder, and a
table to stdout.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from seedtune.common.config import Config, load_config, with_changes
from seedtune.common.errors import SeedtuneError

METHODS = ("zero-shot", "ceiling", "mezo", "dpzero", "dp-zoso", "dp-sgd", "one-silo", "federated")
ONCE = ("zero-shot", "ceiling")  # deterministic: one run, whatever the seeds
PRIVATE = ("dpzero", "dp-zoso", "dp-sgd", "one-silo", "federated")


@dataclass(frozen=True)
class Plan:
    """What a benchmark runs: the base settings of every method and the grid over them."""

    overrides: tuple[str, ...]
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]
    dpsgd_lr: float  # DP-SGD's step size (its gradients are not the zeroth-order estimates)
    dpzero_lr: float  # DPZero's: one direction a step wants a smaller step than K (chosen on validation)
    federated_clients: int = 3


# The full table: the default preset's recipe as it is (1,200 steps, K = 64, q = 0.05, the
# cosine head), one seed: every method at epsilon 2 and 6. DPZero's and DP-SGD's step sizes were
# chosen on the validation split (docs/results.md, "Every method at the default recipe").
FULL = Plan(overrides=("eval.every=0",), epsilons=(2.0, 6.0), seeds=(0,), dpsgd_lr=2.0, dpzero_lr=0.2)
# --quick: the same pipeline on slices (500 training and 200 test examples), one seed.
QUICK = Plan(
    overrides=("schedule.steps=24", "schedule.stages=2", "privacy.sample_rate=0.04", "eval.every=0",
               "data.max_train_examples=500", "eval.test_examples=200", "zo.probes=4"),
    epsilons=(2.0, 6.0), seeds=(0,), dpsgd_lr=2.0, dpzero_lr=0.2,
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
        # One direction per step, on the same trainable set. Rademacher directions lie on
        # DPZero's sphere of radius sqrt(d) and have E[zz^T] = I, as its analysis needs, at a
        # fraction of a Gaussian's generation cost.
        return with_changes(config, schedule={**constant, "lr": plan.dpzero_lr},
                            zo={"distribution": "rademacher", "probes": 1})
    if method == "federated":
        return with_changes(config, federation={"silos": plan.federated_clients, "min_silos": 1})
    return config


def run_one(method: str, settings: dict, run_dir: str, dpsgd_lr: float, baseline: dict | None = None,
            threads: int | None = None) -> dict:
    """One run in this (fresh) process: test metrics, epsilon spent, peak memory, wall time.
    (A federated run's silos live in Ray worker processes: its peak memory is the coordinator's.)
    ``threads``: torch's threads, when several runs share the machine."""
    warnings.simplefilter("ignore")  # e.g. MeZO's non-private warning: the table says so
    if threads:
        import torch

        torch.set_num_threads(threads)
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
        from seedtune.bench.ceiling import ceiling

        metrics, epsilon = ceiling(config), math.inf
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
    extra = {key: metrics[key] for key in ("opacus_epsilon", "validation_accuracy", "best_epoch", "lr",
                                           "epoch_validation_accuracy", "train_loss") if key in metrics}
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
                  dpsgd_lr: float | None = None, jobs: int = 1, epsilons: tuple[float, ...] | None = None,
                  progress: bool = True) -> dict:
    plan = QUICK if quick else FULL
    if jobs < 1:
        raise SeedtuneError(f"--jobs {jobs} must be >= 1")
    if epsilons is not None:
        if not epsilons or not all(e > 0 and math.isfinite(e) for e in epsilons):
            raise SeedtuneError(f"--epsilons {','.join(map(str, epsilons))}: each must be a finite number > 0")
        plan = replace(plan, epsilons=tuple(epsilons))
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
    records: list[dict] = []
    baseline = None
    started = time.perf_counter()
    context = get_context("spawn")
    threads = max(1, _cpus() // jobs) if jobs > 1 else None
    # Zero-shot first: every later run starts from its model and reports it as "before". The
    # federated runs last, one at a time: each spreads its silos over every core itself.
    waves = [([r for r in runs if r[0] == "zero-shot"], 1),
             ([r for r in runs if r[0] not in ("zero-shot", "federated")], jobs),
             ([r for r in runs if r[0] == "federated"], 1)]
    with tqdm(total=len(runs), disable=not progress, unit="run", desc="bench utility") as bar:
        for wave, width in waves:
            if not wave:
                continue
            # A fresh process per run (max_tasks_per_child=1): its peak memory is its own, and
            # nothing leaks between runs.
            with ProcessPoolExecutor(max_workers=min(width, len(wave)), mp_context=context,
                                     max_tasks_per_child=1) as pool:
                pending = {}
                for method, epsilon, seed in wave:
                    config = method_config(base, method, epsilon, seed, plan)
                    name = f"{method}-eps{epsilon:g}-seed{seed}" if epsilon else f"{method}-seed{seed}"
                    pending[pool.submit(run_one, method, config.to_dict(), str(out / "runs" / name), plan.dpsgd_lr,
                                        baseline, threads if width > 1 else None)] = (method, epsilon, seed)
                for future in as_completed(pending):
                    method, epsilon, seed = pending[future]
                    result = future.result()
                    if method == "zero-shot":
                        baseline = {"accuracy": result["accuracy"], "loss": result["loss"]}
                    records.append({"method": method, "epsilon": epsilon, "seed": seed, **result})
                    records.sort(key=lambda r: runs.index((r["method"], r["epsilon"], r["seed"])))
                    _write(out, base, plan, quick, records, time.perf_counter() - started, complete=False, jobs=jobs)
                    bar.set_postfix_str(f"{method} {epsilon or ''} done")
                    bar.update(1)
    summary = _write(out, base, plan, quick, records, time.perf_counter() - started, complete=True, jobs=jobs)
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
    reference = {row["method"]: row["accuracy"] for row in rows if row["method"] in ONCE}
    if len(reference) == 2 and reference["ceiling"] != reference["zero-shot"]:
        for row in rows:  # the share of the zero-shot-to-ceiling gap closed: 1 = the ceiling
            row["of_ceiling"] = (row["accuracy"] - reference["zero-shot"]) / (reference["ceiling"] - reference["zero-shot"])
    return rows


def _write(out: Path, base: Config, plan: Plan, quick: bool, records: list[dict], wall: float,
           complete: bool, jobs: int = 1) -> dict:
    import platform

    import torch

    summary = {
        "complete": complete,
        "quick": quick,
        "wall_s": wall,
        "jobs": jobs,  # runs at once: each run's wall time is on its share of the cores
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
    seeds = len(summary["plan"]["seeds"])
    axis.set_ylabel("test accuracy" + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else " (one seed)"))
    config = summary["config"]
    axis.set_title(f"{config['model']['name']} on {config['data']['name']}, {config['schedule']['steps']} steps"
                   + (" (quick)" if summary["quick"] else ""))
    axis.legend(fontsize="small", loc="best")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
