"""The non-private first-order ceiling of a trainable set: what exact gradients reach on it.

For a linear readout (:mod:`seedtune.bench.readout`: the default preset's cosine head on a frozen
encoder, or a prompt classifier's final norm) training is a convex problem: multinomial logistic
regression, linear in the trained coordinates, on features the frozen network computes once per
training example. Full-batch L-BFGS runs on those coordinates to the minimum of the mean training
loss, no regularisation. Its test accuracy is the best any method that trains those coordinates
on that loss can be expected to reach, so every private run on the same set reads as a fraction
of it. It is not tuned on anything: the minimum is the minimum.

Any other set (a pruning mask, LoRA's adapters, every tensor) has no such minimum to reach, so its
ceiling is fine-tuning as one would without privacy: AdamW on shuffled mini-batches of 32 for 3
epochs, at the usual step sizes (5e-5 for a model's own weights, as BERT was fine-tuned; 1e-3 for
LoRA's adapters), gradients outside a mask zeroed, dropout off as in every other run here, and the
epoch whose model has the best validation accuracy kept. Only the epoch is chosen, and on
validation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from seedtune.bench.readout import Readout, readout_for
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.tasks import Task, evaluate
from seedtune.common.trainable import TrainableSet

EPOCHS, BATCH = 3, 32


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


def ceiling(config: Config, progress: bool = False) -> dict:
    """Test metrics of the config's trainable set trained without privacy: a readout to the
    minimum of the training loss, any other set by :func:`fine_tune`."""
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    mask = components.mask_for(config, task, data)
    readout = readout_for(task, mask)
    if readout is None:
        extra = fine_tune(task, TrainableSet(task.module, mask), data, config.lora.enabled, progress)
    else:
        features, labels = readout.features(task, data.train, batch_size=config.eval.batch_size)
        theta, loss = fit(readout, features, labels, readout.start(task))
        readout.write(task, theta)
        extra = {"train_loss": loss}
    metrics = evaluate(task, data.test, batch_size=config.eval.batch_size, max_examples=config.eval.test_examples)
    metrics["validation_accuracy"] = evaluate(task, data.validation, batch_size=config.eval.batch_size)["accuracy"]
    return {**metrics, **extra}


def fine_tune(task: Task, trainable: TrainableSet, data, lora: bool, progress: bool = False) -> dict:
    """Train ``trainable`` without privacy (the module docstring's recipe), leaving the model at
    the epoch with the best validation accuracy: that epoch, its step size, and every epoch's
    validation accuracy."""
    from tqdm.auto import tqdm

    module = task.module.eval()  # dropout off, as in every other run here
    params = [entry.param for entry in trainable]
    masks = [None if entry.index is None else torch.zeros(entry.param.numel(), dtype=torch.bool).index_fill_(
        0, entry.index, True).view_as(entry.param) for entry in trainable]
    lr = 1e-3 if lora else 5e-5
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # outside a mask: no gradient, no move
    generator = torch.Generator().manual_seed(0)
    validation, best = [], None
    for param in params:
        param.requires_grad_(True)
    try:
        with tqdm(total=EPOCHS * -(-len(data.train) // BATCH), disable=not progress, unit="step",
                  desc="first-order ceiling") as bar:
            for _ in range(EPOCHS):
                order = torch.randperm(len(data.train), generator=generator).tolist()
                for start in range(0, len(order), BATCH):
                    rows = data.train[order[start : start + BATCH]]
                    batch = task.encode(rows["text"], rows["label"])
                    optimizer.zero_grad(set_to_none=True)
                    task.per_example_loss(module, batch).mean().backward()
                    for param, mask in zip(params, masks):
                        if mask is not None:
                            param.grad.mul_(mask)
                    optimizer.step()
                    bar.update(1)
                with torch.no_grad():
                    validation.append(evaluate(task, data.validation)["accuracy"])
                if best is None or validation[-1] > validation[best[0]]:
                    best = (len(validation) - 1, [param.detach().clone() for param in params])
    finally:
        for param in params:
            param.requires_grad_(False)
    with torch.no_grad():
        for param, kept in zip(params, best[1]):
            param.copy_(kept)
    return {"best_epoch": best[0] + 1, "lr": lr, "epoch_validation_accuracy": validation}
