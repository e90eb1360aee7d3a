"""Secure aggregation in rounds: real silo nodes, the coordinator's round loop, the wire.

The coordinator applies exactly the weighted mean of releases it never sees; a participant that
fails makes the round retry without it, freshly noised and charged again; a silo refuses, before
anything is drawn or charged, a round with fewer participants than it counts on, a peer whose key
its roster did not sign, a b too small for the sums, and (deployed) a round it cannot check.
"""

from __future__ import annotations

import dataclasses
import os
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from seedtune.client.app import build_node, handle_keys, handle_train
from seedtune.client.limits import Limits, RequestRefused
from seedtune.client.node import SiloNode
from seedtune.client.secure import SecureSettings
from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.errors import ConfigError
from seedtune.common.privacy.distributed import DistributedDiscreteGaussianDpEvent
from seedtune.common.privacy.mechanism import lattice_step
from seedtune.common.protocol import SecureRound, TrainReply
from seedtune.common.secagg import Roster, SecureAggregationError
from seedtune.common.wire import Sync, WireError, decode_reply, decode_request, encode_reply, encode_request
from seedtune.server.federation import DirectTransport, Federation
from seedtune.server.runs import open_run

SECURE = ["schedule.steps=6", "schedule.stages=2", "eval.every=0", "data.synthetic_size=200",
          "federation.silos=3", "federation.round_timeout=5", "federation.secure_aggregation=true"]


def _config(*extra):
    return load_config("tiny", overrides=[*SECURE, *extra], command="simulate")


def _shard(partition, partitions):
    return lambda config, label_names, split="train": components.silo_shard(config, split, partition, partitions)


def _nodes(tmp_path, honest=3, count=3, **kwargs):
    return {k: SiloNode(tmp_path / f"silo{k}", _shard(k, count), partition=k,
                        secure=kwargs.pop("secure", None) or SecureSettings(honest=honest), **kwargs)
            for k in range(count)}


def _transport(nodes, train=None):
    return DirectTransport(train or {k: (lambda c, n=n: handle_train(c, n)) for k, n in nodes.items()},
                           keys={k: (lambda c, n=n: handle_keys(c, n)) for k, n in nodes.items()})


def test_the_coordinator_applies_the_weighted_mean_of_releases_it_never_sees(tmp_path):
    config = _config()
    run = open_run(config, tmp_path / "run", resume=False)
    nodes = _nodes(tmp_path)
    result = Federation(run, _transport(nodes), progress=False).run_all()
    assert result.steps == 6 and not result.rejections
    g = lattice_step(config.privacy.clip_bound)
    for record in run.log.steps():
        answered = [node.ledger.answered(run.run_id, record.step) for node in nodes.values()]
        units = sum(np.array(a.values, dtype=np.int64) for a in answered)  # what only the silos hold
        weight = sum(config.privacy.sample_rate * len(node._silos[run.run_id].shard) for node in nodes.values())
        assert np.allclose(record.projected_grads, units * g / weight, rtol=1e-12, atol=0)
    for node in nodes.values():
        event = node.ledger.answered(run.run_id, 0).event
        assert isinstance(event.event, DistributedDiscreteGaussianDpEvent) and event.event.parties == 3
        assert node.ledger.spent() == pytest.approx(result.epsilons[node.name], rel=1e-9)
        assert node.ledger.spent() <= config.privacy.epsilon * (1 + 1e-9)
        assert node.ledger.spent_if_all_collude() == pytest.approx(result.epsilons_if_all_collude[node.name], rel=1e-9)
        assert node.ledger.spent_if_all_collude() > 2 * node.ledger.spent()  # one share alone is far weaker


