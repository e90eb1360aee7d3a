"""Cost of one zeroth-order step against two plain forward passes, in one process.

    .venv/bin/python scripts/bench_step.py [--batch 16] [--repeats 5]

Prints, for MiniLM on Rotten Tomatoes text, the time of estimate + update per probe divided by
the time of two plain forwards on the same batch (the physical floor of a two-point estimate),
for full parameters, a 1% SynFlow mask and the head alone; each with and without computing the
frozen prefix once. Ratios within one run: the machine's speed cancels out.
"""

from __future__ import annotations

import argparse
import time

import torch

from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.estimator import ZerothOrderEstimator
from seedtune.common.pruning import synflow_mask
from seedtune.common.update import apply_update


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_config("default", overrides=["model.max_length=64"])
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    rows = data.train[: args.batch]
    batch = task.encode(rows["text"], rows["label"])
    batch = {k: v for k, v in batch.items()}
    masks = {
        "full parameters": {n: None for n, _ in task.module.named_parameters()},
        "1% SynFlow mask + head": synflow_mask(task.module, task.synflow_output, 0.01, ("classifier.*",)),
        "head only": {"classifier.weight": None, "classifier.bias": None},
    }

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def two_forwards():
        with torch.no_grad():
            task.per_example_loss(task.module, batch)
            task.per_example_loss(task.module, batch)

    print(f"batch {args.batch} x {batch['input_ids'].shape[1]} tokens, torch threads {torch.get_num_threads()}")
    for label, mask in masks.items():
        parts = components.model_parts(config, task, mask)
        for probes in (1, 4):
            for cache in (False, True):
                estimator = ZerothOrderEstimator(task.module, task.per_example_loss, parts.trainable,
                                                 parts.directions, cache_prefix=cache)
                seeds = list(range(probes))

                def step():
                    estimator.estimate(batch, args.batch, seeds, 1e-3)
                    apply_update(parts.trainable, parts.directions, seeds, [0.0] * probes, 1e-3)

                ratio = best(step) / best(two_forwards) / probes
                print(f"{label:>24}  K={probes}  prefix cache {'on ' if cache else 'off'}: "
                      f"step / (K x two forwards) = {ratio:.2f}")


if __name__ == "__main__":
    main()
