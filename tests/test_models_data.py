"""Every model, task, trainable subset and data source trains: a few steps on a tiny slice of the
real data lower the loss on that slice. Also hub names, LoRA's save and load through peft, and
the instruction-tuning encoding.

The runs are non-private (public sampling, no noise) and take the whole slice each step, so
they are deterministic; with a small step size a K-probe zeroth-order step lowers the loss to
first order, so a rise means the model, task or subset is wired wrongly.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from seedtune.jobs.train import NonPrivateRunWarning
from seedtune.client.silo import Silo
from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.data import load_text_data
from seedtune.common.errors import ConfigError
from seedtune.common.estimator import ZerothOrderEstimator
from seedtune.common.models import load_base, resolve
from seedtune.common.privacy.randomness import PublicRandomness
from seedtune.server.runs import open_run

SLICE = 12


def _settings(model, task, data, *extra):
    return load_config(None, overrides=[
        f"model.name={json.dumps(model)}", f"model.task={task}", f"data.name={json.dumps(data)}",
        f"data.max_train_examples={SLICE}", "model.max_length=48", "privacy.enabled=false",
        "privacy.sample_rate=1.0", "zo.probes=4", "schedule.kind=constant", "schedule.steps=3", "schedule.stages=1",
        "eval.every=0", *extra,
    ])


def _train(config, run_dir):
    """Three steps through the real run parts; the loss on the slice before and after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonPrivateRunWarning)
        run = open_run(config, run_dir, resume=False)
    task, parts, coordinator = run.task, run.parts, run.coordinator
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, parts.trainable, parts.directions)
    silo = Silo(task, estimator, run.data.train, PublicRandomness(config.seed), None)
    batch = task.encode(run.data.train["text"], run.data.train["label"])

    def loss():
        with torch.no_grad():
            return float(task.per_example_loss(task.module, batch).mean())

    before = loss()
    while not coordinator.done:
        request = coordinator.request()
        coordinator.apply(request, [silo.answer(request)])
    run.close()
    return before, loss(), parts


