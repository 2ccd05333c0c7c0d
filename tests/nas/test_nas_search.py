"""Search over SuperLMs: teacher caching, budgets, Pareto fronts, evolution and NSGA-II, outputs."""
import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from tests.nas.nas_fixtures import TWO_SUBSPACES, nas_values

from pykd.distill import config as run_config
from pykd.nas import algorithms, evaluate, search
from pykd.nas import config as nas_config
from pykd.nas.space import SearchSpace, TeacherShape

TEACHER = TeacherShape("bert", layers=6, hidden=96, heads=8, intermediate=384, vocab_size=1000,
                       max_position_embeddings=64, type_vocab_size=2)
SMALL = {"subspaces": [{"name": "a", "layers": [1, 2, 3], "hidden": [32, 48, 64], "ffn_ratio": [1.0, 2.0, 3.0],
                        "heads": [2, 4, 8]},
                       {"name": "b", "layers": [4, 5, 6], "hidden": [64, 80, 96], "ffn_ratio": [2.0, 3.0, 4.0],
                        "heads": [4, 8]}]}

# Per-layer (HAT / MoS) sub-space: 6 layers x 3 hidden, each layer its own heads and FFN ratio
# (far too many candidates to enumerate).
LAYERWISE = {"subspaces": [{"name": "w", "layers": [2, 4, 6], "hidden": [48, 64, 96], "ffn_ratio": [1.0, 2.0, 4.0],
                            "heads": [2, 4, 8], "layerwise": True}]}


class SyntheticEvaluator(evaluate.Evaluator):
    """The Evaluator with a synthetic loss (no SuperLM): smaller and oddly shaped models lose more."""

    def __init__(self, space, budget):
        super().__init__(space, {}, None, None, budget, 16, None, 1000)

    def score(self, arch):
        key = str(arch)
        if key not in self.results:
            heads = arch.heads if isinstance(arch.heads, tuple) else (arch.heads,)
            loss = 1.0 / math.log(self.space.params(arch)) + 0.01 * sum(abs(h - 4) for h in heads) / len(heads) \
                + 0.003 * (arch.layers % 2)
            costs = self.costs(arch)
            self.results[key] = {"arch": key, "subspace": self.space.subspace_of(arch).name, "loss": loss, **costs,
                                 "feasible": not self.budget.violations(costs)}
        return self.results[key]


def _evaluator(budget=None, layerwise=False):
    space = SearchSpace.from_dict(LAYERWISE if layerwise else SMALL, TEACHER)
    return SyntheticEvaluator(space, budget or evaluate.Budget(flops=0.5 * space.teacher_flops(16)))


def _settings(**changes):
    settings = nas_config.NasEvolution(population=20, parents=5, mutations=8, crossovers=8, generations=6)
    for name, value in changes.items():
        setattr(settings, name, value)
    return settings


def test_evolution_is_reproducible_by_seed_and_never_scores_a_violator():
    runs = []
    for seed in (3, 3, 4):
        evaluator = _evaluator()
        rows = algorithms.evolution_search(evaluator, _settings(), random.Random(seed))
        runs.append(([r["arch"] for r in rows], evaluator.history))
        assert rows and all(r["feasible"] for r in rows)
        assert all(evaluator.space.subspace_of(evaluator.space.parse(r["arch"])) for r in rows)
        # parents + children per generation, never a duplicate in the population
        assert len({r["arch"] for r in rows}) == len(rows)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_evolution_finds_the_enumerated_best_with_fewer_evaluations():
    everything = _evaluator()
    best = min((r for r in algorithms.enumerate_search(everything) if r["feasible"]), key=lambda r: r["loss"])
    evaluator = _evaluator()
    rows = algorithms.evolution_search(evaluator, _settings(generations=10), random.Random(0))
    found = min(rows, key=lambda r: r["loss"])
    assert found["arch"] == best["arch"]
    assert evaluator.evaluations < everything.evaluations
    history = [h["best_loss"] for h in evaluator.history]
    assert history == sorted(history, reverse=True)  # parents survive: the best never gets worse


def test_evolution_rejects_all_violators_and_reports_the_cheapest_cost():
    evaluator = _evaluator(evaluate.Budget(params=10.0))
    with pytest.raises(ValueError, match=r"no candidate meets the budget \(max params 10\): the cheapest candidate "
                                         r"layers=1,hidden=32,ffn_ratio=1,heads=2 has"):
        algorithms.evolution_search(evaluator, _settings(), random.Random(0))


