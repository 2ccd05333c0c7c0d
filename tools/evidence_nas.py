"""Evidence for AutoDistil and Mixture-of-Supernets (issue 15, studies 1 and 2), one resumable command:

    .venv/bin/python tools/evidence_nas.py [--root runs/evidence-nas] [--workers 2] [--scale full|smoke]
    .venv/bin/python tools/evidence_nas.py --summarise-only     # tables from the finished jobs so far

Teacher: the packaged MiniLM-L6 (6 x 384, 12 heads, FFN 1536). Everything task-agnostic (SuperLMs and
standalone students) trains on one unlabelled corpus: pydocs paragraphs plus the training texts (no
labels; validation and test texts left out) of the two evaluation tasks, rotten_tomatoes and
wordnet_glosses; batch 16 x 64 tokens, AdamW lr 3e-4, 10% warmup, seed 0, the same data order for all.
The task-agnostic objective is MiniLMv2's for every model: KL of the QQ, KK and VV self-attention
relations of the teacher's last layer against the student's last layer, 8 relation heads (they divide
every width below). The SuperLM and its standalone control thus differ only in weight sharing and search.

Search space (custom, K=3 sub-spaces split by width, 8 heads everywhere, FFN ratio 2-4): narrow (L 3-6,
d 160-256), medium (L 3-6, d 256-352), wide (L 2-5, d 320-384); K=1 is one SuperLM over the union grid.
FLOPs are counted at 128 tokens (pykd's nas.seq_len default).

Study 1, searched student vs hand design, at FLOPs budgets B = 25% and 50% of the teacher's. The
search scores every candidate of the K=3 SuperLMs by held-out relation loss and picks the best whose
FLOPs lie in [0.85 B, B], so that it chooses between shapes of near-equal cost (17 and 14 candidates,
from 2 to 6 layers) instead of taking the largest. Arms, each fine-tuned identically:
  searched      the searched shape with its SuperLM weights (AutoDistil)
  searched-cut  the same shape cut from the teacher, no task-agnostic training
  searched-kd   the same shape distilled standalone for as many steps as each SuperLM trained (the fair control)
  hand-*        three hand-designed shapes at the budget, distilled standalone likewise: fewer layers
                (full width), narrower (full depth), both; head size 32 as the teacher's
  teacher       MiniLM-L6 itself (reference)
Fine-tuning: 300 steps, batch 32, 64 tokens, 10% warmup; learning rate 1e-4 or 3e-4, the better on a
500-example validation split (held out of the training split) with seed 0; seeds 1 and 2 at that rate;
accuracy on the test split (2,000 examples): mean and standard error over the 3 seeds.

Study 2, ranking quality: the 14 candidates of the medium sub-space with FLOPs in [40%, 50%] of the
teacher's, each distilled standalone for 500 steps; Kendall tau between each supernet's held-out loss
(inherited weights, no training) and the standalone students' held-out loss, and the mean gap
(inherited - standalone). Supernets: K=3 (medium sub-space, 2000 steps; = E=1), K=1 (the union,
6000 steps: equal total steps to K=3's three SuperLMs), E=2 layer-wise and E=2 neuron-wise
Mixture-of-Supernets on the medium sub-space (2000 steps each).

Outputs: bench/results/evidence.json (study "nas" and "ranking" entries: rows and summaries),
bench/results/evidence_nas.md (tables, commands, wall time) and bench/results/evidence_nas.png
(test accuracy against FLOPs, every arm). `--scale smoke` runs the whole graph at a few steps into a
scratch root (a check of the pipeline, not evidence).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from evidence_jobs import Job, Study, claim_settings, mean_and_se, run_workers  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ARCHIVE = RESULTS / "evidence" / "nas"  # every finished job's result, committed
DATASETS = ("rotten_tomatoes", "wordnet_glosses")
BUDGETS = (0.25, 0.5)
BAND = 0.85  # the search picks among candidates with FLOPs in [BAND * budget, budget]
FLOPS_SEQ_LEN = 128
LEARNING_RATES = (1e-4, 3e-4)
SEEDS = (0, 1, 2)
SPACE = {"subspaces": [
    {"name": "narrow", "layers": [3, 4, 5, 6], "hidden": [160, 192, 224, 256], "ffn_ratio": [2.5, 3, 3.5, 4],
     "heads": [8]},
    {"name": "medium", "layers": [3, 4, 5, 6], "hidden": [256, 288, 320, 352], "ffn_ratio": [2.5, 3, 3.5, 4],
     "heads": [8]},
    {"name": "wide", "layers": [2, 3, 4, 5], "hidden": [320, 352, 384], "ffn_ratio": [2, 2.5, 3, 3.5, 4],
     "heads": [8]},
]}
UNION = {"subspaces": [{"name": "all", **{factor: sorted({v for s in SPACE["subspaces"] for v in s[factor]})
                                          for factor in ("layers", "hidden", "ffn_ratio", "heads")}}]}
# Hand-designed shapes per budget: fewer layers at the teacher's width, the teacher's depth narrower, both.
HAND = {0.25: {"fewer-layers": "layers=2,hidden=384,ffn_ratio=2,heads=12",
               "narrower": "layers=6,hidden=192,ffn_ratio=3.5,heads=6",
               "both": "layers=4,hidden=224,ffn_ratio=4,heads=7"},
        0.5: {"fewer-layers": "layers=3,hidden=384,ffn_ratio=4,heads=12",
              "narrower": "layers=6,hidden=256,ffn_ratio=4,heads=8",
              "both": "layers=4,hidden=320,ffn_ratio=4,heads=10"}}
RANKING_SUBSPACE, RANKING_BAND = "medium", (0.40, 0.50)
SUPERNETS = {"k3": {"space": SPACE, "subspaces": ("narrow", "medium", "wide"), "steps": 1, "nas": {}},
             "k1": {"space": UNION, "subspaces": ("all",), "steps": 3, "nas": {}},
             "mos-layer": {"space": SPACE, "subspaces": ("medium",), "steps": 1,
                           "nas": {"experts": 2, "routing": "layer"}},
             "mos-neuron": {"space": SPACE, "subspaces": ("medium",), "steps": 1,
                            "nas": {"experts": 2, "routing": "neuron"}}}
SCALES = {  # steps: SuperLM per sub-space, standalone control, ranking students, fine-tuning
    "full": {"superlm": 2000, "standalone": 2000, "ranking": 500, "finetune": 300, "train": 10000,
             "validation": 500, "test": 2000, "eval_batches": 16, "datasets": DATASETS, "budgets": BUDGETS,
             "ranking_archs": None},
    "smoke": {"superlm": 3, "standalone": 3, "ranking": 2, "finetune": 3, "train": 200, "validation": 40,
              "test": 60, "eval_batches": 2, "datasets": DATASETS[:1], "budgets": BUDGETS[:1], "ranking_archs": 3},
}


def relative(root: Path, path) -> str:
    """A job output's path as its result records it: relative to the study root (see evidence_jobs)."""
    return str(Path(path).resolve().relative_to(Path(root).resolve()))


