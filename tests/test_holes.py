"""Regression tests for the ways a coordinator could get more out of a silo than its ledger charges
(issue 13). Each failed on the code before the fix; docs/threat-model.md lists them."""

from __future__ import annotations

import copy
import dataclasses
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seedtune.jobs.train import train
from seedtune.client.app import NodeConfigError, handle_train, node_for
from seedtune.client.limits import Limits
from seedtune.client.node import SiloNode
from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.errors import ConfigError, SeedtuneError
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.mechanism import LedgerKey, private_release
from seedtune.common.privacy.randomness import SecretRandomness, SeededRandomness
from seedtune.common.protocol import ReleaseParameters
from seedtune.common.wire import Setup, Sync, WireError, encode_request
from seedtune.server.runs import open_run

TINY = ["schedule.steps=4", "schedule.stages=2", "eval.every=0", "data.synthetic_size=200",
        "federation.silos=1", "privacy.sample_rate=0.2"]


class NoNoise(SecretRandomness):
    def normal(self, n):
        return np.zeros(n)

    def discrete_gaussian(self, n, sigma_squared):
        return np.zeros(n, dtype=np.int64)


def _shard(config, label_names, split="train"):
    return components.silo_shard(config, split, 0, 1)


# -- 1: no value that arrives over the network may seed a silo's randomness --------------------
def test_a_setup_asking_for_seeded_noise_is_refused_by_a_deployed_silo(tmp_path):
    run = open_run(load_config("tiny", overrides=TINY), tmp_path / "run", resume=False)
    setup = run.setup()
    tampered = copy.deepcopy(setup.config)
    tampered["privacy"]["noise_seed"] = 7  # what a coordinator could send to make two silos' noise equal
    message = encode_request(run.coordinator.request(), Sync(0, (), Setup(setup.run_id, tampered, setup.base,
                                                                             setup.mask)))
    node = SiloNode(tmp_path / "silo", _shard, budget=(8.0, 1e-5, "rdp"), budget_required=True)
    with pytest.raises(ConfigError, match="privacy.noise_seed is not a setting"):
        handle_train(message, node)
    assert node.ledger is None  # nothing sampled, computed or charged
    with pytest.raises(ConfigError, match="privacy.noise_seed"):
        load_config("tiny", overrides=["privacy.noise_seed=3"])


def test_two_silos_built_from_the_same_setup_release_different_noise(tmp_path):
    run = open_run(load_config("tiny", overrides=TINY), tmp_path / "run", resume=False)
    request, first = run.coordinator.request(), Sync(0, (), run.setup())
    replies = [SiloNode(tmp_path / name, _shard, partition=0).answer(request, first).projected_grads
               for name in ("a", "b")]
    assert replies[0] != replies[1]


@pytest.mark.parametrize("setup_noise, asked", [("discrete", "gaussian"), ("gaussian", "discrete")])
def test_a_request_whose_noise_kind_contradicts_the_setup_is_refused_before_anything_is_charged(
        setup_noise, asked, tmp_path):
    run = open_run(load_config("tiny", overrides=[*TINY, f"privacy.noise={setup_noise}"]), tmp_path / "run",
                   resume=False)
    request = run.coordinator.request()
    assert request.release.noise == setup_noise  # the coordinator asks what its own setup names
    node = SiloNode(tmp_path / "silo", _shard, budget=(8.0, 1e-5, "rdp"), partition=0,
                    limits=Limits(allow_float_noise=True))
    forged = dataclasses.replace(request, release=dataclasses.replace(request.release, noise=asked))
    with pytest.raises(SeedtuneError, match=f"asks for {asked!r} noise but this run's setup names"):
        handle_train(encode_request(forged, Sync(0, (), run.setup())), node)
    assert node.ledger.releases == 0  # nothing sampled, computed or charged
    assert node.answer(request, Sync(0, ())).projected_grads  # the honest request is answered


