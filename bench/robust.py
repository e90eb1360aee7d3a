"""``seedtune bench robust``: one silo of five attacks; the final accuracy under each rule.

Five real silos (``SiloNode``, the tiny preset's synthetic two-class task split IID, a tiny
random BERT) train in this process over ``DirectTransport``: every message goes through the wire
encoding and the coordinator's validation, as in a deployment. Silo 4 answers honestly, then
rewrites the K scalars of its reply:

* ``largest`` — ``LARGEST`` (1e30) in every coordinate: the server refuses only non-finite
  values, so any finite float goes through (see docs/robustness.md);
* ``sign-flip`` — -(N - 1) times its honest values: under the mean it cancels the N - 1 honest
  silos' signal, leaving only noise;
* ``nan`` — NaN: the decoder refuses the reply and the round goes on with the other four.

Each (attack, rule) pair is one federation from the same start, with the same seeded sampling
and noise (each silo built with a ``SeededRandomness`` of its own: a benchmark's common random
numbers, never something a config can ask for), so the honest silos draw the same batches and
noise in every run. The figure is the final test accuracy (``FederationResult.after``).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from seedtune.bench.cost import _progress, _target
from seedtune.common.aggregation import RULES

ATTACKS = ("honest", "largest", "sign-flip", "nan")
SILOS = 5
ADVERSARY = SILOS - 1
LARGEST = 1e30
QUICK_ROUNDS = 4
# The tiny preset, made to learn in 40 rounds: only the head and the word embeddings train (1,762
# coordinates, the synthetic task's cue words among them). Each silo samples ~290 of its 960
# examples a round: the honest silos' scalars then differ by about half their mean (a smaller
# batch makes them differ more, and one attacker at an extreme biases a trimmed mean by a third
# of that spread, see docs/robustness.md). sigma = 1.5 spends epsilon = 8.1 per silo per run.
SETTINGS = ("data.synthetic_size=6000", "prune.enabled=true", "prune.ratio=0",
            "prune.always=classifier.*,*word_embeddings*", "privacy.epsilon=9", "privacy.sample_rate=0.3",
            "privacy.clip_bound=5", "privacy.noise_multiplier=1.5", "schedule.kind=constant",
            "schedule.steps=40", "schedule.lr=0.3", "eval.every=0", f"federation.silos={SILOS}",
            "federation.round_timeout=5", "federation.round_retries=0")


def robust_config(rule: str, *extra: str):
    from seedtune.common.config import load_config

    return load_config("tiny", overrides=[*SETTINGS, f"federation.aggregation={rule}", *extra], command="simulate")


def forged(attack: str, honest: list[float], silos: int) -> list[float]:
    """What the adversary sends instead of its honest scalars."""
    if attack == "largest":
        return [LARGEST] * len(honest)
    if attack == "sign-flip":
        return [-(silos - 1) * g for g in honest]
    if attack == "nan":
        return [math.nan] * len(honest)
    raise ValueError(f"unknown attack {attack!r}; use one of {', '.join(ATTACKS)}")


def adversarial(handler: Callable, attack: str, silos: int) -> Callable:
    """``handler``, whose encoded reply has its projected gradients replaced by ``forged``."""
    def answer(content):
        reply = handler(content)
        record = reply["reply"]
        record["projected_grads"] = forged(attack, list(record["projected_grads"]), silos)
        return reply
    return answer


class Silos:
    """``count`` real silo nodes (``SiloNode``) on IID shards, serving run after run: their ledgers
    hold every run's releases, within a budget of ``runs`` runs of ``config`` (one budget
    computation per silo, not one per run)."""

    def __init__(self, config, directory: Path, runs: int):
        from seedtune.client.node import SiloNode
        from seedtune.common import components
        from seedtune.common.config import with_changes
        from seedtune.common.privacy.randomness import SeededRandomness

        privacy = config.privacy
        count = config.federation.silos
        every_run = with_changes(config, schedule={"steps": runs * config.schedule.steps})
        budget = components.planned_epsilon(every_run, privacy.noise_multiplier)
        budget *= 1 + 1e-9  # the ledger recomputes it: equal, not a rounding error short
        self.nodes = {k: SiloNode(directory / f"silo{k}", _shard(k, count), partition=k,
                                  budget=(budget, privacy.delta, privacy.accountant),
                                  randomness=lambda k=k: SeededRandomness(config.seed * count + k, quiet=True))
                      for k in range(count)}

    def handlers(self, attack: str = "honest", adversary: int = ADVERSARY) -> dict[int, Callable]:
        from seedtune.client.app import handle_train

        handlers = {k: (lambda content, node=node, k=k: handle_train(content, node, partition=k))
                    for k, node in self.nodes.items()}
        if attack != "honest":
            handlers[adversary] = adversarial(handlers[adversary], attack, len(handlers))
        return handlers

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


def _shard(partition: int, partitions: int):
    def load(config, label_names, split="train"):
        from seedtune.common import components

        return components.silo_shard(config, split, partition, partitions)
    return load


def federate(config, run_dir: Path, silos: Silos, attack: str = "honest") -> dict:
    """One federation of ``silos``, silo ``ADVERSARY`` attacking: the test accuracy before and
    after, the rounds applied, the replies refused, and how many per-example rows the honest silos
    counted as zero for not being finite (from their ledgers). A federation that stops (too few
    valid replies) reports the accuracy of the model it had reached."""
    from seedtune.server.federation import DirectTransport, Federation, FederationError
    from seedtune.server.runs import open_run

    run = open_run(config, run_dir, resume=False, command="seedtune bench robust")
    federation = Federation(run, DirectTransport(silos.handlers(attack)), progress=False)
    try:
        result = federation.run_all()
        before, after, stopped = result.before, result.after, None
    except FederationError as error:
        before = run.log.meta("before")
        after, stopped = run.evaluate("test", config.eval.test_examples), str(error)
    zeroed = sum(entry["zeroed"] for k, node in silos.nodes.items() if k != ADVERSARY and node.ledger is not None
                 for entry in node.ledger.history() if entry["run_id"] == run.run_id)
    outcome = {"before": before["accuracy"], "accuracy": after["accuracy"], "rounds": run.coordinator.step,
               "refused": len(federation.store.rejections()), "zeroed": zeroed, "stopped": stopped,
               "cost": None if federation.aggregation is None else federation.aggregation.summary()}
    run.close()
    federation.store.close()
    return outcome


def bench_robust(*, quick: bool = False, progress: bool = True, overrides: tuple[str, ...] = ()) -> dict:
    """Every attack under every rule, the figures of docs/robustness.md, with ``overrides``
    (``--set``) over SETTINGS. ``quick``: a smoke test of QUICK_ROUNDS rounds, too few to learn
    (its targets are not expected to be met)."""
    pairs = [(attack, rule) for attack in ATTACKS for rule in RULES]
    extra = (*overrides, *((f"schedule.steps={QUICK_ROUNDS}",) if quick else ()))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        silos = Silos(robust_config("mean", *extra), Path(scratch), runs=len(pairs))
        try:
            for attack, rule in _progress(pairs, progress, "robust"):
                start = time.perf_counter()
                outcome = federate(robust_config(rule, *extra), Path(scratch) / f"{attack}-{rule}", silos, attack)
                rows.append({"attack": attack, "rule": rule, **outcome, "wall_s": time.perf_counter() - start})
        finally:
            silos.close()
    honest = {row["rule"]: row["accuracy"] for row in rows if row["attack"] == "honest"}
    for row in rows:
        row["change"] = row["accuracy"] - honest[row["rule"]]
    trimmed = [row for row in rows if row["rule"] == "trimmed-mean" and row["attack"] != "honest"]
    meaned = [row for row in rows if row["rule"] == "mean" and row["attack"] in ("largest", "sign-flip")]
    return {
        "bench": "robust",
        "setup": {"preset": "tiny", "settings": [*SETTINGS, *extra], "silos": SILOS, "adversary": ADVERSARY,
                  "largest": LARGEST, "trim": robust_config("trimmed-mean").federation.trim},
        "rows": rows,
        "targets": [
            *[_target(f"trimmed mean, {row['attack']}: accuracy within 2 points of the honest run, |change| in points",
                      100 * abs(row["change"]), 2.0) for row in trimmed],
            *[_target(f"mean, {row['attack']}: accuracy falls more than 2 points below the honest run, points",
                      -100 * row["change"], 2.0, at_least=True) for row in meaned],
        ],
    }
