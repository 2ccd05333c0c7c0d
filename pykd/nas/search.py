r"""`pykd nas search` and `pykd nas export`: a search over trained SuperLMs, its outputs, the task proxy.

`run_search` builds the Evaluator (pykd.nas.evaluate: held-out relation loss through each
sub-space's SuperLM, costs, budget), runs nas.search (pykd.nas.algorithms: enumerate, evolution,
nsga2), picks the best feasible candidate (lowest loss, then fewest FLOPs) and the loss-vs-FLOPs
Pareto front, and writes nas.output/search: candidates.csv / .json, summary.json and pareto.png.

Latency is measured for every candidate only when a latency budget is set or latency is the nsga2
objective; otherwise for the best candidate and the loss-vs-FLOPs Pareto front only (it costs a
model export and several forwards per candidate).

With nas.proxy.top_k, the top candidates are exported and fine-tuned briefly on nas.proxy.dataset
(AutoDistil's task-proxy variant). `export_candidate` writes one sub-network as a stock
transformers model.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from ..distill.config import RunConfig
from .algorithms import pareto_front, raise_no_candidate, search
from .config import supernet_dir
from .evaluate import Evaluator, build_evaluator, load_supernet, load_teacher_and_space
from .space import COSTS


# ---- the command ----

def run_search(config: RunConfig, evaluator: Evaluator | None = None) -> dict:
    """Scores candidates with nas.search, writes CSV/JSON/PNG under nas.output/search, returns the summary."""
    nas = config.nas
    evaluator = evaluator or build_evaluator(config)
    started = time.perf_counter()
    rows = search(evaluator, nas, config.train.seed)
    seconds = time.perf_counter() - started
    feasible = [r for r in rows if r["feasible"]]
    if not feasible:
        raise_no_candidate(evaluator)
    best = min(feasible, key=lambda r: (r["loss"], r["flops"]))
    front = pareto_front(feasible, "flops")
    for row in [best, *front]:
        if row["latency"] is None:
            row["latency"] = evaluator.latency(evaluator.space.parse(row["arch"]))
    for row in rows:
        row["pareto"] = row in front
    summary = {"method": nas.search, "evaluations": evaluator.evaluations, "seconds": seconds,
               "budget": evaluator.budget.describe(), "teacher": evaluator.teacher_costs, "best": best,
               "pareto_flops": [r["arch"] for r in front], "history": evaluator.history}
    if nas.search == "nsga2":
        summary["pareto_" + nas.nsga2.objective] = [r["arch"] for r in pareto_front(feasible, nas.nsga2.objective)]
    if nas.proxy.top_k:
        summary["proxy"] = proxy_search(config, sorted(feasible, key=lambda r: r["loss"])[: nas.proxy.top_k])
    write_results(Path(nas.output) / "search", rows, summary)
    return summary


def proxy_search(config: RunConfig, top: list[dict]) -> dict:
    """AutoDistil's task-proxy variant: export the top candidates, fine-tune each briefly on
    nas.proxy.dataset with the KD engine's finetune path, pick the most accurate; the accuracy-vs-FLOPs
    Pareto front (higher accuracy, fewer FLOPs) is reported too."""
    from ..distill import config as run_config
    from ..distill.report import final_eval, read_log
    from ..distill.trainer import Trainer

    proxy, root = config.nas.proxy, Path(config.nas.output) / "proxy"
    rows = []
    for row in top:
        folder = root / row["arch"].replace(",", "_").replace("=", "").replace("/", "-")
        if not (folder / "student").exists():
            export_candidate(config, row["arch"], folder / "student")
        values = run_config.to_dict(config)
        values["teacher"] = {"path": str(folder / "student"), "finetuned": None}
        values["data"].update(dataset=proxy.dataset, kind="classification")
        values["train"].update(steps=proxy.steps, lr=proxy.lr, output_dir=str(folder / "finetune"))
        values["losses"]["prediction"]["type"] = "soft_ce"
        if not (folder / "finetune" / "model").exists():
            Trainer(run_config.from_dict(values), "finetune").train()
        accuracy = final_eval(read_log(folder / "finetune"))["accuracy"]
        rows.append({**row, "accuracy": accuracy})
    front = [r for r in rows if not any(o["accuracy"] >= r["accuracy"] and o["flops"] <= r["flops"] and
                                        (o["accuracy"] > r["accuracy"] or o["flops"] < r["flops"]) for o in rows)]
    best = max(rows, key=lambda r: (r["accuracy"], -r["flops"]))
    return {"dataset": proxy.dataset, "steps": proxy.steps, "candidates": rows, "best": best,
            "pareto_accuracy_flops": [r["arch"] for r in sorted(front, key=lambda r: r["flops"])]}


def write_results(directory: Path, rows: list[dict], summary: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    columns = ["arch", "subspace", "loss", "params", "flops", "latency", "feasible", "pareto"]
    with open(directory / "candidates.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r["loss"]):
            writer.writerow({k: row.get(k) for k in columns})
    (directory / "candidates.json").write_text(json.dumps(rows, indent=1))
    (directory / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_pareto(rows, summary, directory / "pareto.png")


def plot_pareto(rows: list[dict], summary: dict, path: Path) -> None:
    """Loss against FLOPs, params and latency; the feasible Pareto front joined, the best starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, cost in zip(axes, COSTS):
        measured = [r for r in rows if r.get(cost) is not None]
        feasible = [r for r in measured if r["feasible"]]
        axis.scatter([r[cost] for r in measured if not r["feasible"]],
                     [r["loss"] for r in measured if not r["feasible"]], s=8, c="lightgray", label="over budget")
        axis.scatter([r[cost] for r in feasible], [r["loss"] for r in feasible], s=8, c="tab:blue", label="feasible")
        front = pareto_front(feasible, cost)
        axis.plot([r[cost] for r in front], [r["loss"] for r in front], "-o", c="tab:orange", ms=3, label="Pareto")
        best = summary["best"]
        if best.get(cost) is not None:
            axis.scatter([best[cost]], [best["loss"]], marker="*", s=160, c="tab:red", label="best", zorder=5)
        axis.set_xlabel(cost + (" (ms)" if cost == "latency" else ""))
        axis.set_ylabel("held-out relation loss")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_summary(summary: dict) -> None:
    best = summary["best"]
    latency = f", {best['latency']:.1f} ms" if best.get("latency") is not None else ""
    print(f"[nas search] {summary['method']}: {summary['evaluations']} candidates scored in "
          f"{summary['seconds']:.1f} s; budget {summary['budget']}", flush=True)
    print(f"[nas search] best: {best['arch']} (sub-space {best['subspace']}): loss {best['loss']:.5f}, "
          f"{best['params'] / 1e6:.2f} M params, {best['flops'] / 1e9:.3f} GFLOPs{latency}", flush=True)


# ---- export ----

def export_candidate(config: RunConfig, arch_text: str, output) -> str:
    """Writes the sub-network `arch_text` of its trained SuperLM to the new directory `output`."""
    from .superlm import check_export_path, save_student

    output = check_export_path(output)
    teacher, space, tokenizer = load_teacher_and_space(config)
    arch = space.validate(space.parse(arch_text))
    subspace = space.subspace_of(arch)
    supernet = load_supernet(supernet_dir(config.nas, subspace.name), teacher, space, config.nas)
    save_student(supernet.export(arch), tokenizer, output)
    return str(output)