# -- 2: a non-finite per-example value contributes zero, and the count stays with the silo -----
def test_a_row_that_is_not_finite_contributes_zero_and_is_counted_in_the_ledger_only(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", epsilon=1e6, delta=1e-5)
    rows = torch.tensor([[0.5, -0.25], [0.75, 1.0], [2.0, 3.0]], dtype=torch.float64)
    settings = dict(parameters=ReleaseParameters(10.0, 1.0, 0.5), population=10, randomness=NoNoise(), ledger=ledger)
    honest = private_release(rows[:2], key=LedgerKey(0), **settings)
    for poison in (float("nan"), float("inf"), -float("inf")):
        poisoned = torch.cat([rows[:2], torch.tensor([[1.0, poison]], dtype=torch.float64)])
        release = private_release(poisoned, key=LedgerKey(1), **settings)
        assert np.all(np.isfinite(release.values))
        assert np.array_equal(release.values, honest.values)  # as if the example were absent
        assert release.zeroed == 1
    assert [entry["zeroed"] for entry in ledger.history()] == [0, 1, 1, 1]
    with pytest.raises(AttributeError):
        release.values.zeroed  # the count is not part of what is released


def test_a_huge_finite_row_is_clipped_or_zeroed_never_released_as_infinity(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", epsilon=1e6, delta=1e-5)
    rows = torch.tensor([[1e308, 1e308], [0.5, 0.5]], dtype=torch.float64)  # its norm overflows
    release = private_release(rows, ReleaseParameters(1.0, 1.0, 0.5), population=4, randomness=NoNoise(),
                              ledger=ledger, key=LedgerKey(0))
    assert np.all(np.isfinite(release.values))


# -- 5: a deployed silo's budget, state directory and public size are its operator's -----------
def _context(**node_config):
    return SimpleNamespace(node_config=node_config, node_id=12345)


def test_a_deployed_silo_needs_its_own_state_dir_budget_and_public_size(tmp_path, monkeypatch):
    monkeypatch.delenv("SEEDTUNE_STATE_DIR", raising=False)
    monkeypatch.delenv("SEEDTUNE_EPSILON", raising=False)
    data = tmp_path / "silo.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i} great", "label": "positive"}) + "\n" for i in range(20)))
    with pytest.raises(NodeConfigError, match="no state directory"):
        node_for(_context(name="a"))  # no longer a ledger named after the node id the SuperLink hands out
    with pytest.raises(NodeConfigError, match="public-size"):
        node_for(_context(**{"state-dir": str(tmp_path / "s1"), "data-path": str(data), "epsilon": 6.0}))
    with pytest.raises(NodeConfigError, match="public-size='lots'"):
        node_for(_context(**{"state-dir": str(tmp_path / "s2"), "data-path": str(data), "public-size": "lots"}))
    with pytest.raises(NodeConfigError, match="epsilon='six'"):
        node_for(_context(**{"state-dir": str(tmp_path / "s3"), "epsilon": "six"}))

    run = open_run(load_config("tiny", overrides=TINY), tmp_path / "run", resume=False)
    message = encode_request(run.coordinator.request(), Sync(0, (), run.setup()))
    unbudgeted, _ = node_for(_context(**{"state-dir": str(tmp_path / "s4"), "partition-id": 0}))
    with pytest.raises(SeedtuneError, match="no privacy budget of its own"):
        handle_train(message, unbudgeted)
    assert unbudgeted.ledger is None
    budgeted, _ = node_for(_context(**{"state-dir": str(tmp_path / "s5"), "partition-id": 0, "epsilon": 8.0}))
    handle_train(message, budgeted)
    assert budgeted.ledger.epsilon == 8.0 and budgeted.ledger.releases == 1  # its own budget, not the setup's

    monkeypatch.setenv("SEEDTUNE_STATE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("SEEDTUNE_EPSILON", "7.5")
    with pytest.raises(NodeConfigError, match="partition-id=1 is not a share of num-partitions=1"):
        node_for(_context(**{"partition-id": 1}))  # it would have trained on the whole dataset
    from_environment, _ = node_for(_context(**{"partition-id": 1, "num-partitions": 2}))
    assert from_environment.state_dir == tmp_path / "env" / "partition-1"
    handle_train(message, from_environment)
    assert from_environment.ledger.epsilon == 7.5


# -- 7: the reply is normalised by a size the operator publishes, never the exact count --------
def test_a_silo_divides_by_its_public_size_whatever_its_records(tmp_path):
    run = open_run(load_config("tiny", overrides=TINY), tmp_path / "run", resume=False)
    request, first = run.coordinator.request(), Sync(0, (), run.setup())
    shard = components.silo_shard(run.config, "train", 0, 1)
    sizes = []
    for name, rows in (("all", shard), ("one-less", shard.select(range(len(shard) - 1)))):
        node = SiloNode(tmp_path / name, lambda config, labels, split, rows=rows: rows, public_size=1000,
                        randomness=lambda: NoNoise())
        reply = node.answer(request, first)
        sizes.append(reply.expected_batch_size)
    assert sizes == [request.release.sample_rate * 1000] * 2  # n does not leave, through the weight or the scale


# -- 8: nothing private is written to the run's public log ------------------------------------
def test_train_keeps_the_private_batch_loss_out_of_the_log(tmp_path):
    config = load_config("tiny", overrides=TINY)
    train(config, tmp_path / "run", progress=False, randomness=SeededRandomness(1, quiet=True))
    with sqlite3.connect(tmp_path / "run" / "log.sqlite") as db:
        names = {row[0] for row in db.execute("SELECT DISTINCT name FROM metrics")}
    assert names and not any("train" in name or name == "loss" for name in names), names
    metrics = json.loads(Path(tmp_path / "run" / "metrics.json").read_text())
    assert "train_loss" not in metrics["series"]
