"""``seedtune bench step|memory|sweep``: what a zeroth-order step costs in time and memory.

Every figure is a ratio of two things measured in the same run, so the machine's speed (and its
neighbours' load) cancels out:

* ``step`` — the time of one private ZO step (estimate, clip, noise, update) on all-MiniLM-L6-v2
  with a batch of 16 real sequences of exactly 64 tokens, divided by the time of two plain
  forward passes on the same batch, in the same process, measured alternately. Two forwards per
  probe are what a two-point estimate cannot avoid (the limit 1.0). Variants: every parameter,
  the 1% SynFlow mask, LoRA, K = 4 (divided by 4 x two forwards), and the naive MeZO step
  (in-place perturbation with torch's Gaussian generator, z drawn four times) for comparison;
  and the silo's own path, whose shapes depend on no other example (each example alone, or
  fixed micro-batches of 8): what the privacy argument needs costs more than one batch.
* ``memory`` — the resident memory above the loaded model at the peak of a step, each method in
  a fresh process: inference, the ZO step, plain backpropagation (SGD) and DP-SGD through Opacus.
  The peak is the kernel's high-water mark (``VmHWM``), reset after loading
  (``/proc/self/clear_refs``), so loading does not hide it.
* ``sweep`` — step time and that memory against batch size for the same four methods, with a plot.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from seedtune.common.errors import SeedtuneError

BATCH, LENGTH = 16, 64
COST_METHODS = ("inference", "zo", "backprop", "dp-sgd")
SWEEP_BATCHES = (1, 4, 16, 64)


@dataclass
class Workload:
    """all-MiniLM-L6-v2 and a fixed batch of ``batch_size`` real sequences of ``length`` tokens."""

    config: object
    task: object
    batch: dict
    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.texts)


def workload(batch_size: int = BATCH, length: int = LENGTH, overrides: tuple[str, ...] = ()) -> Workload:
    """The default preset's model and data, every sequence filled to ``length`` tokens by joining
    consecutive review snippets (real text, no padding: padding would make forwards cheaper)."""
    from seedtune.common import components
    from seedtune.common.config import load_config

    config = load_config("default", overrides=[f"model.max_length={length}", *overrides])
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    texts, labels, pool = [], [], iter(zip(data.train["text"], data.train["label"]))
    while len(texts) < batch_size:
        text, label = next(pool)
        while len(task.tokenizer(text)["input_ids"]) < length:
            text = f"{text} {next(pool)[0]}"
        texts.append(text)
        labels.append(label)
    batch = task.encode(texts, labels)
    if batch["input_ids"].shape != (batch_size, length):
        raise SeedtuneError(f"could not fill {batch_size} sequences to {length} tokens")
    return Workload(config, task, batch, texts, labels, data.label_names)


def two_forwards(work: Workload) -> Callable[[], None]:
    import torch

    def run() -> None:
        with torch.no_grad():
            work.task.per_example_loss(work.task.module, work.batch)
            work.task.per_example_loss(work.task.module, work.batch)

    return run


def paired(step: Callable[[], None], baseline: Callable[[], None], repeats: int) -> dict:
    """Median step time, median baseline time and the median of their per-pair ratios, timed
    alternately after one warm-up of each (so a slow spell of the machine hits both)."""
    step(), baseline()
    steps, bases = [], []
    for _ in range(repeats):
        for fn, times in ((baseline, bases), (step, steps)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(steps), "baseline_s": statistics.median(bases),
            "ratio": statistics.median(s / b for s, b in zip(steps, bases))}


# -- the ZO step ---------------------------------------------------------------------------
def zo_step(work: Workload, mask: dict, probes: int, *, cache_prefix: bool = True,
            micro_batch: int | None = None) -> Callable[[], None]:
    """One private step as a silo and the coordinator run it: estimate, clip, sum, noise (secret
    randomness), normalise, update. The durable ledger and log writes are timed in ``server``.

    ``micro_batch``: None estimates on the workload's batch in one piece (the mechanism's cost
    against forwards of the same batch); a number runs the silo's own path,
    ``estimate_examples``, in shapes that depend on no other example (1: each example alone)."""
    import numpy as np
    from seedtune.common import components
    from seedtune.common.estimator import ZerothOrderEstimator
    from seedtune.common.privacy.mechanism import clip_per_example
    from seedtune.common.privacy.randomness import SecretRandomness
    from seedtune.common.update import apply_update

    parts = components.model_parts(work.config, work.task, mask)
    estimator = ZerothOrderEstimator(work.task.module, work.task.per_example_loss, parts.trainable,
                                     parts.directions, cache_prefix=cache_prefix, micro_batch=micro_batch or 1)
    randomness = SecretRandomness()
    clip, sigma, beta, lr = 2.0, 1.0, 1e-3, 1e-6
    counter = iter(range(1 << 62))

    def estimate_step(seeds):
        if micro_batch is None:
            return estimator.estimate(work.batch, work.size, seeds, beta)
        return estimator.estimate_examples(work.task, work.texts, work.labels, seeds, beta)

    def run() -> None:
        seeds = [next(counter) for _ in range(probes)]
        estimate = estimate_step(seeds)
        total = clip_per_example(estimate.differences, clip).sum(dim=0).numpy()
        values = (total + randomness.normal(probes) * sigma * clip) / work.size
        apply_update(parts.trainable, parts.directions, seeds, [float(v) for v in np.asarray(values)], lr)

    run.dimension = parts.trainable.dimension
    return run


def naive_mezo_step(work: Workload) -> Callable[[], None]:
    """MeZO's reference step (Malladi et al. 2023): perturb every parameter in place with z from
    torch's Gaussian generator reseeded per step, +eps, -2 eps, +eps, then regenerate z a fourth
    time for the update; the loss is the batch mean."""
    import torch

    params = [p for p in work.task.module.parameters()]
    counter = iter(range(1 << 62))
    eps, lr = 1e-3, 1e-6

    def perturb(seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for param in params:
            z = torch.normal(mean=0, std=1, size=param.size(), dtype=param.dtype)
            param.data.add_(z, alpha=scale * eps)

    @torch.no_grad()
    def run() -> None:
        seed = next(counter)
        perturb(seed, 1)
        plus = work.task.per_example_loss(work.task.module, work.batch).mean()
        perturb(seed, -2)
        minus = work.task.per_example_loss(work.task.module, work.batch).mean()
        perturb(seed, 1)
        grad = float(plus - minus) / (2 * eps)
        torch.manual_seed(seed)
        for param in params:
            z = torch.normal(mean=0, std=1, size=param.size(), dtype=param.dtype)
            param.data.add_(z, alpha=-lr * grad)

    return run


def step_masks(work: Workload) -> dict[str, dict]:
    """The trainable sets of the step variants, through the same choice a run makes."""
    from seedtune.common import components
    from seedtune.common.config import with_changes

    def mask_for(**changes) -> dict:
        config = with_changes(work.config, **changes)
        return components.choose_mask(config, work.task, work.batch)

    return {
        "full": mask_for(prune={"enabled": False}),
        "mask1": mask_for(prune={"enabled": True, "ratio": 0.01, "always": ["classifier.*"]}),
    }


def bench_step(repeats: int = 10, progress: bool = True) -> dict:
    """Step time over two forwards for each variant (see the module docstring)."""
    import torch

    from seedtune.common import components

    rows = []
    work = workload()
    masks = step_masks(work)
    variants = [
        ("every parameter, K=1", masks["full"], 1, True, None),
        ("every parameter, K=4", masks["full"], 4, True, None),
        ("1% SynFlow mask, K=1", masks["mask1"], 1, True, None),
        ("1% SynFlow mask, K=1, no prefix cache", masks["mask1"], 1, False, None),
        # The silo's path: shapes that depend on no other example (the privacy argument needs them).
        ("every parameter, K=1, each example alone", masks["full"], 1, True, 1),
        ("every parameter, K=1, micro-batches of 8", masks["full"], 1, True, 8),
        ("1% SynFlow mask, K=1, each example alone", masks["mask1"], 1, True, 1),
    ]
    baseline = two_forwards(work)
    for label, mask, probes, cache, micro_batch in _progress(variants, progress, "step"):
        step = zo_step(work, mask, probes, cache_prefix=cache, micro_batch=micro_batch)
        figures = paired(step, baseline, repeats)
        figures["ratio"] /= probes  # per probe: against K x two forwards
        rows.append({"variant": label, "probes": probes, "trainable": step.dimension, **figures})
    figures = paired(naive_mezo_step(work), baseline, repeats)
    rows.append({"variant": "naive MeZO (in-place, torch RNG), K=1", "probes": 1,
                 "trainable": sum(p.numel() for p in work.task.module.parameters()), **figures})

    lora = workload(overrides=("lora.enabled=true",))
    mask = components.choose_mask(lora.config, lora.task, lora.batch)
    step = zo_step(lora, mask, 1)
    figures = paired(step, two_forwards(lora), repeats)
    rows.append({"variant": f"LoRA rank {lora.config.lora.rank} + head, K=1", "probes": 1,
                 "trainable": step.dimension, **figures})

    by = {row["variant"]: row["ratio"] for row in rows}
    return {
        "bench": "step",
        "setup": _setup(work, torch),
        "rows": rows,
        "targets": [
            _target("ZO step / two forwards, every parameter", by["every parameter, K=1"], 1.3),
            _target("ZO step / two forwards, 1% mask", by["1% SynFlow mask, K=1"], 1.05),
        ],
    }


# -- memory and time of one step, each method in a fresh process ------------------------------
def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


def _high_water_kib() -> int:
    return _status_kib("VmHWM")  # the peak resident memory since the last reset


def _resident_kib() -> int:
    return _status_kib("VmRSS")


def _reset_high_water() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


def measure_cost(method: str, batch_size: int, length: int = LENGTH, repeats: int = 3) -> dict:
    """In this (fresh) process: the median time of ``repeats`` steps of ``method`` or, in a
    process started by :func:`in_fresh_process` with ``exact_memory``, the peak resident memory
    above the loaded model during them."""
    import gc
    import warnings

    import torch

    warnings.simplefilter("ignore")  # Opacus's and torch's notes on hooks, once per process
    torch.set_num_threads(_threads())
    work = workload(batch_size, length)
    step = _cost_step(method, work)
    _inference(work)  # the same warm-up for every method: libraries' lazy set-up is not a step's
    gc.collect()
    loaded = _resident_kib()
    _reset_high_water()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _high_water_kib()
    model_bytes = sum(p.numel() * p.element_size() for p in work.task.module.parameters())
    return {"method": method, "batch": batch_size, "length": length, "step_s": statistics.median(times),
            "peak_above_model_mib": (peak - loaded) / 1024, "model_mib": model_bytes / 2**20}


def _cost_step(method: str, work: Workload) -> Callable[[], None]:
    import torch

    module = work.task.module
    if method == "inference":
        return lambda: _inference(work)
    if method == "zo":
        return zo_step(work, step_masks(work)["full"], 1)
    inputs = {k: v for k, v in work.batch.items() if k != "labels"}
    # Explicit per-example position ids: Opacus forms per-example gradients only for tensors
    # looked up per example, and BERT otherwise looks its position embeddings up once per batch.
    inputs["position_ids"] = torch.arange(work.batch["input_ids"].shape[1]).expand_as(work.batch["input_ids"])
    labels = work.batch["labels"]
    module.train()
    for param in module.parameters():
        param.requires_grad_(True)
    if method == "backprop":
        model, optimizer = module, torch.optim.SGD(module.parameters(), lr=1e-6)
    elif method == "dp-sgd":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        model = GradSampleModule(module)  # per-example gradients, clipped and noised by the optimizer
        optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=1e-6), noise_multiplier=1.0,
                                max_grad_norm=2.0, expected_batch_size=work.size)
    else:
        raise SeedtuneError(f"unknown method {method!r}; use one of {', '.join(COST_METHODS)}")

    def gradient_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits.float(), labels)
        loss.backward()
        optimizer.step()

    return gradient_step


def _inference(work: Workload) -> None:
    import torch

    with torch.no_grad():
        work.task.per_example_loss(work.task.module, work.batch)


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# glibc's allocator keeps freed memory for reuse, which made the same measurement vary by 5 MiB
# from run to run. With these settings every allocation of 64 KiB or more is mapped from the
# kernel and returned to it when freed, so resident memory follows the live tensors (repeats to
# 0.2 MiB); allocation is slower, so times are measured in separate processes without them.
EXACT_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": "0"}


def in_fresh_process(fn: Callable, *args, environment: dict[str, str] | None = None):
    """``fn(*args)`` in a new interpreter (with ``environment`` added): its memory is its own."""
    saved = {key: os.environ.get(key) for key in environment or {}}
    os.environ.update(environment or {})
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cost(method: str, batch_size: int) -> dict:
    """Time from one fresh process, memory from another (see EXACT_MEMORY)."""
    timed = in_fresh_process(measure_cost, method, batch_size)
    sized = in_fresh_process(measure_cost, method, batch_size, environment=EXACT_MEMORY)
    return {**timed, "peak_above_model_mib": sized["peak_above_model_mib"]}


def bench_memory(batch_size: int = BATCH, progress: bool = True) -> dict:
    rows = [cost(method, batch_size) for method in _progress(COST_METHODS, progress, "memory")]
    by = {row["method"]: row for row in rows}
    inference = by["inference"]["peak_above_model_mib"]
    for row in rows:
        row["vs_inference"] = row["peak_above_model_mib"] / inference
    zo = by["zo"]["peak_above_model_mib"]
    return {
        "bench": "memory",
        "setup": {"model": "all-MiniLM-L6-v2", "batch": batch_size, "length": LENGTH,
                  "model_mib": by["zo"]["model_mib"], "threads": _threads(),
                  # What a ZO step must hold above inference: one layer's perturbed weights.
                  "largest_layer_mib": 1536 * 384 * 4 / 2**20, "zo_above_inference_mib": zo - inference},
        "rows": rows,
        "targets": [
            _target("ZO step memory / inference memory (above the model)", zo / inference, 1.1),
            _target("DP-SGD (Opacus) memory / ZO step memory", by["dp-sgd"]["peak_above_model_mib"] / zo, 5.0,
                    at_least=True),
        ],
    }


def bench_sweep(out: Path, batches: tuple[int, ...] = SWEEP_BATCHES, progress: bool = True) -> dict:
    """Step time and memory against batch size, each point in a fresh process; sweep.json and
    sweep.png in ``out``."""
    grid = [(method, batch) for batch in batches for method in COST_METHODS]
    rows = [cost(method, batch) for method, batch in _progress(grid, progress, "sweep")]
    summary = {"bench": "sweep", "setup": {"model": "all-MiniLM-L6-v2", "length": LENGTH, "threads": _threads()},
               "rows": rows, "targets": []}
    out.mkdir(parents=True, exist_ok=True)
    _atomic_json(out / "sweep.json", summary)
    sweep_plot(summary, out / "sweep.png")
    return summary


def sweep_plot(summary: dict, path: Path) -> None:
    from seedtune.server.plots import plt

    figure, (timing, memory) = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"inference": "inference (one forward)", "zo": "ZO step (seedtune, K=1)",
              "backprop": "backpropagation (SGD)", "dp-sgd": "DP-SGD (Opacus)"}
    for method in COST_METHODS:
        rows = sorted((r for r in summary["rows"] if r["method"] == method), key=lambda r: r["batch"])
        if not rows:
            continue
        batches = [r["batch"] for r in rows]
        timing.plot(batches, [r["step_s"] for r in rows], marker="o", label=labels[method])
        memory.plot(batches, [max(r["peak_above_model_mib"], 0.1) for r in rows], marker="o", label=labels[method])
    for axis, title in ((timing, "time per step (s)"), (memory, "peak memory above the model (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(f"batch size (sequences of {summary['setup']['length']} tokens)")
        axis.set_title(title)
        axis.grid(alpha=0.3, which="both")
    timing.legend(fontsize="small")
    figure.suptitle("all-MiniLM-L6-v2, every parameter trainable")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- shared helpers -------------------------------------------------------------------------
def _target(claim: str, value: float, limit: float, *, at_least: bool = False) -> dict:
    met = value >= limit if at_least else value <= limit
    return {"claim": claim, "value": value, "limit": limit, "at_least": at_least, "met": bool(met)}


def _setup(work: Workload, torch) -> dict:
    return {"model": "all-MiniLM-L6-v2", "batch": work.size, "length": work.batch["input_ids"].shape[1],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _progress(items, enabled: bool, label: str):
    from tqdm.auto import tqdm

    return tqdm(list(items), desc=label, disable=not enabled, leave=False, dynamic_ncols=True)


def _atomic_json(path: Path, data: dict) -> None:
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(data, indent=2))
    staging.replace(path)

