"""Tiny teachers, texts and configs for the NAS loop's tests (train, search, CLI)."""
import random

from tests.kd_fixtures import WORDS, tiny_teacher

# 16 candidates inside the 4-layer / 48-hidden / 4-head / FFN-96 tiny teacher.
TINY_SPACE = {"subspaces": [{"name": "s", "layers": [2, 4], "hidden": [24, 48], "ffn_ratio": [1.0, 2.0],
                             "heads": [2, 4]}]}
TWO_SUBSPACES = {"subspaces": [{"name": "lo", "layers": [1, 2], "hidden": [16, 24], "ffn_ratio": [1.0, 2.0],
                                "heads": [2, 4]},
                               {"name": "hi", "layers": [3, 4], "hidden": [32, 48], "ffn_ratio": [1.0, 2.0],
                                "heads": [2, 4]}]}


def tiny_text(directory, lines: int = 96, seed: int = 0) -> str:
    """A local .txt corpus of random word lines of varied lengths (so batches carry padding)."""
    rng = random.Random(seed)
    path = directory / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 16))) for _ in range(lines)))
    return str(path)


def nas_values(tmp_path, space=None, **sections) -> dict:
    """A run config for `pykd nas` on the tiny teacher and text; sections update the defaults."""
    values = {"teacher": {"path": tiny_teacher(tmp_path)},
              "data": {"dataset": tiny_text(tmp_path), "kind": "unlabeled", "max_length": 16, "eval_fraction": 0.25,
                       "max_eval_examples": 8},
              "losses": {"prediction": {"type": "none"}},
              "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "eval_every": 100, "log_every": 1,
                        "checkpoint_every": 100, "output_dir": str(tmp_path / "unused"), "progress": False},
              "nas": {"space": "custom", "custom_space": space or TINY_SPACE, "output": str(tmp_path / "nas"),
                      "sandwich_random": 1,
                      "seq_len": 16, "latency": {"batch_size": 2, "seq_len": 8, "repeats": 1}}}
    for section, entries in sections.items():
        values.setdefault(section, {}).update(entries)
    return values

# A per-layer (HAT / MoS) space inside the tiny teacher: 40 candidates, layers differing in heads and FFN ratio.
TINY_LAYERWISE = {"subspaces": [{"name": "w", "layers": [1, 2], "hidden": [24, 48], "ffn_ratio": [1.0, 2.0],
                                 "heads": [2, 4], "layerwise": True}]}
