"""Distiller's data-augmentation stage: augmented copies of the training set labelled by the teacher.

Operations (`augment.policy`; each augmented copy of an example applies one, drawn uniformly):

    swap      swap two random words, n times (EDA's random swap)
    delete    drop each word with probability p, keeping at least one (EDA's random deletion)
    synonym   replace n random words that have WordNet synonyms by one of them (EDA's synonym
              replacement; stop words are left alone)
    mlm       mask n random words and replace each by a whole word sampled from the top-k of a
              masked language model's prediction (contextual substitution, as in Distiller/TinyBERT)

with n = max(1, round(p * words)) and p = augment.word_fraction. Words are whitespace-separated;
punctuation attached to a word stays in place and a capitalised word gets a capitalised
replacement. Pair tasks augment text and text_pair with the same operation.

Synonym source: WordNet 3.0 (Debian's wordnet-base, fetched into the cache for the
wordnet_glosses corpus): the synonyms of a word are the other lemmas of every synset holding it.

Masked LM: any `AutoModelForMaskedLM` by path or hub name (`augment.mlm_model`). No package ships
a pretrained masked-LM head, and there is no offline default: the packaged all-MiniLM-L6-v2 has
no MLM head, and scoring its last hidden state against its tied word embeddings
(LayerNorm(h) E^T) was tried and rejected (for "the cat sat on the [MASK] ." its top words were
"##ppet", "bert", "python", "barrie"): the sentence-embedding training left no word prediction in
it. So `mlm` requires augment.mlm_model; offline that is a local directory.

Every draw comes from a generator seeded by (augment.seed, example index, copy, field), so the
set is the same whatever the batch size (the masked LM's scores aside, which batching may
change in the last bits). The teacher labels every row of the extended training set (its logits
are the soft labels of the prediction loss; augmented rows take the teacher's prediction as
"label" and are excluded from the hard-label loss), and the set is cached on disk by a fingerprint
of everything it depends on: the training rows, the augment section (seed included), the task kind
(which makes an augmented row's label the argmax or the value), the teacher's weights, the tokenizer
and max_length, and, for mlm, the masked LM's weights and tokenizer.

Mixup (`augment.mixup`) lives in the distillation step instead: see WordEmbeddingMixup.
"""
from __future__ import annotations

import functools
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..loading import reading
from .cache import cache_dir, key_digest, model_digest, publish_directory, rows_digest, tokenizer_digest

OPERATIONS = ("swap", "delete", "synonym", "mlm")
_AFFIXES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)
FIELDS = ("text", "text_pair")
FORMAT = 1  # bump when what is cached changes


# ---- words ----

def _split_affixes(word: str) -> tuple[str, str, str]:
    prefix, core, suffix = _AFFIXES.match(word).groups()
    return prefix, core, suffix


def _cased_like(original: str, replacement: str) -> str:
    return replacement[:1].upper() + replacement[1:] if original[:1].isupper() else replacement


def _count(words: list[str], fraction: float) -> int:
    return max(1, round(fraction * len(words)))


@functools.lru_cache(maxsize=1)
def wordnet_synonyms() -> dict[str, tuple[str, ...]]:
    """lower-case word -> its WordNet synonyms (other lemmas of its synsets; multi-word lemmas with spaces)."""
    from .corpora import WORDNET_POS, fetch_debian

    root = fetch_debian("wordnet-base") / "usr/share/wordnet"
    synonyms: dict[str, set] = {}
    for pos in WORDNET_POS:
        with open(root / f"data.{pos}", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("  "):
                    continue
                fields = line.split(" | ", 1)[0].split()
                count = int(fields[3], 16)
                # Adjective lemmas may end in a syntactic marker such as "(a)".
                lemmas = {re.sub(r"\(\w+\)$", "", fields[4 + 2 * k]).replace("_", " ").lower() for k in range(count)}
                for lemma in lemmas:
                    synonyms.setdefault(lemma, set()).update(lemmas - {lemma})
    return {word: tuple(sorted(others)) for word, others in synonyms.items() if others}


@functools.lru_cache(maxsize=1)
def _stop_words() -> frozenset:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def random_swap(words: list[str], rng: np.random.Generator, fraction: float) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(_count(words, fraction)):
        i, j = rng.choice(len(words), size=2, replace=False)
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words: list[str], rng: np.random.Generator, fraction: float) -> list[str]:
    keep = rng.random(len(words)) >= fraction
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep) if k]


