"""`pykd nas demo`: AutoDistil end to end on the packaged MiniLM-L6 teacher, with a Markdown report.

1. K = 3 SuperLMs (tiny, small, base sub-spaces scaled to MiniLM-L6) trained briefly on pydocs
   with the sandwich rule and the teacher's self-attention relations;
2. enumerate every candidate, score it by held-out relation loss, pick the best under 50% of the
   teacher's FLOPs (Pareto plot);
3. export that student as a plain transformers model;
4. fine-tune on rotten_tomatoes: the teacher, the NAS student, and a student of the same shape cut
   from the teacher without SuperLM training (the untrained SuperLM's export, i.e. bottom-left
   slices of the teacher as pykd.distill.models.sliced_state takes them);
5. report params, FLOPs, measured CPU latency and accuracy of the three.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..distill import config as run_config
from ..distill.report import count_parameters, cpu_latency_ms, final_eval, read_log

DEMO_TRAIN = ["data.dataset=pydocs", "data.kind=unlabeled", "losses.prediction.type=none", "data.max_length=64",
              "data.eval_fraction=0.05", "data.max_eval_examples=64", "train.steps=40", "train.batch_size=16",
              "train.lr=3e-4", "train.eval_every=1000", "train.checkpoint_every=1000", "train.log_every=5",
              "nas.k=3", "nas.eval_batches=4", "nas.budget.flops=0.5", "nas.search=enumerate"]
DEMO_FINETUNE = ["data.dataset=rotten_tomatoes", "data.kind=classification", "data.max_length=64",
                 "train.steps=150", "train.batch_size=32", "train.lr=1e-4", "train.eval_every=1000",
                 "train.checkpoint_every=1000", "data.max_eval_examples=1000"]


def _finetune(model_path: str, output: str, overrides: list[str]) -> dict:
    from ..distill.trainer import Trainer

    config = run_config.load(None, DEMO_FINETUNE + [f"teacher.path={model_path}", f"train.output_dir={output}"]
                             + overrides)
    if not (Path(output) / "model").exists():
        Trainer(config, "finetune").train()
    return final_eval(read_log(output))


def _cut_student(config, arch, output: Path) -> str:
    """The same architecture sliced out of the teacher with no SuperLM training."""
    from .evaluate import load_teacher_and_space
    from .superlm import SuperLM, save_student
    from .config import supernet_options

    if not output.exists():
        teacher, space, tokenizer = load_teacher_and_space(config)
        save_student(SuperLM.from_teacher(teacher, space, **supernet_options(config.nas)).export(arch), tokenizer,
                     output)
    return str(output)


def run_demo(output: str, overrides: list[str]) -> str:
    """Runs the chain into `output` (steps already done are reused) and returns the report's path."""
    from .search import export_candidate, print_summary, run_search
    from .architecture import Architecture
    from .train import train_supernets

    root = Path(output)
    nas_overrides = DEMO_TRAIN + [f"nas.output={root / 'nas'}"] + overrides
    config = run_config.load(None, nas_overrides)
    print("[nas demo] 1/5 training K=3 SuperLMs on pydocs", flush=True)
    train_supernets(config)
    print("[nas demo] 2/5 scoring every candidate on held-out text", flush=True)
    summary = run_search(config)
    print_summary(summary)
    arch = Architecture.parse(summary["best"]["arch"])
    student_dir = root / "student"
    print(f"[nas demo] 3/5 exporting {arch} to {student_dir}", flush=True)
    if not student_dir.exists():
        export_candidate(config, str(arch), student_dir)
    cut_dir = _cut_student(config, arch, root / "cut_student")
    print("[nas demo] 4/5 fine-tuning teacher, NAS student and cut student on rotten_tomatoes", flush=True)
    finetune_overrides = [o for o in overrides if not o.startswith("nas.")]
    runs = {"teacher (MiniLM-L6)": (config.teacher.path, str(root / "finetune-teacher")),
            "NAS student": (str(student_dir), str(root / "finetune-student")),
            "cut student (no SuperLM training)": (cut_dir, str(root / "finetune-cut"))}
    results = {name: _finetune(path, run_dir, finetune_overrides) for name, (path, run_dir) in runs.items()}
    print("[nas demo] 5/5 measuring and writing the report", flush=True)
    finetune_steps = run_config.load(None, DEMO_FINETUNE + finetune_overrides).train.steps
    path = write_report(root, config, summary, arch, runs, results, finetune_steps)
    print(f"[nas demo] report: {path}", flush=True)
    return path


