"""AutoDistiller (Distiller, arXiv 2109.11105): rank KD pipelines for a dataset from past runs.

A table of real KD runs (`pykd runs-table`, pykd.distiller.runs_table) holds, per (dataset, pipeline),
the dataset's meta-features, the pipeline and the student/teacher score ratio. pykd ships one
(`packaged_table`: data/kd_runs.csv with its provenance, data/kd_runs.provenance.json), read through
importlib.resources, so an installed pykd recommends from any directory; `--table` takes a user's own.
A regressor learns ratio = f(meta-features, pipeline encoding); for a new dataset it scores every
pipeline of the table and returns the top k, each written as a run config `pykd distill` runs as is.

Meta-features (`meta_features`): log10 training size, classes (1 for regression), label entropy
(normalised to [0, 1]; regression: of a 10-bin histogram), word and token length statistics, the
share of examples cut at data.max_length, the tokenizer's vocabulary coverage (share of word
occurrences kept as one token that is not [UNK]) and its [UNK] share, the fine-tuned teacher's
accuracy, mean confidence (max probability) and mean normalised predictive entropy on a sample of
the eval split (regression: Pearson r, 1 - MAE / label std, and 0), and the student/teacher
parameter ratio.

Pipeline encoding: pykd.distiller.pipeline.encode_config, read off the run config the pipeline
produces (so the default pipeline, hidden MSE and relations together, is encoded like any other).

The regressor is a Gaussian process (sklearn, constant x RBF + white noise on standardised
features, hyper-parameters by marginal likelihood). The tables this machine can afford hold tens
of runs: a GP interpolates smoothly in that regime and its RBF kernel captures the meta-feature x
pipeline interactions the ranking depends on, where gradient boosting on tens of rows makes a few
coarse splits and a linear ridge cannot rank pipelines differently per dataset at all.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.resources
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..distill import config as run_config
from ..loading import bad_file, reading
from .pipeline import encode_config, pipeline_values

META_FEATURES = ("log_train_size", "classes", "label_entropy", "mean_words", "std_words", "mean_tokens",
                 "truncated_fraction", "vocab_coverage", "unk_fraction", "teacher_score", "teacher_confidence",
                 "teacher_entropy", "capacity_ratio")
SAMPLE = 256  # eval examples the teacher predicts for its meta-features
WORD = re.compile(r"[a-z]+|[0-9]+")


# ---- meta-features ----

def _entropy(counts: np.ndarray) -> float:
    """Normalised Shannon entropy of counts (0: one class, 1: uniform)."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(counts))) if len(counts) > 1 else 0.0


def _vocabulary(tokenizer, texts: list[str]) -> tuple[float, float]:
    """(coverage, unk share) over the word occurrences of texts."""
    counts: dict[str, int] = {}
    for text in texts:
        for word in WORD.findall(text.lower()):
            counts[word] = counts.get(word, 0) + 1
    total = sum(counts.values())
    if not total:
        return 0.0, 0.0
    whole = unknown = 0
    for word, count in counts.items():
        pieces = tokenizer.tokenize(word)
        if tokenizer.unk_token in pieces:
            unknown += count
        elif len(pieces) == 1:
            whole += count
    return whole / total, unknown / total


