"""Linear readouts: one feature vector per example stands in for the frozen network, exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seedtune.bench.dpsgd import _through_the_norm
from seedtune.bench.readout import readout_of
from seedtune.common.config import load_config
from seedtune.common.errors import ConfigError

HEAD = ["prune.enabled=true", "prune.ratio=0.0", 'prune.always=["classifier.*"]']
NORM = ["model.task=prompt-classification", "prune.enabled=true", "prune.ratio=0.0",
        'prune.always=["lm.model.norm.weight"]']


@pytest.fixture(scope="module", params=[HEAD, NORM], ids=["head", "final-norm"])
def tiny(request):
    return readout_of(load_config("tiny", None, request.param))


def test_features_and_coordinates_give_the_models_logits(tiny):
    data, task, readout = tiny
    rows = data.train.select(range(12))
    x, labels = readout.features(task, rows, batch_size=5)  # other batches, other padding
    batch = task.encode(rows["text"], rows["label"])
    theta = readout.start(task) + 0.3 * torch.randn(readout.start(task).shape, generator=torch.Generator().manual_seed(0))
    readout.write(task, theta)  # anywhere, not only at the start
    with torch.no_grad():
        real = task.logits(task.module, batch).float()
    torch.testing.assert_close(readout.logits(x, theta), real, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, batch["labels"]) and torch.equal(readout.start(task), theta)


def test_the_linear_part_is_each_logits_directional_derivative(tiny):
    data, task, readout = tiny
    x, _ = readout.features(task, data.train.select(range(6)))
    theta = readout.start(task)
    directions = torch.randn((3, theta.numel()), generator=torch.Generator().manual_seed(1))
    step = 1e-2
    for k, z in enumerate(directions):
        difference = (readout.logits(x, theta + step * z) - readout.logits(x, theta - step * z)) / (2 * step)
        torch.testing.assert_close(readout.linear(x, directions)[:, k], difference, rtol=1e-3, atol=1e-4)


def test_dp_sgd_per_example_gradients_of_a_final_norm_are_the_models():
    data, task, readout = readout_of(load_config("tiny", None, NORM))
    rows = data.train.select(range(4))
    x, labels = readout.features(task, rows)
    layer, backward = _through_the_norm(readout, readout.start(task), x, labels)
    backward(list(range(4)))
    weight = task.module.lm.get_decoder().norm.weight
    weight.requires_grad_(True)
    try:
        for i in range(4):
            batch = task.encode(rows["text"][i : i + 1], rows["label"][i : i + 1])
            loss = F.cross_entropy(task.logits(task.module, batch).float(), batch["labels"])
            (expected,) = torch.autograd.grad(loss, [weight])
            # Opacus undoes the batch mean: each row is that example's own loss's gradient, what it clips
            torch.testing.assert_close(layer.weight.grad_sample[i, 0], expected, rtol=1e-4, atol=1e-6)
    finally:
        weight.requires_grad_(False)


def test_a_set_that_is_not_a_readout_is_a_one_line_error():
    with pytest.raises(ConfigError, match="linear readout only \\(trainable: .*lm.model.norm.weight"):
        readout_of(load_config("tiny", None, [*NORM[:3], 'prune.always=["lm.model.norm.weight", "lm.model.layers.1.mlp.*"]']))