def _replaceable(words: list[str], rng: np.random.Generator, fraction: float, allowed) -> list[int]:
    """Up to n positions (in random order) whose word core passes `allowed`."""
    candidates = [i for i, w in enumerate(words) if allowed(_split_affixes(w)[1])]
    order = rng.permutation(len(candidates))
    return sorted(candidates[k] for k in order[:_count(words, fraction)])


def synonym_replacement(words: list[str], rng: np.random.Generator, fraction: float) -> list[str]:
    table, stop = wordnet_synonyms(), _stop_words()
    words = list(words)
    for i in _replaceable(words, rng, fraction, lambda core: core.lower() in table and core.lower() not in stop):
        prefix, core, suffix = _split_affixes(words[i])
        options = table[core.lower()]
        words[i] = prefix + _cased_like(core, options[rng.integers(len(options))]) + suffix
    return words


# ---- masked language model ----

class MaskedLanguageModel:
    """Whole-word replacements sampled from an AutoModelForMaskedLM's top-k predictions.

    Args:
        name: a local directory or a hub name of a model with a masked-LM head.
        top_k: candidates per masked word; max_length: tokens per sentence (masks past it are kept).
    """

    def __init__(self, name: str, top_k: int = 8, max_length: int = 128, device=None):
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForMaskedLM.from_pretrained(name).eval()
        except (OSError, ValueError) as error:
            raise ValueError(f"augment.mlm_model {name!r} is not a loadable masked language model (a local "
                             f"directory or a hub name of an AutoModelForMaskedLM): {error}") from error
        if self.tokenizer.mask_token is None:
            raise ValueError(f"augment.mlm_model {name!r}: its tokenizer has no mask token")
        self.device = torch.device(device or "cpu")
        self.model.to(self.device)
        self.top_k, self.max_length = top_k, max_length
        vocabulary = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        # Replacements are whole alphabetic words (no sub-word pieces, special or unused tokens).
        self.words = [t.lstrip("Ġ▁") for t in vocabulary]
        special = set(self.tokenizer.all_special_tokens)
        whole = [t.isalpha() and t.isascii() and not t.startswith("##") and t not in special for t in vocabulary]
        outputs = self.model.config.vocab_size  # the logits' width; may differ from the tokenizer's size
        self.allowed = torch.zeros(outputs, dtype=torch.bool, device=self.device)
        self.allowed[: min(outputs, len(whole))] = torch.tensor(whole[:outputs], device=self.device)

    @torch.no_grad()
    def fill(self, sentences: list[list[str]], positions: list[list[int]], rngs: list) -> list[list[str]]:
        """Each sentence with its words at `positions` replaced; one batched forward for all of them."""
        mask = self.tokenizer.mask_token
        masked = []
        for words, chosen in zip(sentences, positions):
            masked_words = list(words)
            for i in chosen:
                prefix, core, suffix = _split_affixes(words[i])
                masked_words[i] = f"{prefix}{mask}{suffix}"
            masked.append(" ".join(masked_words))
        batch = self.tokenizer(masked, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        logits = self.model(**batch).logits.float()
        logits = logits.masked_fill(~self.allowed, float("-inf"))
        filled = []
        for row, (words, chosen, rng) in enumerate(zip(sentences, positions, rngs)):
            words = list(words)
            slots = (batch["input_ids"][row] == self.tokenizer.mask_token_id).nonzero().flatten().tolist()
            for i, slot in zip(chosen, slots):  # masks cut off by max_length keep their word
                prefix, core, suffix = _split_affixes(words[i])
                scores = logits[row, slot].clone()
                original = self.tokenizer.convert_tokens_to_ids(core.lower())
                if isinstance(original, int) and original != self.tokenizer.unk_token_id:
                    scores[original] = float("-inf")  # a replacement, not the word itself
                top = scores.topk(self.top_k)
                probabilities = torch.softmax(top.values.double(), 0).cpu().numpy()
                choice = int(top.indices[rng.choice(self.top_k, p=probabilities / probabilities.sum())])
                words[i] = prefix + _cased_like(core, self.words[choice]) + suffix
            filled.append(words)
        return filled


# ---- the augmenter ----

class Augmenter:
    """Generates `copies` augmented versions of every row (see the module docstring).

    Args:
        config: the `augment` section. masked_lm: a MaskedLanguageModel (needed when the policy has mlm).
    """

    def __init__(self, config, masked_lm: MaskedLanguageModel | None = None):
        unknown = [name for name in config.policy if name not in OPERATIONS]
        if unknown or not config.policy:
            raise ValueError(f"augment.policy takes a non-empty list of {OPERATIONS}, got {config.policy!r}")
        if "mlm" in config.policy and masked_lm is None:
            raise ValueError("augment.policy has mlm but no masked language model was given (augment.mlm_model)")
        self.config, self.masked_lm = config, masked_lm

    def generate(self, rows: list[dict], first_index: int = 0) -> list[dict]:
        """Augmented rows (text and text_pair when present) for rows numbered first_index, first_index + 1, ...

        Returns copies * len(rows) rows, example-major, each with "source" = the index of its example.
        """
        fields = [f for f in FIELDS if f in rows[0]]
        jobs = []  # (source, copy, operation, field, words, rng)
        for offset, row in enumerate(rows):
            source = first_index + offset
            for copy in range(self.config.copies):
                pick = np.random.default_rng([self.config.seed, source, copy])
                operation = self.config.policy[int(pick.integers(len(self.config.policy)))]
                for number, field in enumerate(fields):
                    words = str(row[field]).split()
                    if not words:
                        raise ValueError(f"augment: example {source} has an empty {field!r}: nothing to augment")
                    rng = np.random.default_rng([self.config.seed, source, copy, number + 1])
                    jobs.append((source, copy, operation, field, words, rng))
        results = self._apply(jobs)
        augmented: dict[tuple, dict] = {}
        for (source, copy, _, field, _, _), words in zip(jobs, results):
            augmented.setdefault((source, copy), {"source": source})[field] = " ".join(words)
        return list(augmented.values())

    def _apply(self, jobs: list) -> list[list[str]]:
        fraction = self.config.word_fraction
        token_level = {"swap": random_swap, "delete": random_deletion, "synonym": synonym_replacement}
        results: list = [None] * len(jobs)
        contextual = []
        for index, (_, _, operation, _, words, rng) in enumerate(jobs):
            if operation == "mlm":
                contextual.append(index)
            else:
                results[index] = token_level[operation](words, rng, fraction)
        for start in range(0, len(contextual), self.config.batch_size):  # the masked LM runs in batches
            chunk = contextual[start:start + self.config.batch_size]
            sentences = [jobs[i][4] for i in chunk]
            rngs = [jobs[i][5] for i in chunk]
            positions = [_replaceable(words, rng, fraction, str.isalpha) for words, rng in zip(sentences, rngs)]
            for index, words in zip(chunk, self.masked_lm.fill(sentences, positions, rngs)):
                results[index] = words
        return results


# ---- teacher labels and the cached set ----

@torch.no_grad()
def teacher_logits(teacher, collate, rows: list[dict], batch_size: int, device) -> np.ndarray:
    """(len(rows), outputs) float32 logits of the teacher (eval mode) over rows, in batches."""
    teacher.eval()
    chunks = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        chunks.append(teacher(**batch).logits.float().cpu().numpy())
    return np.concatenate(chunks)


def fingerprint(train_set, augment_config, teacher, collate, kind: str, masked_lm=None) -> str:
    """The augmented set's cache key (32 hex digits): sha256 of the training rows, the augment section
    (without what does not change the set: its batch size, cache folder and the mixup keys), the task kind,
    the teacher's weights, the tokenizer and max_length (collate's), and the masked LM's weights and
    tokenizer when the policy uses one."""
    ignored = ("batch_size", "cache_dir", "mixup", "mixup_alpha")
    policy = {k: v for k, v in asdict(augment_config).items() if k not in ignored}
    key = {"format": FORMAT, "data": rows_digest(train_set, (*FIELDS, "label")), "augment": policy, "kind": kind,
           "teacher": model_digest(teacher), "tokenizer": tokenizer_digest(collate.tokenizer),
           "max_length": collate.max_length}
    if masked_lm is not None:
        key["masked_lm"] = {"model": model_digest(masked_lm.model), "tokenizer": tokenizer_digest(masked_lm.tokenizer)}
    return key_digest(key)


def augmented_train_set(train_set, augment_config, teacher, collate, kind: str, device=None, log=print):
    """The training set extended by its augmented copies, every row labelled by the teacher; cached.

    Columns: text (, text_pair), label (the gold label, or the teacher's prediction on augmented
    rows), gold (1 for original rows), teacher_logits (the teacher's logits: the soft labels).
    One process builds a missing set (under the cache's lock); others, DDP ranks too, wait and load it.
    """
    device = device or torch.device("cpu")
    masked_lm = None
    if "mlm" in augment_config.policy:
        masked_lm = MaskedLanguageModel(augment_config.mlm_model, augment_config.mlm_top_k, collate.max_length, device)
    root = Path(augment_config.cache_dir) if augment_config.cache_dir else cache_dir() / "augment"
    target = root / fingerprint(train_set, augment_config, teacher, collate, kind, masked_lm)
    if target.is_dir():
        log(f"[augment] cached augmented set {target}")
    else:
        def build(folder: Path) -> None:
            extended = _extended(train_set, augment_config, teacher, collate, kind, device, masked_lm)
            extended.save_to_disk(str(folder))
            log(f"[augment] {len(extended) - len(train_set)} augmented examples from {len(train_set)} "
                f"({augment_config.policy}), cached in {target}")

        publish_directory(build, target)
    return load_augmented_set(target)


def load_augmented_set(target: Path):
    """The cached augmented set in the directory `target` (a bad copy is a LoadError naming it)."""
    from datasets import load_from_disk

    with reading(target, "augmented-set cache", "delete that directory: the set is built again on the next run"):
        return load_from_disk(str(target))


def _extended(train_set, augment_config, teacher, collate, kind: str, device, masked_lm):
    from datasets import Dataset

    from .data import Collator

    augmenter = Augmenter(augment_config, masked_lm)
    fields = [f for f in FIELDS if f in train_set.column_names]
    originals = train_set.select_columns(fields + ["label"])[:]
    rows = [dict(zip(originals, values)) for values in zip(*originals.values())]
    extra = []
    for start in range(0, len(rows), augment_config.batch_size):
        extra += augmenter.generate(rows[start:start + augment_config.batch_size], first_index=start)
    everything = rows + [{f: r[f] for f in fields} for r in extra]
    unlabeled = Collator(collate.tokenizer, collate.max_length, "unlabeled")
    logits = teacher_logits(teacher, unlabeled, everything, augment_config.batch_size, device)
    predicted = logits.argmax(-1).tolist() if kind == "classification" else logits[:, 0].tolist()
    columns = {f: [r[f] for r in everything] for f in fields}
    columns["label"] = [r["label"] for r in rows] + predicted[len(rows):]
    columns["gold"] = [1] * len(rows) + [0] * len(extra)
    columns["teacher_logits"] = logits.tolist()
    return Dataset.from_dict(columns)


# ---- mixup ----

class WordEmbeddingMixup:
    """Mixup of word embeddings (Distiller): each example i is mixed with example perm(i),

        e_mix = lambda_i e_i + (1 - lambda_i) e_perm(i),   lambda_i ~ Beta(alpha, alpha),

    in the word-embedding space of each model (teacher and student mix with the same lambda and
    perm), and the batch is doubled: [originals; mixed]. A mixed row attends to the union of both
    rows' tokens and keeps row i's token types. Draws use torch's global generator, which the
    trainer's checkpoints save, so a resumed run draws the same mixes.
    """

    def __init__(self, alpha: float):
        if not alpha > 0:
            raise ValueError(f"augment.mixup_alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def draw(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """lambda (B,) and perm (B,), on the CPU."""
        concentration = torch.full((batch_size,), float(self.alpha))
        lam = torch.distributions.Beta(concentration, concentration).sample()
        return lam, torch.randperm(batch_size)

    @staticmethod
    def inputs(model, batch: dict, lam: torch.Tensor, perm: torch.Tensor) -> dict:
        """Model inputs for the doubled batch (inputs_embeds instead of input_ids)."""
        embeddings = model.get_input_embeddings()(batch["input_ids"])
        weight = lam.to(embeddings.device, embeddings.dtype)[:, None, None]
        perm = perm.to(embeddings.device)
        mixed = weight * embeddings + (1 - weight) * embeddings[perm]
        mask = batch["attention_mask"]
        inputs = {"inputs_embeds": torch.cat([embeddings, mixed]),
                  "attention_mask": torch.cat([mask, torch.maximum(mask, mask[perm])])}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = torch.cat([batch["token_type_ids"], batch["token_type_ids"]])
        return inputs
