r"""`pykd nas search` and `pykd nas export`: a search over trained SuperLMs, its outputs, the task proxy.

`run_search` builds the Evaluator (pykd.nas.evaluate: held-out relation loss through each
sub-space's SuperLM, costs, budget), runs nas.search (pykd.nas.algorithms: enumerate, evolution,
nsga2), picks the best feasible candidate (lowest loss, then fewest FLOPs) and the loss-vs-FLOPs
Pareto front, and writes nas.output/search: candidates.csv / .json, summary.json and pareto.png.

Candidates are journaled as they are scored (`ScoreJournal`, nas.output/search/scored.jsonl, one
whole line per candidate appended with a single write): a search stopped by Ctrl-C or a late error
resumes from it, rescoring nothing, when it is run again with the same configuration and SuperLMs
(a journal of another one is set aside as scored.jsonl.stale). The final files are written whole
(a temporary file renamed into place).

Latency is measured for every candidate only when a latency budget is set or latency is the nsga2
objective; otherwise for the best candidate and the loss-vs-FLOPs Pareto front only (it costs a
model export and several forwards per candidate).

With nas.proxy.top_k, the top candidates are exported and fine-tuned briefly on nas.proxy.dataset
(AutoDistil's task-proxy variant). `export_candidate` writes one sub-network as a stock
transformers model.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from pathlib import Path

from ..distill.callbacks import report_summary
from ..distill.config import RunConfig, to_dict
from ..distill.model_card import write_model_card
from .algorithms import pareto_front, raise_no_candidate, search
from .config import supernet_dir
from .evaluate import Evaluator, build_evaluator, load_supernet, load_teacher_and_space
from .superlm import SUPERNET_FILE
from .space import COSTS


# ---- the command ----

def run_search(config: RunConfig, evaluator: Evaluator | None = None) -> dict:
    """Scores candidates with nas.search, writes CSV/JSON/PNG under nas.output/search, returns the summary."""
    nas = config.nas
    evaluator = evaluator or build_evaluator(config)
    directory = Path(nas.output) / "search"
    journal = ScoreJournal(directory / ScoreJournal.FILE, search_fingerprint(config, evaluator))
    journal.restore(evaluator)
    evaluator.on_score = journal.append
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
    write_results(directory, rows, summary)
    report_summary(config.train.report_to, directory, search_series(rows, front))
    return summary


def search_series(rows: list[dict], front: list[dict]) -> dict:
    """The search as TensorBoard series: each candidate's loss and the best feasible loss so far, in scoring
    order, and the loss-vs-FLOPs Pareto front (step = FLOPs)."""
    best, so_far = float("inf"), []
    for index, row in enumerate(rows):
        if row["feasible"]:
            best = min(best, row["loss"])
        if best < float("inf"):
            so_far.append((index, best))
    pareto = sorted(front, key=lambda r: r["flops"])
    return {"nas/candidate_loss": [(index, row["loss"]) for index, row in enumerate(rows)],
            "nas/best_feasible_loss": so_far,
            "nas/pareto_loss_by_flops": [(int(row["flops"]), row["loss"]) for row in pareto]}


def search_fingerprint(config: RunConfig, evaluator: Evaluator) -> str:
    """What a journaled score depends on: the whole configuration but the task proxy (which runs after the
    search) and the progress display, and the trained SuperLMs' files (their bytes)."""
    values = to_dict(config)
    values["nas"].pop("proxy")
    values["train"].pop("progress")
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode())
    for name in sorted(evaluator.supernets):
        path = supernet_dir(config.nas, name) / "model" / SUPERNET_FILE
        digest.update(name.encode())
        if path.is_file():
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


