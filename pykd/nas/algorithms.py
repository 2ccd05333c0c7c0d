r"""Search methods over an Evaluator (pykd.nas.evaluate) and their Pareto fronts (`nas.search`).

- enumerate: every candidate of every sub-space is scored; the best feasible one wins.
- evolution (HAT / MoS): a population of nas.evolution.population feasible candidates; each
  generation keeps the `parents` best and adds `mutations` mutants (every gene resampled with
  probability mutation_prob within the parent's sub-space) and `crossovers` children (every gene
  from either of two parents of one sub-space). Children outside every sub-space, violating the
  budget or already in the population are rejected and redrawn. Reproducible by train.seed.
- nsga2: Optuna's NSGAIISampler on (loss, cost) with cost = nas.nsga2.objective; infeasible
  draws are pruned. Returns the Pareto front of the feasible candidates it evaluated.

A candidate's genes are the four factors of a uniform sub-space, or layers, hidden and each
layer's heads and FFN ratio of a per-layer one.
"""
from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

from .architecture import FACTORS
from .space import format_cost

if TYPE_CHECKING:
    from .evaluate import Evaluator


# ---- genes: the search's view of a sub-space ----

def genes_of(subspace) -> dict:
    """{gene: choices} of a sub-space (SubSpace.genes() for per-layer spaces, else the four factors)."""
    if hasattr(subspace, "genes"):
        return dict(subspace.genes())
    return {name: tuple(getattr(subspace, name)) for name in FACTORS}


def arch_genes(subspace, arch) -> dict:
    if hasattr(subspace, "genes_of"):
        return dict(subspace.genes_of(arch))
    return {name: getattr(arch, name) for name in FACTORS}


def arch_from_genes(subspace, genes: dict):
    if hasattr(subspace, "from_genes"):
        return subspace.from_genes(genes)
    from .architecture import Architecture

    return Architecture(**genes)


# ---- search methods ----

def enumerate_search(evaluator: Evaluator) -> list[dict]:
    return [evaluator.score(arch) for arch in evaluator.space.candidates()]


def _contained(space, arch):
    """The sub-space holding `arch`, or None (crossover may step outside every sub-space)."""
    for subspace in space.subspaces:
        if subspace.contains(arch):
            return subspace
    return None


def _random_feasible(evaluator: Evaluator, rng: random.Random, taken: set, tries: int):
    subspaces = evaluator.space.subspaces
    for _ in range(tries):
        arch = rng.choice(subspaces).sample(rng)
        if str(arch) not in taken and evaluator.feasible(arch):
            return arch
    return None


def _mutate(subspace, arch, rng: random.Random, probability: float):
    genes, choices = arch_genes(subspace, arch), genes_of(subspace)
    for name in genes:
        if rng.random() < probability:
            genes[name] = rng.choice(choices[name])
    return arch_from_genes(subspace, genes)


def _crossover(subspace, first, second, rng: random.Random):
    a, b = arch_genes(subspace, first), arch_genes(subspace, second)
    return arch_from_genes(subspace, {name: (a[name] if rng.random() < 0.5 else b[name]) for name in a})


def evolution_search(evaluator: Evaluator, settings, rng: random.Random) -> list[dict]:
    """HAT/MoS evolutionary search; returns every row it scored, and records the best per generation."""
    tries = 50
    population: list = []
    taken: set = set()
    while len(population) < settings.population:
        arch = _random_feasible(evaluator, rng, taken, tries * settings.population)
        if arch is None:
            break
        population.append(arch)
        taken.add(str(arch))
    if not population:
        raise_no_candidate(evaluator)
    evaluator.history = []
    for _ in range(settings.generations):
        ranked = sorted(population, key=lambda a: evaluator.score(a)["loss"])
        parents = ranked[: settings.parents]
        evaluator.history.append({"evaluations": evaluator.evaluations,
                                  "best_loss": evaluator.score(parents[0])["loss"], "best": str(parents[0])})
        population = parents + _children(evaluator, parents, settings, rng, tries)
    for arch in population:
        evaluator.score(arch)
    best = min(population, key=lambda a: evaluator.score(a)["loss"])
    evaluator.history.append({"evaluations": evaluator.evaluations, "best_loss": evaluator.score(best)["loss"],
                              "best": str(best)})
    return list(evaluator.results.values())


def _children(evaluator: Evaluator, parents: list, settings, rng: random.Random, tries: int) -> list:
    """One generation's `mutations` mutants and `crossovers` crossed children of `parents` (each drawn up to
    `tries` times until it is new, inside a sub-space and feasible)."""
    space = evaluator.space
    children, seen = [], {str(a) for a in parents}

    def breed(make, count):
        for _ in range(count):
            for _ in range(tries):
                child = make()
                if child is not None and str(child) not in seen and _contained(space, child) is not None \
                        and evaluator.feasible(child):
                    children.append(child)
                    seen.add(str(child))
                    break

    def mutant():
        parent = rng.choice(parents)
        return _mutate(space.subspace_of(parent), parent, rng, settings.mutation_prob)

    def crossed():
        first = rng.choice(parents)
        mates = [p for p in parents if space.subspace_of(p).name == space.subspace_of(first).name]
        return _crossover(space.subspace_of(first), first, rng.choice(mates), rng)

    breed(mutant, settings.mutations)
    breed(crossed, settings.crossovers)
    return children