def slug(text: str) -> str:
    return text.replace("layers=", "L").replace(",hidden=", "-d").replace(",ffn_ratio=", "-r").replace(",heads=", "-h")


# ---- data ----

def _row(texts: list, labels: list, index: int, split: str | None = None) -> dict:
    """One example as a JSON line (the split column is the trainer's train/test: here train/validation)."""
    record = {"text": " ".join(texts[index].split()), "label": int(labels[index])}
    return {**record, "split": split} if split else record


def prepare_data(root: Path, scale: dict) -> dict:
    """Fine-tuning files (train + validation as the trainer's train/test split), test files, the corpus."""
    import numpy as np

    from pykd.distill import corpora
    from pykd.distill import data as data_module

    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    corpus = list(corpora.pydocs_paragraphs())
    info = {"corpus_pydocs": len(corpus)}
    for name in scale["datasets"]:
        prepared = data_module.prepare(data_module.load_corpus(name), "classification", name)
        dataset = prepared.dataset
        texts, labels = dataset["text"][:], dataset["label"][:]
        rng = np.random.default_rng(1234)
        if "split" in dataset.column_names:
            column = dataset["split"][:]
            train_rows = [i for i in rng.permutation(len(texts)) if column[i] == "train"]
            test_rows = [i for i in rng.permutation(len(texts)) if column[i] == "test"][: scale["test"]]
        else:
            order = [int(i) for i in rng.permutation(len(texts))]
            test_rows, train_rows = order[: scale["test"]], order[scale["test"]:]
        validation = train_rows[: scale["validation"]]
        train = train_rows[scale["validation"]: scale["validation"] + scale["train"]]

        lines = [_row(texts, labels, i, "train") for i in train] + [_row(texts, labels, i, "test") for i in validation]
        (data_dir / f"{name}.finetune.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (data_dir / f"{name}.test.jsonl").write_text(
            "".join(json.dumps(_row(texts, labels, i)) + "\n" for i in test_rows))
        corpus += [" ".join(texts[i].split()) for i in train]
        info[name] = {"train": len(train), "validation": len(validation), "test": len(test_rows),
                      "classes": prepared.label_names}
    random.Random(0).shuffle(corpus)
    if scale is SCALES["smoke"]:
        corpus = corpus[:600]
    (data_dir / "corpus.txt").write_text("".join(" ".join(t.split()) + "\n" for t in corpus))
    info["corpus"] = len(corpus)
    files = ["corpus.txt", *(f"{name}.{part}.jsonl" for name in scale["datasets"] for part in ("finetune", "test"))]
    return {**info, "outputs": [relative(root, data_dir / f) for f in files]}