def test_a_participant_that_fails_makes_the_round_retry_without_it_freshly_noised_and_charged(tmp_path):
    config = _config("federation.secure_honest=2")
    run = open_run(config, tmp_path / "run", resume=False)
    budget = (config.privacy.epsilon * 2, config.privacy.delta, "rdp")  # room for the retried round's charge
    nodes = _nodes(tmp_path, honest=2, budget=budget)
    train = {k: (lambda c, n=n: handle_train(c, n)) for k, n in nodes.items()}
    failed = []

    def fails_once_at_step_2(content):
        request, _ = decode_request(content)
        if request.step == 2 and not failed:
            failed.append(request.secure.attempt)
            raise RuntimeError("silo 2 went down")
        return handle_train(content, nodes[2])

    federation = Federation(run, _transport(nodes, {**train, 2: fails_once_at_step_2}), progress=False)
    result = federation.run_all()
    assert result.steps == 6 and failed == [0]
    assert [r["step"] for r in nodes[0].ledger.history()].count(2) == 2  # charged for both attempts
    assert [r["step"] for r in nodes[2].ledger.history()].count(2) == 0  # it failed before releasing
    first, second = [r for r in nodes[0].ledger.history() if r["step"] == 2]
    assert first["request"] != second["request"] and first["released"] != second["released"]  # fresh noise
    assert {silo: pytest.approx(node.ledger.spent(), rel=1e-9) for silo, node in
            ((n.name, n) for n in nodes.values())} == result.epsilons  # the coordinator saw both charges
    assert [record.step for record in run.log.steps()] == list(range(6))  # the round applied once


def test_a_round_is_refused_without_enough_participants_for_the_honest_count(tmp_path):
    run = open_run(_config(), tmp_path / "run", resume=False)  # t = 3
    nodes = _nodes(tmp_path)
    down = lambda content: (_ for _ in ()).throw(RuntimeError("down"))  # noqa: E731 - a silo that never answers
    transport = _transport(nodes)
    transport.keys[2] = down
    federation = Federation(run, transport, progress=False)
    with pytest.raises(Exception, match="at least max\\(federation.min_silos, federation.secure_honest\\) = 3"):
        federation.run_all()
    assert run.log.num_steps == 0
    assert all(node.ledger is None or node.ledger.releases == 0 for node in nodes.values())


def _secure_request(run, nodes, *, bits=40, honest=3, drop=()):
    request = run.coordinator.request()
    setup = Sync(0, (), run.setup())
    participants = tuple(sorted((node.participant(run.run_id, setup) for k, node in nodes.items() if k not in drop),
                                key=lambda p: p.name))
    return dataclasses.replace(request, secure=SecureRound(0, bits, honest, participants)), setup


def test_a_silo_refuses_fewer_participants_than_it_counts_on_and_charges_nothing(tmp_path):
    run = open_run(_config(), tmp_path / "run", resume=False)
    nodes = _nodes(tmp_path)
    request, setup = _secure_request(run, nodes, drop=(2,))
    with pytest.raises(SecureAggregationError, match="2 participant\\(s\\), fewer than the 3 honest"):
        nodes[0].answer(request, setup)
    assert nodes[0].ledger is None or nodes[0].ledger.releases == 0


def test_a_silo_refuses_a_round_that_lists_another_key_for_it(tmp_path):
    run = open_run(_config(), tmp_path / "run", resume=False)
    nodes = _nodes(tmp_path)
    request, setup = _secure_request(run, nodes)
    swapped = list(request.secure.participants)
    swapped[0] = dataclasses.replace(swapped[0], public=bytes(32))  # the coordinator's own key in its place
    request = dataclasses.replace(request, secure=dataclasses.replace(request.secure, participants=tuple(swapped)))
    with pytest.raises(SecureAggregationError, match="with a masking key or public size that is not this silo's"):
        nodes[0].answer(request, setup)


def _roster(tmp_path, signers, skip=()):
    lines = ["[silos]"]
    for name, key in signers.items():
        if name not in skip:
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            lines.append(f'"{name}" = "{public.decode()}"')
    path = tmp_path / f"roster{len(skip)}.toml"
    path.write_text("\n".join(lines) + "\n")
    return Roster.load(path)


