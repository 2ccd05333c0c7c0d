"""KD engine parts: config validation, layer mappings, loss terms, students cut from the teacher."""
import math

import pytest
import torch

from pykd.distill import config as run_config
from pykd.distill.losses import DistillationObjective, ForwardView, ModelShape
from pykd.distill.mapping import attention_pairs, hidden_pairs

transformers = pytest.importorskip("transformers")


# ---- config ----

def test_overrides_and_defaults():
    config = run_config.load(None, ["train.lr=5e-5", "losses.relation.relations=[qk, kk]", "student.dropout=0"])
    assert config.train.lr == 5e-5 and config.losses.relation.relations == ["qk", "kk"]
    assert config.student.dropout == 0.0 and config.student.num_hidden_layers == 3


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], r"unknown config key\(s\) \['train.lrr'\]"),
    (["bogus=1"], r"unknown config key\(s\) \['bogus'\]"),
    (["losses.relation.loss=l2"], r"losses.relation.loss must be one of"),
    (["losses.relation.relations=[qv]"], r"relations takes"),
    (["train.steps=0"], r"train.steps must be >= 1"),
    (["train.steps=two"], r"train.steps must be int"),
    (["train.progress=3"], r"train.progress must be true or false"),
    (["data.kind=unlabeled"], r"set losses.prediction.type to none"),
    (["student.init=checkpoint"], r"student.checkpoint is not set"),
    (["train"], r"--set takes key=value"),
    (["train.eval_every=0"], r"train.eval_every must be >= 1, got 0"),
    (["train.log_every=0"], r"train.log_every must be >= 1, got 0"),
    (["train.checkpoint_every=-1"], r"train.checkpoint_every must be >= 1, got -1"),
    (["data.max_train_examples=0"], r"data.max_train_examples must be >= 1, got 0"),
    (["data.max_eval_examples=0"], r"data.max_eval_examples must be >= 1, got 0"),
    (["data.eval_fraction=0"], r"data.eval_fraction must lie strictly between 0 and 1, got 0.0"),
    (["data.eval_fraction=1"], r"data.eval_fraction must lie strictly between 0 and 1, got 1.0"),
    (["train.lr=0"], r"train.lr must be > 0, got 0.0"),
    (["losses.prediction.temperature=0"], r"losses.prediction.temperature must be > 0"),
    (["train.weight_decay=-0.1"], r"train.weight_decay must be >= 0"),
    (["train.warmup_fraction=1.5"], r"train.warmup_fraction must lie in \[0, 1\], got 1.5"),
    (["train.optimizer=adam"], r"train.optimizer must be one of \('adamw', 'sgd'\)"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        run_config.load(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["losses.hidden.mapping=skipp"], r"config key losses.hidden.mapping must be one of \('skip', 'uniform', 'last', "
                                      r"'pairs', 'emd'\), got 'skipp'"),
    (["losses.relation.mapping=lats"], r"losses.relation.mapping must be one of"),
    (["losses.mi.mapping=uniformm"], r"losses.mi.mapping must be one of"),
    (["losses.hidden.mapping=pairs"], r"losses.hidden.pairs is given exactly when losses.hidden.mapping is 'pairs'"),
    (["losses.relation.pairs=[[0, 1]]"], r"losses.relation.pairs is given exactly when"),
    (["losses.hidden.mapping=pairs", "losses.hidden.pairs=[[0, 1, 2]]"], r"losses.hidden.pairs takes \[\[student"),
    (["losses.mi.bound=alpha-ish"],
     r"losses.mi.bound must be one of \('infonce', 'nwj', 'tuba', 'js', 'alpha', 'none'\)"),
    (["augment.word_fraction=.nan"], r"augment.word_fraction must lie in \(0, 1\], got nan"),
    (["nas.noise=.nan"], r"nas.noise must be >= 0, got nan"),
    (["nas.budget.flops=.nan"], r"nas.budget.flops must be finite and > 0 or null, got nan"),
    (["nas.relations=[]"], r"nas.relations takes a non-empty list of relations from"),
])
def test_every_key_is_checked_when_the_config_loads(overrides, message):
    """Layer mappings (a typo once failed only after data and models had loaded), NaN against every range."""
    with pytest.raises(ValueError, match=message):
        run_config.load(None, overrides)