# ---- configs ----

def pretrain_values(root: Path, scale: dict) -> dict:
    """What every task-agnostic run shares: data, objective settings, optimiser, schedule."""
    return {"teacher": {"path": "minilm-l6"},
            "data": {"dataset": str(root / "data" / "corpus.txt"), "kind": "unlabeled", "max_length": 64,
                     "eval_fraction": 0.02, "max_eval_examples": 16 * scale["eval_batches"]},
            "losses": {"prediction": {"type": "none"}},
            "train": {"batch_size": 16, "lr": 3e-4, "warmup_fraction": 0.1, "eval_every": 10 ** 6,
                      "log_every": 50, "checkpoint_every": 100, "progress": False, "seed": 0}}


def supernet_config(root: Path, scale: dict, variant: str):
    from pykd.distill import config as run_config

    spec = SUPERNETS[variant]
    values = pretrain_values(root, scale)
    values["train"].update(steps=scale["superlm"] * spec["steps"], output_dir=str(root / "unused"))
    values["nas"] = {"space": "custom", "custom_space": spec["space"], "relations": ["qq", "kk", "vv"],
                     "relation_heads": 8, "relation_loss": "kl", "eval_batches": scale["eval_batches"],
                     "seq_len": FLOPS_SEQ_LEN, "output": str(root / "supernets" / variant), **spec["nas"]}
    return run_config.from_dict(values)


def standalone_values(root: Path, scale: dict, arch_text: str, steps: int, output: Path) -> dict:
    from pykd.nas import Architecture

    arch = Architecture.parse(arch_text)
    values = pretrain_values(root, scale)
    values["train"].update(steps=steps, output_dir=str(output))
    values["student"] = {"init": "teacher", "num_hidden_layers": arch.layers, "hidden_size": arch.hidden,
                         "num_attention_heads": arch.heads, "intermediate_size": arch.intermediate}
    values["losses"].update(hidden={"type": "none"}, relation={"relations": ["qq", "kk", "vv"], "loss": "kl",
                                                               "relation_heads": 8, "mapping": "last"})
    return values


# ---- jobs ----

def train_supernet(root: Path, scale: dict, variant: str, subspace: str) -> dict:
    from pykd.nas.train import SuperLMTrainer, subspace_run_config

    config = supernet_config(root, scale, variant)
    names = [s["name"] for s in SUPERNETS[variant]["space"]["subspaces"]]
    run = subspace_run_config(config, subspace)
    history = SuperLMTrainer(run, names.index(subspace)).train()
    losses = [r["loss"] for r in history if "loss" in r]
    return {"dir": run.train.output_dir, "steps": run.train.steps, "first_loss": losses[0], "last_loss": losses[-1],
            "outputs": [relative(root, run.train.output_dir)]}