def nsga2_search(evaluator: Evaluator, settings, seed: int) -> list[dict]:
    """Optuna NSGA-II on (loss, cost); infeasible or out-of-space draws are pruned."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space, cost = evaluator.space, settings.objective
    names = [s.name for s in space.subspaces]
    if cost == "latency":
        evaluator.measure_all_latency = True

    def objective(trial):
        subspace = space.subspaces[names.index(trial.suggest_categorical("subspace", names))]
        arch = arch_from_genes(subspace, _suggest_genes(trial, subspace))
        if arch is None or not subspace.contains(arch) or not evaluator.feasible(arch):
            raise optuna.TrialPruned()
        row = evaluator.score(arch)
        return row["loss"], row[cost] if cost != "latency" else evaluator.latency(arch)

    sampler = optuna.samplers.NSGAIISampler(population_size=settings.population, seed=seed)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.optimize(objective, n_trials=settings.trials)
    evaluator.history = [{"trials": len(study.trials), "evaluations": evaluator.evaluations}]
    return list(evaluator.results.values())


def _suggest_genes(trial, subspace) -> dict:
    """One value per gene; head genes draw only from the counts dividing the drawn hidden size (a
    parameter per hidden size, so Optuna's distributions stay fixed), which spares most prunings."""
    choices = genes_of(subspace)
    hidden = trial.suggest_categorical(f"{subspace.name}.hidden", list(choices["hidden"])) \
        if "hidden" in choices else None
    genes = {}
    for gene, values in choices.items():
        dividing = [h for h in values if hidden and hidden % h == 0] if gene.startswith("heads") else []
        if gene == "hidden":
            genes[gene] = hidden
        elif dividing:
            genes[gene] = trial.suggest_categorical(f"{subspace.name}.{gene}|hidden={hidden}", dividing)
        else:
            genes[gene] = trial.suggest_categorical(f"{subspace.name}.{gene}", list(values))
    return genes


def pareto_front(rows: list[dict], cost: str) -> list[dict]:
    """Rows no other row beats on both loss and `cost` (ties kept), sorted by cost."""
    usable = sorted((r for r in rows if r.get(cost) is not None), key=lambda r: (r[cost], r["loss"]))
    front, best_loss = [], math.inf
    for row in usable:
        if row["loss"] < best_loss or (front and row[cost] == front[-1][cost] and row["loss"] == front[-1]["loss"]):
            front.append(row)
            best_loss = min(best_loss, row["loss"])
    return front


def raise_no_candidate(evaluator: Evaluator) -> None:
    """A clear error: what the budget asks and what the cheapest candidate costs."""
    cheapest = min((s.smallest() for s in evaluator.space.subspaces), key=evaluator.space.params)
    costs = evaluator.costs(cheapest)
    if evaluator.budget.latency is not None and costs["latency"] is None:
        costs["latency"] = evaluator.latency(cheapest)
    largest = max((s.largest() for s in evaluator.space.subspaces), key=evaluator.space.params)
    raise ValueError(f"no candidate meets the budget ({evaluator.budget.describe()}): the cheapest candidate "
                     f"{cheapest} has {costs['params']:,} params, {format_cost(costs['flops'])} FLOPs"
                     + (f", {costs['latency']:.3g} ms" if costs["latency"] is not None else "")
                     + f"; the largest has {evaluator.space.params(largest):,} params")


SEARCHES = {
    "enumerate": lambda evaluator, nas, seed: enumerate_search(evaluator),
    "evolution": lambda evaluator, nas, seed: evolution_search(evaluator, nas.evolution, random.Random(seed)),
    "nsga2": lambda evaluator, nas, seed: nsga2_search(evaluator, nas.nsga2, seed),
}
SEARCH_METHODS = tuple(SEARCHES)  # nas.search


def search(evaluator: Evaluator, nas, seed: int) -> list[dict]:
    """Every row the method nas.search scored (see the module docstring), reproducible by seed (train.seed).

    Args:
        evaluator: scores candidates (pykd.nas.evaluate.Evaluator).
        nas: the nas section (search, evolution, nsga2).
        seed: train.seed.
    Returns:
        [{"arch", "subspace", "loss", "params", "flops", "latency", "feasible"}, ...].
    """
    if nas.search == "enumerate" and not any(evaluator.feasible(a) for a in evaluator.space.candidates()):
        raise_no_candidate(evaluator)  # before scoring anything
    return SEARCHES[nas.search](evaluator, nas, seed)
