"""``seedtune bench recipe``: choose a recipe for a linear readout on the validation split, in minutes.

When only a linear readout trains (:mod:`seedtune.bench.readout`: the cosine head, or a prompt
classifier's final norm), the frozen network's features are fixed, so the whole private run can
be replayed on them: each silo Poisson-samples its shard at q, every sampled example's K
directional derivatives along Rademacher directions are clipped to C in L2, Gaussian noise sigma C
is added to the sum of each coordinate (sigma from seedtune's own accountant for the run's
epsilon, delta, q and steps), the coordinator takes the q n-weighted mean, and the readout moves
by -lr / K sum_k g_k z_k, with the constant or stagewise schedule. What it leaves out, and why
that does not change a choice:

* the real silos' finite differences at beta are replaced by exact directional derivatives; with
  logits linear in the coordinates they differ by O(beta^2) relative (beta = 1e-3);
* the noise is the continuous Gaussian, the discrete one's variance is within 0.1 % of it;
* the directions come from torch's generator, not from the run's seeds (the same distribution).

So a sweep point is the real run's accuracy up to its run-to-run spread, at a thousandth of the
cost (a 1,200-step, 3-silo point takes about 20 s on one core). It reads the training and
validation splits only: **it never loads the test split**, so nothing it chooses is chosen on it.
The default preset's recipe (K, q, C, step size, schedule) was chosen with it (docs/results.md).

``method="dp-sgd"`` replays the utility bench's first-order baseline instead, on the same
features: DP-SGD through Opacus on the readout, one silo holding all the training data, the very
code ``seedtune bench utility --methods dp-sgd`` runs (:func:`seedtune.bench.dpsgd.train_readout`),
so its step size is chosen on validation too.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from seedtune.bench import dpsgd
from seedtune.bench.ceiling import fit
from seedtune.bench.readout import Readout, readout_of
from seedtune.bench.traffic import reply_bytes
from seedtune.common import components
from seedtune.common.config import Config, with_changes
from seedtune.common.errors import ConfigError
from seedtune.common.partition import partition_indices
from seedtune.common.privacy.accounting import calibrate_noise_multiplier
from seedtune.common.privacy.mechanism import lattice_sensitivity, lattice_step

# What a sweep may vary, and where each lives in the config.
KEYS = {"steps": ("schedule", "steps", int), "lr": ("schedule", "lr", float), "kind": ("schedule", "kind", str),
        "stages": ("schedule", "stages", int), "probes": ("zo", "probes", int),
        "sample_rate": ("privacy", "sample_rate", float), "clip_bound": ("privacy", "clip_bound", float),
        "epsilon": ("privacy", "epsilon", float), "silos": ("federation", "silos", int)}
METHODS = ("zeroth-order", "dp-sgd")
DP_SGD_KEYS = ("steps", "lr", "sample_rate", "clip_bound", "epsilon")  # what DP-SGD on one silo has


@dataclass(frozen=True)
class Features:
    """The frozen network's features of the training and validation splits, for a linear readout."""

    readout: Readout
    train: torch.Tensor
    train_labels: torch.Tensor
    validation: torch.Tensor
    validation_labels: torch.Tensor
    start: torch.Tensor  # the readout's starting coordinates
    texts: list[str]  # the training texts, for partitioning as a simulation does


def features(config: Config) -> Features:
    """Features of the training and validation splits (never the test split's)."""
    data, task, readout = readout_of(config)
    size = config.eval.batch_size
    return Features(readout, *readout.features(task, data.train, size), *readout.features(task, data.validation, size),
                    readout.start(task), list(data.train["text"]))


def replay(config: Config, data: Features, seed: int, noise: str = "per-silo",
           method: str = "zeroth-order") -> tuple[float, float]:
    """Validation accuracy and loss of one private run of ``config`` on its readout, replayed on
    the features (``noise``: :func:`train_readout`'s; ``method="dp-sgd"``: :func:`train_dp_sgd`)."""
    theta = train_dp_sgd(config, data, seed) if method == "dp-sgd" else train_readout(config, data, seed, noise)
    logits = data.readout.logits(data.validation, theta)
    return (float((logits.argmax(dim=1) == data.validation_labels).float().mean()),
            float(F.cross_entropy(logits, data.validation_labels)))


def train_dp_sgd(config: Config, data: Features, seed: int) -> torch.Tensor:
    """The readout's coordinates after ``config``'s DP-SGD run (one silo, all the training data),
    its batches and noise drawn from ``seed``."""
    sigma = gaussian_multiplier(config)
    return dpsgd.train_readout(config, data.readout, data.start, data.train, data.train_labels,
                               lr=config.schedule.lr, sigma=sigma, generator=torch.Generator().manual_seed(seed))