def held_out(root: Path, scale: dict):
    """(teacher, space, tokenizer, TeacherCache, RelationSpec) of the K=3 config's held-out batches."""
    from pykd.distill.losses import RelationTerms
    from pykd.nas.evaluate import TeacherCache, held_out_batches, load_teacher_and_space

    config = supernet_config(root, scale, "k3")
    teacher, space, tokenizer = load_teacher_and_space(config)
    cache = TeacherCache(teacher, held_out_batches(config, tokenizer))
    return teacher, space, tokenizer, cache, RelationTerms(("qq", "kk", "vv"), 8, "kl")


def search(root: Path, scale: dict) -> dict:
    """Every K=3 candidate scored; per budget the best in the FLOPs band and, for reference, the best
    under the budget alone (what an unbanded search picks)."""
    from pykd.nas.algorithms import enumerate_search
    from pykd.nas.evaluate import build_evaluator

    config = supernet_config(root, scale, "k3")
    evaluator = build_evaluator(config)
    rows = enumerate_search(evaluator)
    teacher_flops = evaluator.space.teacher_flops(FLOPS_SEQ_LEN)
    for row in rows:
        row["flops_fraction"] = row["flops"] / teacher_flops
    picks = {}
    for budget in scale["budgets"]:
        band = [r for r in rows if BAND * budget <= r["flops_fraction"] <= budget]
        under = [r for r in rows if r["flops_fraction"] <= budget]
        best, unbanded = min(band, key=lambda r: r["loss"]), min(under, key=lambda r: r["loss"])
        by_loss = sorted(band, key=lambda r: r["loss"])
        picks[str(budget)] = {"arch": best["arch"], "loss": best["loss"], "flops_fraction": best["flops_fraction"],
                              "band": [(r["arch"], r["loss"], r["flops_fraction"]) for r in by_loss],
                              "unbanded": unbanded["arch"], "unbanded_flops_fraction": unbanded["flops_fraction"]}
    return {"picks": picks, "candidates": rows}


def export_searched(root: Path, scale: dict, arch_text: str, output: Path) -> dict:
    from pykd.nas.search import export_candidate

    if not output.exists():
        export_candidate(supernet_config(root, scale, "k3"), arch_text, output)
    return {"dir": str(output), "arch": arch_text, "outputs": [relative(root, output)]}


def export_cut(root: Path, scale: dict, arch_text: str, output: Path) -> dict:
    """The shape sliced out of the teacher (the untrained SuperLM's export: pykd's bottom-left cut)."""
    from pykd.nas import Architecture, SuperLM, save_student
    from pykd.nas.evaluate import load_teacher_and_space

    if not output.exists():
        teacher, space, tokenizer = load_teacher_and_space(supernet_config(root, scale, "k3"))
        save_student(SuperLM.from_teacher(teacher, space).export(Architecture.parse(arch_text)), tokenizer, output)
    return {"dir": str(output), "arch": arch_text, "outputs": [relative(root, output)]}


def pretrain(root: Path, scale: dict, arch_text: str, steps: int, output: Path) -> dict:
    from pykd.distill import config as run_config
    from pykd.distill.trainer import Trainer

    history = Trainer(run_config.from_dict(standalone_values(root, scale, arch_text, steps, output)),
                      "distill").train()
    losses = [r["loss"] for r in history if "loss" in r]
    return {"dir": str(output / "model"), "arch": arch_text, "steps": steps, "first_loss": losses[0],
            "last_loss": losses[-1], "outputs": [relative(root, output / "model")]}


