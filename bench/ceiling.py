"""The non-private first-order ceiling of a trainable set: what exact gradients reach on it.

For the default preset's trainable set, the cosine head on a frozen encoder, training is a convex
problem (multinomial logistic regression on fixed, normalised sentence embeddings): the encoder
embeds every training example once, and full-batch L-BFGS runs on the head's coordinates to the
minimum of the mean training loss, no regularisation. Its test accuracy is the best any method
that trains those coordinates on that loss can be expected to reach, so every private run on the
same set reads as a fraction of it. It is not tuned on anything: the minimum is the minimum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.errors import ConfigError
from seedtune.common.tasks import Task, evaluate

HEAD = {"classifier.weight", "classifier.bias"}


def head_task(config: Config):
    """The data and the task model, checked to train the cosine head alone."""
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    sample = task.encode(data.train[:4]["text"], data.train[:4]["label"])
    names = set(components.choose_mask(config, task, sample))
    if config.model.task != "sequence-classification" or names != HEAD:
        raise ConfigError(f"this is computed for the cosine head only (trainable: {', '.join(sorted(names))}); set "
                          "prune.enabled=true prune.ratio=0 prune.always=['classifier.*'] lora.enabled=false and "
                          "model.task=sequence-classification")
    return data, task


@torch.no_grad()
def embed(task: Task, examples, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder's normalised sentence embeddings of ``examples``, and their labels."""
    module = task.module.eval()
    parts, labels = [], []
    for start in range(0, len(examples), batch_size):
        rows = examples[start : start + batch_size]
        batch = task.encode(rows["text"], rows["label"])
        parts.append(module.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")))
        labels.append(batch["labels"])
    return torch.cat(parts).float(), torch.cat(labels)


def fit_head(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             iterations: int = 500) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The head (from ``weight``, ``bias``) at the minimum of the mean cross-entropy, and that loss."""
    weight, bias = weight.detach().float().clone().requires_grad_(True), bias.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        loss = float(F.cross_entropy(features @ weight.T + bias, labels))  # step() returns the first loss
    return weight.detach(), bias.detach(), loss


def head_ceiling(config: Config) -> dict:
    """Test metrics of the head trained to the minimum of the training loss, without privacy."""
    data, task = head_task(config)
    features, labels = embed(task, data.train)
    head = task.module.classifier
    weight, bias, loss = fit_head(features, labels, head.weight, head.bias)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
        head.bias.copy_(bias.to(head.bias.dtype))
    metrics = evaluate(task, data.test, batch_size=config.eval.batch_size, max_examples=config.eval.test_examples)
    metrics["validation_accuracy"] = evaluate(task, data.validation, batch_size=config.eval.batch_size)["accuracy"]
    metrics["train_loss"] = loss
    return metrics
