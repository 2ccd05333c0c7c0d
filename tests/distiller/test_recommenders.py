"""Recommenders and their leave-one-dataset-out evaluation on planted KD runs tables."""
import math
import random

import pytest

pytest.importorskip("sklearn")

from pykd.distiller import recommenders as rc
from pykd.distiller.autodistiller import META_FEATURES, Run
from pykd.distiller.pipeline import PIPELINES

NAMES = ("default", "prediction_only", "hidden_mse_skip", "relation_last")


def planted_table(gain: float, noise: float, seed: int = 0) -> list[Run]:
    """6 datasets x 2 settings x 4 pipelines x 3 seeds. A dataset's label entropy x decides which of two
    pipelines gains `gain` over the others: hidden MSE where x > 0.5, relations below."""
    rng = random.Random(seed)
    runs = []
    for d in range(6):
        x = (d + 0.5) / 6
        difficulty = rng.uniform(0.7, 0.95)
        for setting in ("n=1000", "n=4000"):
            meta = dict.fromkeys(META_FEATURES, 1.0) | {"label_entropy": x, "log_train_size": float(len(setting))}
            for s in range(3):
                for name in NAMES:
                    advantage = gain if (name == "hidden_mse_skip") == (x > 0.5) and name in (
                        "hidden_mse_skip", "relation_last") else 0.0
                    ratio = difficulty + advantage + rng.gauss(0.0, noise)
                    runs.append(Run(f"d{d}", name, PIPELINES[name], meta, ratio, {}, setting, s))
    return runs


def test_advantages_are_relative_to_prediction_only_in_the_same_cell():
    runs = planted_table(gain=0.05, noise=0.0)
    for run, advantage in zip(runs, rc.advantages(runs)):
        reference = next(r for r in runs if (r.dataset, r.setting, r.seed, r.pipeline) ==
                         (run.dataset, run.setting, run.seed, "prediction_only"))
        assert advantage == pytest.approx(run.ratio - reference.ratio)


def test_cell_mean_is_the_reference_where_prediction_only_was_not_run():
    meta = dict.fromkeys(META_FEATURES, 0.0)
    runs = [Run("a", "default", {}, meta, 0.8, {}), Run("a", "mi_alpha", {}, meta, 0.9, {})]
    assert rc.advantages(runs) == pytest.approx([-0.05, 0.05])


def test_learned_recommenders_find_a_planted_interaction_the_fixed_choice_cannot():
    runs = planted_table(gain=0.05, noise=0.002)
    rows = rc.leave_one_dataset_out(runs)
    regret = rc.mean_regrets(rows, rc.RECOMMENDERS)
    assert regret["advantage_ridge"][0] < 0.01
    # The fixed choice picks one of the two winners everywhere: right on half the datasets.
    assert regret["best_on_average"][0] > 0.02
    assert all(row["spread"] == pytest.approx(0.05, abs=0.01) for row in rows)
    assert all(0.0 < row["random_regret"] < row["spread"] for row in rows)


def test_noise_is_the_standard_error_of_the_gap_between_the_two_best_pipelines():
    meta = dict.fromkeys(META_FEATURES, 0.0)
    runs = [Run("a", p, {}, meta, r, {}, "", s) for s, (x, y) in enumerate([(0.8, 0.7), (0.9, 0.7), (1.0, 0.7)])
            for p, r in (("default", x), ("mi_alpha", y))]
    (cell,) = rc.held_out_settings(runs, "a")
    assert cell.means == pytest.approx({"default": 0.9, "mi_alpha": 0.7})
    assert cell.noise() == pytest.approx(0.1 / math.sqrt(3))  # std 0.1 over 3 seeds; the other has none
    assert cell.regret("mi_alpha") == pytest.approx(0.2)


def test_without_an_effect_no_recommender_beats_a_random_pick_by_much():
    runs = planted_table(gain=0.0, noise=0.01, seed=1)
    rows = rc.leave_one_dataset_out(runs, {n: rc.RECOMMENDERS[n] for n in ("advantage_ridge", "best_on_average")})
    regret = rc.mean_regrets(rows, ("advantage_ridge", "best_on_average"))
    random_regret = sum(r["random_regret"] for r in rows) / len(rows)
    for value, se in regret.values():
        assert value > random_regret - 3 * se - 0.005
    assert all(row["spread"] < 6 * row["noise"] for row in rows)  # the spread is the seeds' noise


def test_nested_selection_chooses_without_the_held_out_dataset():
    runs = planted_table(gain=0.05, noise=0.002)
    rows = rc.nested_selection(runs, candidates=("advantage_ridge", "best_on_average"))
    assert {r["dataset"] for r in rows} == {f"d{d}" for d in range(6)}
    assert sum(r["selected_regret"] for r in rows) / len(rows) < 0.02
    with pytest.raises(ValueError, match="at least 3 datasets"):
        rc.nested_selection([r for r in runs if r.dataset in ("d0", "d1")])
