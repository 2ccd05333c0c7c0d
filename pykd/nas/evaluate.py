r"""Scoring architecture candidates (AutoDistil): held-out relation loss through a trained SuperLM, costs, budget.

Fitness of a candidate a is the SuperLM's held-out relation-distillation loss, without training:

    loss(a) = mean over held-out batches b of sum_{r in QQ, KK, VV} attention_relation_loss(T_r(b), S_r(a, b))

(the KD engine's relation term, pykd.distill.losses.RelationTerms, on the last layers), over the
eval split the trainer holds out (pykd.distill.data.load_splits), nas.eval_batches batches of it.
The teacher's side T(b) (its last-layer Q, K, V per batch) is computed once and cached for every
candidate (`TeacherCache`). Costs per candidate: exact parameters and analytic FLOPs from the
SearchSpace, and latency measured on the current device (median of repeats of the exported plain
model's forward, batch and length from nas.latency; cached per architecture).

Constraints (nas.budget, `Budget`): maximum params / FLOPs / latency and a minimum params (the
lower end of MoS's parameter window); a value in (0, 1] is a fraction of the teacher's cost, a
larger one absolute (`resolve_budget`). An `Evaluator` bundles the SuperLMs, the cache, the costs
and the budget; pykd.nas.algorithms searches over it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..distill import data as data_module
from ..distill.losses import RelationTerms, layer_qkv
from ..loading import bad_file, load_tensors, reading
from .architecture import LayerwiseArchitecture
from .space import COSTS, format_cost
from .superlm import SUPERNET_FILE
from .config import build_space, supernet_dir, supernet_options


# ---- held-out data and the teacher's cached side ----

def held_out_batches(config, tokenizer) -> list[dict]:
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
        """What of `costs` breaks the budget, as "name cost > limit" lines (none: feasible)."""
        found = []
        for name in COSTS:
            limit = getattr(self, name)
            if limit is not None and costs.get(name) is not None and costs[name] > limit:
                found.append(f"{name} {format_cost(costs[name])} > {format_cost(limit)}")
        if self.min_params is not None and costs["params"] < self.min_params:
            found.append(f"params {format_cost(costs['params'])} < {format_cost(self.min_params)}")
        return found

    def describe(self) -> str:
        parts = [f"max {n} {format_cost(getattr(self, n))}" for n in COSTS if getattr(self, n) is not None]
        if self.min_params is not None:
            parts.append(f"min params {format_cost(self.min_params)}")
        return ", ".join(parts) or "none"


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
    on_score: object = None  # called with each newly scored row (search.py journals it)
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
            settings = self.latency_config
            self.latency_cache[key] = measure_latency_ms(self.timed_model(arch), settings.batch_size,
                                                         settings.seq_len, settings.repeats, self.vocab_size)
        return self.latency_cache[key]

    def timed_model(self, arch):
        """What a candidate's latency is measured on: the exported stock model; for a per-layer space's
        candidates (whose head counts or FFN widths may differ by layer, which no stock model holds) the
        SuperLM with the candidate active, for every candidate of such a space alike so that they compare."""
        supernet = self.supernets[self.space.subspace_of(arch).name]
        if isinstance(arch, LayerwiseArchitecture):
            supernet.set_active(arch)
            return supernet
        return supernet.export(arch)

    def feasible(self, arch) -> bool:
        return not self.budget.violations(self.costs(arch))

    def score(self, arch) -> dict:
        key = str(arch)
        if key not in self.results:
            subspace = self.space.subspace_of(arch)
            loss = held_out_loss(self.supernets[subspace.name], arch, self.cache, self.spec)
            self.results[key] = self.row(arch, subspace.name, loss)
            if self.on_score is not None:
                self.on_score(self.results[key])
        return self.results[key]

    def row(self, arch, subspace: str, loss: float) -> dict:
        """A scored candidate's row: its loss, its costs and whether they meet the budget."""
        costs = self.costs(arch)
        return {"arch": str(arch), "subspace": subspace, "loss": loss, **costs,
                "feasible": not self.budget.violations(costs)}


# ---- loading trained SuperLMs ----

def load_supernet(run_dir, teacher, space, nas):
    """The SuperLM trained in `run_dir` (its model/supernet.pt); refuses one of another configuration."""
    from .superlm import SuperLM

    path = Path(run_dir) / "model" / SUPERNET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no trained SuperLM at {path}: run `pykd nas train` with the same config first")
    way_out = f"train it again with `pykd nas train` (after deleting {Path(run_dir) / 'checkpoint.pt'})"
    saved = load_tensors(path, "SuperLM file", way_out)
    missing = [key for key in ("config", "state") if not isinstance(saved, dict) or key not in saved]
    if missing:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise bad_file("SuperLM file", path, f"lacks the entries {missing} a trained SuperLM has (it holds {found})",
                       way_out)
    supernet = SuperLM.from_teacher(teacher, space, **supernet_options(nas))
    try:
        supernet.check_config_dict(saved["config"])
    except ValueError as error:
        raise ValueError(f"{path} holds a SuperLM of another configuration than this run's: {error}") from None
    with reading(path, "SuperLM file", way_out):  # right config, wrong tensors: load_state_dict's RuntimeError
        supernet.load_state_dict(saved["state"])
    return supernet.eval()


def check_latency_positions(nas, teacher_config) -> None:
    """nas.latency.seq_len within the teacher's positions (every student has the teacher's), before any work:
    the latency of the best candidate and the front is measured at that length in every search."""
    from ..distill.trainer import POSITIONS_AFTER_PADDING

    positions = teacher_config.max_position_embeddings
    if teacher_config.model_type in POSITIONS_AFTER_PADDING:
        positions -= (teacher_config.pad_token_id or 0) + 1
    if nas.latency.seq_len > positions:
        raise ValueError(f"config key nas.latency.seq_len ({nas.latency.seq_len}) exceeds the {positions} positions "
                         f"of the teacher {getattr(teacher_config, '_name_or_path', '')!r}")


def load_teacher_and_space(config):
    from ..distill.models import load_pretrained, load_tokenizer

    source = config.teacher.finetuned or config.teacher.path
    teacher = load_pretrained(source, "unlabeled").eval()
    return teacher, build_space(config.nas, teacher.config), load_tokenizer(source)


def build_evaluator(config, cached: bool = True, supernets: dict | None = None) -> Evaluator:
    nas = config.nas
    teacher, space, tokenizer = load_teacher_and_space(config)
    check_latency_positions(nas, teacher.config)
    if supernets is None:
        supernets = {s.name: load_supernet(supernet_dir(nas, s.name), teacher, space, nas)
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