def test_peers_keys_must_be_signed_by_the_roster_and_a_refusal_charges_nothing(tmp_path):
    run = open_run(_config(), tmp_path / "run", resume=False)
    signers = {f"partition-{k}": ed25519.Ed25519PrivateKey.generate() for k in range(3)}
    roster = _roster(tmp_path, signers)
    nodes = {k: SiloNode(tmp_path / f"silo{k}", _shard(k, 3), partition=k,
                         secure=SecureSettings(3, roster, False, signers[f"partition-{k}"])) for k in range(3)}
    request, setup = _secure_request(run, nodes)
    assert all(p.signature for p in request.secure.participants)
    reply = nodes[0].answer(request, setup)  # every peer signed by its operator: answered
    assert len(reply.masked) == len(request.probe_seeds) and nodes[0].ledger.releases == 1

    forged = list(request.secure.participants)
    forged[1] = dataclasses.replace(forged[1], signature=bytes(64))
    bad = dataclasses.replace(request, secure=dataclasses.replace(request.secure, participants=tuple(forged),
                                                                  attempt=1))
    with pytest.raises(SecureAggregationError, match="'partition-1' is not signed by its key"):
        nodes[0].answer(bad, setup)
    lacking = SiloNode(tmp_path / "silo0", _shard(0, 3), partition=0,
                       secure=SecureSettings(3, _roster(tmp_path, signers, skip=("partition-2",)), False,
                                             signers["partition-0"]))
    with pytest.raises(SecureAggregationError, match="'partition-2' is not in .*roster1.toml"):
        lacking.answer(dataclasses.replace(request, secure=dataclasses.replace(request.secure, attempt=2)), setup)
    assert lacking.ledger.releases == 1  # only the answered round: neither refusal charged anything


def test_a_deployed_silo_without_a_roster_refuses_unless_its_operator_trusts_the_coordinator(tmp_path):
    run = open_run(_config(), tmp_path / "run", resume=False)
    own_budget = (8.0, 1e-5, "rdp")
    nodes = _nodes(tmp_path, budget=own_budget, budget_required=True)
    request, setup = _secure_request(run, nodes)
    with pytest.raises(SecureAggregationError, match="no secure-roster .* secure-trust-coordinator=true"):
        nodes[0].answer(request, setup)
    trusting = SiloNode(tmp_path / "silo0", _shard(0, 3), partition=0, budget=own_budget, budget_required=True,
                        secure=SecureSettings(3, None, True))
    assert trusting.answer(request, setup).masked


def test_a_b_too_small_for_the_sums_stops_the_run_in_one_line_before_anything_is_charged(tmp_path):
    run = open_run(_config("federation.secure_bits=8"), tmp_path / "run", resume=False)
    nodes = _nodes(tmp_path)
    with pytest.raises(SecureAggregationError, match="federation.secure_bits=8 is too small: .* need \\d+ bits"):
        Federation(run, _transport(nodes), progress=False).run_all()
    assert all(node.ledger is None or node.ledger.releases == 0 for node in nodes.values())
    request, setup = _secure_request(run, nodes, bits=8)  # a coordinator that sends it anyway
    with pytest.raises(SecureAggregationError, match="too small"):
        nodes[0].answer(request, setup)
    assert nodes[0].ledger is None or nodes[0].ledger.releases == 0


def test_a_silo_keeps_its_masking_key_across_restarts_readable_by_it_alone(tmp_path):
    run = open_run(_config(), tmp_path / "run", resume=False)
    setup = Sync(0, (), run.setup())
    first = _nodes(tmp_path)[0].participant(run.run_id, setup)
    again = _nodes(tmp_path)[0].participant(run.run_id, setup)
    assert first == again and len(first.public) == 32
    (key_file,) = (tmp_path / "silo0" / "secagg").iterdir()
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_two_processes_making_a_silos_key_at_once_end_with_the_same_one(tmp_path, monkeypatch):
    """The first key written wins; a process that made another reads the winner's."""
    from seedtune.client import secure

    first = secure.masking_key(tmp_path, "run-1")
    path = next((tmp_path / "secagg").iterdir())
    exists = type(path).exists  # the second process looked before the first had written:
    monkeypatch.setattr(type(path), "exists", lambda self: False if self == path else exists(self))
    second = secure.masking_key(tmp_path, "run-1")
    monkeypatch.undo()
    assert second.public_bytes == first.public_bytes
    assert sorted(p.name for p in (tmp_path / "secagg").iterdir()) == [path.name]  # no temporary left


