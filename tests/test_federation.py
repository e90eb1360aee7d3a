"""The federation's logic in one process: wire validation, partitions, silo nodes, rounds,
dropouts, malformed replies, checkpoints and a coordinator crash (no Flower runtime needed)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from seedtune.client.app import handle_evaluate, handle_train
from seedtune.client.limits import Limits
from seedtune.client.node import SiloNode, SyncError
from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.errors import BudgetExhausted, ConfigError
from seedtune.common.partition import partition_indices
from seedtune.common.privacy import events as codec
from seedtune.common.privacy.accounting import epsilon_for
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.protocol import ReleaseParameters, TrainReply, TrainRequest
from seedtune.common.wire import (
    Sync, WireError, decode_reply, decode_request, encode_reply, encode_request, serialized_size,
)
from seedtune.server.federation import (
    DirectTransport,
    Federation,
    FederationError,
    NonPrivateEvaluationWarning,
    Response,
)
from seedtune.server.runs import open_run

TINY = ["schedule.steps=8", "schedule.stages=2", "eval.every=0", "data.synthetic_size=200",
        "federation.silos=1", "federation.round_timeout=5"]


def _config(*extra):
    return load_config("tiny", overrides=[*TINY, *extra], command="simulate")


def _request(step=3, probes=2):
    return TrainRequest("run", step, tuple(range(1, probes + 1)), 1e-3, ReleaseParameters(1.0, 0.8, 0.05))


# -- wire --------------------------------------------------------------------------------------
def test_requests_and_replies_round_trip():
    request = _request()
    decoded, sync = decode_request(encode_request(request, Sync(3, ())))
    assert decoded == request and sync.records == () and sync.setup is None
    reply = TrainReply(3, (0.25, -1.5), 4.0, (dp_accounting.GaussianDpEvent(0.8),))
    assert decode_reply(encode_reply(reply, "silo-a"), step=3, probes=2) == (reply, "silo-a")


def _bad_reply(**changes):
    record = {"silo": "x", "step": 3, "projected_grads": [0.1, 0.2],
              "expected_batch_size": 4.0, "events": []}
    record.update(changes)
    return RecordDict({"reply": ConfigRecord(record)})


@pytest.mark.parametrize("changes, reason", [
    ({"projected_grads": [0.1, math.nan]}, "finite"),
    ({"projected_grads": [0.1, math.inf]}, "finite"),
    ({"projected_grads": [0.1]}, "expected 2"),
    ({"step": 4}, "step 4, not 3"),
    ({"expected_batch_size": -1.0}, "expected_batch_size"),
    ({"events": ['{"type": "os.system"}']}, "unsupported event"),
    ({"step": "3"}, "must be int"),
])
def test_malformed_replies_are_refused_with_a_reason(changes, reason):
    with pytest.raises(WireError, match=reason):
        decode_reply(_bad_reply(**changes), step=3, probes=2)
    with pytest.raises(WireError, match="no 'reply' record"):
        decode_reply(RecordDict(), step=3, probes=2)


def test_malformed_requests_are_refused_before_anything_runs():
    good = encode_request(_request(), Sync(3, ()))
    for key, value in (("sample_rate", 1.5), ("beta", 0.0), ("step", -1), ("noise_multiplier", math.nan),
                       ("probe_seeds", [])):
        content = encode_request(_request(), Sync(3, ()))
        content["request"][key] = value
        with pytest.raises(WireError):
            decode_request(content)
    good["sync"]["records"] = "[[5, 0, [1], [0.1], 0.1, 0.001, 0.0, 0]]"  # step 5 does not follow 3
    with pytest.raises(WireError, match="consecutive"):
        decode_request(good)


# -- partitions --------------------------------------------------------------------------------
def _pool(size, classes, seed=0):
    labels = np.random.default_rng(seed).integers(0, classes, size=size)
    return [f"record {i} says {label}" for i, label in enumerate(labels)], labels


@pytest.mark.parametrize("scheme", ["iid", "label-skew", "quantity-skew"])
def test_partitions_keep_every_example_exactly_once_deterministically_by_seed(scheme):
    texts, labels = _pool(1001, 3)
    parts = partition_indices(texts, labels, 4, scheme=scheme, alpha=0.3, seed=4)
    together = np.concatenate(parts)
    assert len(together) == 1001 and set(together.tolist()) == set(range(1001))
    again = partition_indices(texts, labels, 4, scheme=scheme, alpha=0.3, seed=4)
    assert [p.tolist() for p in parts] == [p.tolist() for p in again]
    other = partition_indices(texts, labels, 4, scheme=scheme, alpha=0.3, seed=9)
    assert [p.tolist() for p in parts] != [p.tolist() for p in other]


@pytest.mark.parametrize("scheme", ["iid", "label-skew", "quantity-skew"])
def test_adding_or_removing_one_record_moves_no_other_record_between_silos(scheme):
    # Add/remove-one adjacency: a record's presence may change only its own silo.
    texts, labels = _pool(1000, 3)
    def silos(texts, labels):
        parts = partition_indices(texts, labels, 4, scheme=scheme, alpha=0.5, seed=4)
        return {(texts[i], int(labels[i])): silo for silo, part in enumerate(parts) for i in part}
    before = silos(texts, labels)
    added = silos(texts[:500] + ["one more record"] + texts[500:], np.insert(labels, 500, 2))
    assert len(added) == 1001 and {k: v for k, v in added.items() if k[0] != "one more record"} == before
    removed = silos(texts[:-1], labels[:-1])
    assert removed == {k: v for k, v in before.items() if k[0] != texts[-1]}
    new_class = silos(texts + ["a record of a new class"], np.append(labels, 3))  # shares are per class
    assert {k: v for k, v in new_class.items() if k[1] != 3} == before


def test_quantity_skew_skews_sizes_but_not_labels_and_an_empty_silo_is_an_error():
    texts, labels = _pool(4000, 2)
    parts = partition_indices(texts, labels, 5, scheme="quantity-skew", alpha=0.3, seed=2)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 4 * sizes[0] and sizes[0] >= 1
    big = [p for p in parts if len(p) >= 200]
    assert all(abs(labels[p].mean() - labels.mean()) < 0.08 for p in big)  # label mix stays IID
    # iid sizes are Binomial(4000, 1/5): 800 +- 25 standard deviations; within 5 of them.
    iid = [len(p) for p in partition_indices(texts, labels, 5, scheme="iid")]
    assert sum(iid) == 4000 and all(abs(size - 800) < 5 * math.sqrt(4000 * 0.2 * 0.8) for size in iid)
    with pytest.raises(ConfigError, match=r"leaves silo \d of 6 with none of the 6 examples; use a larger "
                                          r"federation.alpha or fewer federation.silos"):
        partition_indices(texts[:6], labels[:6], 6, scheme="quantity-skew", alpha=0.01, seed=3)
    with pytest.raises(ConfigError, match="leaves silo"):
        partition_indices(texts[:3], labels[:3], 4, scheme="quantity-skew")


def test_label_skew_skews_and_iid_does_not():
    texts, labels = [f"record {i}" for i in range(4000)], np.repeat([0, 1], 2000)
    def spread(parts):  # mean distance of each partition's positive share from the global 0.5
        return np.mean([abs(labels[p].mean() - 0.5) for p in parts if len(p)])
    assert spread(partition_indices(texts, labels, 5, scheme="iid")) < 0.05
    assert spread(partition_indices(texts, labels, 5, scheme="label-skew", alpha=0.1)) > 0.2


# -- silo nodes --------------------------------------------------------------------------------
def _shard(partition, partitions):
    def load(config, label_names, split="train"):
        return components.silo_shard(config, split, partition, partitions)
    return load


def _first_contact(run, step=0):
    return Sync(0, tuple(run.log.steps()), run.setup())


def test_a_restarted_silo_keeps_its_budget_and_refuses_past_it(tmp_path):
    config = _config("privacy.epsilon=8.0")
    run = open_run(config, tmp_path / "run", resume=False)
    budget = epsilon_for(run.sigma, config.privacy.sample_rate, 3, config.privacy.delta) * 1.0001
    node = SiloNode(tmp_path / "silo", _shard(0, 1), budget=(budget, config.privacy.delta, "rdp"), partition=0)
    request = run.coordinator.request()

    def other(k):  # the same step asked with other directions: another question, another release
        return TrainRequest(request.run_id, request.step, (k, k + 1), request.beta, request.release)

    first = node.answer(request, _first_contact(run))
    again = node.answer(request, Sync(0, ()))  # the very same request: the same release, not charged again
    assert again == first and node.ledger.releases == 1
    node.answer(other(10), Sync(0, ()))
    assert node.ledger.releases == 2
    node.close()
    restarted = SiloNode(tmp_path / "silo", _shard(0, 1), budget=(budget, config.privacy.delta, "rdp"), partition=0)
    assert restarted.answer(other(10), _first_contact(run)).projected_grads  # kept across the restart
    assert restarted.ledger.releases == 2
    restarted.answer(other(20), Sync(0, ()))
    assert restarted.ledger.releases == 3
    with pytest.raises(BudgetExhausted, match="past its budget"):
        restarted.answer(other(30), Sync(0, ()))
    assert restarted.ledger.releases == 3  # refused: nothing released, nothing charged


def test_a_silo_out_of_step_refuses_instead_of_answering_on_the_wrong_model(tmp_path):
    run = open_run(_config(), tmp_path / "run", resume=False)
    node = SiloNode(tmp_path / "silo", _shard(0, 1), partition=0)
    with pytest.raises(SyncError, match="no setup"):
        node.answer(run.coordinator.request(), Sync(0, ()))
    request = run.coordinator.request()
    behind = TrainRequest(request.run_id, 4, request.probe_seeds, request.beta, request.release)
    with pytest.raises(SyncError, match="after 4 steps"):
        node.answer(behind, _first_contact(run))


# -- rounds over a transport -------------------------------------------------------------------
class FakeSilo:
    """A deterministic stand-in for a silo: replies are a function of the round (unit tests of
    the coordinator's own logic)."""

    def __init__(self, seed):
        self.seed = seed

    def __call__(self, content):
        request, _ = decode_request(content)
        grads = tuple(math.sin(self.seed * 7.1 + request.step * 1.3 + k) for k in range(len(request.probe_seeds)))
        event = dp_accounting.GaussianDpEvent(1.0)
        return encode_reply(TrainReply(request.step, grads, 10.0 + self.seed, (event,)), f"fake-{self.seed}")


def _final_state(run):
    return {k: v.clone() for k, v in run.task.module.state_dict().items()}


@pytest.mark.slow
def test_malformed_replies_never_touch_the_model(tmp_path):
    honest = DirectTransport({1: FakeSilo(1)})
    clean = open_run(_config(), tmp_path / "clean", resume=False)
    Federation(clean, honest, progress=False).run_all()

    class Mixed(DirectTransport):
        def exchange(self, messages, *, round, timeout):
            responses = super().exchange({1: messages[1]}, round=round, timeout=timeout)
            responses += [
                Response(2, _bad_reply(step=round, projected_grads=[math.nan] * 4)),
                Response(3, _bad_reply(step=round, projected_grads=[0.0])),
                Response(4, _bad_reply(step=round + 1, projected_grads=[0.0] * 4)),
                Response(99, _bad_reply(step=round, projected_grads=[0.0] * 4)),  # never asked
                Response(5, None, "Flower error 2: ClientApp raised"),
            ]
            return responses

        def nodes(self):
            return [1, 2, 3, 4, 5]

    noisy = open_run(_config(), tmp_path / "noisy", resume=False)
    result = Federation(noisy, Mixed({1: FakeSilo(1)}), progress=False).run_all()
    reasons = " | ".join(r["reason"] for r in result.rejections)
    for expected in ("not a finite number", "expected 4", "not 0", "not asked", "ClientApp raised"):
        assert expected in reasons
    a, b = _final_state(clean), _final_state(noisy)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_round_short_of_replies_is_retried_then_stops_without_half_applying(tmp_path):
    run = open_run(_config("federation.min_silos=2", "federation.round_retries=1"), tmp_path / "run", resume=False)

    def broken(content):
        raise RuntimeError("silo down")

    federation = Federation(run, DirectTransport({1: FakeSilo(1), 2: broken}), progress=False)
    with pytest.raises(FederationError, match="fewer than federation.min_silos=2"):
        federation.run_all()
    assert run.log.num_steps == 0 and run.coordinator.step == 0
    assert len([r for r in federation.store.rejections() if "silo down" in r["reason"]]) == 2  # asked twice


def test_a_round_waits_round_timeout_for_each_answer_its_silos_give_in_turn(tmp_path):
    waited = []

    class Recording(DirectTransport):
        def exchange(self, messages, *, round, timeout, **kwargs):
            waited.append(timeout)
            return super().exchange(messages, round=round, timeout=timeout, **kwargs)

    run = open_run(_config("schedule.steps=3"), tmp_path / "run", resume=False)  # round_timeout=5
    Federation(run, Recording({1: FakeSilo(1)}), progress=False, turns=3).run_all()
    assert waited == [15.0] * 3


@pytest.mark.parametrize("crash_round", [1, 5, 7])
@pytest.mark.slow
def test_a_coordinator_crash_resumes_to_the_same_model_given_the_same_replies(tmp_path, crash_round):
    silos = {1: FakeSilo(1), 2: FakeSilo(2)}
    whole = open_run(_config(), tmp_path / "whole", resume=False)
    Federation(whole, DirectTransport(silos), progress=False).run_all()

    class CrashingAt(DirectTransport):
        def exchange(self, messages, *, round, timeout):
            if round == crash_round:
                raise KeyboardInterrupt  # the coordinator dies mid-round
            return super().exchange(messages, round=round, timeout=timeout)

    config = _config()
    crashed = open_run(config, tmp_path / "crashed", resume=False)
    with pytest.raises(KeyboardInterrupt):
        Federation(crashed, CrashingAt(silos), progress=False).run_all()
    crashed.close()
    resumed = open_run(config, tmp_path / "crashed", resume=True)
    assert resumed.coordinator.step == crash_round
    Federation(resumed, DirectTransport(silos), progress=False).run_all()
    a, b = _final_state(whole), _final_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _silo_nodes(tmp_path, count, **kwargs):
    return {k: SiloNode(tmp_path / f"silo{k}", _shard(k, count), partition=k, **kwargs) for k in range(count)}


@pytest.mark.parametrize("stop_round", [0, 3])
@pytest.mark.slow
def test_a_coordinator_stopped_after_the_replies_resumes_without_charging_the_round_twice(tmp_path, stop_round):
    """Stopped with the round's replies in (every silo charged it) and its step not logged: the
    resumed coordinator asks the same round again and every silo answers with the same release,
    uncharged. σ is calibrated to spend the budget in exactly the planned rounds, so a second charge
    would make the last round impossible."""
    config = _config("federation.silos=3", "privacy.epsilon=3.0")
    run = open_run(config, tmp_path / "run", resume=False)
    nodes = _silo_nodes(tmp_path, 3)
    handlers = {k: (lambda content, node=node: handle_train(content, node)) for k, node in nodes.items()}

    class StopsAfterReplies(DirectTransport):
        def exchange(self, messages, *, round, timeout, kind="train"):
            responses = super().exchange(messages, round=round, timeout=timeout, kind=kind)
            if round == stop_round:
                raise KeyboardInterrupt  # the replies arrived; the step is never logged
            return responses

    with pytest.raises(KeyboardInterrupt):
        Federation(run, StopsAfterReplies(handlers), progress=False).run_all()
    assert run.log.num_steps == stop_round and all(node.ledger.releases == stop_round + 1 for node in nodes.values())
    run.close()
    resumed = open_run(config, tmp_path / "run", resume=True)
    federation = Federation(resumed, DirectTransport(handlers), progress=False)
    result = federation.run_all()
    steps = config.schedule.steps
    assert result.steps == steps and result.stopped_early is None
    assert all(node.ledger.releases == steps for node in nodes.values())  # one release per logged round
    assert result.epsilons == {node.name: pytest.approx(node.ledger.spent(), rel=1e-9) for node in nodes.values()}
    assert max(result.epsilons.values()) <= 3.0 + 1e-9


def test_silos_out_of_budget_end_the_run_with_the_numbers_and_the_rounds_it_has(tmp_path):
    config = _config("federation.silos=2", "federation.min_silos=2", "federation.round_retries=0")
    run = open_run(config, tmp_path / "run", resume=False)
    budget = epsilon_for(run.sigma, config.privacy.sample_rate, 3, config.privacy.delta) * 1.0001  # 3 of 8 rounds
    nodes = _silo_nodes(tmp_path, 2, budget=(budget, config.privacy.delta, "rdp"))
    handlers = {k: (lambda content, node=node: handle_train(content, node)) for k, node in nodes.items()}
    result = Federation(run, DirectTransport(handlers), progress=False).run_all()
    assert result.steps == 3 and run.log.num_steps == 3
    assert "round 3 of 8" in result.stopped_early and "lack of privacy budget" in result.stopped_early
    assert "3 releases made" in result.stopped_early  # the silo's own numbers, not "resume later"


@pytest.mark.slow
def test_the_coordinators_view_keys_silos_by_name_across_node_ids(tmp_path):
    """After a resume every silo comes back under a new node id; the view lists it once, with
    everything it spent."""
    config = _config("federation.silos=2")
    run = open_run(config, tmp_path / "run", resume=False)
    nodes = _silo_nodes(tmp_path, 2)
    first = {k: (lambda content, node=node: handle_train(content, node)) for k, node in nodes.items()}

    class StopsAt(DirectTransport):
        def exchange(self, messages, *, round, timeout, kind="train"):
            if round == 4:
                raise KeyboardInterrupt
            return super().exchange(messages, round=round, timeout=timeout, kind=kind)

    with pytest.raises(KeyboardInterrupt):
        Federation(run, StopsAt(first), progress=False).run_all()
    run.close()
    resumed = open_run(config, tmp_path / "run", resume=True)
    renumbered = {k + 1000: handler for k, handler in first.items()}  # what a restarted SuperNode looks like
    federation = Federation(resumed, DirectTransport(renumbered), progress=False)
    result = federation.run_all()
    assert sorted(result.epsilons) == ["partition-0", "partition-1"] == federation.store.silos()
    assert federation.store.releases() == {"partition-0": 8, "partition-1": 8}
    for node in nodes.values():
        assert result.epsilons[node.name] == pytest.approx(node.ledger.spent(), rel=1e-9)
    assert sorted(result.traffic) == ["partition-0", "partition-1"]


@pytest.mark.slow
def test_silos_stay_in_step_and_a_late_silo_gets_a_checkpoint_not_a_weight_stream(tmp_path):
    config = _config("federation.max_replay=2", "zo.probes=16", "prune.enabled=false")
    run = open_run(config, tmp_path / "run", resume=False)
    nodes = {k: SiloNode(tmp_path / f"silo{k}", _shard(k, 2), partition=k) for k in range(2)}
    sent: list[tuple[int, int, RecordDict]] = []
    late_joined = {"now": False}

    class Recording(DirectTransport):
        def nodes(self):
            return [0, 1] if late_joined["now"] else [0]

        def exchange(self, messages, *, round, timeout):
            late_joined["now"] = round >= 4
            sent.extend((round, node, content) for node, content in messages.items())
            return super().exchange(messages, round=round, timeout=timeout)

    handlers = {k: (lambda content, node=node: handle_train(content, node, partition=k)) for k, node in nodes.items()}
    result = Federation(run, Recording(handlers), progress=False).run_all()
    assert result.steps == 8 and not result.rejections
    with_weights = [(round, node) for round, node, content in sent if content.array_records]
    assert with_weights == [(5, 1)]  # only the silo that joined 5 rounds late, once
    routine = [content for round, node, content in sent if "setup" not in content["sync"] and not content.array_records]
    assert len(routine) == len(sent) - 2 and all(serialized_size(content) < 2500 for content in routine)
    assert all(traffic["bytes_up"] / traffic["messages"] <= 1024 for traffic in result.traffic.values())  # K = 16
    for node in nodes.values():  # every silo's replica is the coordinator's model, bit for bit
        replica = node.run(run.run_id)
        for record in run.log.steps(replica.step):  # the last round reaches silos with the next request
            replica.applier.apply(record)
        for mine, theirs in zip(replica.parts.trainable, run.parts.trainable):
            assert torch.equal(mine.values(), theirs.values())


@pytest.mark.parametrize("mode", ["private", "nonprivate"])
@pytest.mark.slow
def test_evaluation_on_silos_data_is_noised_and_charged_or_warns(tmp_path, mode):
    config = _config(f"federation.silo_eval={mode}", "federation.silos=2", "federation.silo_eval_std=2.0")
    run = open_run(config, tmp_path / "run", resume=False)
    limits = Limits(allow_nonprivate=mode == "nonprivate")  # a deployed silo must opt in to exact counts
    nodes = {k: SiloNode(tmp_path / f"silo{k}", _shard(k, 2), partition=k, limits=limits) for k in range(2)}
    transport = DirectTransport({k: (lambda c, node=node: handle_train(c, node)) for k, node in nodes.items()},
                                {k: (lambda c, node=node: handle_evaluate(c, node)) for k, node in nodes.items()})
    if mode == "nonprivate":
        with pytest.warns(NonPrivateEvaluationWarning, match="NOT differentially private"):
            result = Federation(run, transport, progress=False).run_all()
    else:
        result = Federation(run, transport, progress=False).run_all()
    assert result.silo_evaluation["silos"] == 2 and result.silo_evaluation["private"] == (mode == "private")
    accuracy = result.silo_evaluation["accuracy"]
    # Exact counts give a fraction; noised ones (std 2 on a few dozen examples) may leave [0, 1].
    assert (0.0 <= accuracy <= 1.0) if mode == "nonprivate" else math.isfinite(accuracy)
    for node in nodes.values():
        notes = [release["note"] for release in node.ledger.history()]
        assert notes.count("evaluation") == (1 if mode == "private" else 0)
        assert len(notes) == 8 + notes.count("evaluation")
        assert node.ledger.spent() <= config.privacy.epsilon  # sigma was calibrated with the evaluation in


def test_a_silo_answering_each_message_from_a_fresh_process_checkpoints_and_stays_exact(tmp_path, monkeypatch):
    # Flower's deployment engine starts a new ClientApp process for every message: model the
    # silo as a new SiloNode per message, over the same state directory.
    import seedtune.client.node as node_module

    monkeypatch.setattr(node_module, "CHECKPOINT_EVERY", 3)
    config = _config("zo.probes=4")
    run = open_run(config, tmp_path / "run", resume=False)
    state = tmp_path / "silo0"

    def fresh_process(content):
        node = SiloNode(state, _shard(0, 1), partition=0)
        try:
            return handle_train(content, node, partition=0)
        finally:
            node.close()

    result = Federation(run, DirectTransport({0: fresh_process}), progress=False).run_all()
    assert result.steps == 8 and not result.rejections
    saved = torch.load(next(state.glob("runs/*/checkpoint.pt")), weights_only=True)
    assert saved["step"] >= 6  # the replica keeps its own checkpoint near its head
    replica = SiloNode(state, _shard(0, 1), partition=0).run(run.run_id)
    for record in run.log.steps(replica.step):
        replica.applier.apply(record)
    for mine, theirs in zip(replica.parts.trainable, run.parts.trainable):
        assert torch.equal(mine.values(), theirs.values())


def test_grid_replies_are_attributed_to_the_silo_asked_even_when_the_superlink_writes_them(monkeypatch):
    # A SuperNode that vanished is answered for by the SuperLink (its node id, 1, as sender); a
    # reply that claims another sender than the node asked is refused, not credited.
    from flwr.app import Error, Message
    from flwr.supercore.task_identity import TaskIdentity

    from seedtune.server.app import GridTransport

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    class FakeGrid:
        def push_messages(self, messages):
            self.sent = messages
            return [f"id-{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids):
            replies = []
            for message in self.sent:
                message.metadata.__dict__["_message_id"] = f"id-{message.metadata.dst_node_id}"
                if message.metadata.dst_node_id == 7:
                    reply = Message(Error(code=5, reason="node unavailable"), reply_to=message)
                    reply.metadata.__dict__["_src_node_id"] = 1  # written by the SuperLink
                else:
                    reply = Message(RecordDict({"reply": ConfigRecord({"x": 1})}), reply_to=message)
                    reply.metadata.__dict__["_src_node_id"] = 99 if message.metadata.dst_node_id == 9 else 8
                replies.append(reply)
            return replies

    responses = GridTransport(FakeGrid()).exchange({7: RecordDict(), 8: RecordDict(), 9: RecordDict()},
                                                   round=0, timeout=5)
    by_node = {response.node: response for response in responses}
    assert set(by_node) == {7, 8, 9}
    assert "node unavailable" in by_node[7].error
    assert by_node[8].error is None and by_node[8].content is not None
    assert "from node 99" in by_node[9].error and by_node[9].content is None


@pytest.mark.slow
def test_one_silo_federation_ends_with_the_same_model_as_seedtune_train(tmp_path):
    """The same estimator, privacy path and update: with the same (seeded, test-only) sampling and
    noise, one silo federated and ``seedtune train`` end bit for bit at the same model."""
    from safetensors.torch import load_file

    from seedtune.jobs.train import train
    from seedtune.common.privacy.randomness import SeededRandomness

    overrides = ["schedule.steps=12", "schedule.stages=2", "eval.every=0", "federation.silos=1",
                 "prune.enabled=true", "prune.ratio=0.2"]
    config = load_config("tiny", overrides=overrides)
    train(config, tmp_path / "local", progress=False, randomness=SeededRandomness(11, quiet=True))
    run = open_run(config, tmp_path / "federated", resume=False)
    node = SiloNode(tmp_path / "silo", lambda c, labels, split: components.silo_shard(c, split, 0, 1), partition=0,
                    randomness=lambda: SeededRandomness(11, quiet=True))
    Federation(run, DirectTransport({0: lambda content: handle_train(content, node)}), progress=False).run_all()
    local = load_file(tmp_path / "local" / "final" / "model.safetensors")
    federated = run.task.hf_model().state_dict()
    assert local.keys() <= federated.keys() and all(torch.equal(local[k], federated[k]) for k in local)


@pytest.mark.slow
def test_the_tiny_simulate_preset_beats_zero_shot_over_seeds(tmp_path):
    """A new user's first federation should show the thing working: over three seeds (directions
    and split keys differ; the noise is fresh each time) test accuracy rises well above zero-shot."""
    for seed in range(3):
        config = load_config("tiny", overrides=[f"seed={seed}", f"data.split_seed={seed}", "eval.every=0"],
                             command="simulate")
        run = open_run(config, tmp_path / f"run{seed}", resume=False)
        count = config.federation.silos
        nodes = _silo_nodes(tmp_path / f"silos{seed}", count)
        handlers = {k: (lambda content, node=node: handle_train(content, node)) for k, node in nodes.items()}
        result = Federation(run, DirectTransport(handlers), progress=False).run_all()
        assert result.after["accuracy"] >= result.before["accuracy"] + 0.15, (seed, result.before, result.after)


# -- durable stores written by earlier versions ------------------------------------------------
def test_a_store_keyed_by_node_id_is_upgraded_once_and_loses_no_reported_release(tmp_path):
    import sqlite3

    from seedtune.server.store import FederationStore

    path = tmp_path / "store.sqlite"
    event = dp_accounting.GaussianDpEvent(1.0)
    with sqlite3.connect(path) as db:
        db.executescript("CREATE TABLE node_events (id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT, round INTEGER, "
                         "event TEXT); CREATE TABLE nodes (node TEXT PRIMARY KEY, silo TEXT NOT NULL DEFAULT '');")
        db.execute("INSERT INTO nodes VALUES ('7', 'hospital')")
        db.executemany("INSERT INTO node_events (node, round, event) VALUES (?, ?, ?)",
                       [("7", 0, codec.dumps(event)), ("7", 1, codec.dumps(event)), ("9", 0, codec.dumps(event))])
    for _ in range(2):  # a second opening finds nothing left to upgrade
        store = FederationStore(path)
        assert store.releases() == {"hospital": 2, "node 9": 1}
        store.close()


def test_a_store_or_ledger_that_is_not_sqlite_is_a_one_line_error_naming_it(tmp_path):
    from seedtune.common.errors import RunDirError
    from seedtune.server.store import FederationStore

    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database, " * 100)
    with pytest.raises(RunDirError, match=f"cannot open the federation store {junk}"):
        FederationStore(junk)
    with pytest.raises(RunDirError, match=f"cannot open privacy ledger {junk}"):
        PrivacyLedger(junk, epsilon=1.0, delta=1e-5)


# -- local steps -------------------------------------------------------------------------------
def test_local_steps_charge_each_step_once_and_every_party_rebuilds_the_same_model(tmp_path):
    config = _config("federation.silos=2", "federation.local_steps=3", "schedule.steps=7")
    run = open_run(config, tmp_path / "run", resume=False)
    nodes = {k: SiloNode(tmp_path / f"silo{k}", _shard(k, 2), partition=k) for k in range(2)}
    widths = []

    def answer(node):
        def handler(content):
            request, _ = decode_request(content)
            reply = handle_train(content, node)
            widths.append((request.steps, len(reply["reply"]["projected_grads"])))
            return reply
        return handler

    result = Federation(run, DirectTransport({k: answer(node) for k, node in nodes.items()}), progress=False).run_all()
    assert result.steps == 7 and not result.rejections
    assert sorted(set(widths)) == [(1, 4), (3, 12)]  # rounds of 3, 3 and the last 1 step; K = 4 scalars each
    for node in nodes.values():
        assert sorted(release["step"] for release in node.ledger.history()) == list(range(7))  # one charge a step
        replica = node.run(run.run_id)
        assert replica.step == 6  # every step it was sent; the last reaches it with the next request
        replica.applier.apply_all(list(run.log.steps(6)))
        assert all(torch.equal(a.values(), b.values()) for a, b in zip(replica.parts.trainable, run.parts.trainable))


def test_with_one_silo_local_steps_follow_the_trajectory_of_one_step_rounds(tmp_path):
    """Non-private with q = 1 the answers are deterministic: one silo taking 2 local steps moves
    by its own scalars exactly as the coordinator then does, so the run ends where single-step
    rounds end (up to the rounding of a weighted mean of one reply)."""
    ends = []
    for tau in (1, 2):
        config = _config("privacy.enabled=false", "privacy.sample_rate=1.0", f"federation.local_steps={tau}",
                         "schedule.steps=6")
        run = open_run(config, tmp_path / f"run{tau}", resume=False)
        node = SiloNode(tmp_path / f"silo{tau}", _shard(0, 1), partition=0, limits=Limits(allow_nonprivate=True))
        Federation(run, DirectTransport({0: lambda content, node=node: handle_train(content, node)}),
                   progress=False).run_all()
        ends.append(torch.cat([entry.values().flatten() for entry in run.parts.trainable]))
    assert torch.allclose(ends[0], ends[1], rtol=0, atol=1e-6) and float((ends[0] - ends[1]).abs().max()) < 1e-6


def test_a_local_round_asked_again_after_a_crash_is_answered_from_the_ledger_uncharged(tmp_path):
    config = _config("federation.local_steps=3", "privacy.epsilon=8.0")
    run = open_run(config, tmp_path / "run", resume=False)
    node = SiloNode(tmp_path / "silo", _shard(0, 1), partition=0)
    request = run.coordinator.request()
    first = node.answer(request, _first_contact(run))
    before = [entry.values().clone() for entry in node.run(run.run_id).parts.trainable]
    again = node.answer(request, Sync(0, ()))
    assert again == first and node.ledger.releases == 3
    after = [entry.values() for entry in node.run(run.run_id).parts.trainable]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # back at the round's model, exactly
