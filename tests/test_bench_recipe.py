"""``seedtune bench recipe``: head-only runs replayed on embeddings, chosen on validation only."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from seedtune.bench import recipe
from seedtune.cli.main import main
from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.errors import ConfigError

HEAD = ["prune.enabled=true", "prune.ratio=0.0", "prune.always=[\"classifier.*\"]"]


NORM = ["model.task=prompt-classification", "prune.enabled=true", "prune.ratio=0.0",
        "prune.always=[\"lm.model.norm.weight\"]"]  # a prompt classifier's final norm


@pytest.fixture(scope="module")
def tiny_features():
    return recipe.features(load_config("tiny", None, HEAD, command="simulate"))


@pytest.mark.parametrize("readout", [HEAD, NORM], ids=["head", "final-norm"])
def test_without_privacy_many_probes_follow_exact_gradient_descent(readout):
    data = recipe.features(load_config("tiny", None, readout, command="simulate"))
    steps, lr = 5, 0.5
    config = load_config("tiny", None, [*readout, "privacy.enabled=false", "privacy.sample_rate=1.0",
                                        "zo.probes=1024", f"schedule.steps={steps}", f"schedule.lr={lr}",
                                        "schedule.kind=constant", "schedule.stages=1", "federation.silos=1"],
                         command="simulate")
    theta = recipe.train_readout(config, data, seed=0)
    exact = data.start.clone().requires_grad_(True)
    for _ in range(steps):  # the mean loss's exact gradient: what (1/K) sum_k z_k z_k^T g estimates
        loss = F.cross_entropy(data.readout.logits(data.train, exact), data.train_labels)
        (grad,) = torch.autograd.grad(loss, [exact])
        with torch.no_grad():
            exact -= lr * grad
    moved, off = (exact - data.start).norm(), (theta - exact).norm()
    assert moved > 0 and off < 2 * (data.start.numel() / 1024) ** 0.5 * moved  # the estimate's spread, sqrt(d / K)


def test_noise_and_clipping_change_the_run(tiny_features):
    base = [*HEAD, "schedule.steps=20", "zo.probes=16"]
    quiet = recipe.train_readout(load_config("tiny", None, [*base, "privacy.enabled=false"], command="simulate"),
                                 tiny_features, seed=0)
    private = recipe.train_readout(load_config("tiny", None, base, command="simulate"), tiny_features, seed=0)
    assert not torch.equal(quiet, private)
    again = recipe.train_readout(load_config("tiny", None, base, command="simulate"), tiny_features, seed=0)
    assert torch.equal(private, again)  # a seed replays the same run


def test_the_test_split_is_never_read(monkeypatch):
    original = components.load_data

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError("the recipe bench read the test split")

        def __getitem__(self, key):
            raise AssertionError("the recipe bench read the test split")

        def __len__(self):
            raise AssertionError("the recipe bench read the test split")

    def without_test(config):
        data = original(config)
        return type(data)(data.train, data.validation, Untouchable(), data.label_names)

    monkeypatch.setattr(components, "load_data", without_test)
    report = recipe.bench_recipe("tiny", None, [*HEAD, "schedule.steps=4"], ["lr=0.1,0.2"], 1, progress=False)
    assert [point["lr"] for point in report["points"]] in ([0.1, 0.2], [0.2, 0.1])


def test_the_cli_prints_points_best_first_and_refuses_a_bad_grid(tmp_path, capsys):
    args = ["bench", "recipe", "--preset", "tiny", *(a for k in HEAD for a in ("--set", k)), "--set", "schedule.steps=6",
            "--vary", "lr=0.05,0.5", "--vary", "probes=2,8", "--seeds", "2", "--time-steps", "--no-progress"]
    assert main([*args, "--json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "recipe.json").read_text()) == report
    means = [point["validation_accuracy"] for point in report["points"]]
    assert len(means) == 4 and means == sorted(means, reverse=True)
    assert all(len(point["each"]) == 2 and point["smallest"] <= point["validation_accuracy"] for point in report["points"])
    assert 0 <= report["validation_ceiling"] <= 1
    size = {point["probes"]: point["uplink_bytes"] for point in report["points"]}
    assert size[8] - size[2] >= 6 * 8  # six more float64 values in every reply
    assert all(point["step_seconds"] > 0 for point in report["points"])
    for bad, named in ((["--vary", "speed=1"], "speed"), (["--vary", "lr=fast"], "lr=fast")):
        assert main(["bench", "recipe", "--preset", "tiny", *(a for k in HEAD for a in ("--set", k)), *bad]) == 2
        error = capsys.readouterr().err
        assert named in error and len(error.strip().splitlines()) == 1


def test_a_trainable_set_beyond_a_linear_readout_is_refused():
    with pytest.raises(ConfigError, match="linear readout only .*prune.ratio=0"):
        recipe.features(load_config("tiny", None, [], command="simulate"))


@pytest.mark.parametrize("readout", [HEAD, NORM], ids=["head", "final-norm"])
def test_the_dp_sgd_replay_is_the_utility_benchs_dp_sgd_run(monkeypatch, readout):
    """Same batches and noise (one seed), the same readout: the validation accuracy the replay
    reports is the one `bench utility --methods dp-sgd` measures through the real model."""
    from seedtune.bench import dpsgd

    overrides = [*readout, "schedule.steps=5", "schedule.lr=0.5", "privacy.sample_rate=0.1", "eval.every=0",
                 "data.max_train_examples=120", "eval.test_examples=100000"]  # the whole validation split
    config = load_config("tiny", None, overrides, command="simulate")
    data = recipe.features(config)
    accuracy, _ = recipe.replay(config, data, seed=3, method="dp-sgd")

    replayed = recipe.train_dp_sgd(config, data, seed=3)
    assert not torch.allclose(replayed, data.start)  # it trained
    assert torch.equal(replayed, recipe.train_dp_sgd(config, data, seed=3))  # a seed replays the same run
    assert not torch.equal(replayed, recipe.train_dp_sgd(config, data, seed=4))

    original, trained = dpsgd.train_readout, []

    def seeded(*args, generator=None, **kwargs):  # the utility bench's run, with the replay's seed
        trained.append(original(*args, generator=torch.Generator().manual_seed(3), **kwargs))
        return trained[-1]

    monkeypatch.setattr(dpsgd, "train_readout", seeded)
    metrics, _ = dpsgd.dp_sgd(load_config("tiny", None, overrides, command="simulate"), lr=0.5)
    torch.testing.assert_close(trained[0], replayed)
    validation = len(data.validation_labels)
    assert metrics["validation_accuracy"] == pytest.approx(accuracy, abs=1.5 / validation)  # a tie may flip


def test_dp_sgd_sweeps_its_own_keys_only(capsys):
    report = recipe.bench_recipe("tiny", None, [*HEAD, "schedule.steps=4"], ["lr=0.1,1", "epsilon=2"], 2,
                                 progress=False, method="dp-sgd")
    assert report["method"] == "dp-sgd" and len(report["points"]) == 2
    assert all(point["uplink_bytes"] is None and point["sigma"] > 0 for point in report["points"])
    with pytest.raises(ConfigError, match="--vary 'probes=4'.*one silo, without probes"):
        recipe.bench_recipe("tiny", None, HEAD, ["probes=4"], 1, progress=False, method="dp-sgd")
    with pytest.raises(ConfigError, match="--time-steps"):
        recipe.bench_recipe("tiny", None, HEAD, ["lr=1"], 1, progress=False, method="dp-sgd", time_steps=True)
    args = ["bench", "recipe", "--preset", "tiny", *(a for k in HEAD for a in ("--set", k)), "--set", "schedule.steps=4",
            "--method", "dp-sgd", "--vary", "lr=0.5", "--seeds", "1", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dp-sgd recipe" in out and "—" in out