def finetune(root: Path, scale: dict, dataset: str, model_dir: str, lr: float, seed: int, output: Path) -> dict:
    from pykd.distill import config as run_config
    from pykd.distill.report import final_eval
    from pykd.distill.trainer import Trainer

    values = {"teacher": {"path": model_dir},
              "data": {"dataset": str(root / "data" / f"{dataset}.finetune.jsonl"), "kind": "classification",
                       "max_length": 64},
              "train": {"steps": scale["finetune"], "batch_size": 32, "lr": lr, "warmup_fraction": 0.1,
                        "eval_every": 10 ** 6, "log_every": 50, "checkpoint_every": 10 ** 6, "progress": False,
                        "seed": seed, "output_dir": str(output)}}
    history = Trainer(run_config.from_dict(values), "finetune").train()
    validation = final_eval(history)
    test = test_metrics(root, dataset, output / "model")
    # ~100 fine-tunes of up to 90 MB weights and 270 MB checkpoints: only the log and config are kept.
    for path in [output / "checkpoint.pt", *(output / "model").glob("*.safetensors")]:
        path.unlink(missing_ok=True)
    return {"validation_accuracy": validation["accuracy"], "test_accuracy": test["accuracy"],
            "test_f1": test["f1"], "test_examples": test["examples"]}


def test_metrics(root: Path, dataset: str, model_dir: Path) -> dict:
    import torch

    from pykd.distill import data as data_module
    from pykd.distill.metrics import task_metrics
    from pykd.distill.models import load_pretrained, load_tokenizer

    rows = [json.loads(line) for line in (root / "data" / f"{dataset}.test.jsonl").read_text().splitlines()]
    model, tokenizer = load_pretrained(str(model_dir), "classification").eval(), load_tokenizer(str(model_dir))
    collate = data_module.Collator(tokenizer, 64, "classification")
    logits, labels = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = collate(rows[start:start + 64])
            labels.append(batch.pop("labels"))
            logits.append(model(**batch).logits.float())
    metrics = task_metrics(torch.cat(logits).numpy(), torch.cat(labels).numpy(), "classification")
    return {**metrics, "examples": len(rows)}


@functools.cache
def _ranking_archs(limit: int | None) -> tuple:
    from pykd.distill.models import load_pretrained
    from pykd.nas import SearchSpace

    teacher = load_pretrained("minilm-l6", "unlabeled")
    space = SearchSpace.from_dict(SPACE, teacher.config)
    total = space.teacher_flops(FLOPS_SEQ_LEN)
    low, high = RANKING_BAND
    found = [str(a) for a in space.subspace(RANKING_SUBSPACE).candidates()
             if low <= space.flops(a, FLOPS_SEQ_LEN) / total <= high]
    return tuple(found[:limit])


def ranking_archs(scale: dict) -> list[str]:
    return list(_ranking_archs(scale["ranking_archs"]))


def rank_supernet(root: Path, scale: dict, variant: str, archs: list[str], standalone: dict) -> dict:
    from scipy.stats import kendalltau

    from pykd.nas import Architecture
    from pykd.nas.config import build_space
    from pykd.nas.evaluate import held_out_loss, load_supernet
    from pykd.nas.train import subspace_run_config

    teacher, _, _, cache, spec = held_out(root, scale)
    config = supernet_config(root, scale, variant)
    space = build_space(config.nas, teacher.config)
    subspace = SUPERNETS[variant]["subspaces"][0] if variant == "k1" else RANKING_SUBSPACE
    supernet = load_supernet(subspace_run_config(config, subspace).train.output_dir, teacher, space, config.nas)
    inherited = [held_out_loss(supernet, Architecture.parse(a), cache, spec) for a in archs]
    alone = [standalone[a] for a in archs]
    gaps = [i - s for i, s in zip(inherited, alone)]
    return {"variant": variant, "kendall_tau": float(kendalltau(inherited, alone).statistic),
            "mean_gap": sum(gaps) / len(gaps), "mean_abs_gap": sum(abs(g) for g in gaps) / len(gaps),
            "rows": [{"arch": a, "inherited": i, "standalone": s} for a, i, s in zip(archs, inherited, alone)]}