def _teacher_statistics(teacher, collate, rows: list[dict], kind: str) -> tuple[float, float, float]:
    from ..distill.augment import teacher_logits
    from ..distill.data import Collator

    logits = teacher_logits(teacher, Collator(collate.tokenizer, collate.max_length, "unlabeled"), rows, 64,
                            _device())
    labels = np.array([r["label"] for r in rows])
    if kind == "regression":
        predictions = logits[:, 0]
        spread = labels.std() or 1.0
        r = float(np.corrcoef(predictions, labels)[0, 1]) if predictions.std() > 0 else 0.0
        return r, float(1.0 - np.abs(predictions - labels).mean() / spread), 0.0
    shifted = logits - logits.max(-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(-1) / math.log(probs.shape[1])
    return float((probs.argmax(-1) == labels).mean()), float(probs.max(-1).mean()), float(entropy.mean())


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def require_labels(config) -> None:
    """AutoDistiller predicts a task score ratio: the data must be labelled."""
    if config.data.kind == "unlabeled":
        raise ValueError(f"AutoDistiller ranks pipelines by the student/teacher score on a labelled task, but "
                         f"data.kind is 'unlabeled' for data.dataset {config.data.dataset!r}")


def meta_features(config) -> dict:
    """The dataset's meta-features (META_FEATURES) for this teacher (teacher.finetuned) and student."""
    from ..distill import data as data_module
    from ..distill.models import build_student, load_pretrained, load_tokenizer

    require_labels(config)
    if not config.teacher.finetuned:
        raise ValueError("AutoDistiller's meta-features include the fine-tuned teacher's accuracy: set "
                         "teacher.finetuned (a `pykd finetune` output directory)")
    splits = data_module.load_splits(config.data, config.train.seed)
    train, evaluation = splits.train, splits.eval
    tokenizer = load_tokenizer(config.teacher.finetuned)
    texts = list(train["text"][:2000])
    words = np.array([len(t.split()) for t in texts])
    tokens = np.array([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])
    labels = np.array(train["label"][:])
    if config.data.kind == "regression":
        classes, entropy = 1, _entropy(np.histogram(labels, bins=10)[0])
    else:
        classes = len(splits.label_names)
        entropy = _entropy(np.bincount(labels, minlength=classes))
    coverage, unknown = _vocabulary(tokenizer, texts)
    num_labels = 1 if config.data.kind == "regression" else classes
    teacher = load_pretrained(config.teacher.finetuned, config.data.kind, num_labels).to(_device())
    collate = data_module.Collator(tokenizer, config.data.max_length, config.data.kind)
    sample = [evaluation[i] for i in range(min(SAMPLE, len(evaluation)))]
    score, confidence, teacher_entropy = _teacher_statistics(teacher, collate, sample, config.data.kind)
    student = build_student(teacher, config.student)
    return {"log_train_size": math.log10(len(train)), "classes": float(classes), "label_entropy": entropy,
            "mean_words": float(words.mean()), "std_words": float(words.std()), "mean_tokens": float(tokens.mean()),
            "truncated_fraction": float((tokens > config.data.max_length).mean()), "vocab_coverage": coverage,
            "unk_fraction": unknown, "teacher_score": score, "teacher_confidence": confidence,
            "teacher_entropy": teacher_entropy, "capacity_ratio": _parameters(student) / _parameters(teacher)}


# ---- the KD runs table and the ratio model ----

@dataclass
class Run:
    """One row of the KD runs table. `setting` names the run's training size and student when a dataset
    was distilled under several (e.g. "n=500 student=2x192"); it is "" in tables without the column."""
    dataset: str
    pipeline: str
    params: dict
    meta: dict
    ratio: float
    row: dict
    setting: str = ""
    seed: int = 0  # tables with several seeds per (dataset, setting, pipeline) have a seed column


PACKAGED_TABLE = "kd_runs.csv"  # in the package's data/, beside kd_runs.provenance.json


def packaged_table():
    """The KD runs table shipped in the package (an importlib.resources Traversable)."""
    return importlib.resources.files(__package__).joinpath("data", PACKAGED_TABLE)


def packaged_provenance() -> dict:
    """How the packaged table was made: the commands, date, machine, pykd and library versions."""
    return json.loads(importlib.resources.files(__package__).joinpath("data", "kd_runs.provenance.json").read_text())


@contextlib.contextmanager
def table_file(table: str | None):
    """A path to read: `table`, or with None the packaged table (a real file for as long as the block runs)."""
    if table:
        yield table
        return
    with importlib.resources.as_file(packaged_table()) as path:
        yield str(path)


def read_table(path: str | None) -> list[Run]:
    """The runs of the table at `path` (None: the packaged table), those with a finite ratio."""
    if path is None:
        with table_file(None) as packaged:
            return read_table(packaged)
    if not Path(path).is_file():
        raise FileNotFoundError(f"KD runs table {path} does not exist: make one with `pykd runs-table --output "
                                f"{path}` or leave out --table to use the table shipped with pykd")
    runs = []
    way_out = "regenerate it (`python tools/kd_runs_table.py`) or pass another --table"
    # a truncated row's missing cells read as None, a foreign file's as anything: float/json errors name the file
    with reading(path, "KD runs table", way_out), open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            missing = [k for k in ("dataset", "pipeline", "params", "ratio", *META_FEATURES) if k not in row]
            if missing:
                raise bad_file("KD runs table", path, f"lacks the column(s) {missing}", way_out)
            if not math.isfinite(float(row["ratio"])):  # a teacher scoring 0 leaves the ratio undefined
                continue
            runs.append(Run(row["dataset"], row["pipeline"], json.loads(row["params"]),
                            {k: float(row[k]) for k in META_FEATURES}, float(row["ratio"]), row,
                            row.get("setting", ""), int(row.get("seed") or 0)))
    if not runs:
        raise ValueError(f"KD runs table {path} has no rows with a finite ratio")
    return runs


def feature_vector(meta: dict, params: dict, base_values: dict) -> list[float]:
    """The regressors' input: the meta-features, then the pipeline's encoding (encode_config) by name."""
    encoded = encode_config(run_config.from_dict(pipeline_values(base_values, params)))
    return [meta[k] for k in META_FEATURES] + [encoded[k] for k in sorted(encoded)]


class RatioModel:
    """ratio = f(meta-features, pipeline encoding): a Gaussian process on standardised features."""

    def __init__(self, base_values: dict | None = None, seed: int = 0):
        self.base_values = base_values or {}
        self.seed = seed

    def fit(self, runs: list[Run]) -> RatioModel:
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if len(runs) < 2:
            raise ValueError(f"the ratio model needs at least 2 runs to learn from, got {len(runs)}")
        x = np.array([feature_vector(r.meta, r.params, self.base_values) for r in runs])
        y = np.array([r.ratio for r in runs])
        kernel = ConstantKernel(1.0) * RBF(length_scale=math.sqrt(x.shape[1])) + WhiteKernel(1e-2)
        gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=2,
                                      random_state=self.seed)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant features make the scaler and the optimiser warn
            self.model = make_pipeline(StandardScaler(), gp).fit(x, y)
        return self

    def predict(self, meta: dict, candidates: list[dict]) -> np.ndarray:
        x = np.array([feature_vector(meta, params, self.base_values) for params in candidates])
        return self.model.predict(x)


