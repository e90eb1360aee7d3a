"""DP-SGD through Opacus, as the utility benchmark's first-order baseline.

It trains the same tensors as the zeroth-order run of the same config (its trainable subset,
whole tensors; every tensor of the classifier, embeddings included, when nothing is pruned), on the same training split, for the same number of steps, with Opacus's Poisson
sampler at the same rate q, per-example clipping at ``privacy.clip_bound`` and Gaussian noise
whose multiplier seedtune's own accountant calibrates for the same (epsilon, delta, q, steps).
When that subset is the cosine head alone, the frozen encoder embeds every training example once
and DP-SGD runs on the head over those embeddings: with the encoder frozen and in evaluation mode
this is the same computation as a full forward per step (the zeroth-order run keeps the same
outputs in its prefix store), at a cost that lets it run the default recipe's 1,200 steps.
The epsilon it reports is that accountant's for the release made; Opacus's own RDP accountant
is asked too, as a cross-check, and must agree.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import dp_accounting
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from seedtune.bench.readout import Readout, readout_for
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.errors import ConfigError
from seedtune.common.privacy.accounting import epsilon_of, release_event
from seedtune.common.tasks import evaluate


def _train(trainable: list, population: int, backward, *, lr: float, sigma: float, p, steps: int,
           generator: torch.Generator | None = None) -> None:
    """``steps`` DP-SGD steps of SGD at ``lr`` on ``trainable``, each over one Poisson batch of
    the ``population`` training examples at ``p.sample_rate``, per-example gradients clipped to
    ``p.clip_bound`` and noised at ``sigma``; ``backward(rows)`` takes the batch's loss backward,
    leaving Opacus its per-example gradients. ``generator`` draws the batches and the noise
    (torch's global one when None, Opacus's default)."""
    optimizer = DPOptimizer(torch.optim.SGD(trainable, lr=lr), noise_multiplier=sigma, max_grad_norm=p.clip_bound,
                            expected_batch_size=max(1, round(p.sample_rate * population)), generator=generator)
    sampler = UniformWithReplacementSampler(num_samples=population, sample_rate=p.sample_rate, generator=generator)
    done = 0
    with warnings.catch_warnings():
        # Opacus's hooks read each trained module's output gradients; torch warns when the module's
        # inputs (frozen features, token ids) need none, which is every run here and harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        while done < steps:
            for chosen in sampler:
                if done == steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                if len(chosen):
                    backward(list(chosen))
                else:  # an empty Poisson batch still releases noise
                    for param in trainable:
                        param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype)
                try:
                    optimizer.step()
                except RuntimeError as error:  # e.g. position embeddings, looked up once for the whole batch
                    raise ConfigError(
                        "DP-SGD through Opacus cannot form per-example gradients for every tensor of this trainable "
                        f"subset ({error}); compare on the head or a mask, e.g. --set prune.enabled=true "
                        "--set prune.ratio=0"
                    ) from None
                done += 1


def train_readout(config: Config, readout: Readout, start: torch.Tensor, features: torch.Tensor,
                  labels: torch.Tensor, *, lr: float, sigma: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A linear readout's coordinates (flat, float32, from ``start``) after ``config``'s DP-SGD
    run on the frozen network's ``features`` of the training examples and their ``labels``."""
    if readout.kind == "head":
        layer, backward = _through_the_head(start, features, labels)
    else:
        layer, backward = _through_the_norm(readout, start, features, labels)
    trainable = list(layer.parameters())
    _train(trainable, len(labels), backward, lr=lr, sigma=sigma, p=config.privacy, steps=config.schedule.steps,
           generator=generator)
    return torch.cat([param.detach().flatten() for param in trainable])


def _through_the_model(model, task, train):
    """Each step's backward through the whole model, from the batch's texts."""

    def backward(chosen: list[int]) -> None:
        rows = train[chosen]
        batch = task.encode(rows["text"], rows["label"])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        # One position lookup per example, not one per batch, so that Opacus can form
        # per-example gradients of the position embeddings too.
        length = inputs["input_ids"].shape[1]
        inputs["position_ids"] = torch.arange(length).expand(len(chosen), length)
        logits = model(**inputs).logits
        torch.nn.functional.cross_entropy(logits.float(), batch["labels"]).backward()

    return backward