class ScoreJournal:
    """Scored candidates as JSON lines, appended as they are scored, read back on a rerun.

    The first line holds the fingerprint of what the scores depend on (search_fingerprint). Each line
    goes out in one write() on an O_APPEND descriptor, so an interrupted process leaves whole lines; a
    line torn by a crash of the machine is cut off when the journal is reopened.
    """

    FILE = "scored.jsonl"

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint

    def _entries(self) -> list[dict]:
        """The journal's whole lines if it belongs to this fingerprint; otherwise [] (a foreign one set aside)."""
        if not self.path.is_file():
            return []
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        whole = text[: text.rfind("\n") + 1]
        entries = []
        for line in whole.splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if not entries or entries[0].get("fingerprint") != self.fingerprint:
            os.replace(self.path, self.path.with_name(self.path.name + ".stale"))
            print(f"[nas search] {self.path} was scored with another configuration or other SuperLMs: set aside as "
                  f"{self.path.name}.stale, scoring from scratch", flush=True)
            return []
        if len(whole) != len(text):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(whole.encode("utf-8")))
        return entries[1:]

    def restore(self, evaluator: Evaluator) -> int:
        """Puts the journaled scores into the evaluator (costs and feasibility recomputed); returns how many."""
        entries = self._entries()
        for entry in entries:
            if entry.get("latency") is not None:
                evaluator.latency_cache[entry["arch"]] = entry["latency"]
            arch = evaluator.space.parse(entry["arch"])
            evaluator.results[entry["arch"]] = evaluator.row(arch, entry["subspace"], entry["loss"])
        if entries:
            print(f"[nas search] resuming: {len(entries)} candidates already scored in {self.path}", flush=True)
        else:
            self._write({"fingerprint": self.fingerprint}, mode=os.O_TRUNC)
        return len(entries)

    def append(self, row: dict) -> None:
        self._write({key: row[key] for key in ("arch", "subspace", "loss", "latency")})

    def _write(self, entry: dict, mode: int = 0) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | mode, 0o666)
        try:
            os.write(descriptor, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(descriptor)


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
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["loss"]):
        writer.writerow({k: row.get(k) for k in columns})
    _write_whole(directory / "candidates.csv", table.getvalue())
    _write_whole(directory / "candidates.json", json.dumps(rows, indent=1))
    _write_whole(directory / "summary.json", json.dumps(summary, indent=1))
    plot_pareto(rows, summary, directory / "pareto.png")


def _write_whole(path: Path, text: str) -> None:
    """path holds text, or (after a crash mid-write) what it held before, never a part."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


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

def export_candidate(config: RunConfig, arch_text: str, output, pad_ffn: bool = False) -> str:
    """Writes the sub-network `arch_text` (either form, pykd.nas.architecture) of its trained SuperLM to the new
    directory `output`; pad_ffn as SuperLM.export's (a per-layer architecture's FFN widths zero-padded)."""
    from .architecture import parse_architecture
    from .superlm import check_export_path, save_student

    output = check_export_path(output)
    parse_architecture(arch_text)  # a malformed architecture is refused before anything loads
    teacher, space, tokenizer = load_teacher_and_space(config)
    arch = space.validate(space.parse(arch_text))
    subspace = space.subspace_of(arch)
    supernet = load_supernet(supernet_dir(config.nas, subspace.name), teacher, space, config.nas)
    student = supernet.export(arch, pad_ffn=pad_ffn)

    def card(directory: Path) -> None:
        write_model_card(directory, student, title=output.name, teacher=config.teacher.path, task_kind="unlabeled",
                         sequence_length=config.nas.seq_len,
                         made_by=f"Exported by `pykd nas export --arch {arch}` from the SuperLM of sub-space "
                                 f"{subspace.name!r} (weights shared with the teacher's SuperLM, no further training).",
                         config={"arch": str(arch), "nas": to_dict(config.nas)}, datasets=(config.data.dataset,),
                         metrics=searched_figures(config.nas, str(arch)), teacher_model=teacher)

    save_student(student, tokenizer, output, extra=card)
    return str(output)


def searched_figures(nas, arch: str) -> dict:
    """What `pykd nas search` measured of `arch` (nas.output/search/candidates.json): its held-out relation
    loss and, when measured, latency; {} when the search did not score it."""
    path = Path(nas.output) / "search" / "candidates.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    row = next((r for r in rows if r["arch"] == arch), None)
    if row is None:
        return {}
    figures = {"relation_loss": row["loss"]}
    if row.get("latency") is not None:
        figures["latency_ms"] = row["latency"]
    return figures