def standalone_losses(root: Path, scale: dict, archs: list[str], results: dict) -> dict:
    from pykd.distill.models import load_pretrained
    from pykd.nas.evaluate import model_loss

    _, _, _, cache, spec = held_out(root, scale)
    losses = {a: model_loss(load_pretrained(results[f"rank-pretrain-{slug(a)}"]["dir"], "unlabeled"), cache, spec)
              for a in archs}
    return {"losses": losses}


# ---- the plan ----

def arms(results: dict, scale: dict) -> dict:
    """{arm key: (budget or None, arch text or None, job that produces its model)} known so far."""
    found = {"teacher": (None, "layers=6,hidden=384,ffn_ratio=4,heads=12", None)}
    for budget in scale["budgets"]:
        tag = f"{int(budget * 100)}"
        for name, arch in HAND[budget].items():
            found[f"hand-{name}-{tag}"] = (budget, arch, f"pretrain-{slug(arch)}")
        if "search" in results:
            arch = results["search"]["picks"][str(budget)]["arch"]
            found[f"searched-{tag}"] = (budget, arch, f"export-searched-{tag}")
            found[f"searched-cut-{tag}"] = (budget, arch, f"export-cut-{tag}")
            found[f"searched-kd-{tag}"] = (budget, arch, f"pretrain-{slug(arch)}")
    return found


def model_dir_of(results: dict, job: str | None) -> str:
    return "minilm-l6" if job is None else results[job]["dir"]


def chosen_lr(results: dict, dataset: str, arm: str) -> float:
    scores = [(results[f"ft-{dataset}-{arm}-lr{lr:g}-s0"]["validation_accuracy"], -lr) for lr in LEARNING_RATES]
    return -max(scores)[1]


def plan(root: Path, scale: dict):
    def jobs(results: dict) -> list[Job]:
        listed = [Job("data", lambda: prepare_data(root, scale), priority=0)]
        need = ["data"]
        for variant, spec in SUPERNETS.items():
            for subspace in spec["subspaces"]:
                listed.append(Job(f"supernet-{variant}-{subspace}",
                                  lambda v=variant, s=subspace: train_supernet(root, scale, v, s), need,
                                  priority=1 if variant == "k3" else 5))
        k3 = [f"supernet-k3-{s}" for s in SUPERNETS["k3"]["subspaces"]]
        listed.append(Job("search", lambda: search(root, scale), k3, priority=2))
        pretrained = set()

        def add_pretrain(arch: str, priority: int):
            if arch not in pretrained:
                pretrained.add(arch)
                listed.append(Job(f"pretrain-{slug(arch)}", lambda a=arch: pretrain(
                    root, scale, a, scale["standalone"], root / "standalone" / slug(a)), need, priority=priority))

        for budget in scale["budgets"]:
            for arch in HAND[budget].values():
                add_pretrain(arch, 4)
        if "search" in results:
            for budget in scale["budgets"]:
                tag, arch = f"{int(budget * 100)}", results["search"]["picks"][str(budget)]["arch"]
                listed.append(Job(f"export-searched-{tag}", lambda a=arch, t=tag: export_searched(
                    root, scale, a, root / "exports" / f"searched-{t}"), ["search"], priority=2))
                listed.append(Job(f"export-cut-{tag}", lambda a=arch, t=tag: export_cut(
                    root, scale, a, root / "exports" / f"cut-{t}"), ["search"], priority=2))
                add_pretrain(arch, 2)
        for arm, (_, _, producer) in arms(results, scale).items():
            needs = need + ([producer] if producer else [])
            for dataset in scale["datasets"]:
                for lr in LEARNING_RATES:
                    name = f"ft-{dataset}-{arm}-lr{lr:g}-s0"
                    listed.append(Job(name, lambda d=dataset, p=producer, r=lr, n=name: finetune(
                        root, scale, d, model_dir_of(results, p), r, 0, root / "finetune" / n), needs, priority=3))
                firsts = [f"ft-{dataset}-{arm}-lr{lr:g}-s0" for lr in LEARNING_RATES]
                if all(f in results for f in firsts):
                    lr = chosen_lr(results, dataset, arm)
                    for seed in SEEDS[1:]:
                        name = f"ft-{dataset}-{arm}-lr{lr:g}-s{seed}"
                        listed.append(Job(name, lambda d=dataset, p=producer, r=lr, s=seed, n=name: finetune(
                            root, scale, d, model_dir_of(results, p), r, s, root / "finetune" / n), firsts,
                            priority=3))
        archs = ranking_archs(scale)
        rank_pretrains = []
        for arch in archs:
            name = f"rank-pretrain-{slug(arch)}"
            rank_pretrains.append(name)
            listed.append(Job(name, lambda a=arch: pretrain(root, scale, a, scale["ranking"],
                                                            root / "ranking" / slug(a)), need, priority=6))
        listed.append(Job("rank-standalone", lambda: standalone_losses(root, scale, archs, results), rank_pretrains,
                          priority=7))
        for variant in SUPERNETS:
            subspace = "all" if variant == "k1" else RANKING_SUBSPACE
            listed.append(Job(f"rank-{variant}", lambda v=variant: rank_supernet(
                root, scale, v, archs, results["rank-standalone"]["losses"]),
                ["rank-standalone", f"supernet-{variant}-{subspace}"], priority=7))
        return listed

    return jobs