def test_parameter_window_keeps_every_scored_candidate_inside_it():
    space = SearchSpace.from_dict(SMALL, TEACHER)
    params = sorted(space.params(a) for a in space.candidates())
    low, high = params[len(params) // 4], params[len(params) // 2]
    evaluator = _evaluator(evaluate.Budget(params=high, min_params=low))
    rows = algorithms.evolution_search(evaluator, _settings(), random.Random(1))
    assert rows and all(low <= r["params"] <= high for r in rows)
    with pytest.raises(ValueError, match="min params"):
        algorithms.evolution_search(_evaluator(evaluate.Budget(min_params=params[-1] + 1)), _settings(),
                                    random.Random(1))


def _dominated(row, rows, cost):
    return any(o["loss"] <= row["loss"] and o[cost] <= row[cost] and (o["loss"] < row["loss"] or o[cost] < row[cost])
               for o in rows)


def test_pareto_front_is_exactly_the_non_dominated_rows():
    rng = random.Random(0)
    rows = [{"loss": rng.choice([0.1, 0.2, 0.3, 0.4]), "flops": rng.choice([1, 2, 3, 4, 5])} for _ in range(60)]
    front = algorithms.pareto_front(rows, "flops")
    assert all(not _dominated(r, rows, "flops") for r in front)
    assert all(_dominated(r, rows, "flops") or r in front for r in rows)


def test_nsga2_returns_a_non_dominated_set_of_feasible_candidates():
    evaluator = _evaluator()
    settings = nas_config.NasNsga2(trials=60, population=10, objective="params")
    rows = algorithms.nsga2_search(evaluator, settings, seed=0)
    assert rows and all(r["feasible"] for r in rows)
    front = algorithms.pareto_front(rows, "params")
    assert len(front) >= 2
    assert all(not _dominated(r, rows, "params") for r in front)
    again = algorithms.nsga2_search(_evaluator(), settings, seed=0)
    assert [r["arch"] for r in again] == [r["arch"] for r in rows]


def test_budget_fractions_are_relative_to_the_teacher():
    budget = evaluate.resolve_budget(nas_config.NasBudget(params=0.5, flops=2e6, latency=None, min_params=0.1),
                                   {"params": 1000, "flops": 5e6, "latency": None})
    assert (budget.params, budget.flops, budget.latency, budget.min_params) == (500, 2e6, None, 100)
    assert budget.violations({"params": 600, "flops": 1e6, "latency": None}) == ["params 600 > 500"]
    assert budget.violations({"params": 50, "flops": 3e6, "latency": None}) == ["flops 3e+06 > 2e+06",
                                                                                 "params 50 < 100"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny sub-spaces' SuperLMs trained for 2 steps (shared by the tests below)."""
    from pykd.nas.train import train_supernets

    tmp_path = tmp_path_factory.mktemp("nas")
    values = nas_values(tmp_path, TWO_SUBSPACES, train={"steps": 2, "eval_every": 100, "log_every": 1,
                                                       "checkpoint_every": 100, "progress": False})
    train_supernets(run_config.from_dict(values))
    return values


def test_cached_teacher_scores_equal_recomputed_ones(trained):
    config = run_config.from_dict(trained)
    cached = evaluate.build_evaluator(config)
    fresh = evaluate.build_evaluator(config, cached=False, supernets=cached.supernets)
    for arch in cached.space.candidates()[::5]:
        assert cached.score(arch)["loss"] == fresh.score(arch)["loss"]


def test_enumerate_writes_every_candidate_the_front_and_the_best_under_budget(trained):
    values = json.loads(json.dumps(trained))
    values["nas"]["budget"] = {"flops": 0.5}
    config = run_config.from_dict(values)
    summary = search.run_search(config)
    directory = config.nas.output + "/search"
    rows = list(csv.DictReader(Path(directory + "/candidates.csv").read_text().splitlines()))
    evaluator = evaluate.build_evaluator(config)
    assert len(rows) == len(evaluator.space.candidates()) == summary["evaluations"]
    feasible = [r for r in rows if r["feasible"] == "True"]
    limit = 0.5 * evaluator.space.teacher_flops(config.nas.seq_len)
    assert all(int(r["flops"]) <= limit for r in feasible) and len(feasible) < len(rows)
    assert summary["best"]["loss"] == min(float(r["loss"]) for r in feasible)
    assert summary["best"]["latency"] > 0
    assert json.loads(Path(directory + "/candidates.json").read_text())[0].keys() >= {"arch", "loss", "params", "flops"}
    import os

    assert os.path.getsize(directory + "/pareto.png") > 0


def test_a_budget_no_candidate_meets_says_what_the_cheapest_costs(trained):
    values = json.loads(json.dumps(trained))
    values["nas"]["budget"] = {"params": 100}
    with pytest.raises(ValueError, match=r"no candidate meets the budget \(max params 100\): the cheapest candidate "
                                         r"layers=1,hidden=16,ffn_ratio=1,heads=2 has [\d,]+ params, [\d.e+]+ FLOPs; "
                                         r"the largest has [\d,]+ params"):
        search.run_search(run_config.from_dict(values))


def test_export_writes_a_plain_model_equal_to_the_sub_network(trained, tmp_path):
    import transformers

    config = run_config.from_dict(trained)
    arch = "layers=3,hidden=32,ffn_ratio=2,heads=4"
    output = tmp_path / "student"
    if not search.searched_figures(config.nas, arch):  # the card shows what the search measured
        search.run_search(config)
    search.export_candidate(config, arch, output)
    student = transformers.AutoModel.from_pretrained(output).eval()
    evaluator = evaluate.build_evaluator(config)
    supernet = evaluator.supernets["hi"]
    supernet.set_active(evaluator.space.parse(arch))
    batch = evaluator.cache.batches[0]
    with torch.no_grad():
        expected, got = supernet(**batch).last_hidden_state, student(**batch).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="already exists"):
        search.export_candidate(config, arch, output)
    from huggingface_hub import ModelCard

    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == trained["teacher"]["path"] and card.data.pipeline_tag == "feature-extraction"
    assert "| layers | 3 |" in card.text and "ffn_ratio=2" in card.text
    assert f"| parameters | {sum(p.numel() for p in student.parameters()):,} |" in card.text
    figures = search.searched_figures(config.nas, arch)
    assert "relation_loss" in figures and f"| relation_loss | {figures['relation_loss']:.4g} |" in card.text


@pytest.mark.parametrize("method", ["evolution", "nsga2"])
def test_per_layer_spaces_are_searched_reproducibly_within_the_budget(method):
    runs = []
    for _ in range(2):
        evaluator = _evaluator(layerwise=True)
        if method == "evolution":
            rows = algorithms.evolution_search(evaluator, _settings(generations=3), random.Random(0))
        else:
            settings = nas_config.NasNsga2(trials=30, population=6, objective="flops")
            rows = algorithms.nsga2_search(evaluator, settings, 0)
        runs.append([r["arch"] for r in rows])
        subspace = evaluator.space.subspaces[0]
        archs = [evaluator.space.parse(r["arch"]) for r in rows]
        assert rows and all(r["feasible"] for r in rows) and all(subspace.contains(a) for a in archs)
        assert any(len(set(a.heads)) > 1 or len(set(a.ffn_ratio)) > 1 for a in archs)  # layers do differ
    assert runs[0] == runs[1]


def test_task_proxy_fine_tunes_the_top_candidates_and_picks_by_accuracy(trained):
    from tests.kd_fixtures import tiny_csv

    values = json.loads(json.dumps(trained))
    output = values["nas"]["output"]
    values["nas"]["proxy"] = {"top_k": 2, "dataset": tiny_csv(Path(output)), "steps": 2}
    summary = search.run_search(run_config.from_dict(values))
    proxy = summary["proxy"]
    ranked = sorted(json.loads(Path(output + "/search/candidates.json").read_text()), key=lambda r: r["loss"])
    assert [r["arch"] for r in proxy["candidates"]] == [r["arch"] for r in ranked[:2]]
    assert proxy["best"]["accuracy"] == max(r["accuracy"] for r in proxy["candidates"])
    assert proxy["best"]["arch"] in proxy["pareto_accuracy_flops"]
    import transformers

    from pykd.nas.architecture import Architecture

    for row in proxy["candidates"]:
        folder = row["arch"].replace(",", "_").replace("=", "")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            f"{output}/proxy/{folder}/finetune/model")
        arch = Architecture.parse(row["arch"])
        assert (model.config.num_hidden_layers, model.config.hidden_size) == (arch.layers, arch.hidden)


