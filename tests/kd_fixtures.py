"""Tiny teachers and datasets for the KD engine's tests (the real tokenizer, a random small BERT)."""
import csv
import random

import torch

WORDS = ["good", "bad", "great", "awful", "fine", "movie", "plot", "actor", "boring", "fun", "dull", "superb"]
POSITIVE, NEGATIVE = {"good", "great", "fine", "fun", "superb"}, {"bad", "awful", "boring", "dull"}


def tiny_teacher(directory, layers: int = 4, hidden: int = 48, heads: int = 4, seed: int = 0) -> str:
    import transformers

    from pykd.distill.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=2 * hidden,
                                     max_position_embeddings=64)
    torch.manual_seed(seed)
    path = str(directory / "teacher")
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_csv(directory, rows: int = 120, regression: bool = False, seed: int = 0) -> str:
    rng = random.Random(seed)
    path = str(directory / ("regression.csv" if regression else "sentiment.csv"))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 14))]
            score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
            writer.writerow([" ".join(words), score / 3.0 if regression else int(score > 0)])
    return path


def tiny_masked_lm(directory, layers: int = 4, hidden: int = 48, heads: int = 4, seed: int = 0,
                   name: str = "masked_lm") -> str:
    """A random small BertForMaskedLM (output projection tied to the word embeddings) with the real tokenizer."""
    import transformers

    from pykd.distill.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=2 * hidden,
                                     max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():  # a head bias that is not zero, so that slicing it is seen
        model.cls.predictions.bias.normal_(0.0, 0.5)
    path = str(directory / name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
