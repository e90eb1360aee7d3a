"""A silo's own limits: a coordinator cannot make it release weaker or more than its operator allows."""

from __future__ import annotations

import dataclasses

import pytest

from seedtune.client.app import handle_train
from seedtune.client.limits import Limits, RequestRefused
from seedtune.client.node import SiloNode
from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.errors import SeedtuneError
from seedtune.common.privacy.accounting import release_event
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.protocol import MIN_BETA, EvaluationRequest, ReleaseParameters, TrainRequest
from seedtune.common.wire import Sync
from seedtune.server.federation import DirectTransport, Federation, FederationError
from seedtune.server.runs import open_run

TINY = ["schedule.steps=4", "schedule.stages=2", "eval.every=0", "data.synthetic_size=200",
        "federation.silos=1", "federation.round_timeout=5", "federation.round_retries=1"]


def _config(*extra):
    return load_config("tiny", overrides=[*TINY, *extra], command="simulate")


def _shard(config, label_names, split="train"):
    return components.silo_shard(config, split, 0, 1)


def _with(request: TrainRequest, **changes) -> TrainRequest:
    """``request`` with some of its own fields or its release parameters changed."""
    release = {key: changes.pop(key) for key in list(changes) if key in ReleaseParameters.__dataclass_fields__}
    return dataclasses.replace(request, release=dataclasses.replace(request.release, **release), **changes)


def _evaluation(request: TrainRequest, private: bool, noise_std: float) -> EvaluationRequest:
    """An evaluation of the model ``request`` is for."""
    return EvaluationRequest(request.run_id, request.step, private, noise_std)


def test_node_config_sets_the_limits_and_a_bad_value_names_its_key():
    limits = Limits.from_node_config({"min-noise-multiplier": 0.8, "max-probes": 16, "max-sample-rate": 0.05,
                                      "max-releases": 500, "min-beta": 1e-3, "allow-nonprivate": "true"})
    assert limits == Limits(0.8, 16, 0.05, 500, 1e-3, True, False)
    assert Limits.from_node_config({"allow-float-noise": "true"}).allow_float_noise
    assert Limits.from_node_config({}) == Limits()  # no floor, K <= 1024, q <= 1, no release limit, private only
    assert Limits().min_beta == MIN_BETA > 0  # a floor on beta by default
    assert Limits.from_node_config({}, allow_nonprivate=True).allow_nonprivate
    for key, value in (("min-noise-multiplier", -1.0), ("max-probes", 0), ("max-sample-rate", 1.5),
                       ("max-releases", "many"), ("allow-nonprivate", "sometimes"), ("max-probes", True),
                       ("allow-float-noise", "maybe"), ("min-beta", 0.0), ("min-beta", "tiny")):
        with pytest.raises(SeedtuneError, match=f"node config {key}="):
            Limits.from_node_config({key: value})
    with pytest.raises(SeedtuneError, match="max-rounds is now max-releases"):
        Limits.from_node_config({"max-rounds": 5})


def test_requests_outside_the_limits_are_refused_before_anything_is_released(tmp_path):
    run = open_run(_config("zo.probes=4", "privacy.sample_rate=0.05"), tmp_path / "run", resume=False)
    limits = Limits(min_noise_multiplier=run.sigma * 0.9, max_probes=4, max_sample_rate=0.05, min_beta=1e-3)
    node = SiloNode(tmp_path / "silo", _shard, partition=0, limits=limits)
    request = run.coordinator.request()
    first = Sync(0, tuple(run.log.steps()), run.setup())
    refusals = {
        "min-noise-multiplier": _with(request, noise_multiplier=run.sigma * 0.5),
        "max-probes": _with(request, probe_seeds=request.probe_seeds + (99,)),
        "max-sample-rate": _with(request, sample_rate=0.2),
        "min-beta": _with(request, beta=1e-7),
    }
    for key, asked in refusals.items():
        with pytest.raises(RequestRefused, match=key):
            node.answer(asked, first)
    assert node.ledger is None or node.ledger.releases == 0  # nothing drawn, charged or released
    assert not (tmp_path / "silo" / "timings.jsonl").exists()
    reply = node.answer(request, first)  # the same request within the limits is answered
    assert len(reply.projected_grads) == 4 and node.ledger.releases == 1


def test_max_releases_counts_the_ledger_not_the_step_a_request_names(tmp_path):
    """Five requests all for step 0 used to be answered under max-rounds=1; evaluations were
    not counted at all. Now every release the ledger holds counts, whatever it is labelled."""
    run = open_run(_config("privacy.sample_rate=0.05"), tmp_path / "run", resume=False)
    node = SiloNode(tmp_path / "silo", _shard, partition=0, limits=Limits(max_releases=3))
    request, first = run.coordinator.request(), Sync(0, tuple(run.log.steps()), run.setup())
    node.answer(request, first)
    again = node.answer(request, first)  # the same question: the same release, nothing new charged
    assert node.ledger.releases == 1 and again.projected_grads == node.answer(request, first).projected_grads
    node.answer(_with(request, probe_seeds=(7, 8, 9, 10)), first)  # step 0 again, another question
    node.evaluate(_evaluation(request, True, 5.0), first)  # an evaluation is a release too
    assert node.ledger.releases == 3
    with pytest.raises(RequestRefused, match="max-releases"):
        node.answer(_with(request, probe_seeds=(11, 12, 13, 14)), first)
    with pytest.raises(RequestRefused, match="max-releases"):
        node.evaluate(_evaluation(request, True, 6.0), first)
    assert node.ledger.releases == 3


