"""Small-scale evidence for the NAS loop (issues 8 and 9), reproducible with one command:

    .venv/bin/python tools/nas_evidence.py [--steps 40] [--output runs/nas-evidence]

On the packaged MiniLM-L6 teacher and pydocs text (batch 16, 64 tokens, QQ+KK+VV relations with
mse_prob and 8 relation heads, which divide every hidden size of the MiniLM spaces, so the
standalone students use the KD engine's relation term unchanged):

1. Few-shot vs one-shot (AutoDistil Table 6): K=3 SuperLMs of `steps` steps each against one K=1
   SuperLM of 3 x `steps` steps (same total), held-out relation loss of the smallest, middle and
   largest sub-network of each of the three sub-spaces.
2. Ranking quality: 8 sub-networks of the "small" sub-space (spread over its FLOPs), each distilled
   on its own for `steps` steps (pykd distill: cut from the teacher, relation loss only, same data
   order); Kendall tau between the supernet's held-out-loss ranking and the standalone ranking.
3. Mixture-of-Supernets (issue 9): the "small" sub-space's SuperLM with plain sharing (E=1, the
   K=3 one above), layer-wise MoS (E=2) and neuron-wise MoS (E=2), same steps and data: inherited
   loss, standalone loss, gap and Kendall tau per supernet.
4. Search: evolution and NSGA-II against exhaustive enumeration on the "small" sub-space under 10%
   of the teacher's FLOPs, with the E=1 SuperLM's held-out loss as fitness: the best found, its
   rank among all feasible candidates, and the evaluations it took to first score it (3 seeds).

Writes bench/results/nas_evidence.{json,md} and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STANDALONE = 8


def base_values(output: Path, steps: int) -> dict:
    return {"teacher": {"path": "minilm-l6"},
            "data": {"dataset": "pydocs", "kind": "unlabeled", "max_length": 64, "max_eval_examples": 64},
            "losses": {"prediction": {"type": "none"}},
            "train": {"steps": steps, "batch_size": 16, "lr": 3e-4, "eval_every": 10**6, "log_every": 10,
                      "checkpoint_every": 10**6, "progress": False, "seed": 0,
                      "output_dir": str(output / "unused")},
            "nas": {"k": 3, "relation_heads": 8, "relation_loss": "mse_prob", "eval_batches": 4,
                    "output": str(output / "k3")}}


def _config(values: dict, **nas):
    from pykd.distill import config as run_config

    copied = json.loads(json.dumps(values))
    copied["nas"].update(nas)
    return run_config.from_dict(copied)


def _trained(config, subspace_name: str):
    """Trains (or reuses) the SuperLM of one sub-space; returns it loaded."""
    from pykd.nas.evaluate import load_supernet, load_teacher_and_space
    from pykd.nas.train import SuperLMTrainer, subspace_run_config

    teacher, space, _ = load_teacher_and_space(config)
    run = subspace_run_config(config, subspace_name)
    if not (Path(run.train.output_dir) / "model").exists():
        started = time.perf_counter()
        index = [s.name for s in space.subspaces].index(subspace_name)
        SuperLMTrainer(run, index).train()
        print(f"  trained {run.train.output_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    return load_supernet(run.train.output_dir, teacher, space, config.nas)


def _standalone(values: dict, arch, output: Path) -> str:
    """`arch` cut from the teacher and distilled on its own (relation loss only) for train.steps steps."""
    from pykd.distill import config as run_config
    from pykd.distill.trainer import Trainer

    directory = output / "standalone" / str(arch).replace(",", "_").replace("=", "")
    if not (directory / "model").exists():
        copied = json.loads(json.dumps(values))
        copied.pop("nas")
        copied["student"] = {"init": "teacher", "num_hidden_layers": arch.layers, "hidden_size": arch.hidden,
                             "num_attention_heads": arch.heads, "intermediate_size": arch.intermediate}
        copied["losses"] = {"prediction": {"type": "none"}, "hidden": {"type": "none"},
                            "relation": {"relations": ["qq", "kk", "vv"], "loss": "mse_prob",
                                         "relation_heads": values["nas"]["relation_heads"], "mapping": "last"}}
        copied["train"]["output_dir"] = str(directory)
        Trainer(run_config.from_dict(copied), "distill").train()
    return str(directory / "model")


def _spread(candidates: list, count: int, flops) -> list:
    ordered = sorted(candidates, key=flops)
    return [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]


def few_shot_vs_one_shot(values, output, steps, cache, spec) -> list[dict]:
    from pykd.nas.evaluate import held_out_loss

    k3 = _config(values, k=3, output=str(output / "k3"))
    k1 = _config(json.loads(json.dumps({**values, "train": {**values["train"], "steps": 3 * steps}})), k=1,
                 output=str(output / "k1"))
    one_shot = _trained(k1, "all")
    rows = []
    for subspace in _space(k3).subspaces:
        few_shot = _trained(k3, subspace.name)
        candidates = subspace.candidates()
        for label, arch in (("smallest", subspace.smallest()), ("middle", candidates[len(candidates) // 2]),
                            ("largest", subspace.largest())):
            rows.append({"subspace": subspace.name, "which": label, "arch": str(arch),
                         "k3_loss": held_out_loss(few_shot, arch, cache, spec),
                         "k1_loss": held_out_loss(one_shot, arch, cache, spec)})
    return rows


def _space(config):
    from pykd.nas.evaluate import load_teacher_and_space

    return load_teacher_and_space(config)[1]


def ranking_and_mos(values, output, steps, cache, spec) -> tuple[list[dict], list[dict]]:
    from scipy.stats import kendalltau

    from pykd.distill.models import load_pretrained
    from pykd.nas.evaluate import held_out_loss, model_loss

    space = _space(_config(values))
    small = space.subspace("small")
    archs = _spread(small.candidates(), STANDALONE, lambda a: space.flops(a, 64))
    standalone = [model_loss(load_pretrained(_standalone(values, a, output), "unlabeled"), cache, spec)
                  for a in archs]
    supernets = {"E=1 (plain sharing)": _config(values, output=str(output / "k3")),
                 "E=2 layer-wise MoS": _config(values, experts=2, routing="layer", output=str(output / "mos-layer")),
                 "E=2 neuron-wise MoS": _config(values, experts=2, routing="neuron",
                                                output=str(output / "mos-neuron"))}
    per_arch, summary = [], []
    for name, config in supernets.items():
        supernet = _trained(config, "small")
        inherited = [held_out_loss(supernet, a, cache, spec) for a in archs]
        tau = kendalltau(inherited, standalone).statistic
        gaps = [i - s for i, s in zip(inherited, standalone)]
        summary.append({"supernet": name, "kendall_tau": tau, "mean_inherited": statistics.mean(inherited),
                        "mean_standalone": statistics.mean(standalone), "mean_gap": statistics.mean(gaps),
                        "mean_abs_gap": statistics.mean(abs(g) for g in gaps)})
        for arch, i, s in zip(archs, inherited, standalone):
            per_arch.append({"supernet": name, "arch": str(arch), "inherited": i, "standalone": s, "gap": i - s})
    return per_arch, summary


def search_methods(values, output, cache, spec) -> list[dict]:
    from pykd.nas import SearchSpace
    from pykd.nas import config as nas_config
    from pykd.nas.algorithms import enumerate_search, evolution_search, nsga2_search
    from pykd.nas.evaluate import Evaluator, resolve_budget

    config = _config(values, output=str(output / "k3"))
    full = _space(config)
    space = SearchSpace([full.subspace("small")], full.teacher)
    supernet = _trained(config, "small")
    budget = resolve_budget(nas_config.NasBudget(flops=0.1), {"params": space.teacher_params(),
                                                               "flops": space.teacher_flops(64), "latency": None})

    def evaluator():
        return Evaluator(space, {"small": supernet}, cache, spec, budget, 64, config.nas.latency,
                         supernet.config.vocab_size)

    everything = [r for r in enumerate_search(evaluator()) if r["feasible"]]
    ranking = [r["arch"] for r in sorted(everything, key=lambda r: r["loss"])]
    rows = [{"method": "enumerate", "seed": "-", "evaluations": len(everything), "best": ranking[0],
             "best_loss": min(r["loss"] for r in everything), "rank_of_found": 1,
             "evaluations_to_found": len(everything)}]
    evolution = nas_config.NasEvolution(population=16, parents=4, mutations=6, crossovers=6, mutation_prob=0.3,
                                        generations=8)
    nsga2 = nas_config.NasNsga2(trials=96, population=8, objective="flops")
    for seed in (0, 1, 2):
        for method in ("evolution", "nsga2"):
            scorer = evaluator()
            if method == "evolution":
                found = evolution_search(scorer, evolution, random.Random(seed))
            else:
                found = nsga2_search(scorer, nsga2, seed)
            best = min((r for r in found if r["feasible"]), key=lambda r: r["loss"])
            order = list(scorer.results)
            rows.append({"method": method, "seed": seed, "evaluations": scorer.evaluations, "best": best["arch"],
                         "best_loss": best["loss"], "rank_of_found": ranking.index(best["arch"]) + 1,
                         "evaluations_to_found": order.index(best["arch"]) + 1})
    return rows


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    def cell(value):
        return f"{value:.5g}" if isinstance(value, float) else str(value)

    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per SuperLM / standalone student")
    parser.add_argument("--output", default="runs/nas-evidence")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from pykd.nas.evaluate import TeacherCache, held_out_batches, load_teacher_and_space
    from pykd.distill.losses import RelationTerms

    output = Path(args.output)
    values = base_values(output, args.steps)
    started = time.perf_counter()
    teacher, _, tokenizer = load_teacher_and_space(_config(values))
    cache = TeacherCache(teacher, held_out_batches(_config(values), tokenizer))
    spec = RelationTerms(("qq", "kk", "vv"), 8, "mse_prob")
    print("[evidence] 1/4 K=3 vs K=1", flush=True)
    shots = few_shot_vs_one_shot(values, output, args.steps, cache, spec)
    print("[evidence] 2-3/4 standalone students, ranking, MoS", flush=True)
    per_arch, mos = ranking_and_mos(values, output, args.steps, cache, spec)
    print("[evidence] 4/4 evolution and NSGA-II against enumeration", flush=True)
    searches = search_methods(values, output, cache, spec)
    minutes = (time.perf_counter() - started) / 60
    lines = [f"NAS evidence: `.venv/bin/python tools/nas_evidence.py --steps {args.steps}` ({minutes:.1f} min). "
             f"MiniLM-L6 teacher, pydocs, batch 16 x 64 tokens, {args.steps} steps per SuperLM (K=1: "
             f"{3 * args.steps}), held-out relation loss (QQ+KK+VV, mse_prob, 8 relation heads) on "
             f"{len(cache.batches)} held-out batches.", "", "K=3 (few-shot) vs K=1 (one-shot), same total steps:", ""]
    lines += _table(shots, ["subspace", "which", "arch", "k3_loss", "k1_loss"])
    lines += ["", f"Supernets vs {STANDALONE} standalone students of the 'small' sub-space ({args.steps} steps each):",
              ""]
    lines += _table(mos, ["supernet", "kendall_tau", "mean_inherited", "mean_standalone", "mean_gap", "mean_abs_gap"])
    lines += ["", "Per sub-network:", ""] + _table(per_arch, ["supernet", "arch", "inherited", "standalone", "gap"])
    lines += ["", "Search on the 'small' sub-space under 10% of the teacher's FLOPs (fitness: E=1 SuperLM loss):", ""]
    lines += _table(searches, ["method", "seed", "evaluations", "best", "best_loss", "rank_of_found",
                               "evaluations_to_found"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nas_evidence.json").write_text(json.dumps({"steps": args.steps, "few_shot": shots, "mos": mos,
                                                            "per_arch": per_arch, "search": searches}, indent=1))
    (RESULTS / "nas_evidence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