def gaussian_multiplier(config: Config) -> float:
    """One silo's Gaussian noise multiplier for ``config``'s (epsilon, delta, q, steps); 0 without privacy."""
    p = config.privacy
    if not p.enabled:
        return 0.0
    return calibrate_noise_multiplier(p.epsilon, p.delta, p.sample_rate, config.schedule.steps, p.accountant,
                                      noise="gaussian")


NOISE_MODES = ("per-silo", "secure", "one-silo")


def train_readout(config: Config, data: Features, seed: int, noise: str = "per-silo") -> torch.Tensor:
    """The readout's coordinates after ``config``'s run, replayed on the features with directions,
    samples and noise drawn from ``seed``. ``noise``: each silo noises its own sum at sigma
    ("per-silo", what seedtune does without secure aggregation); only the sum of the silos' sums is
    noised, by t shares of a multiplier calibrated for them ("secure": secure aggregation with
    distributed noise, t = ``federation.honest``; the sum of t discrete Gaussian shares replayed as
    one Gaussian of their summed variance); or one silo holds all the data ("one-silo")."""
    if noise not in NOISE_MODES:
        raise ValueError(f"noise={noise!r} is not one of {NOISE_MODES}")
    generator = torch.Generator().manual_seed(seed)
    p, schedule = config.privacy, config.schedule
    silos = 1 if noise == "one-silo" else config.federation.silos
    shards = partition_indices(data.texts, data.train_labels.tolist(), silos, scheme=config.federation.partition,
                               alpha=config.federation.alpha, seed=config.data.split_seed)
    shards = [torch.as_tensor(shard) for shard in shards]
    sigma = gaussian_multiplier(config) if noise != "secure" else 0.0
    summed_std = 0.0  # secure: the standard deviation of the summed shares, per coordinate
    if p.enabled and noise == "secure":
        with_secure = with_changes(config, federation={"secure_aggregation": True})
        share = share_multiplier(with_secure)
        unit = float(lattice_sensitivity(p.clip_bound, config.zo.probes)) * lattice_step(p.clip_bound)  # D g
        summed_std = math.sqrt(with_secure.federation.honest) * share * unit
    readout, theta = data.readout, data.start.clone()
    plan_of = components.make_schedule(config).plan
    probes = config.zo.probes
    for step in range(schedule.steps):
        z = torch.randint(0, 2, (probes, theta.numel()), generator=generator).float().mul_(2).sub_(1)
        total, population = torch.zeros(probes), 0.0
        for shard in shards:
            chosen = shard[torch.rand(len(shard), generator=generator) < p.sample_rate]
            x, y = data.train[chosen], data.train_labels[chosen]
            logits = readout.logits(x, theta)
            residual = torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).float()  # d loss / d logits
            projected = torch.einsum("nkc,nc->nk", readout.linear(x, z), residual)  # each example's K derivatives
            if p.enabled:
                norms = projected.norm(dim=1, keepdim=True).clamp_min(1e-12)
                projected = projected * torch.clamp(p.clip_bound / norms, max=1.0)
                total += torch.randn(probes, generator=generator) * sigma * p.clip_bound
            total += projected.sum(dim=0)
            population += p.sample_rate * len(shard)
        if summed_std:
            total += torch.randn(probes, generator=generator) * summed_std
        plan = plan_of(step)
        theta -= (total / population) @ z * (plan.lr / probes)
    return theta


@functools.lru_cache(maxsize=64)
def share_multiplier(config: Config) -> float:
    """The calibrated share of a secure-aggregation config, once per config (a calibration under
    distributed noise takes seconds; a bench replays the same config for every seed)."""
    return components.noise_multiplier(config)


