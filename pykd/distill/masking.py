"""Masked-LM inputs for data.kind mlm: BERT's masking, seeded per example.

For each row, the candidates are its non-special tokens (not [CLS], [SEP] or padding). As BERT's
create_pretraining_data.py does, n = max(1, round(probability * candidates)) of them are chosen
uniformly without replacement (whole words with whole_word: a word's tokens are chosen together,
words are drawn in random order and taken while the chosen tokens stay within n; the first word
drawn is always taken, so every row with a candidate predicts something), and each chosen token is
independently replaced by the mask token with probability mask_fraction, by a random word (uniform
over the vocabulary's non-special ids) with probability random_fraction, and left as it is
otherwise (80 / 10 / 10 by default). The labels are the original ids at the chosen positions and
IGNORE_INDEX (-100, pykd.vocab_kd_loss's and cross-entropy's ignore_index) everywhere else.

Reproducible: a row's mask depends only on (seed, stream, key), drawn from
numpy.random.default_rng([seed, stream, key]). The Trainer keys training rows by their position
in the run's sample sequence (step * examples per step + offset), so the same row gets the same
mask whatever the batch size split, grad_accum or number of torchrun ranks, a resumed run masks as
the uninterrupted one, and a row seen again in a later epoch gets a fresh mask (dynamic masking,
as RoBERTa and DistilBERT). Evaluation rows are keyed by their index in the eval set, on their own
stream, so every evaluation scores the same masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
STREAMS = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class Masking:
    """The masking of data.masking (see the module docstring), with the tokenizer's ids."""
    probability: float
    mask_fraction: float
    random_fraction: float
    whole_word: bool
    mask_id: int
    replacement_ids: np.ndarray  # the vocabulary's non-special ids, for random replacements

    @classmethod
    def of(cls, config, tokenizer) -> Masking:
        """config: the data.masking section; tokenizer: the run's (needs a mask token)."""
        if tokenizer.mask_token_id is None:
            raise ValueError(f"data.kind mlm needs a tokenizer with a mask token; {type(tokenizer).__name__} of "
                             f"{getattr(tokenizer, 'name_or_path', '?')!r} has none")
        if config.whole_word and not getattr(tokenizer, "is_fast", False):
            raise ValueError("data.masking.whole_word needs a fast tokenizer (its word_ids give the word boundaries)")
        special = set(tokenizer.all_special_ids)
        replacement_ids = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
        return cls(config.probability, config.mask_fraction, config.random_fraction, config.whole_word,
                   int(tokenizer.mask_token_id), replacement_ids)

    def row(self, ids: np.ndarray, special: np.ndarray, words: list | None, rng) -> tuple[np.ndarray, np.ndarray]:
        """(masked ids, labels) of one row.

        Args:
            ids: (L,) token ids; special: (L,) bool, True for special and padding tokens.
            words: the row's word index per token (None for special tokens), with whole_word.
            rng: the row's numpy Generator.
        """
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        candidates = np.flatnonzero(~special)
        if not len(candidates):
            return ids.copy(), labels
        budget = max(1, round(self.probability * len(candidates)))
        chosen = self._chosen(candidates, words, budget, rng)
        labels[chosen] = ids[chosen]
        masked = ids.copy()
        draw = rng.random(len(chosen))
        to_mask = chosen[draw < self.mask_fraction]
        to_random = chosen[(draw >= self.mask_fraction) & (draw < self.mask_fraction + self.random_fraction)]
        masked[to_mask] = self.mask_id
        masked[to_random] = rng.choice(self.replacement_ids, size=len(to_random))
        return masked, labels

    def _chosen(self, candidates: np.ndarray, words: list | None, budget: int, rng) -> np.ndarray:
        if not self.whole_word:
            return np.sort(rng.choice(candidates, size=budget, replace=False))
        groups: dict = {}
        for position in candidates:
            groups.setdefault(words[position], []).append(int(position))
        units = list(groups.values())
        chosen: list[int] = []
        for index in rng.permutation(len(units)):
            group = units[index]
            if chosen and len(chosen) + len(group) > budget:
                continue
            chosen.extend(group)
            if len(chosen) >= budget:
                break
        return np.array(sorted(chosen), dtype=np.int64)


def row_generator(seed: int, stream: str, key: int):
    """The numpy Generator of one row's mask (SeedSequence takes non-negative entropy: the seed is taken
    modulo 2^64)."""
    return np.random.default_rng([seed % 2**64, STREAMS[stream], key])


def mask_batch(encoding, masking: Masking, seed: int, stream: str, keys: list[int]):
    """(input_ids, labels) as int64 tensors (B, L) for a tokenized batch.

    Args:
        encoding: the tokenizer's BatchEncoding, with special_tokens_mask (and word_ids for whole_word).
        masking: the Masking. seed: train.seed. stream: "train" or "eval". keys: one int per row.
    """
    import torch

    ids = encoding["input_ids"].numpy()
    special = encoding["special_tokens_mask"].numpy().astype(bool) | (encoding["attention_mask"].numpy() == 0)
    if len(keys) != len(ids):
        raise ValueError(f"masking needs one key per row: {len(keys)} keys for {len(ids)} rows")
    rows = [masking.row(ids[i], special[i], encoding.word_ids(i) if masking.whole_word else None,
                        row_generator(seed, stream, int(keys[i]))) for i in range(len(ids))]
    return (torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows])))
