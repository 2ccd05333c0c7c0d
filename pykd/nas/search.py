r"""Lightweight search over trained SuperLMs (AutoDistil) and evolutionary / Pareto search (MoS, HAT).

Fitness of a candidate a is the SuperLM's held-out relation-distillation loss, without training:

    loss(a) = mean over held-out batches b of sum_{r in QQ, KK, VV} attention_relation_loss(T_r(b), S_r(a, b))

The teacher's side T(b) (its last-layer Q, K, V per batch) is computed once and cached for every
candidate (`TeacherCache`). Costs per candidate: exact parameters and analytic FLOPs from the
SearchSpace, and latency measured on the current device (median of repeats of the exported plain
model's forward, batch and length from nas.latency; cached per architecture).

Constraints (nas.budget): maximum params / FLOPs / latency and a minimum params (the lower end of
MoS's parameter window); a value in (0, 1] is a fraction of the teacher's cost, a larger one
absolute. Methods (nas.search):

- enumerate: every candidate of every sub-space is scored; the best feasible one wins.
- evolution (HAT / MoS): a population of nas.evolution.population feasible candidates; each
  generation keeps the `parents` best and adds `mutations` mutants (every gene resampled with
  probability mutation_prob within the parent's sub-space) and `crossovers` children (every gene
  from either of two parents of one sub-space). Children outside every sub-space, violating the
  budget or already in the population are rejected and redrawn. Reproducible by train.seed.
- nsga2: Optuna's NSGAIISampler on (loss, cost) with cost = nas.nsga2.objective; infeasible
  draws are pruned. Returns the Pareto front of the feasible candidates it evaluated.

Latency is measured for every candidate only when a latency budget is set or latency is the nsga2
objective; otherwise for the best candidate and the loss-vs-FLOPs Pareto front only (it costs a
model export and several forwards per candidate).
"""
from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..distill import data as data_module
from ..distill.config import RunConfig
from ..distill.losses import RelationTerms, layer_qkv
from .superlm import SUPERNET_FILE
from .train import build_space, supernet_options

UNIFORM_GENES = ("layers", "hidden", "ffn_ratio", "heads")
COSTS = ("params", "flops", "latency")


# ---- genes: the search's view of a sub-space ----

def genes_of(subspace) -> dict:
    """{gene: choices} of a sub-space (SubSpace.genes() for per-layer spaces, else the four factors)."""
    if hasattr(subspace, "genes"):
        return dict(subspace.genes())
    return {name: tuple(getattr(subspace, name)) for name in UNIFORM_GENES}


def arch_genes(subspace, arch) -> dict:
    if hasattr(subspace, "genes_of"):
        return dict(subspace.genes_of(arch))
    return {name: getattr(arch, name) for name in UNIFORM_GENES}


def arch_from_genes(subspace, genes: dict):
    if hasattr(subspace, "from_genes"):
        return subspace.from_genes(genes)
    from .space import Architecture

    return Architecture(**genes)


# ---- held-out data and the teacher's cached side ----

def held_out_batches(config: RunConfig, tokenizer) -> list[dict]:
    """The eval split of data.dataset (the same split the trainer holds out), tokenized in batches."""
    data = config.data
    evaluation = data_module.load_splits(data, config.train.seed, kind="unlabeled").eval
    collate = data_module.Collator(tokenizer, data.max_length, "unlabeled")
    size = config.train.batch_size
    batches = [collate([evaluation[i] for i in range(start, min(start + size, len(evaluation)))])
               for start in range(0, len(evaluation), size)]
    limit = config.nas.eval_batches
    return batches[:limit] if limit is not None else batches


class TeacherCache:
    """The teacher's last-layer Q/K/V of every held-out batch, computed once (or per call: cached=False)."""

    def __init__(self, teacher, batches: list[dict], cached: bool = True):
        self.teacher, self.batches, self.cached = teacher.eval(), batches, cached
        self._views = [self._compute(batch) for batch in batches] if cached else None

    @torch.no_grad()
    def _compute(self, batch: dict) -> dict:
        from ..capture import capture

        with capture(self.teacher) as recorded:
            self.teacher(**batch)
        return layer_qkv(recorded[-1])

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            yield batch, (self._views[index] if self.cached else self._compute(batch))


@torch.no_grad()
def held_out_loss(supernet, arch, cache: TeacherCache, spec: RelationTerms) -> float:
    """The mean relation loss of sub-network `arch` over the held-out batches."""
    supernet.set_active(arch)
    return model_loss(supernet, cache, spec)