def candidate_pipelines(runs: list[Run]) -> dict[str, dict]:
    """name -> params of every pipeline in the table (the default pipeline has params {})."""
    return {r.pipeline: r.params for r in runs}


def rank(model: RatioModel, meta: dict, candidates: dict[str, dict]) -> list[tuple[str, float]]:
    names = list(candidates)
    scores = model.predict(meta, [candidates[n] for n in names])
    return sorted(zip(names, scores.tolist()), key=lambda item: -item[1])


# ---- recommendation ----

def parse_student(text: str | None) -> dict:
    """layers=L,hidden=H,heads=A,ffn=F -> student section values."""
    if not text:
        return {}
    names = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
             "ffn": "intermediate_size"}
    values = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in names or not value.strip().isdigit():
            raise ValueError(f"--student takes layers=L,hidden=H,heads=A,ffn=F (positive integers), got {text!r}")
        values[names[key.strip()]] = int(value)
    return values


def recommend(base_values: dict, table: str | None, top_k: int, output: str, log=print) -> list[dict]:
    """The top_k pipelines for base_values' dataset, each written as output/rank-K/config.yaml; the ratio
    model learns from the KD runs table `table` (None: the packaged one).

    Returns [{"rank", "pipeline", "predicted_ratio", "params", "config"}], best first.
    """
    config = run_config.from_dict(base_values)
    require_labels(config)
    runs = read_table(table)
    if log:
        made = packaged_provenance()
        source = table or f"the table shipped with pykd {made['pykd']} (made {made['date']})"
        log(f"[recommend] learning from {len(runs)} KD runs on {len({r.dataset for r in runs})} datasets: {source}")
    meta = meta_features(config)
    if log:
        log("[recommend] meta-features: " + ", ".join(f"{k} {v:.3g}" for k, v in meta.items()))
    model = RatioModel(base_values).fit(runs)
    ranked = rank(model, meta, candidate_pipelines(runs))[:top_k]
    results = []
    for position, (name, predicted) in enumerate(ranked, 1):
        params = candidate_pipelines(runs)[name]
        directory = Path(output) / f"rank-{position}"
        values = pipeline_values(base_values, params)
        values.setdefault("train", {})["output_dir"] = str(directory / "run")
        path = run_config.write_run_config(values, directory)
        results.append({"rank": position, "pipeline": name, "predicted_ratio": predicted, "params": params,
                        "config": str(path)})
    return results