EVIDENCE_SANDWICH_STEPS = 2000  # what issue 15's study trains each SuperLM for (tools/evidence_nas.py)


def student_vs_cut(nas: float, cut: float, eval_examples: int, sandwich_steps: int) -> str:
    """The report's verdict on AutoDistil's claim at the demo's scale: does the NAS student beat the same
    shape cut from the teacher? A difference within two standard errors of two accuracies on the eval
    set (binomial, at most `eval_examples` rows each) is called a tie, with the likely reason."""
    se = math.sqrt((nas * (1 - nas) + cut * (1 - cut)) / eval_examples)
    gap = nas - cut
    head = (f"**NAS student vs the cut student of its shape:** {nas:.4f} vs {cut:.4f} ({gap:+.4f}; standard error "
            f"of the difference {se:.4f}, binomial on <= {eval_examples} eval examples each).")
    if gap > 2 * se:
        return head + " The SuperLM's weights beat the cut beyond two standard errors."
    why = (f" The SuperLM trained {sandwich_steps} sandwich steps per sub-space. It starts as the teacher, whose "
           "slices are the cut student, so after a short training its export starts fine-tuning from close to "
           f"the cut's weights. The evidence study trains {EVIDENCE_SANDWICH_STEPS} steps per sub-space "
           "(`python tools/evidence_nas.py`, README \"Evidence\").")
    if gap < -2 * se:
        return head + " The cut student is better beyond two standard errors." + why
    return head + " Within two standard errors: a tie at this scale." + why


def write_report(root: Path, config, summary: dict, arch, runs: dict, results: dict, finetune_steps: int) -> str:
    from ..distill.models import load_pretrained, load_tokenizer
    from .evaluate import load_teacher_and_space

    _, space, _ = load_teacher_and_space(config)
    teacher_arch = space.teacher_architecture()
    seq_len = config.nas.seq_len
    tokenizer = load_tokenizer(config.teacher.path)
    texts = ["a gripping, beautifully acted film that never lets go of its audience"] * 32
    batch = dict(tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt"))
    rows = []
    for name, (_, run_dir) in runs.items():
        model = load_pretrained(f"{run_dir}/model", "classification")
        shape = teacher_arch if name.startswith("teacher") else arch
        rows.append({"model": name, "arch": str(shape), "params": count_parameters(model),
                     "flops": space.flops(shape, seq_len), "latency": cpu_latency_ms(model, batch),
                     "accuracy": results[name]["accuracy"]})
    search_dir = Path(config.nas.output) / "search"
    lines = ["# pykd NAS demo report (AutoDistil on MiniLM-L6)", "",
             f"SuperLMs: K={len(space.subspaces)} sub-spaces ({', '.join(s.name for s in space.subspaces)}), "
             f"{config.train.steps} sandwich steps each (batch {config.train.batch_size}, pydocs, "
             f"{config.nas.relation_loss} on {'+'.join(r.upper() for r in config.nas.relations)} relations).",
             f"Search: {summary['method']}, {summary['evaluations']} candidates scored in {summary['seconds']:.1f} s "
             f"on held-out pydocs; budget {summary['budget']} (50% of the teacher's FLOPs at {seq_len} tokens). "
             f"Best: `{summary['best']['arch']}` (held-out relation loss {summary['best']['loss']:.5f}).",
             f"Fine-tuning: rotten_tomatoes, {finetune_steps} steps each. Latency: median CPU "
             f"forward of a batch of 32 x 64 tokens, {torch.get_num_threads()} threads. Encoder FLOPs per "
             f"{seq_len}-token sequence.", "",
             "| model | architecture | params | GFLOPs | CPU ms / batch | accuracy |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | `{row['arch']}` | {row['params'] / 1e6:.2f} M | {row['flops'] / 1e9:.3f} | "
                     f"{row['latency']:.1f} | {row['accuracy']:.4f} |")
    eval_cap = run_config.load(None, DEMO_FINETUNE).data.max_eval_examples
    nas, cut = (results[name]["accuracy"] for name in ("NAS student", "cut student (no SuperLM training)"))
    lines += ["", student_vs_cut(nas, cut, eval_cap, config.train.steps)]
    lines += ["", f"![Pareto front]({Path('nas/search/pareto.png')})", "",
              f"Every candidate: `{search_dir / 'candidates.csv'}`.", ""]
    (root / "report.json").write_text(json.dumps({"rows": rows, "search": summary}, indent=1, default=str))
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return str(path)
