"""The coordinator's round loop over any transport: Flower's Grid, or a direct call in tests.

Each round: sample silos from public randomness, send each the request plus the updates it has
not applied (or, far behind, a checkpoint), collect replies until the timeout, reject the
malformed ones with a recorded reason, and apply the round only with at least
``federation.min_silos`` valid replies. A round short of replies is asked again (a silo that already answered
gets the very same request and answers with the same release from its ledger, uncharged) and
after ``federation.round_retries`` retries the run stops with its log intact: a round is never
half applied. The log, written before each update, is what a restarted coordinator resumes from;
a resumed run asks its silos the round in flight again, and they answer it the same way.

Silos are known by the name each asserts in its replies, not by Flower's node ids, which change
whenever a node restarts (:mod:`seedtune.server.store`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flwr.app import RecordDict
import numpy as np
from seedtune.common.errors import BudgetExhausted, SeedtuneError
from seedtune.common.privacy.mechanism import share_scale
from seedtune.common.protocol import EvaluationRequest, Participant, SecureRound, TrainReply, TrainRequest
from seedtune.common.secagg import check_bits, sum_bits, unmask_sum
from seedtune.common.updatelog import Checkpoint
from seedtune.common.wire import (
    Sync,
    WireError,
    decode_evaluation_reply,
    decode_keys_reply,
    decode_reply,
    encode_evaluation,
    encode_keys_request,
    encode_request,
)
from seedtune.common.aggregation import RuleCost
from seedtune.server.rounds import Played, run_rounds
from seedtune.server.runs import Run
from seedtune.server.store import FederationStore

log = logging.getLogger(__name__)


class NonPrivateEvaluationWarning(UserWarning):
    """Silos' exact evaluation counts leave them unprotected."""


class FederationError(SeedtuneError):
    """The federation could not complete a round."""


class Stopped(Exception):
    """The process running the coordinator asked it to stop (Ctrl-C in ``seedtune simulate``)."""


class OutOfBudget(FederationError, BudgetExhausted):
    """Too few silos have budget left for another round: the run ends with the rounds it has."""


STOP_HOOK = "SEEDTUNE_TEST_STOP_MID_ROUND"  # tests: "<round>:stop" or "<round>:kill"


