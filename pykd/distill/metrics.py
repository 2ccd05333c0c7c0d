"""Task metrics with scikit-learn and scipy (the `evaluate` package needs the hub)."""
from __future__ import annotations

import numpy as np

# The metrics an evaluation of each labelled task reports (what pykd hpo's study.metric may name).
METRICS = {"classification": ("accuracy", "f1", "mcc"), "regression": ("pearson", "spearman")}


def classification_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    average = "binary" if max(labels.max(), predictions.max()) <= 1 else "macro"
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "f1": float(f1_score(labels, predictions, average=average)),
            "mcc": float(matthews_corrcoef(labels, predictions))}


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr

    return {"pearson": float(pearsonr(predictions, labels)[0]),
            "spearman": float(spearmanr(predictions, labels)[0])}


def task_metrics(logits: np.ndarray, labels: np.ndarray, kind: str) -> dict:
    if kind == "regression":
        return regression_metrics(logits[:, 0], labels)
    return classification_metrics(logits.argmax(-1), labels)