def test_ranges_are_declared_beside_their_fields():
    import dataclasses

    from pykd.distill.options import Range

    def ranged(section, prefix=""):
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if dataclasses.is_dataclass(value):
                yield from ranged(value, f"{prefix}{field.name}.")
            elif isinstance(field.metadata.get("range"), Range):
                yield prefix + field.name

    keys = set(ranged(run_config.DEFAULT))
    # the counts, periods and rates checked before this layout, from the tables it replaced
    assert {"train.steps", "train.batch_size", "train.grad_accum", "train.eval_every", "train.log_every",
            "train.checkpoint_every", "data.max_length", "data.max_train_examples", "data.max_eval_examples",
            "train.lr", "losses.prediction.temperature", "train.weight_decay", "train.clip_norm",
            "data.eval_fraction", "train.warmup_fraction", "nas.k", "nas.sandwich_random", "nas.experts",
            "nas.seq_len", "nas.latency.batch_size", "nas.latency.seq_len", "nas.latency.repeats",
            "nas.evolution.population", "nas.evolution.parents", "nas.evolution.mutations",
            "nas.evolution.crossovers", "nas.evolution.generations", "nas.nsga2.trials", "nas.nsga2.population",
            "nas.proxy.top_k", "nas.proxy.steps", "nas.relation_heads", "nas.budget.params", "nas.budget.flops",
            "nas.budget.latency", "nas.budget.min_params", "nas.evolution.mutation_prob", "nas.noise",
            "augment.copies", "augment.mlm_top_k", "augment.batch_size", "augment.word_fraction",
            "augment.mixup_alpha"} <= keys


def test_resume_conflicts_name_every_key_a_checkpoint_depends_on():
    saved = run_config.to_dict(run_config.load(None, []))
    allowed = run_config.load(None, ["train.log_every=1", "train.eval_every=7", "train.checkpoint_every=3",
                                     "train.progress=false", "train.output_dir=elsewhere", "train.resume=false",
                                     "train.steps=999"])
    assert run_config.resume_conflicts(saved, run_config.to_dict(allowed)) == []
    changed = run_config.load(None, ["train.grad_accum=2", "student.hidden_size=96", "losses.mi.bound=nwj",
                                     "train.seed=1", "teacher.finetuned=elsewhere", "data.eval_fraction=0.2"])
    assert run_config.resume_conflicts(saved, run_config.to_dict(changed)) == [
        "data.eval_fraction (0.1 -> 0.2)", "losses.mi.bound ('none' -> 'nwj')", "student.hidden_size (192 -> 96)",
        "teacher.finetuned (None -> 'elsewhere')", "train.grad_accum (1 -> 2)", "train.seed (0 -> 1)"]
    older = dict(saved, train={k: v for k, v in saved["train"].items() if k != "optimizer"})  # before the key
    assert run_config.resume_conflicts(older, saved) == ["train.optimizer ('<absent>' -> 'adamw')"]


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 7\nlosses:\n  mi:\n    bound: nwj\n")
    config = run_config.load(str(path), ["train.steps=9"])
    assert config.train.steps == 9 and config.losses.mi.bound == "nwj"


# ---- mappings ----

