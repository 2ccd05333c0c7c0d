"""Pipeline recommenders for AutoDistiller and their leave-one-dataset-out evaluation.

A recommender learns from KD runs (`autodistiller.Run`: dataset, setting, pipeline, meta-features,
student/teacher ratio, seed) and scores candidate pipelines for an unseen dataset's meta-features;
the highest score is its pick. Several are compared, because with tens of (dataset, setting) cells
the right inductive bias matters more than capacity:

- `ratio_gp`: AutoDistiller's regressor, a Gaussian process on (meta-features, pipeline encoding)
  -> ratio (autodistiller.RatioModel). Most of a ratio's variance is the dataset's difficulty, which
  says nothing about which pipeline to run there.
- `advantage_gp`: the same GP on each run's *advantage*, its ratio minus the ratio of prediction-only
  KD in the same (dataset, setting, seed) (the cell's mean where that was not run). Ranking needs only
  the advantage, and subtracting the reference removes the difficulty term the ratio GP spends its
  data on.
- `advantage_ridge`: one ridge regression per pipeline of the advantage on the standardised
  meta-features (a pipeline's gain as a linear function of the dataset), for pipelines the table has.
- `best_on_average`: no meta-features: the pipeline with the highest mean advantage over the
  training datasets (the fixed choice a recommender has to beat).
- `default`: always pykd's default pipeline.

Evaluation (`leave_one_dataset_out`): for each dataset, every recommender fits on the other
datasets' runs and picks, for each setting of the held-out dataset, one of the pipelines run there.
Scores use the seed means of that setting's ratios. Per setting the table gives each recommender's
regret (best mean ratio - the picked one's), the expected regret of a uniformly random pick, the
oracle spread (best - worst), and the noise: the standard error of the difference between the best
and the second-best pipeline's means. A recommender cannot be told from a random pick where the
spread itself is within a few standard errors.

`nested_selection` picks the recommender honestly: for each held-out dataset the recommender is
chosen by an inner leave-one-dataset-out over the remaining datasets only, and its outer regret is
reported. Choosing the best row of the outer table instead would reuse the evaluation data.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .autodistiller import META_FEATURES, RatioModel, Run, feature_vector

DEFAULT_PIPELINE = "default"
REFERENCE_PIPELINE = "prediction_only"  # run in every setting of the KD runs tables: advantages are relative to it


def cell_means(runs: list[Run]) -> dict[tuple[str, str, str], list[float]]:
    """{(dataset, setting, pipeline): [ratio per seed]}."""
    cells = defaultdict(list)
    for run in runs:
        cells[(run.dataset, run.setting, run.pipeline)].append(run.ratio)
    return dict(cells)


def advantages(runs: list[Run], reference: str = REFERENCE_PIPELINE) -> list[float]:
    """Each run's ratio minus the reference pipeline's in the same (dataset, setting, seed), or minus the mean
    of that cell's runs where the reference was not run. A fixed reference keeps advantages comparable
    between cells that ran different subsets of pipelines (a cell mean would move with the subset)."""
    groups = defaultdict(dict)
    for run in runs:
        groups[(run.dataset, run.setting, run.seed)][run.pipeline] = run.ratio
    base = {key: cell.get(reference, sum(cell.values()) / len(cell)) for key, cell in groups.items()}
    return [run.ratio - base[(run.dataset, run.setting, run.seed)] for run in runs]


class Recommender:
    """fit(runs) -> self; scores(meta, candidates {name: params}) -> {name: score} (higher is better)."""

    def fit(self, runs: list[Run]) -> Recommender:
        raise NotImplementedError

    def scores(self, meta: dict, candidates: dict[str, dict]) -> dict[str, float]:
        raise NotImplementedError

    def pick(self, meta: dict, candidates: dict[str, dict]) -> str:
        scored = self.scores(meta, candidates)
        return max(sorted(scored), key=lambda name: scored[name])  # ties: the first name


class RatioGP(Recommender):
    def __init__(self, base_values: dict | None = None):
        self.model = RatioModel(base_values)

    def fit(self, runs):
        self.model.fit(runs)
        return self

    def scores(self, meta, candidates):
        names = list(candidates)
        return dict(zip(names, self.model.predict(meta, [candidates[n] for n in names]).tolist()))


class AdvantageGP(Recommender):
    def __init__(self, base_values: dict | None = None):
        self.base_values = base_values or {}

    def fit(self, runs):
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = np.array([feature_vector(r.meta, r.params, self.base_values) for r in runs])
        y = np.array(advantages(runs))
        kernel = ConstantKernel(1.0) * RBF(length_scale=math.sqrt(x.shape[1])) + WhiteKernel(1e-2)
        gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=2, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant columns make the scaler and the optimiser warn
            self.model = make_pipeline(StandardScaler(), gp).fit(x, y)
        return self

    def scores(self, meta, candidates):
        names = list(candidates)
        x = np.array([feature_vector(meta, candidates[n], self.base_values) for n in names])
        return dict(zip(names, self.model.predict(x).tolist()))


class AdvantageRidge(Recommender):
    """Per pipeline, advantage = ridge(standardised meta-features); unseen pipelines score -inf."""

    def __init__(self, alpha: float = 10.0):
        self.alpha = alpha

    def fit(self, runs):
        from sklearn.linear_model import Ridge

        x = np.array([[r.meta[k] for k in META_FEATURES] for r in runs])
        self.mean, self.scale = x.mean(0), x.std(0)
        self.scale[self.scale == 0] = 1.0
        y = np.array(advantages(runs))
        self.models = {}
        for name in sorted({r.pipeline for r in runs}):
            rows = [i for i, r in enumerate(runs) if r.pipeline == name]
            self.models[name] = Ridge(alpha=self.alpha).fit((x[rows] - self.mean) / self.scale, y[rows])
        return self

    def scores(self, meta, candidates):
        x = (np.array([[meta[k] for k in META_FEATURES]]) - self.mean) / self.scale
        return {name: float(self.models[name].predict(x)[0]) if name in self.models else float("-inf")
                for name in candidates}


class BestOnAverage(Recommender):
    def fit(self, runs):
        totals = defaultdict(list)
        for run, advantage in zip(runs, advantages(runs)):
            totals[run.pipeline].append(advantage)
        self.mean = {name: sum(v) / len(v) for name, v in totals.items()}
        return self

    def scores(self, meta, candidates):
        return {name: self.mean.get(name, float("-inf")) for name in candidates}


class Fixed(Recommender):
    def __init__(self, pipeline: str = DEFAULT_PIPELINE):
        self.pipeline = pipeline

    def fit(self, runs):
        return self

    def scores(self, meta, candidates):
        return {name: float(name == self.pipeline) for name in candidates}


RECOMMENDERS = {"ratio_gp": RatioGP, "advantage_gp": AdvantageGP, "advantage_ridge": AdvantageRidge,
                "best_on_average": BestOnAverage, "default": Fixed}
LEARNED = ("ratio_gp", "advantage_gp", "advantage_ridge")  # the ones that read meta-features


@dataclass
class HeldOutSetting:
    """One (dataset, setting) of a held-out dataset: seed-mean ratios per pipeline and their spread."""
    dataset: str
    setting: str
    meta: dict
    candidates: dict  # name -> params
    means: dict  # name -> mean ratio over seeds
    ses: dict  # name -> standard error of that mean (nan for one seed)

    def regret(self, name: str) -> float:
        return max(self.means.values()) - self.means[name]

    def noise(self) -> float:
        """Standard error of (best - second best) mean: the resolution at which pipelines differ here."""
        order = sorted(self.means, key=lambda n: -self.means[n])
        if len(order) < 2:
            return float("nan")
        return math.hypot(self.ses[order[0]], self.ses[order[1]])


def held_out_settings(runs: list[Run], dataset: str) -> list[HeldOutSetting]:
    cells = cell_means([r for r in runs if r.dataset == dataset])
    settings = []
    for setting in sorted({key[1] for key in cells}):
        names = sorted(key[2] for key in cells if key[1] == setting)
        example = {r.pipeline: r for r in runs if r.dataset == dataset and r.setting == setting}
        means, ses = {}, {}
        for name in names:
            values = cells[(dataset, setting, name)]
            means[name] = sum(values) / len(values)
            ses[name] = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
        settings.append(HeldOutSetting(dataset, setting, example[names[0]].meta,
                                       {n: example[n].params for n in names}, means, ses))
    return settings


def leave_one_dataset_out(runs: list[Run], recommenders: dict | None = None, base_values: dict | None = None
                          ) -> list[dict]:
    """One row per held-out (dataset, setting): each recommender's pick and regret, the random pick's
    expected regret, the oracle spread and the noise (see the module docstring)."""
    recommenders = recommenders or RECOMMENDERS
    datasets = sorted({r.dataset for r in runs})
    if len(datasets) < 2:
        raise ValueError(f"leave-one-dataset-out needs runs on at least 2 datasets, the table has {datasets}")
    rows = []
    for dataset in datasets:
        train = [r for r in runs if r.dataset != dataset]
        fitted = {name: _make(factory, base_values).fit(train) for name, factory in recommenders.items()}
        for cell in held_out_settings(runs, dataset):
            row = {"dataset": dataset, "setting": cell.setting, "best": max(cell.means, key=cell.means.get),
                   "spread": max(cell.means.values()) - min(cell.means.values()), "noise": cell.noise(),
                   "random_regret": float(np.mean([cell.regret(n) for n in cell.means]))}
            for name, model in fitted.items():
                if name == "default" and DEFAULT_PIPELINE not in cell.means:
                    row[f"{name}_pick"], row[f"{name}_regret"] = None, float("nan")
                    continue
                pick = model.pick(cell.meta, cell.candidates)
                row[f"{name}_pick"], row[f"{name}_regret"] = pick, cell.regret(pick)
            rows.append(row)
    return rows


def _make(factory, base_values):
    return factory(base_values) if factory in (RatioGP, AdvantageGP) else factory()


def mean_regrets(rows: list[dict], names) -> dict[str, tuple[float, float]]:
    """{name: (mean regret, its standard error over the held-out settings)} (nan rows skipped)."""
    out = {}
    for name in names:
        values = [r[f"{name}_regret"] for r in rows if not math.isnan(r[f"{name}_regret"])]
        se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
        out[name] = (float(np.mean(values)) if values else float("nan"), se)
    return out


def nested_selection(runs: list[Run], candidates=LEARNED, base_values: dict | None = None) -> list[dict]:
    """Outer leave-one-dataset-out; inside, the learned recommender with the lowest inner mean regret on
    the remaining datasets is chosen, then fitted on all of them and scored on the held-out dataset."""
    datasets = sorted({r.dataset for r in runs})
    if len(datasets) < 3:
        raise ValueError(f"nested selection needs runs on at least 3 datasets, the table has {datasets}")
    rows = []
    for dataset in datasets:
        train = [r for r in runs if r.dataset != dataset]
        inner = leave_one_dataset_out(train, {n: RECOMMENDERS[n] for n in candidates}, base_values)
        inner_regret = mean_regrets(inner, candidates)
        chosen = min(candidates, key=lambda n: inner_regret[n][0])
        model = _make(RECOMMENDERS[chosen], base_values).fit(train)
        for cell in held_out_settings(runs, dataset):
            pick = model.pick(cell.meta, cell.candidates)
            rows.append({"dataset": dataset, "setting": cell.setting, "chosen": chosen, "pick": pick,
                         "selected_regret": cell.regret(pick)})
    return rows
