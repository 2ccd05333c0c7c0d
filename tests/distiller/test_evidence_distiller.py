"""tools/evidence_distiller.py's summary on a planted runs table: seed means, paired gains, MI-alpha's rank."""
import csv
import json
import math

import pytest
from tests.paths import load_tool

evidence_distiller = load_tool("evidence_distiller")

# (dataset, setting, pipeline) -> score per seed 0, 1, 2
PLANTED = {("a", "n=1000 student=2x384", "prediction_only"): (0.70, 0.72, 0.71),
           ("a", "n=1000 student=2x384", "augment_eda"): (0.73, 0.74, 0.76),
           ("a", "n=1000 student=2x384", "hidden_mse_skip"): (0.69, 0.70, 0.74),
           ("a", "n=1000 student=2x384", "mi_alpha"): (0.71, 0.73, 0.72),
           ("b", "n=250 student=3x192", "prediction_only"): (0.60, 0.61, 0.62),
           ("b", "n=250 student=3x192", "augment_eda"): (0.60, 0.60, 0.61)}


def planted_rows() -> list[dict]:
    return [{"dataset": d, "setting": s, "pipeline": p, "seed": seed, "student_score": score, "ratio": score / 0.9,
             "eval_examples": 400}
            for (d, s, p), scores in PLANTED.items() for seed, score in enumerate(scores)]


def planted_table(path) -> None:
    """The rows with what the recommenders read: each pipeline's parameters and a dataset's meta-features."""
    from pykd.distiller.autodistiller import META_FEATURES

    rows = [{**row, "params": json.dumps(evidence_distiller.pipelines()[row["pipeline"]]),
             **{k: 1.0 + i + (row["dataset"] == "b") for i, k in enumerate(META_FEATURES)}} for row in planted_rows()]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_seed_means_are_means_with_the_standard_error_of_the_mean():
    mean, se, seeds = evidence_distiller.seed_means(planted_rows())[("a", "n=1000 student=2x384", "augment_eda")]
    assert seeds == 3 and mean == pytest.approx(0.74333333333)
    assert se == pytest.approx(math.sqrt(((0.73 - mean) ** 2 + (0.74 - mean) ** 2 + (0.76 - mean) ** 2) / 2 / 3))


def test_the_augmentation_gain_is_paired_by_seed():
    gain = evidence_distiller.paired_gain(planted_rows(), "a", "n=1000 student=2x384", "augment_eda", "prediction_only")
    differences = (0.03, 0.02, 0.05)  # seed by seed; unpaired, the standard error would be larger
    assert gain["seeds"] == 3 and gain["gain"] == pytest.approx(sum(differences) / 3)
    assert gain["se"] == pytest.approx(math.sqrt(sum((x - 0.1 / 3) ** 2 for x in differences) / 2 / 3))
    assert evidence_distiller.paired_gain(planted_rows(), "b", "n=250 student=3x192", "mi_alpha",
                                          "prediction_only") is None


def test_the_summary_ranks_mi_alpha_and_reports_the_gains(tmp_path):
    table = tmp_path / "runs.csv"
    planted_table(table)
    results = {"teacher-a": {"accuracy": 0.9}, "kd-x": {"seconds": 7200.0}}
    summary = evidence_distiller.summarise("full", {"steps": 500}, results, table)
    regret = summary["regret"]["mean_regret"]
    # a random pick's expected regret: a's seed means 0.71, 0.7433, 0.71, 0.72 (best 0.7433); b's 0.61, 0.6033
    assert set(regret) == {"ratio_gp", "advantage_gp", "advantage_ridge", "best_on_average", "default", "random"}
    a_random = (0.1 / 3 + 0 + 0.1 / 3 + 0.07 / 3) / 4
    assert regret["random"]["mean"] == pytest.approx((a_random + 0.02 / 3 / 2) / 2 / 0.9)
    assert math.isnan(regret["default"]["mean"])  # no setting ran the default pipeline
    (rank,) = summary["mi_alpha_rank"]  # dataset b has two intermediate pipelines only
    assert (rank["rank"], rank["of"]) == (1, 3) and rank["mi_alpha_minus_best_other"] == pytest.approx(0.72 - 0.71)
    assert [round(g["gain"], 6) for g in summary["augmentation"]] == [round(0.10 / 3, 6), round(-0.02 / 3, 6)]
    mean_b = (0.60 + 0.61 + 0.62 + 0.60 + 0.60 + 0.61) / 6  # one run's binomial error at b's mean, 400 examples
    assert summary["binomial_se"]["b | n=250 student=3x192"] == pytest.approx(math.sqrt(mean_b * (1 - mean_b) / 400))
    text = evidence_distiller.markdown(summary, "python tools/evidence_distiller.py")
    assert "| a | n=1000 student=2x384 | +0.0333 +- 0.0088 | 3 |" in text and "2.0 core-hours" in text
