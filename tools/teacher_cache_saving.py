"""What teacher.cache_logits saves per HPO trial: one prediction-loss-only distillation run with the
teacher's forward on every batch against the same run reading the cached logits.

    .venv/bin/python tools/teacher_cache_saving.py [--steps 30] [--batch-size 32] [--max-length 64]

Teacher: the packaged all-MiniLM-L6-v2 with a (random) 2-class head standing in for a fine-tuned one
(the cost does not depend on the head's weights); student: 2 layers, hidden 192; rotten_tomatoes,
first --max-train examples. Prints the one-off cost of filling the cache and the seconds per run
and per step of both runs; writes bench/results/teacher_cache.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(values: dict, cache: bool, output: Path) -> tuple[float, float]:
    """(seconds to build the Trainer, seconds to train)."""
    from pykd.distill import config as run_config
    from pykd.distill.trainer import Trainer

    values = json.loads(json.dumps(values))
    values["teacher"]["cache_logits"] = cache
    values["train"]["output_dir"] = str(output)
    started = time.perf_counter()
    trainer = Trainer(run_config.from_dict(values), "distill")
    built = time.perf_counter()
    trainer.train()
    return built - started, time.perf_counter() - built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=2000)
    args = parser.parse_args(argv)
    import os

    import torch

    from pykd.distill.models import resolve_model_path

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["PYKD_CACHE"] = scratch
        teacher = str(resolve_model_path("minilm-l6"))
        values = {"teacher": {"path": teacher, "finetuned": teacher},
                  "data": {"dataset": "rotten_tomatoes", "max_length": args.max_length,
                           "max_train_examples": args.max_train, "max_eval_examples": 64},
                  "student": {"num_hidden_layers": 2, "hidden_size": 192, "num_attention_heads": 6,
                              "intermediate_size": 768},
                  "losses": {"hidden": {"type": "none"}, "relation": {"relations": []}},
                  "train": {"steps": args.steps, "batch_size": args.batch_size, "eval_every": 10 ** 6,
                            "checkpoint_every": 10 ** 6, "progress": False}}
        fill_setup, _ = run(values, True, Path(scratch) / "fill")  # computes and writes the cache
        _, live = run(values, False, Path(scratch) / "live")
        cached_setup, cached = run(values, True, Path(scratch) / "cached")
        fill = fill_setup - cached_setup  # the same setup but for computing the logits
    result = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "train_examples": args.max_train, "cache_fill_s": round(fill, 2),
              "live_run_s": round(live, 2), "cached_run_s": round(cached, 2),
              "live_s_per_step": round(live / args.steps, 4), "cached_s_per_step": round(cached / args.steps, 4),
              "saving": round(1 - cached / live, 3), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads()}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "teacher_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