@torch.no_grad()
def model_loss(model, cache: TeacherCache, spec: RelationTerms) -> float:
    """The mean relation loss of any capturable encoder (a SuperLM, a plain student) over the held-out batches."""
    from ..capture import capture

    model.eval()
    total, count = 0.0, 0
    for batch, teacher_qkv in cache:
        with capture(model) as recorded:
            model(**batch)
        total += float(spec(teacher_qkv, layer_qkv(recorded[-1], spec.letters), batch["attention_mask"].bool()))
        count += 1
    return total / count


# ---- costs and constraints ----

@torch.no_grad()
def measure_latency_ms(model, batch_size: int, seq_len: int, repeats: int, vocab_size: int) -> float:
    """Median wall time (ms) of one forward of a random (batch_size, seq_len) batch on the model's device."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    model(**batch)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000.0 * sorted(times)[len(times) // 2]


@dataclass
class Budget:
    """Absolute limits (None: unconstrained)."""
    params: float | None = None
    flops: float | None = None
    latency: float | None = None
    min_params: float | None = None

    def violations(self, costs: dict) -> list[str]:
        found = []
        for name in COSTS:
            limit = getattr(self, name)
            if limit is not None and costs.get(name) is not None and costs[name] > limit:
                found.append(f"{name} {_fmt(costs[name])} > {_fmt(limit)}")
        if self.min_params is not None and costs["params"] < self.min_params:
            found.append(f"params {_fmt(costs['params'])} < {_fmt(self.min_params)}")
        return found

    def describe(self) -> str:
        parts = [f"max {n} {_fmt(getattr(self, n))}" for n in COSTS if getattr(self, n) is not None]
        if self.min_params is not None:
            parts.append(f"min params {_fmt(self.min_params)}")
        return ", ".join(parts) or "none"


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def resolve_budget(budget_config, teacher_costs: dict) -> Budget:
    """Fractions (values in (0, 1]) become absolute limits relative to the teacher's costs."""
    def absolute(value, cost_name):
        if value is None:
            return None
        return value * teacher_costs[cost_name] if value <= 1.0 else float(value)

    return Budget(params=absolute(budget_config.params, "params"), flops=absolute(budget_config.flops, "flops"),
                  latency=absolute(budget_config.latency, "latency"),
                  min_params=absolute(budget_config.min_params, "params"))


# ---- the evaluator: supernets, cache, costs ----

@dataclass
class Evaluator:
    """Scores architectures: loss through the SuperLM of the architecture's sub-space, costs, budget."""
    space: object
    supernets: dict  # sub-space name -> SuperLM
    cache: TeacherCache
    spec: RelationTerms
    budget: Budget
    seq_len: int
    latency_config: object
    vocab_size: int
    measure_all_latency: bool = False
    teacher_costs: dict = field(default_factory=dict)
    latency_cache: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)  # str(arch) -> row
    history: list = field(default_factory=list)  # search progress (evolution: best per generation)

    @property
    def evaluations(self) -> int:
        return len(self.results)

    def costs(self, arch) -> dict:
        costs = {"params": self.space.params(arch), "flops": self.space.flops(arch, self.seq_len), "latency": None}
        if self.measure_all_latency:
            costs["latency"] = self.latency(arch)
        return costs

    def latency(self, arch) -> float:
        key = str(arch)
        if key not in self.latency_cache:
            model = self.supernets[self.space.subspace_of(arch).name].export(arch)
            settings = self.latency_config
            self.latency_cache[key] = measure_latency_ms(model, settings.batch_size, settings.seq_len,
                                                         settings.repeats, self.vocab_size)
        return self.latency_cache[key]

    def feasible(self, arch) -> bool:
        return not self.budget.violations(self.costs(arch))

    def score(self, arch) -> dict:
        key = str(arch)
        if key not in self.results:
            subspace = self.space.subspace_of(arch)
            loss = held_out_loss(self.supernets[subspace.name], arch, self.cache, self.spec)
            costs = self.costs(arch)
            self.results[key] = {"arch": key, "subspace": subspace.name, "loss": loss, **costs,
                                 "feasible": not self.budget.violations(costs)}
        return self.results[key]


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
    space, tries = evaluator.space, 50
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
        population = parents + children
    for arch in population:
        evaluator.score(arch)
    best = min(population, key=lambda a: evaluator.score(a)["loss"])
    evaluator.history.append({"evaluations": evaluator.evaluations, "best_loss": evaluator.score(best)["loss"],
                              "best": str(best)})
    return list(evaluator.results.values())


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
                     f"{cheapest} has {costs['params']:,} params, {_fmt(costs['flops'])} FLOPs"
                     + (f", {costs['latency']:.3g} ms" if costs["latency"] is not None else "")
                     + f"; the largest has {evaluator.space.params(largest):,} params")


