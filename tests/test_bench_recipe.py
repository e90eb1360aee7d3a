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