def _through_the_head(start: torch.Tensor, features: torch.Tensor, labels: torch.Tensor):
    """Each step's backward through the head alone, from the frozen encoder's embeddings: a
    float32 copy of the head at ``start`` (its weight, then its bias, flat). The layer, and the backward."""
    width = features.shape[1]
    classes = start.numel() // (width + 1)
    layer = torch.nn.utils.skip_init(torch.nn.Linear, width, classes)  # no draw from the generator Opacus uses
    with torch.no_grad():
        layer.weight.copy_(start[: classes * width].view(classes, width))
        layer.bias.copy_(start[classes * width :])
    model = GradSampleModule(layer)

    def backward(chosen: list[int]) -> None:
        index = torch.as_tensor(chosen, dtype=torch.long)
        torch.nn.functional.cross_entropy(model(features[index]), labels[index]).backward()

    return layer, backward


def _through_the_norm(readout: Readout, weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor):
    """Each step's backward through a prompt classifier's final-norm weight w alone, from the
    last tokens' unit-RMS states x: logit_c = <w, x * e_c>, a linear layer from the norm's width
    to one output applied to each label word's x * e_c, so Opacus's own per-example rule for
    ``nn.Linear`` forms the gradients. The layer to train, and the backward."""
    layer = torch.nn.utils.skip_init(torch.nn.Linear, weight.numel(), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight.detach().float()[None])
    model = GradSampleModule(layer)

    def backward(chosen: list[int]) -> None:
        index = torch.as_tensor(chosen, dtype=torch.long)
        logits = model(features[index, None, :] * readout.label_rows[None]).squeeze(-1)
        if readout.offset is not None:
            logits = logits + readout.offset
        torch.nn.functional.cross_entropy(logits, labels[index]).backward()

    return layer, backward


def dp_sgd(config: Config, *, lr: float) -> tuple[dict, float]:
    """Train with DP-SGD; the test metrics and the epsilon spent."""
    # Opacus adds floating-point Gaussian noise: calibrate and account for that, not for the
    # discrete Gaussian the zeroth-order runs release.
    config = replace(config, privacy=replace(config.privacy, noise="gaussian"))
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    names = set(components.mask_for(config, task, data))
    readout = readout_for(task, names)
    if readout is None and config.model.task != "sequence-classification":
        raise ConfigError("the DP-SGD baseline trains a prompt classifier's final norm only (prune.enabled=true "
                          "prune.ratio=0 prune.always=['lm.model.norm.weight']), or any set of a sequence classifier")
    module = task.module
    module.eval()
    for name, param in module.named_parameters():
        param.requires_grad_(name in names)
    p = config.privacy
    sigma = components.noise_multiplier(config)
    steps = config.schedule.steps
    if readout is not None:  # the frozen network runs once per training example, not once per step
        features = readout.features(task, data.train, batch_size=config.eval.batch_size)
        readout.write(task, train_readout(config, readout, readout.start(task), *features, lr=lr, sigma=sigma))
    else:
        trainable = [param for name, param in module.named_parameters() if name in names]
        # Opacus records activations only in training mode; only the modules holding trainable
        # tensors train, so dropout stays off in the frozen encoder, as in the zeroth-order runs.
        for owner in module.modules():
            if any(param.requires_grad for param in owner.parameters(recurse=False)):
                owner.train()
        _train(trainable, len(data.train), _through_the_model(GradSampleModule(module), task, data.train), lr=lr,
               sigma=sigma, p=p, steps=steps)
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    metrics = evaluate(task, data.test, batch_size=config.eval.batch_size, max_examples=config.eval.test_examples)
    # Its step size is chosen on this, never on the test split.
    metrics["validation_accuracy"] = evaluate(task, data.validation, batch_size=config.eval.batch_size,
                                              max_examples=config.eval.test_examples)["accuracy"]
    events = [dp_accounting.SelfComposedDpEvent(release_event(p.sample_rate, sigma), steps)]
    epsilon = epsilon_of(events, p.delta, p.accountant)
    opacus = RDPAccountant()
    opacus.history = [(sigma, p.sample_rate, steps)]
    metrics["opacus_epsilon"] = opacus.get_epsilon(p.delta)
    return metrics, epsilon
