"""The teacher's logits over a training set, computed once and cached on disk (`teacher.cache_logits`).

An HPO study trains many students from one fine-tuned teacher on one dataset; every trial would
otherwise run the teacher's forward on every batch. The logits are computed once per fingerprint of

    (teacher weights, tokenizer vocabulary, training rows (text, text_pair, label), data.max_length)

and stored as `<pykd cache>/teacher/<fingerprint>.npy` (float32, one row per training example, in
the training set's order). The training set gains the columns `teacher_logits` and `gold` (1), the
same columns an augmented set carries (pykd.distill.augment), and the DistillStep reads the logits
from the batch; it skips the teacher's forward entirely when the objective reads nothing else of it
(no hidden, relation or MI term, no mixup). Intermediate losses need the teacher's hidden states or
attention projections per batch, which are too large to cache (L x B x T x d per batch), so with them
only the prediction loss uses the cache and the teacher still runs.

The cached logits come from padded batches of `BATCH` rows in eval mode (fp32); a live forward pads
each batch to its own longest row and may use bf16 autocast on CUDA, so the two agree to rounding.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import cache_dir, key_digest, model_digest, replace_atomically, rows_digest, tokenizer_digest

FORMAT = 1
BATCH = 64


def fingerprint(train_set, teacher, collate) -> str:
    """sha256 (32 hex digits) of (teacher weights, tokenizer vocabulary, training rows, max_length)."""
    key = {"format": FORMAT, "teacher": model_digest(teacher), "tokenizer": tokenizer_digest(collate.tokenizer),
           "rows": rows_digest(train_set, ("text", "text_pair", "label")), "max_length": collate.max_length}
    return key_digest(key)


def cache_root() -> Path:
    return cache_dir() / "teacher"


def teacher_logits_cached(train_set, teacher, collate, device=None, root: Path | None = None, log=print):
    """(logits (N, outputs) float32, path, hit): the teacher's logits over train_set, from the cache
    when present, otherwise computed in batches of BATCH and written atomically."""
    import torch

    from .augment import teacher_logits
    from .data import Collator

    path = (root or cache_root()) / f"{fingerprint(train_set, teacher, collate)}.npy"
    if path.is_file():
        logits = np.load(path)
        if len(logits) == len(train_set):
            if log:
                log(f"[teacher-cache] teacher logits of {len(train_set)} training examples from {path}")
            return logits, path, True
    inputs = Collator(collate.tokenizer, collate.max_length, "unlabeled")
    rows = [train_set[i] for i in range(len(train_set))]
    logits = teacher_logits(teacher, inputs, rows, BATCH, device or torch.device("cpu")).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda partial: np.save(partial, logits))  # concurrent workers write the same bytes
    if log:
        log(f"[teacher-cache] computed the teacher's logits over {len(train_set)} training examples into {path}")
    return logits, path, False


def with_teacher_logits(train_set, teacher, collate, device=None, root: Path | None = None, log=print):
    """train_set with `teacher_logits` (cached, see teacher_logits_cached) and `gold` (1) columns.
    A set that already has teacher logits (an augmented set) is returned as it is.

    Args:
        train_set: a datasets.Dataset with text (, text_pair) and label columns.
        teacher: the fine-tuned teacher (a sequence-classification model).
        collate: the run's Collator (its tokenizer and max_length are part of the fingerprint).
    Returns:
        the dataset with two more columns; teacher_logits has shape (outputs,) per row.
    """
    if "teacher_logits" in train_set.column_names:
        return train_set
    logits, _, _ = teacher_logits_cached(train_set, teacher, collate, device, root, log)
    return train_set.add_column("teacher_logits", logits.tolist()).add_column("gold", [1] * len(train_set))