def test_mappings():
    assert hidden_pairs("skip", 3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert hidden_pairs("skip", 5, 12) == [(1, 2), (2, 4), (3, 7), (4, 9), (5, 12)]
    assert hidden_pairs("uniform", 5, 12) == [(1, 2), (2, 5), (3, 7), (4, 10), (5, 12)]
    assert hidden_pairs("last", 3, 6, include_embeddings=True) == [(0, 0), (3, 6)]
    assert attention_pairs("skip", 3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert attention_pairs("last", 3, 6) == [(2, 5)]
    assert attention_pairs("pairs", 3, 6, [[0, 0], [2, 5]]) == [(0, 0), (2, 5)]
    with pytest.raises(ValueError, match="out of range"):
        attention_pairs("pairs", 3, 6, [[3, 5]])
    with pytest.raises(ValueError, match="mapping must be one of"):
        hidden_pairs("bogus", 3, 6)


# ---- loss terms ----

def _view(gen, batch, length, layers, hidden, heads, classes, mask, dtype=torch.float64):
    states = tuple(torch.randn(batch, length, hidden, generator=gen, dtype=dtype) for _ in range(layers + 1))
    from pykd.capture import LayerCapture

    captured = [LayerCapture(*(torch.randn(batch, heads, length, hidden // heads, generator=gen, dtype=dtype)
                               for _ in range(3))) for _ in range(layers)]
    return ForwardView(torch.randn(batch, classes, generator=gen, dtype=dtype), states, captured, mask)


def _objective(**overrides):
    values = {"losses": {"prediction": {"temperature": 3.0, "t_squared": True, "hard_weight": 0.5},
                         "hidden": {"type": "mse"}, "relation": {"relations": ["qk", "vv"], "relation_heads": 2},
                         "mi": {"bound": "none"}}}
    for key, value in overrides.items():
        values["losses"].setdefault(key, {}).update(value)
    return run_config.from_dict(values).losses


def test_terms_match_their_formulas():
    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    teacher = _view(gen, 2, 9, 4, 16, 4, 3, mask)
    student = _view(gen, 2, 9, 2, 16, 2, 3, mask)
    objective = DistillationObjective(_objective(), ModelShape(4, 16), ModelShape(2, 16), "classification").double()
    labels = torch.tensor([2, 0])
    terms, total = objective(teacher, student, labels)

    soft = -(torch.softmax(teacher.logits / 3, -1) * torch.log_softmax(student.logits / 3, -1)).sum(-1).mean() * 9
    hard = torch.nn.functional.cross_entropy(student.logits, labels)
    hidden = []
    for s, t in [(1, 2), (2, 4)]:
        per_token = (student.hidden_states[s] - teacher.hidden_states[t]).pow(2).mean(-1)
        hidden.append(torch.stack([per_token[b][mask[b]].mean() for b in range(2)]).mean())
    from pykd import attention_relation_loss_reference as relation

    def flat(x):
        return x.transpose(1, 2).flatten(2)

    rel = sum(relation(flat(getattr(teacher.layers[3], a)), flat(getattr(teacher.layers[3], b)),
                       flat(getattr(student.layers[1], a)), flat(getattr(student.layers[1], b)),
                       num_relation_heads=2, mask=mask, loss="kl") for a, b in [("query", "key"), ("value", "value")])
    expected = {"prediction": soft, "hard_label": hard, "hidden": torch.stack(hidden).mean(), "relation": rel}
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(float(value), rel=1e-5), name
    weighted = soft + 0.5 * hard + expected["hidden"] + rel
    assert float(total) == pytest.approx(float(weighted), rel=1e-5)


def test_projection_critics_and_baseline_train():
    gen = torch.Generator().manual_seed(4)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[2, 3:] = False
    teacher = _view(gen, 6, 5, 2, 16, 4, 2, mask, torch.float32)
    student = _view(gen, 6, 5, 1, 8, 2, 2, mask, torch.float32)
    config = _objective(hidden={"type": "cosine", "mapping": "last"}, mi={"bound": "alpha", "samples": "tokens"},
                        relation={"relations": ["kk"]})
    objective = DistillationObjective(config, ModelShape(2, 16), ModelShape(1, 8), "classification")
    for index, hidden in enumerate(student.hidden_states):
        student.hidden_states = student.hidden_states[:index] + (hidden.requires_grad_(),) + \
            student.hidden_states[index + 1:]
    terms, total = objective(teacher, student)
    total.backward()
    assert set(terms) == {"prediction", "hidden", "relation", "mi"}
    assert math.isfinite(float(terms["mi"]))
    for name, parameter in objective.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert student.hidden_states[-1].grad.abs().sum() > 0


def test_relation_heads_must_divide_both_widths():
    with pytest.raises(ValueError, match=r"relation_heads \(5\) must divide the teacher's attention width 16"):
        DistillationObjective(_objective(relation={"relation_heads": 5}), ModelShape(2, 16), ModelShape(1, 10),
                              "classification")


def test_soft_ce_refuses_regression():
    with pytest.raises(ValueError, match="soft_ce needs class logits"):
        DistillationObjective(_objective(), ModelShape(2, 16), ModelShape(1, 16), "regression")


# ---- students ----

def test_student_cut_from_the_teacher(tmp_path):
    from tests.kd_fixtures import tiny_teacher
    from pykd.distill.models import build_student, load_pretrained

    teacher = load_pretrained(tiny_teacher(tmp_path, layers=4, hidden=48, heads=4), "classification", 3)
    spec = run_config.from_dict({"student": {"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2,
                                             "intermediate_size": 50}}).student
    student = build_student(teacher, spec)
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 24
    t_layers, s_layers = teacher.bert.encoder.layer, student.bert.encoder.layer
    torch.testing.assert_close(s_layers[1].attention.self.query.weight,
                               t_layers[2].attention.self.query.weight[:24, :24])
    torch.testing.assert_close(s_layers[0].intermediate.dense.weight, t_layers[0].intermediate.dense.weight[:50, :24])
    torch.testing.assert_close(student.classifier.weight, teacher.classifier.weight[:, :24])
    torch.testing.assert_close(student.bert.embeddings.word_embeddings.weight,
                               teacher.bert.embeddings.word_embeddings.weight[:, :24])
    too_big = run_config.from_dict({"student": {"hidden_size": 64, "num_attention_heads": 4}}).student
    with pytest.raises(ValueError, match="may not be larger than the teacher"):
        build_student(teacher, too_big)