# ---- summary ----

def summarise(root: Path, scale_name: str, results: dict, wall: float | None) -> dict:
    """The study's rows and summary figures; Markdown and a plot beside the JSON."""
    scale = SCALES[scale_name]
    rows = []
    for name, result in results.items():
        if not name.startswith("ft-"):
            continue
        _, rest = name.split("-", 1)
        dataset = next(d for d in DATASETS if rest.startswith(d + "-"))
        arm, lr_part, seed_part = rest[len(dataset) + 1:].rsplit("-", 2)
        budget, arch, _ = arms(results, scale).get(arm, (None, None, None))
        rows.append({"study": "nas", "dataset": dataset, "budget": budget, "model": arch, "kind": arm,
                     "lr": float(lr_part[2:]), "seed": int(seed_part[1:]), "metric": "accuracy",
                     "validation": result["validation_accuracy"], "value": result["test_accuracy"],
                     "steps": SCALES[scale_name]["finetune"]})
    summary = []
    for dataset in scale["datasets"]:
        for arm in arms(results, scale):
            firsts = [f"ft-{dataset}-{arm}-lr{lr:g}-s0" for lr in LEARNING_RATES]
            if not all(f in results for f in firsts):
                continue
            lr = chosen_lr(results, dataset, arm)
            values = [r["value"] for r in rows if r["dataset"] == dataset and r["kind"] == arm and r["lr"] == lr]
            mean, se = mean_and_se(values)
            budget, arch, _ = arms(results, scale)[arm]
            summary.append({"dataset": dataset, "budget": budget, "arm": arm, "arch": arch, "lr": lr,
                            "seeds": len(values), "mean": mean, "se": se})
    ranking = [results[f"rank-{v}"] for v in SUPERNETS if f"rank-{v}" in results]
    out = {"scale": scale_name, "steps": SCALES[scale_name], "rows": rows, "summary": summary,
           "search": dict(results.get("search", {}).get("picks", {})),
           "ranking": [{k: v for k, v in r.items() if k != "rows"} for r in ranking],
           "ranking_rows": [{"variant": r["variant"], **row} for r in ranking for row in r["rows"]],
           "compute_s": sum(r.get("seconds", 0.0) for r in results.values()), "wall_s": wall}
    return out


