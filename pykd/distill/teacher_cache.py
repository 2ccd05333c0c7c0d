"""The teacher's logits over a training set, computed once and cached on disk (`teacher.cache_logits`).

An HPO study trains many students from one fine-tuned teacher on one dataset; every trial would
otherwise run the teacher's forward on every batch. The logits are computed once per fingerprint of

    (teacher weights, tokenizer vocabulary, training rows (text, text_pair, label), data.max_length)

and stored as `<pykd cache>/teacher/<fingerprint>.npz`: the logits (float32, one row per training
example, in the training set's order) and their sha256. An entry is checked when it is read (its shape
against the training set and the teacher's outputs, the checksum, every value finite): a bad one,
truncated, altered or filled with NaN, is a LoadError naming the file, never used as it is; the
teacher's logits are checked finite before they are written. The training set gains the columns
`teacher_logits` and `gold` (1), the same columns an augmented set carries (pykd.distill.augment), and
the DistillStep reads the logits from the batch; it skips the teacher's forward entirely when the
objective reads nothing else of it (no hidden, relation or MI term, no mixup). Intermediate losses need
the teacher's hidden states or attention projections per batch, which are too large to cache (L x B x T
x d per batch), so with them only the prediction loss uses the cache and the teacher still runs.

The cached logits come from padded batches of `BATCH` rows in eval mode (fp32); a live forward pads
each batch to its own longest row and may use bf16 autocast on CUDA, so the two agree to rounding.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..loading import bad_file, load_arrays
from .cache import cache_dir, key_digest, model_digest, replace_atomically, rows_digest, tokenizer_digest

FORMAT = 2  # 2: .npz of the logits and their sha256 (1: a bare .npy, trusted as it was)
BATCH = 64
WHAT = "teacher-logit cache"
WAY_OUT = "delete it: the teacher's logits are computed again on the next run"


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

    path = (root or cache_root()) / f"{fingerprint(train_set, teacher, collate)}.npz"
    shape = (len(train_set), teacher.config.num_labels)
    if path.is_file():
        logits = read_cached_logits(path, shape)
        if log:
            log(f"[teacher-cache] teacher logits of {len(train_set)} training examples from {path}")
        return logits, path, True
    inputs = Collator(collate.tokenizer, collate.max_length, "unlabeled")
    rows = [train_set[i] for i in range(len(train_set))]
    logits = teacher_logits(teacher, inputs, rows, BATCH, device or torch.device("cpu")).astype(np.float32)
    if not np.isfinite(logits).all():
        row = int(np.flatnonzero(~np.isfinite(logits).all(axis=1))[0])
        raise ValueError(f"the teacher's logits are not finite (training example {row}: {logits[row].tolist()}): "
                         "check teacher.finetuned, or set teacher.cache_logits false")
    path.parent.mkdir(parents=True, exist_ok=True)
    # concurrent workers write the same bytes
    replace_atomically(path, lambda partial: np.savez(partial, logits=logits, sha256=np.array(_digest(logits))))
    if log:
        log(f"[teacher-cache] computed the teacher's logits over {len(train_set)} training examples into {path}")
    return logits, path, False


def _digest(logits: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest()


def read_cached_logits(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The logits of the cache entry `path`, checked: shape `shape` (training examples, teacher outputs),
    float32, its checksum, every value finite. A bad entry is a LoadError naming the file."""
    arrays = load_arrays(path, WHAT, WAY_OUT, ("logits", "sha256"))
    logits, stored = arrays["logits"], str(arrays["sha256"])
    if logits.dtype != np.float32 or logits.shape != shape:
        raise bad_file(WHAT, path, f"holds {logits.dtype} logits of shape {logits.shape}, the run needs float32 of "
                       f"shape {shape} (training examples, teacher outputs)", WAY_OUT)
    if _digest(logits) != stored:
        raise bad_file(WHAT, path, "does not match the checksum written with it (altered or damaged since)", WAY_OUT)
    if not np.isfinite(logits).all():
        raise bad_file(WHAT, path, f"holds {int((~np.isfinite(logits)).sum())} non-finite logits", WAY_OUT)
    return logits


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