def test_the_noise_floor_is_checked_against_the_sigma_the_evaluation_is_charged_at(tmp_path):
    """An evaluation's counts get noise of std s each, charged as sigma = s / sqrt 2 (two counts, each
    moved by one): a floor of 1 refuses s = 1.2, which used to pass as 1.2 >= 1."""
    run = open_run(_config(), tmp_path / "run", resume=False)
    request, first = run.coordinator.request(), Sync(0, tuple(run.log.steps()), run.setup())
    node = SiloNode(tmp_path / "silo", _shard, partition=0, limits=Limits(min_noise_multiplier=1.0))
    with pytest.raises(RequestRefused, match=r"noise multiplier 0.848"):
        node.evaluate(_evaluation(request, True, 1.2), first)
    assert node.ledger is None or node.ledger.releases == 0
    node.evaluate(_evaluation(request, True, 1.5), first)  # 1.5 / sqrt 2 = 1.06 >= 1
    assert node.ledger.releases == 1


def test_the_ledger_applies_the_limits_inside_its_own_transaction(tmp_path):
    """A second process serving the same silo (another ledger object on the same file) is held to
    the count the file holds, not to what it saw when it opened."""
    limits = Limits(max_releases=2)
    one = PrivacyLedger(tmp_path / "l.sqlite", epsilon=1e6, delta=1e-5, admit=limits.admit)
    two = PrivacyLedger(tmp_path / "l.sqlite", epsilon=1e6, delta=1e-5, admit=limits.admit)
    event = release_event(0.1, 1.0, "discrete")
    one.charge(event, step=0)
    two.charge(event, step=1)
    with pytest.raises(RequestRefused, match="max-releases"):
        one.charge(event, step=2)
    with pytest.raises(RequestRefused, match="min-noise-multiplier"):
        PrivacyLedger(tmp_path / "m.sqlite", epsilon=1e6, delta=1e-5,
                      admit=Limits(min_noise_multiplier=2.0).admit).charge(event, step=0)
    assert one.releases == 2


def test_a_run_that_switches_privacy_off_is_refused_unless_the_silo_allows_it(tmp_path):
    run = open_run(_config("privacy.enabled=false"), tmp_path / "run", resume=False)
    request, first = run.coordinator.request(), Sync(0, tuple(run.log.steps()), run.setup())
    strict = SiloNode(tmp_path / "strict", _shard, partition=0)
    with pytest.raises(RequestRefused, match="allow-nonprivate"):
        strict.answer(request, first)
    with pytest.raises(RequestRefused, match="allow-nonprivate"):
        strict.evaluate(_evaluation(request, False, 0.0), first)
    willing = SiloNode(tmp_path / "willing", _shard, partition=0, limits=Limits(allow_nonprivate=True))
    reply = willing.answer(request, first)
    assert reply.events == ()  # answered, without noise, as its operator allowed


def test_a_coordinator_asking_for_less_noise_than_the_floor_gets_no_release(tmp_path):
    run = open_run(_config(), tmp_path / "run", resume=False)
    node = SiloNode(tmp_path / "silo", _shard, partition=0, limits=Limits(min_noise_multiplier=run.sigma * 2))
    federation = Federation(run, DirectTransport({0: lambda content: handle_train(content, node)}), progress=False)
    with pytest.raises(FederationError):
        federation.run_all()
    reasons = [r["reason"] for r in federation.store.rejections()]
    assert reasons and all("min-noise-multiplier" in reason for reason in reasons)
    assert run.coordinator.step == 0  # no round was applied
    assert node.ledger is None or node.ledger.releases == 0


def test_a_run_asking_for_floating_point_noise_is_refused_unless_the_silo_allows_it(tmp_path):
    run = open_run(_config("privacy.noise=gaussian"), tmp_path / "run", resume=False)
    request, first = run.coordinator.request(), Sync(0, tuple(run.log.steps()), run.setup())
    strict = SiloNode(tmp_path / "strict", _shard, partition=0)
    with pytest.raises(RequestRefused, match="allow-float-noise"):
        strict.answer(request, first)
    with pytest.raises(RequestRefused, match="allow-float-noise"):
        strict.evaluate(_evaluation(request, True, 5.0), first)
    assert strict.ledger is None or strict.ledger.releases == 0
    willing = SiloNode(tmp_path / "willing", _shard, partition=0, limits=Limits(allow_float_noise=True))
    reply = willing.answer(request, first)
    assert [type(event.event).__name__ for event in reply.events] == ["GaussianDpEvent"]