# ---- loading trained SuperLMs ----

def load_supernet(run_dir, teacher, space, nas):
    """The SuperLM trained in `run_dir` (its model/supernet.pt); refuses one of another configuration."""
    from .superlm import SuperLM

    path = Path(run_dir) / "model" / SUPERNET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no trained SuperLM at {path}: run `pykd nas train` with the same config first")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    supernet = SuperLM.from_teacher(teacher, space, **supernet_options(nas))
    try:
        supernet.check_config_dict(saved["config"])
    except ValueError as error:
        raise ValueError(f"{path} holds a SuperLM of another configuration than this run's: {error}") from None
    supernet.load_state_dict(saved["state"])
    return supernet.eval()


def load_teacher_and_space(config: RunConfig):
    from ..distill.models import load_pretrained, load_tokenizer

    source = config.teacher.finetuned or config.teacher.path
    teacher = load_pretrained(source, "unlabeled").eval()
    return teacher, build_space(config, teacher.config), load_tokenizer(source)


def build_evaluator(config: RunConfig, cached: bool = True, supernets: dict | None = None) -> Evaluator:
    from .train import subspace_run_config

    nas = config.nas
    teacher, space, tokenizer = load_teacher_and_space(config)
    if supernets is None:
        supernets = {s.name: load_supernet(subspace_run_config(config, s.name).train.output_dir, teacher, space, nas)
                     for s in space.subspaces}
    cache = TeacherCache(teacher, held_out_batches(config, tokenizer), cached=cached)
    spec = RelationTerms(tuple(nas.relations), nas.relation_heads or teacher.config.num_attention_heads,
                         nas.relation_loss)
    teacher_costs = {"params": space.teacher_params(), "flops": space.teacher_flops(nas.seq_len), "latency": None}
    if nas.budget.latency is not None:
        teacher_costs["latency"] = measure_latency_ms(teacher, nas.latency.batch_size, nas.latency.seq_len,
                                                      nas.latency.repeats, teacher.config.vocab_size)
    evaluator = Evaluator(space, supernets, cache, spec, resolve_budget(nas.budget, teacher_costs), nas.seq_len,
                          nas.latency, teacher.config.vocab_size,
                          measure_all_latency=nas.budget.latency is not None or
                          (nas.search == "nsga2" and nas.nsga2.objective == "latency"), teacher_costs=teacher_costs)
    return evaluator


# ---- the command ----

def run_search(config: RunConfig, evaluator: Evaluator | None = None) -> dict:
    """Scores candidates with nas.search, writes CSV/JSON/PNG under nas.output/search, returns the summary."""
    nas = config.nas
    evaluator = evaluator or build_evaluator(config)
    rng = random.Random(config.train.seed)
    started = time.perf_counter()
    if nas.search == "enumerate" and not any(evaluator.feasible(a) for a in evaluator.space.candidates()):
        raise_no_candidate(evaluator)  # before scoring anything
    if nas.search == "enumerate":
        rows = enumerate_search(evaluator)
    elif nas.search == "evolution":
        rows = evolution_search(evaluator, nas.evolution, rng)
    else:
        rows = nsga2_search(evaluator, nas.nsga2, config.train.seed)
    seconds = time.perf_counter() - started
    feasible = [r for r in rows if r["feasible"]]
    if not feasible:
        raise_no_candidate(evaluator)
    best = min(feasible, key=lambda r: (r["loss"], r["flops"]))
    front = pareto_front(feasible, "flops")
    for row in [best, *front]:
        if row["latency"] is None:
            row["latency"] = evaluator.latency(_parse(evaluator.space, row["arch"]))
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


def _parse(space, text: str):
    subspace = space.subspaces[0]
    if hasattr(subspace, "parse"):
        return subspace.parse(text)
    from .space import Architecture

    return Architecture.parse(text)


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
    from .space import Architecture
    from .train import subspace_run_config

    from .superlm import save_student

    output = Path(output)
    if output.exists():
        raise ValueError(f"export path {str(output)!r} already exists; choose a new directory")
    arch = Architecture.parse(arch_text)
    teacher, space, tokenizer = load_teacher_and_space(config)
    space.validate(arch)
    subspace = space.subspace_of(arch)
    supernet = load_supernet(subspace_run_config(config, subspace.name).train.output_dir, teacher, space, config.nas)
    save_student(supernet.export(arch), tokenizer, output)
    return str(output)