def recommend_cli(config_path, overrides, dataset, student, top_k, table, output) -> list[dict]:
    values = run_config.load_values(config_path, list(overrides) + [f"data.dataset={json.dumps(dataset)}"])
    for key, value in parse_student(student).items():
        values.setdefault("student", {})[key] = value
    if "kind" not in values.get("data", {}):
        from ..distill.corpora import CORPORA

        values["data"]["kind"] = CORPORA[dataset].kind if dataset in CORPORA else "classification"
    return recommend(values, table, top_k, output)


def print_recommendations(results: list[dict]) -> None:
    for item in results:
        print(f"[recommend] {item['rank']}. {item['pipeline']}: predicted student/teacher ratio "
              f"{item['predicted_ratio']:.4f} {json.dumps(item['params'])}")
        print(f"[recommend]    pykd distill {item['config']}")


# ---- leave one dataset out ----

def leave_one_dataset_out(runs: list[Run], base_values: dict | None = None, default: str = "default") -> list[dict]:
    """For each dataset: the model trained on the other datasets' runs (all their settings) picks, for each
    setting of the held-out dataset, a pipeline among those run there; its real ratio against the default
    pipeline's and the best one's (regret = best - picked)."""
    datasets = sorted({r.dataset for r in runs})
    if len(datasets) < 2:
        raise ValueError(f"leave-one-dataset-out needs runs on at least 2 datasets, the table has {datasets}")
    rows = []
    for held_out in datasets:
        train = [r for r in runs if r.dataset != held_out]
        model = RatioModel(base_values).fit(train)
        for setting in sorted({r.setting for r in runs if r.dataset == held_out}):
            test = {r.pipeline: r for r in runs if r.dataset == held_out and r.setting == setting}
            rows.append(_held_out_row(model, train, held_out, setting, test, default))
    return rows


def best_on_average(train: list[Run], candidates) -> str:
    """The baseline without meta-features: the candidate with the highest mean ratio over the training runs
    (a candidate never run there ranks last)."""
    def mean_ratio(name):
        ratios = [r.ratio for r in train if r.pipeline == name]
        return sum(ratios) / len(ratios) if ratios else float("-inf")

    return max(sorted(candidates), key=mean_ratio)


def _held_out_row(model: RatioModel, train: list[Run], dataset: str, setting: str, test: dict[str, Run],
                  default: str) -> dict:
    meta = next(iter(test.values())).meta
    picked, predicted = rank(model, meta, {name: r.params for name, r in test.items()})[0]
    fixed = best_on_average(train, test)
    best = max(test.values(), key=lambda r: r.ratio)
    default_ratio = test[default].ratio if default in test else float("nan")
    return {"dataset": dataset, "setting": setting, "picked": picked, "predicted": predicted,
            "picked_ratio": test[picked].ratio, "default_ratio": default_ratio, "best": best.pipeline,
            "best_ratio": best.ratio, "regret": best.ratio - test[picked].ratio,
            "default_regret": best.ratio - default_ratio, "fixed": fixed,
            "fixed_regret": best.ratio - test[fixed].ratio}


def regret_markdown(rows: list[dict]) -> str:
    """One line per held-out (dataset, setting); means over the lines with a value (nan where a setting
    lacks the default pipeline)."""
    lines = ["| held-out dataset | setting | recommended | its ratio | default ratio | best pipeline | best ratio "
             "| regret | default's regret | best on average elsewhere | its regret |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['setting']} | {r['picked']} | {r['picked_ratio']:.4f} | "
                     f"{r['default_ratio']:.4f} | {r['best']} | {r['best_ratio']:.4f} | {r['regret']:.4f} | "
                     f"{r['default_regret']:.4f} | {r['fixed']} | {r['fixed_regret']:.4f} |")

    def mean(key: str) -> float:
        return float(np.nanmean([r[key] for r in rows]))

    lines.append(f"| mean | | | {mean('picked_ratio'):.4f} | {mean('default_ratio'):.4f} | | {mean('best_ratio'):.4f} "
                 f"| {mean('regret'):.4f} | {mean('default_regret'):.4f} | | {mean('fixed_regret'):.4f} |")
    return "\n".join(lines) + "\n"