def _scored(directory: Path) -> dict:
    """arch -> what a rerun must reproduce exactly (latency is a measurement, so left out)."""
    rows = json.loads((directory / "candidates.json").read_text())
    return {r["arch"]: (r["subspace"], r["loss"], r["params"], r["flops"], r["feasible"]) for r in rows}


def test_an_interrupted_search_resumes_from_the_candidates_it_scored(trained, tmp_path, monkeypatch):
    """Ctrl-C (or a late failure) after some candidates keeps them: the rerun scores only the rest, and a
    torn last line or another configuration's journal is not trusted."""
    import shutil

    values = json.loads(json.dumps(trained))
    values["nas"]["budget"] = {"flops": 0.7}
    config = run_config.from_dict(values)
    directory = Path(config.nas.output) / "search"
    shutil.rmtree(directory, ignore_errors=True)
    whole = search.run_search(config)
    expected = _scored(directory)
    shutil.rmtree(directory)

    real, calls = evaluate.held_out_loss, []

    def interrupted_after(count):
        def loss(*args):
            if len(calls) == count:
                raise KeyboardInterrupt
            calls.append(str(args[1]))
            return real(*args)
        return loss

    monkeypatch.setattr(evaluate, "held_out_loss", interrupted_after(5))
    with pytest.raises(KeyboardInterrupt):
        search.run_search(config)
    journal = directory / search.ScoreJournal.FILE
    assert len(journal.read_text().splitlines()) == 1 + 5 and not (directory / "candidates.json").exists()
    with open(journal, "ab") as handle:  # what a crash of the machine mid-write could leave
        handle.write(b'{"arch": "layers=1,hid')

    first = list(calls)
    calls.clear()
    monkeypatch.setattr(evaluate, "held_out_loss", interrupted_after(10 ** 6))
    resumed = search.run_search(config)
    assert not set(first) & set(calls) and len(first) + len(calls) == whole["evaluations"]
    assert _scored(directory) == expected and resumed["best"]["arch"] == whole["best"]["arch"]

    calls.clear()
    values["nas"]["relation_loss"] = "kl"  # the journal's scores are not this configuration's
    search.run_search(run_config.from_dict(values))
    assert len(calls) == whole["evaluations"] and (directory / (search.ScoreJournal.FILE + ".stale")).exists()