def _stop_mid_round(round: int) -> None:
    """Tests only: behave as if Ctrl-C (``stop``) or SIGKILL (``kill``) landed after a round's
    replies arrived and were recorded, before its step was logged."""
    hook = os.environ.get(STOP_HOOK, "")
    if hook.partition(":")[0] != str(round):
        return
    if hook.endswith(":kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does to the process running the coordinator
    raise Stopped(f"stopped in round {round}, its replies in and its step not logged ({STOP_HOOK})")


@dataclass
class Response:
    """What came back from one node: a reply's content, or the reason it failed."""

    node: int
    content: RecordDict | None
    error: str | None = None
    bytes_down: int = 0
    bytes_up: int = 0


class Transport(Protocol):
    def nodes(self) -> Sequence[int]:
        """The silos connected now."""

    def exchange(self, messages: dict[int, RecordDict], *, round: int, timeout: float,
                 kind: str = "train") -> list[Response]:
        """Send each node its message (a "train" or "evaluate" instruction); return the replies
        that came back in time."""


@dataclass
class FederationResult:
    steps: int
    before: dict
    after: dict
    epsilons: dict[str, float]  # silo name -> epsilon recomputed from its reported events
    traffic: dict[str, dict[str, int]]  # silo name -> messages and bytes
    rejections: list[dict] = field(default_factory=list)
    silo_evaluation: dict | None = None
    aggregation: RuleCost | None = None  # the rule's sensitivity and noise, over the last round's silos
    stopped_early: str | None = None  # why the run ended before its planned rounds (silos out of budget)
    # secure aggregation: silo name -> epsilon if every other party colluded (its own share alone)
    epsilons_if_all_collude: dict[str, float] = field(default_factory=dict)
    secure_honest: int = 0  # t the charged epsilons assume


class Federation:
    """Runs the remaining rounds of ``run`` over ``transport``."""

    def __init__(self, run: Run, transport: Transport, *, progress: bool = True, turns: int = 1):
        """``turns``: how many answers a silo's process gives one after another in a round (a
        simulation with fewer processes than silos asked); a round waits ``round_timeout`` for each."""
        self.run = run
        self.transport = transport
        self.progress = progress
        self.config = run.config
        self.round_timeout = run.config.federation.round_timeout * turns
        self.store = FederationStore(run.layout.store)
        self.held: dict[int, int | None] = {}  # node -> the steps its model holds, as last known (None: unknown)
        self.aggregation: RuleCost | None = None
        self.keys: dict[int, Participant] = {}  # secure aggregation: node -> its masking key, as it reported it

    # -- one round -----------------------------------------------------------------------------
    def sync_for(self, node: int) -> Sync:
        """The updates ``node`` lacks: setup on first contact; a checkpoint if far behind."""
        coordinator = self.run.coordinator
        known = self.held.get(node)
        setup = self.run.setup() if known is None else None
        start = known or 0
        if coordinator.step - start > self.config.federation.max_replay:
            return Sync(coordinator.step, (), setup, Checkpoint.of(self.run.parts.trainable, coordinator.applier))
        return Sync(start, tuple(self.run.log.steps(start)), setup)

    def select(self, nodes: Sequence[int], round: int, attempt: int) -> list[int]:
        """The silos asked this round: a public, seeded sample of ``federation.fraction``."""
        nodes = sorted(nodes)
        fraction = self.config.federation.fraction
        count = max(self.config.federation.min_silos, math.ceil(fraction * len(nodes)))
        if count >= len(nodes):
            return nodes
        chooser = random.Random(f"{self.config.seed}/{round}/{attempt}")
        return sorted(chooser.sample(nodes, count))

    def collect(self, request: TrainRequest, responses: list[Response], asked: dict[int, RecordDict],
                round: int, attempt: int) -> dict[int, TrainReply]:
        """Validate every response; keep the good replies, record why the others were refused.
        Under secure aggregation a retried round's replies are new releases, charged again: each
        attempt's are recorded apart."""
        valid: dict[int, TrainReply] = {}
        secure = request.secure
        kind = "train" if secure is None or attempt == 0 else f"train/{attempt}"
        for response in responses:
            node = response.node
            self.store.record_traffic(round, attempt, node, response.bytes_down, response.bytes_up)
            reason = None
            if node not in asked:
                reason = "reply from a node that was not asked"
            elif node in valid:
                reason = "second reply from the same node"
            elif response.error is not None:
                reason = f"node reported an error: {response.error}"
                if "SyncError" in response.error:
                    self.held[node] = None  # it lost track: resynchronise it from scratch
            else:
                try:
                    reply, silo = decode_reply(response.content, step=request.step,
                                               probes=len(request.probe_seeds) * request.steps,
                                               bits=None if secure is None else secure.bits)
                    silo = silo or f"node {node}"
                    self.store.register(node, silo)
                    self.store.record_release(silo, round, reply.events, kind=kind)  # spent, whatever follows
                    if secure is not None:
                        self.store.record_collusion(silo, round, reply.collusion, kind=kind)
                        self._check_participant(request, node, silo, reply)
                    valid[node] = reply
                    self.held[node] = request.step  # it answered on the model after request.step steps
                except WireError as error:
                    reason = f"malformed reply: {error}"
            if reason is not None:
                log.warning("round %d: rejected node %d: %s", round, node, reason)
                self.store.reject(round, node, reason)
        return valid

    def _check_participant(self, request: TrainRequest, node: int, silo: str, reply: TrainReply) -> None:
        """A secure reply must come from the participant the round lists for its node, with the q N
        its key reply published (the unmasked sum is divided by the summed q N)."""
        participant = self.keys.get(node)
        if participant is None or participant.name != silo:
            raise WireError(f"a secure reply named {silo!r} from a node the round lists as "
                            f"{participant.name if participant else 'no participant'!r}")
        expected = request.release.sample_rate * participant.public_size
        if not math.isclose(reply.expected_batch_size, expected, rel_tol=1e-9):
            raise WireError(f"reply.expected_batch_size={reply.expected_batch_size:g}, not q x its public size "
                            f"({expected:g})")

    def play_round(self) -> int:
        """Run the next round to completion (retrying if short of replies); returns replies used."""
        coordinator = self.run.coordinator
        federation = self.config.federation
        request = coordinator.request()
        round = request.step  # a round is numbered by the (first) step it asks for
        if federation.secure_aggregation:
            return self.play_secure_round(request, round)
        for attempt in range(federation.round_retries + 1):
            nodes = self.select(self.transport.nodes(), round, attempt)
            asked = {node: encode_request(request, self.sync_for(node)) for node in nodes}
            responses = self.transport.exchange(asked, round=round, timeout=self.round_timeout)
            valid = self.collect(request, responses, asked, round, attempt)
            if len(valid) >= federation.min_silos:
                replies = [valid[node] for node in sorted(valid)]
                _stop_mid_round(round)
                coordinator.apply(request, replies)
                self._note_cost(round, replies)
                return len(valid)
            log.warning("round %d attempt %d: %d valid replies of %d asked, need %d",
                        round, attempt, len(valid), len(asked), federation.min_silos)
            self._out_of_budget(round, valid, asked)
        raise FederationError(
            f"round {round} got fewer than federation.min_silos={federation.min_silos} valid "
            f"replies in {federation.round_retries + 1} attempts; every earlier round is in the log "
            f"({self.run.run_dir}), so the run can resume once enough silos are back"
        )

    # -- secure aggregation ----------------------------------------------------------------------
    def participants(self, nodes: Sequence[int], round: int, attempt: int) -> dict[int, Participant]:
        """The masking keys of ``nodes``: asked once of each node (a silo keeps its key for the
        run, so a resumed coordinator asks again and gets the same); a node that does not answer
        is left out of the round."""
        missing = [node for node in nodes if node not in self.keys]
        if missing:
            setup = Sync(self.run.coordinator.step, (), self.run.setup())
            messages = {node: encode_keys_request(self.run.run_id, setup) for node in missing}
            for response in self.transport.exchange(messages, round=round, timeout=self.round_timeout,
                                                    kind="keys"):
                self.store.record_traffic(round, attempt, response.node, response.bytes_down, response.bytes_up)
                try:
                    if response.node not in messages or response.error is not None:
                        raise WireError(response.error or "reply from a node that was not asked")
                    participant = decode_keys_reply(response.content)
                except WireError as error:
                    self.store.reject(round, response.node, f"masking key: {error}")
                    continue
                self.store.register(response.node, participant.name)
                self.keys[response.node] = participant
        chosen: dict[int, Participant] = {}
        for node in nodes:
            if node in self.keys and self.keys[node].name not in {p.name for p in chosen.values()}:
                chosen[node] = self.keys[node]
        return chosen

    def round_bits(self, participants: Sequence[Participant]) -> int:
        """b: federation.secure_bits, checked, or the fewest bits no sum of this round can wrap."""
        sizes = [participant.public_size for participant in participants]
        scale = share_scale(self.run.coordinator.release, self.config.zo.probes)
        bits = self.config.federation.secure_bits or sum_bits(sizes, *scale)
        check_bits(bits, sizes, *scale)
        return bits

    def play_secure_round(self, request: TrainRequest, round: int) -> int:
        """A round under secure aggregation: the participants' keys, the masked replies, their sum
        unmasked, the step. Any participant missing makes the attempt fail (nothing is unmasked
        from part of a round); the next attempt asks the others, with fresh masks and noise, and
        each silo charges it again."""
        coordinator = self.run.coordinator
        federation = self.config.federation
        failed: set[int] = set()
        for attempt in range(federation.round_retries + 1):
            nodes = [node for node in self.select(self.transport.nodes(), round, attempt) if node not in failed]
            participants = self.participants(nodes, round, attempt)
            if len(participants) < max(federation.min_silos, federation.honest):
                log.warning("round %d attempt %d: %d participant(s), the round needs %d (federation.min_silos, "
                            "federation.secure_honest)", round, attempt, len(participants),
                            max(federation.min_silos, federation.honest))
                failed |= set(nodes) - set(participants)
                continue
            ordered = sorted(participants.values(), key=lambda participant: participant.name)
            secure = SecureRound(attempt, self.round_bits(ordered), federation.honest, tuple(ordered))
            asked_request = dataclasses.replace(request, secure=secure)
            asked = {node: encode_request(asked_request, self.sync_for(node)) for node in participants}
            responses = self.transport.exchange(asked, round=round, timeout=self.round_timeout)
            valid = self.collect(asked_request, responses, asked, round, attempt)
            if len(valid) == len(participants):
                masked = {participants[node].name: np.array(reply.masked, dtype=np.uint64)
                          for node, reply in valid.items()}
                total = unmask_sum(masked, set(masked), secure.bits)
                _stop_mid_round(round)
                coordinator.apply_sum(asked_request, total, sum(reply.expected_batch_size for reply in valid.values()))
                self._note_cost(round, list(valid.values()))
                return len(valid)
            missing = set(participants) - set(valid)
            log.warning("round %d attempt %d: %d of %d participants answered; the round is not unmasked and is "
                        "asked again without %s", round, attempt, len(valid), len(participants),
                        ", ".join(participants[node].name for node in sorted(missing)))
            failed |= missing
            for node in missing:
                self.keys.pop(node, None)  # asked again if it comes back: it may have a new key
            self._out_of_budget(round, valid, asked)
        raise FederationError(
            f"round {round} could not be completed under secure aggregation in {federation.round_retries + 1} "
            f"attempts (every participant must answer, at least max(federation.min_silos, "
            f"federation.secure_honest) = {max(federation.min_silos, federation.honest)} of them); every earlier round "
            f"is in the log ({self.run.run_dir}), so the run can resume once enough silos are back")

    def _out_of_budget(self, round: int, valid: dict, asked: dict) -> None:
        """End the run if too few silos with budget are left to answer a round."""
        federation = self.config.federation
        spent = {r["silo"]: r["reason"] for r in self.store.rejections()
                 if r["round"] == round and "BudgetExhausted" in r["reason"]}
        if spent and len(valid) + len(asked) - len(spent) < federation.min_silos:
            raise OutOfBudget(
                f"round {round} of {self.run.schedule.steps}: {len(spent)} silo(s) refuse for lack of "
                "privacy budget, so fewer than federation.min_silos="
                f"{federation.min_silos} can answer; the run ends with the {self.run.coordinator.step} rounds it has. "
                + "; ".join(f"{silo}: {reason.split('BudgetExhausted: ')[-1]}" for silo, reason in spent.items()))

    def _note_cost(self, round: int, replies: list[TrainReply]) -> None:
        """Log what the aggregation rule costs whenever the silos that answered change it."""
        cost = self.run.coordinator.cost(replies)
        if cost != self.aggregation:
            log.info("round %d: %s", round, cost.summary())
            self.aggregation = cost

    # -- the whole run -------------------------------------------------------------------------
    def epsilons(self) -> dict[str, float]:
        """Silo name -> epsilon, recomputed from what each silo reported."""
        privacy = self.config.privacy
        if not privacy.enabled:
            return {silo: math.inf for silo in self.store.silos()}
        return self.store.epsilons(privacy.delta, privacy.accountant)

    def wait_for_silos(self, expected: int, patience: float) -> list[int]:
        """Silos register with the coordinator asynchronously: wait until ``expected`` have (or
        ``patience`` seconds pass), then go on with at least ``federation.min_silos``."""
        deadline = time.monotonic() + patience
        while True:
            nodes = list(self.transport.nodes())
            if len(nodes) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if len(nodes) < self.config.federation.min_silos:
            raise FederationError(
                f"only {len(nodes)} silo(s) connected within {patience:.0f} s; "
                f"federation.min_silos={self.config.federation.min_silos}"
            )
        return nodes

    def run_all(self) -> FederationResult:
        run, federation = self.run, self.config.federation
        for node in self.wait_for_silos(federation.silos, federation.round_timeout):
            self.store.register(node)

        def play() -> Played:
            used = self.play_round()
            return Played({"replies": used}, {"silos": str(used)})

        def epsilons() -> dict[str, float]:
            return {f"epsilon.{silo}": value for silo, value in self.epsilons().items()}

        loop = run_rounds(run, play, epsilons, progress=self.progress, desc="simulate", unit="round")
        silo_evaluation = None
        if federation.silo_eval != "off":
            # "client_evaluation": where a run logged before the rename keeps its (charged) result
            silo_evaluation = (run.log.meta("silo_evaluation") or run.log.meta("client_evaluation")
                               or self.evaluate_on_silos())
            run.log.set_meta("silo_evaluation", silo_evaluation)
        colluding = {}
        if federation.secure_aggregation:
            colluding = self.store.epsilons(self.config.privacy.delta, self.config.privacy.accountant, colluding=True)
        return FederationResult(run.coordinator.step, loop.before, loop.after, self.epsilons(), self.store.traffic(),
                                self.store.rejections(), silo_evaluation, self.aggregation, loop.stopped_early,
                                colluding, federation.honest if federation.secure_aggregation else 0)

    def evaluate_on_silos(self) -> dict:
        """Accuracy of the final model on the silos' own held-out data: noised and charged to
        every silo's ledger ("private"), or exact and unprotected ("nonprivate", which warns)."""
        federation = self.config.federation
        private = federation.silo_eval == "private"
        if not private:
            warnings.warn(
                "federation.silo_eval=nonprivate: silos report exact accuracy counts on their own data, "
                "which are NOT differentially private; use silo_eval=private to noise and charge them",
                NonPrivateEvaluationWarning, stacklevel=2)
        coordinator = self.run.coordinator
        nodes = sorted(self.transport.nodes())
        request = EvaluationRequest(self.run.run_id, coordinator.step, private, federation.silo_eval_std)
        messages = {node: encode_evaluation(request, self.sync_for(node)) for node in nodes}
        correct = count = 0.0
        answered = 0
        for response in self.transport.exchange(messages, round=coordinator.step, timeout=self.round_timeout,
                                                kind="evaluate"):
            try:
                if response.node not in messages or response.error is not None:
                    raise WireError(response.error or "reply from a node that was not asked")
                silo_correct, silo_count, events, silo = decode_evaluation_reply(response.content)
            except WireError as error:
                self.store.reject(coordinator.step, response.node, f"evaluation: {error}")
                continue
            silo = silo or f"node {response.node}"
            self.store.register(response.node, silo)
            self.store.record_release(silo, coordinator.step, events, kind="evaluation")
            correct, count, answered = correct + silo_correct, count + silo_count, answered + 1
        accuracy = correct / count if count > 0 else float("nan")
        return {"accuracy": accuracy, "silos": answered, "private": private}


class DirectTransport:
    """Silos called in this process: ``handlers[node](content) -> content``. For tests and tools;
    every message still goes through the wire encoding, and its size is measured."""

    def __init__(self, handlers: dict, evaluators: dict | None = None, keys: dict | None = None):
        self.handlers = handlers
        self.evaluators = evaluators or {}
        self.keys = keys or {}

    def nodes(self) -> list[int]:
        return sorted(self.handlers)

    def exchange(self, messages: dict[int, RecordDict], *, round: int, timeout: float,
                 kind: str = "train") -> list[Response]:
        from seedtune.common.wire import serialized_size

        handlers = {"train": self.handlers, "keys": self.keys}.get(kind, self.evaluators)
        responses = []
        for node, content in messages.items():
            down = serialized_size(content)
            try:
                reply = handlers[node](content)
            except Exception as error:  # noqa: BLE001  (a silo's failure is a reply, not a crash)
                responses.append(Response(node, None, f"{type(error).__name__}: {error}", down, 0))
                continue
            responses.append(Response(node, reply, None, down, serialized_size(reply)))
        return responses
