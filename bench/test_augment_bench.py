"""Augmentation throughput: batched generation + teacher labelling against a one-sentence-at-a-time loop.

    pytest bench/test_augment_bench.py     (part of `make bench`; PYKD_AUGMENT_BENCH_EXAMPLES=8 for a smoke run)

The first N rotten_tomatoes sentences, one augmented copy each, labelled by the packaged MiniLM-L6
teacher (a 2-class head); policies "token" (swap, delete, synonym) and "mlm" (contextual
substitution, word_fraction 0.15, top-8). No package ships a trained masked-LM head, so the masked
LM here is MiniLM-L6's encoder under BertForMaskedLM with an untrained head transform: the compute
of a real BERT-style MLM of that size, not its word choices. Batched: Augmenter.generate and the
teacher over batches of 64; loop: both on one sentence at a time. Both give the same augmented set
for the token policy (checked). Writes bench/results/augment.{json,csv,md}.
"""
import os

import pytest
from conftest import ratio, write_table

pytest.importorskip("transformers")
pytest.importorskip("datasets")

EXAMPLES = int(os.environ.get("PYKD_AUGMENT_BENCH_EXAMPLES", "128"))
BATCH = 64
ROUNDS = 3
POLICIES = {"token": ["swap", "delete", "synonym"], "mlm": ["mlm"]}
MEASURED: dict[tuple, dict] = {}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    import transformers

    from pykd.distill import data
    from pykd.distill.models import load_pretrained, load_tokenizer, resolve_model_path

    mlm_path = str(tmp_path_factory.mktemp("mlm") / "minilm-mlm")
    transformers.BertForMaskedLM.from_pretrained(resolve_model_path("minilm-l6")).save_pretrained(mlm_path)
    load_tokenizer("minilm-l6").save_pretrained(mlm_path)
    teacher = load_pretrained("minilm-l6", "classification", 2).eval()
    collate = data.Collator(load_tokenizer("minilm-l6"), 64, "unlabeled")
    rows = [{"text": t} for t in data.load_corpus("rotten_tomatoes")["text"][:EXAMPLES]]
    return {"mlm_path": mlm_path, "teacher": teacher, "collate": collate, "rows": rows}


def _augmenter(setting, policy):
    from pykd.distill import augment
    from pykd.distill import config as run_config

    config = run_config.from_dict({"augment": {"policy": POLICIES[policy], "word_fraction": 0.15, "batch_size": BATCH,
                                               "mlm_model": setting["mlm_path"]}}).augment
    masked_lm = augment.MaskedLanguageModel(setting["mlm_path"], config.mlm_top_k, 64) if policy == "mlm" else None
    return augment.Augmenter(config, masked_lm)


def _batched(setting, augmenter):
    from pykd.distill.augment import teacher_logits

    made = []
    for start in range(0, len(setting["rows"]), BATCH):
        made += augmenter.generate(setting["rows"][start:start + BATCH], first_index=start)
    logits = teacher_logits(setting["teacher"], setting["collate"], made, BATCH, "cpu")
    return made, logits


def _one_at_a_time(setting, augmenter):
    from pykd.distill.augment import teacher_logits

    made, logits = [], []
    for index, row in enumerate(setting["rows"]):
        augmented = augmenter.generate([row], first_index=index)
        made += augmented
        logits.append(teacher_logits(setting["teacher"], setting["collate"], augmented, 1, "cpu"))
    return made, logits


@pytest.mark.parametrize("mode", ["batched", "loop"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_augment_throughput(benchmark, setting, policy, mode):
    augmenter = _augmenter(setting, policy)
    run = _batched if mode == "batched" else _one_at_a_time
    made, _ = run(setting, augmenter)  # warm-up; also builds the WordNet table once
    benchmark.pedantic(lambda: run(setting, augmenter), rounds=ROUNDS, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    MEASURED[policy, mode] = {"texts": [r["text"] for r in made], "per_second": len(made) / seconds}


def test_augment_report():
    if len(MEASURED) < 2 * len(POLICIES):
        pytest.skip("not every variant ran in this session")
    assert MEASURED["token", "batched"]["texts"] == MEASURED["token", "loop"]["texts"]
    rows = []
    for policy in POLICIES:
        batched, loop = MEASURED[policy, "batched"], MEASURED[policy, "loop"]
        rows.append({"policy": policy, "examples": EXAMPLES, "batch": BATCH,
                     "batched_per_s": batched["per_second"], "loop_per_s": loop["per_second"],
                     "speedup": ratio(batched["per_second"], loop["per_second"])})
    lines = [f"Augmentation + teacher labelling (MiniLM-L6), {EXAMPLES} rotten_tomatoes sentences, one copy each, "
             f"fp32, CPU, median of {ROUNDS}; examples per second.", "",
             "| policy | batched (64) ex/s | one at a time ex/s | batched/loop |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['batched_per_s']:.1f} | {r['loop_per_s']:.1f} | {r['speedup']:.2f}x |")
    write_table("augment", rows, "\n".join(lines) + "\n")