@pytest.mark.parametrize("extra, message", [
    (["federation.aggregation=median"], "federation.aggregation='median' is invalid: it must be 'mean' under"),
    (["federation.local_steps=4"], "federation.local_steps=4 is invalid: it must be 1 under"),
    (["privacy.noise=gaussian"], "privacy.noise='gaussian' is invalid: it must be 'discrete' under"),
    (["privacy.enabled=false"], "privacy.enabled=False is invalid: it must be true under"),
    (["federation.secure_honest=4"], "federation.secure_honest=4 is invalid: it must be in \\[0, 3\\]"),
])
def test_combinations_secure_aggregation_cannot_run_are_one_line_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        _config(*extra)


def test_a_node_config_sets_t_and_a_bad_one_names_the_key(tmp_path):
    node = build_node({"state-dir": str(tmp_path / "a"), "partition-id": 0, "secure-honest": 4,
                       "secure-trust-coordinator": "true"}, tmp_path)
    assert node.secure.honest == 4 and node.secure.trust_coordinator
    with pytest.raises(Exception, match="node config secure-honest='x' must be an integer >= 1"):
        build_node({"state-dir": str(tmp_path / "b"), "partition-id": 0, "secure-honest": "x"}, tmp_path)
    with pytest.raises(Exception, match="secure-signing-key=.*missing"):
        build_node({"state-dir": str(tmp_path / "c"), "partition-id": 0, "secure-signing-key": str(tmp_path / "missing")},
                   tmp_path)


def test_a_silos_noise_floor_is_checked_against_the_summed_noise_it_counts_on(tmp_path):
    from seedtune.client.limits import _mechanism

    event = DistributedDiscreteGaussianDpEvent(0.5, 4, 8, 10.0)
    assert _mechanism(event) == (pytest.approx(1.0), 1.0)
    with pytest.raises(RequestRefused, match="noise multiplier 1, below"):
        Limits(min_noise_multiplier=1.5).admit(event, 0)


def test_secure_requests_and_masked_replies_cross_the_wire_checked(tmp_path):
    run = open_run(_config(), tmp_path / "run", resume=False)
    nodes = _nodes(tmp_path)
    request, setup = _secure_request(run, nodes)
    decoded, _ = decode_request(encode_request(request, setup))
    assert decoded == request
    reply = TrainReply(0, (), 4.0, (), masked=(0, 2**40 - 1), collusion=())
    assert decode_reply(encode_reply(reply), step=0, probes=2, bits=40)[0] == reply
    with pytest.raises(WireError, match="outside \\[0, 2\\^40\\)"):
        decode_reply(encode_reply(dataclasses.replace(reply, masked=(0, 2**40))), step=0, probes=2, bits=40)
    with pytest.raises(WireError, match="2 masked integers"):
        decode_reply(encode_reply(dataclasses.replace(reply, masked=(1,))), step=0, probes=2, bits=40)
    with pytest.raises(WireError, match="masked"):  # a plain reply to a secure round
        decode_reply(encode_reply(TrainReply(0, (0.1, 0.2), 4.0, ())), step=0, probes=2, bits=40)
    content = encode_request(request, setup)
    content["request"]["secure"] = content["request"]["secure"].replace('"bits": 40', '"bits": 80')
    with pytest.raises(WireError, match="bits in \\[2, 64\\]"):
        decode_request(content)


def test_private_evaluation_counts_work_under_secure_aggregation_and_stay_in_the_budget(tmp_path):
    """Each silo noises its own evaluation counts, as without secure aggregation; the share is
    calibrated with that evaluation's charge, so every ledger ends within its epsilon."""
    from seedtune.client.app import handle_evaluate

    config = _config("federation.silo_eval=private")
    run = open_run(config, tmp_path / "run", resume=False)
    nodes = _nodes(tmp_path)
    transport = _transport(nodes)
    transport.evaluators = {k: (lambda c, n=n: handle_evaluate(c, n)) for k, n in nodes.items()}
    result = Federation(run, transport, progress=False).run_all()
    assert result.steps == 6 and result.silo_evaluation["private"] and result.silo_evaluation["silos"] == 3
    for node in nodes.values():
        notes = [row["note"] for row in node.ledger.history()]
        assert notes.count("evaluation") == 1 and len(notes) == 7
        assert node.ledger.spent() == pytest.approx(config.privacy.epsilon, rel=1e-3)
        assert node.ledger.spent() <= config.privacy.epsilon * (1 + 1e-9)