HEAD = ["prune.ratio=0.0", "prune.always=classifier.*", "schedule.lr=0.5"]
SOURCES = ["rotten-tomatoes", "bbc-news", "crowdflower-tweets"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.models
def test_minilm_classifies_every_packaged_source(source, tmp_path):
    before, after, _ = _train(_settings("minilm", "sequence-classification", source, *HEAD), tmp_path / "run")
    assert after < before


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_minilm_classifies_a_users_file(suffix, tmp_path):
    rows = [("a gripping, beautiful film", "good"), ("dull and far too long", "bad")] * 10
    path = tmp_path / f"reviews.{suffix}"
    if suffix == "csv":
        path.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
    else:
        path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    before, after, _ = _train(_settings("minilm", "sequence-classification", str(path), *HEAD), tmp_path / "run")
    assert after < before


@pytest.mark.models
def test_minilm_trains_a_pruning_mask_of_the_encoder(tmp_path):
    config = _settings("minilm", "sequence-classification", "rotten-tomatoes", "prune.ratio=0.001",
                       "prune.always=", "schedule.lr=2e-3")
    before, after, parts = _train(config, tmp_path / "run")
    assert after < before
    assert 0 < parts.trainable.dimension <= 0.0011 * sum(p.numel() for p in parts.task.module.parameters())


SMOL_HEAD = ["prune.ratio=0.0", "prune.always=lm.model.norm.*", "schedule.lr=0.05"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.models
def test_smollm2_classifies_every_packaged_source_by_prompt(source, tmp_path):
    before, after, _ = _train(_settings("smollm2", "prompt-classification", source, *SMOL_HEAD), tmp_path / "run")
    assert after < before


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.models
def test_smollm2_instruction_tuning_lowers_the_answer_loss(source, tmp_path):
    config = _settings("smollm2", "causal-lm", source, "prune.ratio=0.0",
                       "prune.always=model.norm.*", "schedule.lr=0.05")
    before, after, parts = _train(config, tmp_path / "run")
    assert after < before
    assert parts.task.instruction


@pytest.mark.parametrize("model,task,lr", [("minilm", "sequence-classification", 0.05),
                                           ("smollm2", "prompt-classification", 0.002)])
@pytest.mark.models
def test_lora_adapters_train_and_save_and_load_with_peft(model, task, lr, tmp_path):
    config = _settings(model, task, "rotten-tomatoes", "lora.enabled=true", "lora.rank=4", f"schedule.lr={lr}",
                       "prune.always=classifier.*", "data.max_train_examples=8")
    before, after, parts = _train(config, tmp_path / "run")
    assert after < before
    assert parts.trainable.entries and all(".lora_" in e.name or e.name.startswith("classifier.")
                                           for e in parts.trainable)
    trained = parts.task
    trained.save(tmp_path / "final")

    # peft's own loader puts the trained adapters back on a fresh base model ...
    fresh = load_base(model, causal=task != "sequence-classification").model
    adapted = PeftModel.from_pretrained(fresh, tmp_path / "final" / "adapter")
    ours = {n.replace(".default", ""): p for n, p in trained.module.named_parameters() if ".lora_" in n}
    theirs = {n.replace(".default", ""): p for n, p in adapted.named_parameters() if ".lora_" in n}
    assert len(theirs) == len(ours) > 0
    assert any(bool(p.abs().sum()) for n, p in theirs.items() if ".lora_B" in n)  # trained, not the zero init
    for name, value in ours.items():
        suffix = name.split("base_model.model.", 1)[1]
        match = next(p for n, p in theirs.items() if n.endswith(suffix))
        assert torch.equal(match, value)

    # ... and the merged model beside them loads with plain transformers and predicts the same.
    batch = trained.encode(["a gripping, beautiful film", "dull and far too long"], [1, 0])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = trained.logits(trained.module, batch)
        if task == "sequence-classification":
            merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final", trust_remote_code=True)
            got = merged(**inputs).logits
        else:
            lm = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
            last = inputs["attention_mask"].sum(1) - 1
            full = lm(**inputs).logits[torch.arange(2), last]
            got = full[:, trained.extra["label_token_ids"]]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_hub_names_are_served_by_the_packaged_copies_offline():
    # conftest sets HF_HUB_OFFLINE: the hub is out of reach, as on this machine.
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == resolve("smollm2")
    assert resolve("sentence-transformers/all-MiniLM-L6-v2") == resolve("minilm")
    kwargs = dict(split_seed=0, validation_fraction=0.1, test_fraction=0.1)
    hub, packaged = load_text_data("SetFit/bbc-news", **kwargs), load_text_data("bbc-news", **kwargs)
    assert hub.label_names == packaged.label_names and hub.test["text"] == packaged.test["text"]


def test_unknown_names_and_unsupported_tasks_are_one_line_errors():
    with pytest.raises(ConfigError, match="model.name='nobody/nothing'.*local model directory"):
        resolve("nobody/nothing")
    with pytest.raises(ConfigError, match="model.name='minilm' does not support model.task='causal-lm'.*smollm2"):
        resolve("minilm", "causal-lm")
    with pytest.raises(ConfigError, match="data.name='nobody/nothing'.*packaged copy"):
        load_text_data("nobody/nothing", split_seed=0, validation_fraction=0.1, test_fraction=0.1)


@pytest.mark.models
def test_the_gguf_is_converted_once_and_loads_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEDTUNE_CACHE", str(tmp_path))
    first = resolve("smollm2")
    assert first.is_relative_to(tmp_path) and (first / "model.safetensors").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve("smollm2") == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".converting")]  # no staging left
    converted = load_base("smollm2", causal=True).model.state_dict()
    monkeypatch.delenv("SEEDTUNE_CACHE")
    shared = load_base("smollm2", causal=True).model.state_dict()
    assert converted.keys() == shared.keys() and all(torch.equal(converted[k], shared[k]) for k in shared)


@pytest.mark.models
def test_instruction_encoding_counts_only_the_answer(tmp_path):
    config = _settings("smollm2", "causal-lm", "rotten-tomatoes")
    task = components.load_model(config, ("negative", "positive"))
    batch = task.encode(["fine", "a much longer review of a film that went on"], [1, 0])
    tokenizer = task.tokenizer
    for row in range(2):
        answer = batch["input_ids"][row][batch["loss_mask"][row].bool()]
        assert tokenizer.decode(answer) == ["positive", "negative"][row] + tokenizer.eos_token
        text = tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
        assert "<|im_start|>user" in text and "Review:" in text  # the chat format of an instruct model