def write_outputs(summary: dict, markdown_path: Path, plot_path: Path, evidence_path: Path, command: str) -> None:
    evidence = json.loads(evidence_path.read_text()) if evidence_path.exists() else {}
    evidence["nas"] = summary
    evidence_path.write_text(json.dumps(evidence, indent=1, default=str))
    lines = ["# Evidence: AutoDistil and Mixture-of-Supernets (studies 1-2)", "",
             f"Command: `{command}`. Compute so far: {summary['compute_s'] / 3600:.1f} core-hours "
             f"(jobs' own wall times on one thread each).", "",
             "## Study 1: searched student vs hand design", "",
             "Test accuracy (mean +- standard error over seeds) after identical fine-tuning; lr chosen on "
             "validation with seed 0.", "",
             "| dataset | budget | arm | architecture | lr | seeds | accuracy |", "|---|---|---|---|---|---|---|"]
    for row in summary["summary"]:
        budget = "-" if row["budget"] is None else f"{row['budget']:.0%}"
        lines.append(f"| {row['dataset']} | {budget} | {row['arm']} | `{row['arch']}` | {row['lr']:g} | "
                     f"{row['seeds']} | {row['mean']:.4f} +- {row['se']:.4f} |")
    if summary["search"]:
        lines += ["", "Search picks (held-out relation loss; band = candidates with FLOPs in [0.85 B, B]):", ""]
        for budget, pick in summary["search"].items():
            lines.append(f"- B = {float(budget):.0%}: `{pick['arch']}` ({pick['flops_fraction']:.3f} of the teacher's "
                         f"FLOPs, loss {pick['loss']:.5f}) among {len(pick['band'])} band candidates; without the "
                         f"band the search takes `{pick['unbanded']}` ({pick['unbanded_flops_fraction']:.3f}).")
    lines += ["", "## Study 2: ranking quality", "",
              "| supernet | Kendall tau | mean gap (inherited - standalone) | mean abs gap |", "|---|---|---|---|"]
    for row in summary["ranking"]:
        lines.append(f"| {row['variant']} | {row['kendall_tau']:.3f} | {row['mean_gap']:.5f} | "
                     f"{row['mean_abs_gap']:.5f} |")
    markdown_path.write_text("\n".join(lines) + "\n")
    plot(summary, plot_path)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pykd.distill.models import load_pretrained
    from pykd.nas import Architecture, SearchSpace

    if not summary["summary"]:
        return
    space = SearchSpace.from_dict(SPACE, load_pretrained("minilm-l6", "unlabeled").config)
    total = space.teacher_flops(FLOPS_SEQ_LEN)
    datasets = sorted({r["dataset"] for r in summary["summary"]})
    figure, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for row in (r for r in summary["summary"] if r["dataset"] == dataset):
            fraction = space.flops(Architecture.parse(row["arch"]), FLOPS_SEQ_LEN) / total
            family = row["arm"].rsplit("-", 1)[0] if row["budget"] is not None else "teacher"
            axis.errorbar([fraction], [row["mean"]], yerr=[0 if math.isnan(row["se"]) else row["se"]], fmt="o",
                          label=family, capsize=3)
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        axis.legend(unique.values(), unique.keys(), fontsize=7)
        axis.set_xlabel("FLOPs / teacher's (128 tokens)")
        axis.set_ylabel("test accuracy")
        axis.set_title(dataset)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="where runs and job results go (default runs/evidence-nas, "
                                                     "runs/evidence-nas-smoke for --scale smoke)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--workers", type=int, default=2, help="parallel single-thread workers")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    root = Path(args.root or f"runs/evidence-nas{'' if args.scale == 'full' else '-' + args.scale}").resolve()
    scale = SCALES[args.scale]
    archive = ARCHIVE if args.scale == "full" else None
    try:
        started = claim_settings([root] + ([archive] if archive else []), {"scale": args.scale, "steps": scale},
                                 time.time())
    except ValueError as error:
        parser.error(str(error))
    study = Study(root, plan(root, scale), archive)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        study.work()
        return 0
    if not args.summarise_only:
        code = run_workers([str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])],
                           args.workers, root)
        if code:
            return code
    ready, waiting = study.pending()
    wall = None if ready or waiting else time.time() - started
    summary = summarise(root, args.scale, study.results(), wall)
    suffix = "" if args.scale == "full" else f"_{args.scale}"
    command = "python tools/evidence_nas.py" + ("" if args.scale == "full" else f" --scale {args.scale}")
    out_dir = RESULTS if args.scale == "full" else root
    write_outputs(summary, out_dir / f"evidence_nas{suffix}.md", out_dir / f"evidence_nas{suffix}.png",
                  out_dir / f"evidence{suffix}.json", command)
    print((out_dir / f"evidence_nas{suffix}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
