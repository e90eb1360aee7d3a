"""Linear readouts: trainable sets whose logits are linear in the trained coordinates once the
frozen network in front of them has run.

Two of the sets seedtune trains are such readouts:

* ``head`` — the cosine head of a sequence classifier (``classifier.weight``, ``classifier.bias``):
  logits = W x + b, x the frozen encoder's normalised sentence embedding (the default preset's);
* ``final-norm`` — the final RMSNorm's weight w of a prompt classifier (a causal LM scoring label
  words): logit_c = sum_d w_d x_d e_cd, x the last token's state scaled to unit RMS (all the norm
  does but weigh), e_c label word c's output-embedding row. Every decoder layer is in front of it.

On a readout a run can be studied from one feature vector x per example: the frozen network runs
once per example instead of twice per probe and step. The benches use this for the non-private
ceiling (:mod:`seedtune.bench.ceiling`), the recipe replay (:mod:`seedtune.bench.recipe`) and
DP-SGD (:mod:`seedtune.bench.dpsgd`); a test checks that the features and :meth:`Readout.logits`
give the real model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.errors import ConfigError
from seedtune.common.tasks import Task

HEAD = frozenset({"classifier.weight", "classifier.bias"})


@dataclass(frozen=True)
class Readout:
    """A linear readout of ``task``: coordinates theta (flat), features x per example."""

    kind: str  # "head" or "final-norm"
    names: frozenset[str]  # the trained tensors
    label_rows: torch.Tensor | None = None  # final-norm: the label words' output embeddings, classes x width
    offset: torch.Tensor | None = None  # final-norm: the LM head's bias on the label words, if it has one

    def start(self, task: Task) -> torch.Tensor:
        """The coordinates the model holds now, flat, in float32."""
        return torch.cat([param.detach().float().flatten() for param in self._tensors(task)])

    def write(self, task: Task, theta: torch.Tensor) -> None:
        """Put ``theta`` into the model."""
        with torch.no_grad():
            at = 0
            for param in self._tensors(task):
                param.copy_(theta[at : at + param.numel()].view_as(param).to(param.dtype))
                at += param.numel()

    def linear(self, x: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
        """The part of the logits linear in theta, for every example and every row of ``thetas``
        (K x d): n x K x classes. Linear, so it also gives each logit's directional derivative."""
        if self.kind == "head":
            width = x.shape[1]
            classes = thetas.shape[1] // (width + 1)
            weights = thetas[:, : classes * width].view(-1, classes, width)
            return torch.einsum("nd,kcd->nkc", x, weights) + thetas[:, classes * width :]
        return torch.einsum("nd,kd,cd->nkc", x, thetas, self.label_rows)

    def logits(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The logits of the examples with features ``x`` at coordinates ``theta``: n x classes."""
        logits = self.linear(x, theta[None])[:, 0]
        return logits if self.offset is None else logits + self.offset

    @torch.no_grad()
    def features(self, task: Task, examples, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's features (n x width, float32) and its label, from the frozen network."""
        module = task.module.eval()
        parts, labels = [], []
        for start in range(0, len(examples), batch_size):
            rows = examples[start : start + batch_size]
            batch = task.encode(rows["text"], rows["label"])
            if self.kind == "head":
                parts.append(module.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")))
            else:
                parts.append(_unit_rms_last_state(module, batch))
            labels.append(batch["labels"])
        return torch.cat(parts).float(), torch.cat(labels)

    def _tensors(self, task: Task) -> list[torch.nn.Parameter]:
        if self.kind == "head":
            return [task.module.classifier.weight, task.module.classifier.bias]
        return [task.module.lm.get_decoder().norm.weight]


def _unit_rms_last_state(module, batch: dict) -> torch.Tensor:
    """The last real token's input to the final norm, scaled to unit RMS as the norm scales it."""
    norm = module.lm.get_decoder().norm
    seen = []
    handle = norm.register_forward_hook(lambda _, args, __: seen.append(args[0]))
    try:
        module(batch["input_ids"], batch["attention_mask"])
    finally:
        handle.remove()
    hidden = seen[0].float()
    last = hidden[torch.arange(hidden.shape[0]), batch["attention_mask"].sum(dim=1) - 1]
    return last * torch.rsqrt(last.pow(2).mean(dim=-1, keepdim=True) + norm.variance_epsilon)


def readout_for(task: Task, names) -> Readout | None:
    """The :class:`Readout` formed by the tensors ``names`` of ``task``, or None if they form none."""
    names = frozenset(names)
    if task.kind == "sequence-classification" and names == HEAD:
        return Readout("head", names)
    if task.kind == "prompt-classification":
        norm = task.module.lm.get_decoder().norm
        if names == _names_of(task, getattr(norm, "weight", None)) and hasattr(norm, "variance_epsilon"):  # RMSNorm
            with torch.no_grad():
                rows = task.module.label_rows(task.module.label_ids).float().clone()
                bias = getattr(task.module.lm.get_output_embeddings(), "bias", None)
                offset = None if bias is None else bias[task.module.label_ids].float().clone()
            return Readout("final-norm", names, rows, offset)
    return None


def _names_of(task: Task, param) -> frozenset[str]:
    return frozenset(name for name, candidate in task.module.named_parameters() if candidate is param)


def readout_of(config: Config):
    """The data, the task model and its :class:`Readout`, for a config whose trainable set is one;
    otherwise a one-line error saying how to choose one."""
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    names = list(components.mask_for(config, task, data))
    readout = readout_for(task, names)
    if readout is None:
        raise ConfigError(f"this is computed for a linear readout only (trainable: {', '.join(sorted(names))}); "
                          "train the cosine head "
                          "(model.task=sequence-classification prune.enabled=true prune.ratio=0 "
                          "prune.always=['classifier.*'] lora.enabled=false) or a prompt classifier's final norm "
                          "(model.task=prompt-classification prune.enabled=true prune.ratio=0 "
                          "prune.always=['lm.model.norm.weight'] lora.enabled=false)")
    return data, task, readout
