"""Task adapters: a model to perturb, a per-example loss, predictions, and how to save the result.

Three kinds, each returning one loss per example (never a batch mean, which would hide the
per-example sensitivity that clipping needs):

* ``sequence-classification`` — encoder + mean pooling + a cosine head initialised from the
  label words' own sentence embeddings, so training starts at zero-shot quality
  (:mod:`seedtune.common.modeling_seedtune`); loss = cross-entropy.
* ``prompt-classification`` — a causal LM reads ``template.format(text=...)`` and scores the
  first token of each label word at the last position; loss = cross-entropy over the label
  words (LM-BFF / MeZO style). The label-word rows are looked up through an ``nn.Embedding`` that
  shares the LM's output embedding, so only those rows are ever perturbed.
* ``causal-lm`` — mean next-token negative log-likelihood. With the plain template ``{text}`` it
  is language modelling of each text; with any other template it is instruction tuning: the
  prompt ``template.format(text=...)`` (in the tokenizer's chat format, if it has one) is followed
  by the label word as the answer, and only the answer's tokens (and the end-of-turn token) count.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from seedtune.common import modeling_seedtune
from seedtune.common.errors import ConfigError
from seedtune.common.lora import add_lora, find_adapted, is_lora, merged_copy, save_adapter
from seedtune.common.models import BaseModel, load_base, quiet_transformers
from torch import nn

TASKS = ("sequence-classification", "prompt-classification", "causal-lm")
TASK_FILE = "seedtune_task.json"
KEPT_EXAMPLES = 200_000  # encoded examples a task keeps (their token tensors only, none of the model)


@dataclass
class Task:
    """A model wrapped for one kind of task."""

    kind: str
    module: nn.Module
    tokenizer: object
    label_names: tuple[str, ...]
    max_length: int
    template: str = "{text}"
    extra: dict = field(default_factory=dict)
    # Each example's encoding, by its text, label, template, length and device: a silo samples
    # the same records step after step, and tokenizing them again cost about a tenth of a step
    # of the default (head-only) recipe.
    _examples: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def derived(self) -> tuple[str, ...]:
        """Parameters computed at construction rather than loaded (the label-word head)."""
        return ("classifier.weight", "classifier.bias") if self.kind == "sequence-classification" else ()

    @property
    def classifies(self) -> bool:
        return self.kind != "causal-lm"

    @property
    def instruction(self) -> bool:
        """A causal-LM task that answers prompts (instruction tuning) rather than modelling text."""
        return self.kind == "causal-lm" and self.template != "{text}"

    def encode(self, texts: list[str], labels: list[int] | None = None) -> dict:
        if self.instruction and labels is not None:
            return self._encode_answers(texts, labels)
        prompts = [self.template.format(text=text) for text in texts]
        batch = dict(
            self.tokenizer(
                prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )
        if "token_type_ids" in batch and self.kind != "sequence-classification":
            del batch["token_type_ids"]
        if labels is not None:
            batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
        return self._placed(batch)

    def _placed(self, batch: dict) -> dict:
        """The batch on the module's device (a silo may compute on a GPU: client/placement.py)."""
        device = next(self.module.parameters()).device
        return batch if device.type == "cpu" else {key: value.to(device) for key, value in batch.items()}

    def encode_example(self, text: str, label: int | None = None) -> dict:
        """One example alone: a batch of one at its own length, without padding. Its shapes, and
        so the bits of its logits and loss, depend on this example only, never on which others
        were sampled with it (a padded batch takes its width from its longest row).

        Encoded once and kept (up to ``KEPT_EXAMPLES`` of them); each call returns a dict of its
        own over the kept tensors, which no caller modifies in place."""
        key = (text, label, self.template, self.max_length, next(self.module.parameters()).device)
        batch = self._examples.get(key)
        if batch is None:
            batch = self.encode([text], None if label is None else [label])
            if len(self._examples) < KEPT_EXAMPLES:
                self._examples[key] = batch
        return dict(batch)

    def encode_fixed(self, texts: list[str], labels: list[int], micro_batch: int = 1) -> list[tuple[dict, list[int]]]:
        """The examples in batches whose shapes depend on no other example, each with the
        positions in ``texts`` of its first rows (the examples it holds, in order).

        ``micro_batch`` = 1: each example alone (:meth:`encode_example`). m > 1: micro-batches of
        exactly m rows, an example padded on the right to its own length bucket
        (:func:`length_bucket`), the last micro-batch of a bucket filled with a filler row (the
        first label word) whose results the caller discards. An example's tokens are the same
        either way. What private per-example quantities need: see :mod:`seedtune.common.estimator`."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch} must be at least 1")
        examples = [self.encode_example(text, label) for text, label in zip(texts, labels, strict=True)]
        if micro_batch == 1:
            return [(example, [i]) for i, example in enumerate(examples)]
        buckets: dict[int, list[int]] = {}
        for i, example in enumerate(examples):
            buckets.setdefault(length_bucket(example["input_ids"].shape[1], self.max_length), []).append(i)
        filler = self.encode_example(self.label_names[0], 0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batches = []
        for width, members in sorted(buckets.items()):
            for start in range(0, len(members), micro_batch):
                chosen = members[start : start + micro_batch]
                rows = [examples[i] for i in chosen] + [filler] * (micro_batch - len(chosen))
                batch = {key: torch.cat([_pad_right(row[key], width, pad if key == "input_ids" else 0) for row in rows])
                         for key in rows[0]}
                batches.append((batch, chosen))
        return batches

    def _encode_answers(self, texts: list[str], labels: list[int]) -> dict:
        """prompt + answer + end of turn, right-padded; ``loss_mask`` marks the answer tokens."""
        tokenizer = self.tokenizer
        end = tokenizer.eos_token or ""
        chat = getattr(tokenizer, "chat_template", None)
        rows = []
        for text, label in zip(texts, labels):
            prompt = self.template.format(text=text)
            if chat:
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
            answer = tokenizer((self.label_names[label] if chat else " " + self.label_names[label]) + end,
                               add_special_tokens=False)["input_ids"]
            room = max(self.max_length - len(answer), 1)
            question = tokenizer(prompt, add_special_tokens=not chat, truncation=True, max_length=room)["input_ids"]
            rows.append((question, answer))
        width = max(len(q) + len(a) for q, a in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        answer_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (question, answer) in enumerate(rows):
            ids[i, : len(question) + len(answer)] = torch.tensor(question + answer)
            attention[i, : len(question) + len(answer)] = 1
            answer_mask[i, len(question) : len(question) + len(answer)] = 1
        return self._placed({"input_ids": ids, "attention_mask": attention, "loss_mask": answer_mask,
                             "labels": torch.as_tensor(labels, dtype=torch.long)})

    def logits(self, module: nn.Module, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}
        if self.kind == "sequence-classification":
            return module(**inputs).logits
        if self.kind == "prompt-classification":
            return module(**inputs)
        return module(**inputs, use_cache=False).logits

    def per_example_loss(self, module: nn.Module, batch: dict) -> torch.Tensor:
        logits = _at_least_float32(self.logits(module, batch))
        if self.classifies:
            return F.cross_entropy(logits, batch["labels"], reduction="none")
        targets = batch["input_ids"][:, 1:]
        weights = batch.get("loss_mask", batch["attention_mask"])[:, 1:].to(logits.dtype)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        return (nll * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def predict(self, module: nn.Module, batch: dict) -> torch.Tensor:
        return self.logits(module, batch).argmax(dim=-1)

    # -- pruning support ----------------------------------------------------------------------
    def synflow_output(self, module: nn.Module, length: int = 8) -> torch.Tensor:
        """The output of ``module`` (this task's module or a copy of it) on an all-ones input
        embedding: SynFlow's data-free probe."""
        backbone = _backbone(self.kind, module)
        dtype = next(module.parameters()).dtype
        ones = torch.ones(1, length, backbone.config.hidden_size, dtype=dtype)
        mask = torch.ones(1, length, dtype=torch.long)
        hidden = backbone(inputs_embeds=ones, attention_mask=mask).last_hidden_state
        if self.kind == "sequence-classification":
            pooled = F.normalize(hidden.mean(dim=1), dim=-1)
            return module.classifier(pooled)
        if self.kind == "prompt-classification":
            return hidden[:, -1] @ module.label_rows(module.label_ids).T
        return module.get_output_embeddings()(hidden)

    # -- saving -------------------------------------------------------------------------------
    def hf_model(self) -> nn.Module:
        """The model as Hugging Face saves it: the LM of a prompt task, LoRA adapters merged."""
        model = self.module.lm if self.kind == "prompt-classification" else self.module
        if find_adapted(model) is None:
            return model
        if self.kind != "sequence-classification":
            return merged_copy(model)
        plain = modeling_seedtune.MeanPoolingClassifier(model.config, encoder=merged_copy(model.encoder))
        plain.classifier.load_state_dict(model.classifier.state_dict())
        return plain.eval()

    def save(self, directory: Path) -> None:
        """Write a Hugging Face directory that AutoModel*.from_pretrained loads (and, for a LoRA
        run, the adapters in peft's format under ``adapter/``)."""
        directory.mkdir(parents=True, exist_ok=True)
        # A fast tokenizer keeps the truncation and padding of its last call in its backend, and
        # tokenizer.json records them: a saved tokenizer would then depend on what was encoded
        # last (training's max_length, or none after a replay), and its copy would truncate
        # differently. transformers sets both on every call anyway, so save a copy without them.
        tokenizer = copy.deepcopy(self.tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
        with quiet_transformers():
            self.hf_model().save_pretrained(directory)
            if find_adapted(self.module) is not None:
                save_adapter(self.module, directory)
            tokenizer.save_pretrained(directory)
        if self.kind == "sequence-classification":
            shutil.copy(modeling_seedtune.__file__, directory / "modeling_seedtune.py")
        (directory / TASK_FILE).write_text(
            json.dumps(
                {
                    "kind": self.kind,
                    "label_names": list(self.label_names),
                    "max_length": self.max_length,
                    "template": self.template,
                    **self.extra,
                },
                indent=2,
            )
        )


def length_bucket(length: int, max_length: int) -> int:
    """The width an example of ``length`` tokens is padded to in a fixed-shape micro-batch: the
    next power of two from 8, at most ``max_length`` (a function of the example alone)."""
    return min(max(8, 1 << (length - 1).bit_length()), max(max_length, length))


def _pad_right(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """A row of token-aligned values (ids, masks) padded on the right to ``width`` (a longer one,
    only ever the filler, is cut to it); labels as they are."""
    if tensor.dim() < 2:
        return tensor
    return F.pad(tensor, (0, width - tensor.shape[1]), value=value)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Losses of a half-precision model in float32; of a float64 model in float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class LabelWordScorer(nn.Module):
    """A causal LM scoring label words: logit_c = <h_last, e_c>, e_c the output-embedding row of
    label word c's first token (and its bias, if the LM head has one)."""

    def __init__(self, lm: nn.Module, label_ids: list[int]):
        super().__init__()
        self.lm = lm
        self.label_rows = nn.Embedding(1, 1)
        self.label_rows.weight = lm.get_output_embeddings().weight  # the same Parameter: tied
        self.register_buffer("label_ids", torch.tensor(label_ids, dtype=torch.long), persistent=False)

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        decoder = self.lm.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1) - 1  # right padding: the last real token
        state = hidden[torch.arange(hidden.shape[0]), last]
        logits = state @ self.label_rows(self.label_ids).T
        bias = getattr(self.lm.get_output_embeddings(), "bias", None)
        return logits if bias is None else logits + bias[self.label_ids]


def _backbone(kind: str, module: nn.Module) -> nn.Module:
    if kind == "sequence-classification":
        return module.encoder
    if kind == "prompt-classification":
        return module.lm.get_decoder()
    return module.get_decoder()


def build_task(
    kind: str,
    base: BaseModel,
    label_names: tuple[str, ...],
    *,
    max_length: int,
    template: str | None = None,
    head_scale: float = 20.0,
) -> Task:
    """Wrap ``base`` for task ``kind``; the result is a pure function of its arguments."""
    if kind not in TASKS:
        raise ConfigError(f"model.task={kind!r} is not a task; use one of {', '.join(TASKS)}")
    for param in base.model.parameters():
        param.requires_grad_(False)  # forward passes only
    if kind == "sequence-classification":
        module = _encoder_classifier(base, label_names, max_length, head_scale)
        return Task(kind, module, base.tokenizer, label_names, max_length, "{text}", {"head_scale": head_scale})
    template = template or "Review: {text} Sentiment:"
    if "{text}" not in template:
        raise ConfigError(f"model.template={template!r} must contain {{text}}")
    if kind == "prompt-classification":
        ids = []
        for word in label_names:
            tokens = base.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if not tokens or tokens[0] == base.tokenizer.unk_token_id:
                raise ConfigError(f"label word {word!r} is not in the tokenizer's vocabulary")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise ConfigError(f"label words {label_names} must start with different tokens")
        module = LabelWordScorer(base.model, ids).eval()
        return Task(kind, module, base.tokenizer, label_names, max_length, template, {"label_token_ids": ids})
    return Task(kind, base.model.eval(), base.tokenizer, label_names, max_length, template)


def _encoder_classifier(base: BaseModel, label_names, max_length, head_scale) -> nn.Module:
    config = base.model.config
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    config.architectures = ["MeanPoolingClassifier"]
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_seedtune.MeanPoolingClassifier"}
    adapters = {name: value.clone() for name, value in base.model.state_dict().items() if is_lora(name)}
    module = modeling_seedtune.MeanPoolingClassifier(config, encoder=base.model).eval()
    if adapters:  # post_init re-draws modules transformers did not load (the adapters) from the global RNG
        base.model.load_state_dict(adapters, strict=False)
    with torch.no_grad():
        words = base.tokenizer(list(label_names), padding=True, return_tensors="pt")
        words.pop("token_type_ids", None)
        module.classifier.weight.copy_(module.embed(**words) * head_scale)
        module.classifier.bias.zero_()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def load_task(model_name: str, kind: str, label_names, *, max_length, template=None,
              head_scale: float = 20.0, init_seed: int = 0, lora: dict | None = None) -> Task:
    """Base model by name, with LoRA adapters if ``lora`` holds their rank, alpha and targets,
    wrapped for ``kind``."""
    if kind not in TASKS:
        raise ConfigError(f"model.task={kind!r} is not a task; use one of {', '.join(TASKS)}")
    base = load_base(model_name, causal=kind != "sequence-classification", init_seed=init_seed, task=kind)
    if lora is not None:
        base.model = add_lora(base.model, seed=init_seed, **lora)
    return build_task(kind, base, tuple(label_names), max_length=max_length, template=template,
                      head_scale=head_scale)


@torch.no_grad()
def evaluate(task: Task, dataset, *, batch_size: int = 64, max_examples: int = 0,
             micro_batch: int | None = None) -> dict[str, float]:
    """Mean loss, and accuracy for classification.

    By default in batches of ``batch_size`` padded to their longest example, so the last bits of
    an example's logits depend on its neighbours: fine for public data. With ``micro_batch``, in
    shapes that depend on no other example (:meth:`Task.encode_fixed`; 1: each example alone), so
    whether example j counts as correct does not depend on which other examples are evaluated:
    what counts of private examples released with noise need (their sensitivity of 1 assumes the
    other examples' results stay as they are)."""
    count = len(dataset) if not max_examples else min(max_examples, len(dataset))
    rows = dataset[:count]
    texts, labels = rows["text"], rows["label"]
    if micro_batch is None:
        batches = ((task.encode(texts[i : i + batch_size], labels[i : i + batch_size]), min(batch_size, count - i))
                   for i in range(0, count, batch_size))
    else:
        batches = ((batch, len(held)) for batch, held in task.encode_fixed(texts, labels, micro_batch))
    total_loss, correct = 0.0, 0
    for batch, real in batches:  # the first ``real`` rows are examples; the rest, filler
        if task.classifies:
            logits, truth = _at_least_float32(task.logits(task.module, batch))[:real], batch["labels"][:real]
            total_loss += float(F.cross_entropy(logits, truth, reduction="sum"))
            correct += int((logits.argmax(-1) == truth).sum())
        else:
            total_loss += float(task.per_example_loss(task.module, batch)[:real].sum())
    metrics = {"loss": total_loss / max(count, 1)}
    if task.classifies:
        metrics["accuracy"] = correct / max(count, 1)
    return metrics
