"""The non-private first-order ceiling of a trainable set: what exact gradients reach on it.

For a linear readout (:mod:`seedtune.bench.readout`: the default preset's cosine head on a frozen
encoder, or a prompt classifier's final norm) training is a convex problem: multinomial logistic
regression, linear in the trained coordinates, on features the frozen network computes once per
training example. Full-batch L-BFGS runs on those coordinates to the minimum of the mean training
loss, no regularisation. Its test accuracy is the best any method that trains those coordinates
on that loss can be expected to reach, so every private run on the same set reads as a fraction
of it. It is not tuned on anything: the minimum is the minimum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from seedtune.bench.readout import Readout, readout_of
from seedtune.common.config import Config
from seedtune.common.tasks import evaluate


def fit(readout: Readout, features: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor,
        iterations: int = 500) -> tuple[torch.Tensor, float]:
    """The coordinates (from ``theta``) at the minimum of the mean cross-entropy, and that loss."""
    theta = theta.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(readout.logits(features, theta), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        loss = float(F.cross_entropy(readout.logits(features, theta), labels))  # step() returns the first loss
    return theta.detach(), loss


def ceiling(config: Config) -> dict:
    """Test metrics of the readout trained to the minimum of the training loss, without privacy."""
    data, task, readout = readout_of(config)
    features, labels = readout.features(task, data.train, batch_size=config.eval.batch_size)
    theta, loss = fit(readout, features, labels, readout.start(task))
    readout.write(task, theta)
    metrics = evaluate(task, data.test, batch_size=config.eval.batch_size, max_examples=config.eval.test_examples)
    metrics["validation_accuracy"] = evaluate(task, data.validation, batch_size=config.eval.batch_size)["accuracy"]
    metrics["train_loss"] = loss
    return metrics
