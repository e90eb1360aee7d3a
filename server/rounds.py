"""The round loop that ``seedtune train`` and a federation share.

Everything around a round is decided here, once: the test metrics before and after, the
validation cadence (``eval.every`` and the last round), how often epsilon is refreshed (the
accountant costs about 20 ms a call), the metrics logged per round, the progress bar, and what
ends a run early. Playing a round (asking silos, validating replies, applying the step) is the
caller's: :class:`~seedtune.server.federation.Federation` over a transport, or ``train``'s one
in-process silo. A round that a crash interrupts is asked again with the same request, and a silo
answers it with the release its ledger already holds (:class:`~seedtune.client.silo.Silo`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from seedtune.common.errors import BudgetExhausted
from seedtune.server.runs import Run
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

EPSILON_REFRESH_S = 1.0  # seconds between two refreshes of the epsilon series


@dataclass
class Played:
    """What one round reports for the log and the bar: public values only."""

    metrics: dict[str, float] = field(default_factory=dict)  # logged with the round's step
    postfix: dict[str, str] = field(default_factory=dict)  # shown on the bar only


@dataclass
class LoopResult:
    before: dict  # test metrics of the starting model
    after: dict  # test metrics of the final model
    stopped_early: str | None  # why the run ended before its planned rounds


def run_rounds(run: Run, play: Callable[[], Played], epsilons: Callable[[], dict[str, float]], *,
               progress: bool, desc: str, unit: str, baseline: dict | None = None) -> LoopResult:
    """Play ``run``'s remaining rounds; ``epsilons()`` gives the series to log (``{"epsilon": e}``
    for one silo, ``{"epsilon.<silo>": e, ...}`` for a federation). A silo out of budget
    (:class:`~seedtune.common.errors.BudgetExhausted`, or the federation's ``OutOfBudget``) ends
    the run with the rounds it has: the model so far is a valid private model."""
    coordinator, run_log = run.coordinator, run.log
    before = run_log.meta("before") or baseline or run.evaluate("test", run.config.eval.test_examples)
    run_log.set_meta("before", before)
    if coordinator.step == 0:
        run_log.record_metrics(0, _validation(run))
    bar = tqdm(total=run.schedule.steps, initial=coordinator.step, disable=not progress, unit=unit,
               dynamic_ncols=True, desc=desc, file=sys.stderr)
    spent, refreshed, stopped_early = {}, 0.0, None
    try:
        while not coordinator.done:
            before_round = coordinator.step
            try:
                played = play()
            except BudgetExhausted as error:
                stopped_early = f"stopped after {coordinator.step} of {run.schedule.steps} {unit}s: {error}"
                log.warning("%s", stopped_early)
                break
            if time.monotonic() - refreshed > EPSILON_REFRESH_S or coordinator.done:
                spent, refreshed = epsilons(), time.monotonic()
                played.metrics.update(spent)
            every = run.config.eval.every
            if every and (coordinator.step // every > before_round // every or coordinator.done):  # crossed a multiple
                played.metrics.update(_validation(run))
            run_log.record_metrics(coordinator.step, played.metrics)
            bar.set_postfix(_postfix(played, spent), refresh=False)
            bar.update(coordinator.step - before_round)  # a round of local steps moves several
    finally:
        bar.close()
    after = run.evaluate("test", run.config.eval.test_examples)
    run_log.set_meta("after", after)
    return LoopResult(before, after, stopped_early)


def _validation(run: Run) -> dict[str, float]:
    return {f"val_{k}": v for k, v in run.evaluate("validation").items()}


def _postfix(played: Played, spent: dict[str, float]) -> dict[str, str]:
    postfix = dict(played.postfix)
    postfix["eps"] = "/".join(f"{e:.3f}" for e in spent.values()) if spent else "off"
    if "val_accuracy" in played.metrics:
        postfix["val_acc"] = f"{played.metrics['val_accuracy']:.3f}"
    return postfix