def parse_grid(pairs: list[str], method: str = "zeroth-order") -> dict[str, list]:
    """``key=v1,v2`` pairs into {key: [values]}; a one-line error names a bad key or value."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    keys = DP_SGD_KEYS if method == "dp-sgd" else tuple(KEYS)
    grid = {}
    for pair in pairs:
        key, _, values = pair.partition("=")
        if key not in keys or not values:
            raise ConfigError(f"--vary {pair!r}: expected KEY=V1,V2 with KEY one of {', '.join(keys)}"
                              + (" (DP-SGD runs one silo, without probes or stages)" if key in KEYS else ""))
        kind = KEYS[key][2]
        try:
            grid[key] = [kind(value) for value in values.split(",")]
        except ValueError:
            raise ConfigError(f"--vary {pair!r}: {values!r} are not all {kind.__name__} values") from None
    return grid


def at_point(base: Config, point: dict) -> Config:
    """``base`` with a grid point's settings (the point's other fields, results, ignored)."""
    changes: dict[str, dict] = {}
    for key, value in point.items():
        if key in KEYS:
            section, name, _ = KEYS[key]
            changes.setdefault(section, {})[name] = value
    return with_changes(base, **changes).validate()


def sweep(base: Config, grid: dict[str, list], seeds: int, data: Features, progress: bool = True,
          method: str = "zeroth-order") -> list[dict]:
    """Every point of ``grid`` over ``base``, each replayed with ``seeds`` seeds on ``data`` by
    ``method``: validation accuracy (mean, smallest, each), mean validation loss and the bytes of
    one silo's reply (None for DP-SGD, which has no such reply), best mean accuracy first."""
    from tqdm.auto import tqdm

    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    rows = []
    for point in tqdm(points, disable=not progress, unit="point", desc="bench recipe"):
        config = at_point(base, point)
        accuracies, losses = zip(*(replay(config, data, seed, method=method) for seed in range(seeds)))
        rows.append({**point, "validation_accuracy": statistics.fmean(accuracies),
                     "validation_loss": statistics.fmean(losses),
                     "uplink_bytes": None if method == "dp-sgd" else reply_bytes(config.zo.probes),
                     "smallest": min(accuracies), "each": list(accuracies),
                     "sigma": gaussian_multiplier(config)})
    return sorted(rows, key=lambda row: -row["validation_accuracy"])


def validation_ceiling(data: Features) -> float:
    """Validation accuracy of the readout at the minimum of the training loss (no privacy)."""
    theta, _ = fit(data.readout, data.train, data.train_labels, data.start)
    logits = data.readout.logits(data.validation, theta)
    return float((logits.argmax(dim=1) == data.validation_labels).float().mean())


def bench_recipe(preset: str, file, overrides: list[str], vary: list[str], seeds: int, progress: bool = True,
                 time_steps: bool = False, method: str = "zeroth-order") -> dict:
    """The sweep over ``vary`` from simulate's ``preset`` (with ``file`` and ``overrides``) by
    ``method``, and the validation accuracy of the non-private ceiling beside it; with
    ``time_steps``, each point's real silo step time too (:func:`step_seconds`, zeroth-order only)."""
    from seedtune.common.config import load_config

    grid = parse_grid(vary, method)
    if time_steps and method == "dp-sgd":
        raise ConfigError("--time-steps times a zeroth-order silo's step; leave it out with --method dp-sgd")
    base = load_config(preset, file, overrides, command="simulate")
    data = features(base)
    points = sweep(base, grid, seeds, data, progress, method)
    if time_steps:
        step_seconds(base, points)
    return {"preset": preset, "overrides": list(overrides), "method": method, "seeds": seeds, "grid": grid,
            "validation_ceiling": validation_ceiling(data), "points": points}


def step_seconds(base: Config, points: list[dict], repeats: int = 3) -> None:
    """Add to each point the median time of one real silo step at its K and q: the estimator of
    a silo of the first shard, on the real model, its frozen encoder's outputs kept for the whole
    shard first (as a silo keeps them before its first step), one Poisson sample per repeat."""
    import time

    import numpy as np
    from seedtune.common.estimator import ZerothOrderEstimator, micro_batch_for

    data, task, _ = readout_of(base)
    parts = components.model_parts(base, task, components.mask_for(base, task, data))
    shard = components.silo_shard(base, "train", 0, base.federation.silos)
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, parts.trainable, parts.directions,
                                     keep_prefix_mib=base.zo.keep_prefix_mib)
    generator = np.random.default_rng(0)
    for point in points:
        config = at_point(base, point)
        micro_batch = micro_batch_for(config.privacy.sample_rate * len(shard))
        estimator.keep_prefixes(task, shard["text"], shard["label"], micro_batch)
        times = []
        for _ in range(repeats):
            chosen = np.flatnonzero(generator.random(len(shard)) < config.privacy.sample_rate).tolist()
            rows = shard[chosen]
            start = time.perf_counter()
            estimator.estimate_examples(task, rows["text"], rows["label"], list(range(config.zo.probes)), 1e-3,
                                        micro_batch)
            times.append(time.perf_counter() - start)
        point["step_seconds"] = statistics.median(times)
