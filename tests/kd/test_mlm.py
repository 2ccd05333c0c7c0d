"""Masked-LM distillation in the KD engine: masking, masked-LM teachers and students, the fused term, the
head fitted on a frozen encoder, and the run end to end (tiny models, CPU)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pykd.distill import config as run_config

transformers = pytest.importorskip("transformers")
from tests.kd_fixtures import WORDS, tiny_csv, tiny_masked_lm, tiny_teacher
from tests.ops.vocab_cases import Case, bounds, oracle
from pykd.distill import data, masking, models
from pykd.distill.losses import ForwardView, MaskedLMTerm

SENTENCES = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 11)) for i in range(64)]
LONG_WORDS = ["unbelievably", "antidisestablishmentarianism", "tokenization", "overparameterised", "the", "a"]


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("minilm-l6")


def _collator(tokenizer, whole_word=False, seed=0, **fractions):
    config = run_config.MaskingConfig(whole_word=whole_word, **fractions)
    return data.Collator(tokenizer, 32, "mlm", masking.Masking.of(config, tokenizer), seed)


def _rows(texts):
    return [{"text": t} for t in texts]


def _binomial_ok(count, n, p):
    """|count / n - p| within 5 standard deviations (a false failure has probability < 6e-7)."""
    return abs(count / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_masking_is_berts(tokenizer):
    collate = _collator(tokenizer)
    plain = data.Collator(tokenizer, 32, "unlabeled")(_rows(SENTENCES))
    batch = collate(_rows(SENTENCES), mask_keys=range(len(SENTENCES)))
    special = torch.tensor([tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
                            for ids in plain["input_ids"].tolist()]).bool() | (plain["attention_mask"] == 0)
    chosen = batch["labels"] != masking.IGNORE_INDEX
    assert not (chosen & special).any()
    candidates = (~special).sum(1)
    assert chosen.sum(1).tolist() == [max(1, round(0.15 * int(c))) for c in candidates]
    assert torch.equal(batch["labels"][chosen], plain["input_ids"][chosen])
    assert torch.equal(batch["input_ids"][~chosen], plain["input_ids"][~chosen])
    assert torch.equal(batch["attention_mask"], plain["attention_mask"]) and "special_tokens_mask" not in batch
    # 80 / 10 / 10 over many rows
    many = collate(_rows(SENTENCES * 8), mask_keys=range(len(SENTENCES) * 8))
    picked = many["labels"] != masking.IGNORE_INDEX
    got, original = many["input_ids"][picked], many["labels"][picked]
    n = len(got)
    masked = got == tokenizer.mask_token_id
    replaced = ~masked & (got != original)
    assert _binomial_ok(int(masked.sum()), n, 0.8) and _binomial_ok(int(replaced.sum()), n, 0.1)
    assert not set(got[replaced].tolist()) & set(tokenizer.all_special_ids)


def test_masks_depend_on_seed_stream_and_key_only(tokenizer):
    collate = _collator(tokenizer)
    rows = _rows(SENTENCES[:8])
    whole = collate(rows, mask_keys=range(100, 108))
    again = collate(rows, mask_keys=range(100, 108))
    assert torch.equal(whole["input_ids"], again["input_ids"]) and torch.equal(whole["labels"], again["labels"])
    halves = [collate(rows[:4], mask_keys=range(100, 104)), collate(rows[4:], mask_keys=range(104, 108))]
    for i in range(8):  # another batching pads differently; each row's tokens and mask are the same
        part, j = halves[i // 4], i % 4
        length = int(whole["attention_mask"][i].sum())
        assert torch.equal(part["labels"][j, :length], whole["labels"][i, :length])
        assert torch.equal(part["input_ids"][j, :length], whole["input_ids"][i, :length])
    for other in (collate(rows, mask_keys=range(200, 208)), collate(rows, mask_keys=range(100, 108), stream="eval"),
                  _collator(tokenizer, seed=1)(rows, mask_keys=range(100, 108))):
        assert not torch.equal(other["labels"], whole["labels"])
    with pytest.raises(ValueError, match="needs mask_keys"):
        collate(rows)


def test_whole_word_masking_takes_every_piece_of_a_word(tokenizer):
    texts = [" ".join(LONG_WORDS[(i + j) % len(LONG_WORDS)] for j in range(4 + i % 5)) for i in range(40)]
    encoding = tokenizer(texts, padding=True, truncation=True, max_length=32)
    batch = _collator(tokenizer, whole_word=True)(_rows(texts), mask_keys=range(len(texts)))
    split_words = 0
    for i in range(len(texts)):
        words = encoding.word_ids(i)
        chosen = {p for p in range(len(words)) if batch["labels"][i, p] != masking.IGNORE_INDEX}
        assert chosen
        for word in {words[p] for p in chosen}:
            pieces = {p for p, w in enumerate(words) if w == word}
            assert pieces <= chosen
            split_words += len(pieces) > 1
    assert split_words  # the case tested something


def test_mlm_config_errors_name_the_key():
    def load(*overrides):
        return run_config.load(None, list(overrides))

    with pytest.raises(ValueError, match="losses.prediction.type mse needs the vocabulary logits"):
        load("data.kind=mlm", "losses.prediction.type=mse")
    with pytest.raises(ValueError, match="losses.prediction.type kl is for masked-LM KD"):
        load("losses.prediction.type=kl")
    with pytest.raises(ValueError, match="data.masking.mask_fraction .* data.masking.random_fraction"):
        load("data.kind=mlm", "data.masking.mask_fraction=0.95")
    with pytest.raises(ValueError, match="data.masking.probability must lie in"):
        load("data.kind=mlm", "data.masking.probability=0")
    with pytest.raises(ValueError, match="teacher.cache_logits"):
        load("data.kind=mlm", "teacher.cache_logits=true")
    with pytest.raises(ValueError, match=r"augment.policy, augment.mixup"):
        load("data.kind=mlm", "augment.mixup=true")
    with pytest.raises(ValueError, match="losses.prediction.positions must be one of"):
        load("data.kind=mlm", "losses.prediction.positions=some")
    assert load("data.kind=mlm", "losses.prediction.type=jsd").losses.prediction.beta == 0.5


def test_the_example_is_distilberts_recipe():
    from tests.paths import REPO

    example = run_config.load(str(REPO / "examples" / "mlm_distill.yaml"))
    prediction = example.losses.prediction
    assert example.data.kind == "mlm" and example.losses.hidden.type == "cosine"
    assert not example.losses.relation.relations
    assert (prediction.type, prediction.temperature, prediction.t_squared, prediction.weight, prediction.hard_weight) \
        == ("kl", 2.0, True, 5.0, 2.0)


def test_a_model_without_a_trained_head_is_refused(tmp_path):
    headless = tiny_teacher(tmp_path)
    with pytest.raises(ValueError, match=r"teacher.path .* has no trained masked-LM head: .*pykd mlm-head"):
        models.load_pretrained(headless, "mlm")
    assert models.load_masked_lm(headless, require_head=False).config.num_hidden_layers == 4
    with pytest.raises(ValueError, match=r"teacher.path '.*missing' .* is not a loadable masked language model"):
        models.load_masked_lm(str(tmp_path / "missing"))


def _student_spec(**kw):
    return run_config.StudentConfig(**{"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2,
                                       "intermediate_size": 40, **kw})


@pytest.mark.parametrize("tied", [True, False])
def test_the_students_head_is_cut_from_the_teachers(tmp_path, tied):
    path = tiny_masked_lm(tmp_path)
    if not tied:
        config = transformers.AutoConfig.from_pretrained(path)
        config.tie_word_embeddings = False
        model = transformers.BertForMaskedLM.from_pretrained(path, config=config)
        with torch.no_grad():
            model.cls.predictions.decoder.weight.normal_()
        model.save_pretrained(path)
    teacher = models.load_pretrained(path, "mlm")
    student = models.build_student(teacher, _student_spec())
    t_head, s_head = teacher.cls.predictions, student.cls.predictions
    assert torch.equal(s_head.transform.dense.weight, t_head.transform.dense.weight[:24, :24])
    assert torch.equal(s_head.transform.LayerNorm.weight, t_head.transform.LayerNorm.weight[:24])
    assert torch.equal(s_head.bias, t_head.bias) and s_head.bias.abs().sum() > 0
    assert torch.equal(s_head.decoder.weight, t_head.decoder.weight[:, :24])
    assert (s_head.decoder.weight is student.get_input_embeddings().weight) == tied
    assert (t_head.decoder.weight is teacher.get_input_embeddings().weight) == tied


def test_decoder_inputs_are_what_the_head_projects(tmp_path, tokenizer):
    model = models.load_pretrained(tiny_masked_lm(tmp_path), "mlm").eval()
    inputs = data.Collator(tokenizer, 20, "unlabeled")(_rows(SENTENCES[:3]))
    with torch.no_grad():
        logits = model(**inputs).logits
        with models.decoder_inputs(model) as record:
            empty = model(**inputs).logits
        decoder = model.get_output_embeddings()
        assert torch.equal(F.linear(record.inputs, decoder.weight, decoder.bias), logits)
    assert empty.shape == logits.shape and empty.stride()[-1] == 0 and not empty.any()
    assert "forward" not in vars(decoder)  # the decoder is itself again
    view = record.view()
    assert view.weight is decoder.weight and view.bias is decoder.bias


def _views(tmp_path, tokenizer):
    """Teacher and student decoder views and labels of one masked batch (student: 2 layers, width 24)."""
    teacher = models.load_pretrained(tiny_masked_lm(tmp_path), "mlm").eval()
    student = models.build_student(teacher, _student_spec(dropout=0.0))
    batch = _collator(tokenizer)(_rows(SENTENCES[:6]), mask_keys=range(6))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    views = []
    for model in (teacher, student):
        with models.decoder_inputs(model) as record:
            out = model(**inputs, output_hidden_states=True)
        views.append(ForwardView(None, out.hidden_states, [], inputs["attention_mask"].bool(), record.view()))
    return views[0], views[1], batch["labels"]


def _oracle_term(teacher, student, labels, kd_weight, hard_weight, options):
    def flat(view):
        return view.decoder.inputs.detach().reshape(-1, view.decoder.inputs.shape[-1])

    case = Case(flat(student), student.decoder.weight.detach(), student.decoder.bias.detach(),
                {"h_t": flat(teacher), "w_t": teacher.decoder.weight.detach(), "b_t": teacher.decoder.bias.detach()},
                labels, {**options, "kd_weight": kd_weight, "hard_label_weight": hard_weight})
    ref = oracle(case)
    return ref.value, bounds(case, ref)["value"]


@pytest.mark.parametrize("divergence, temperature, t_squared, positions, hard_weight", [
    ("kl", 2.0, True, "masked", 2.0), ("soft_ce", 1.0, False, "masked", 0.0), ("reverse_kl", 4.0, True, "all", 0.0),
    ("jsd", 2.0, False, "all", 1.5), ("none", 1.0, False, "masked", 1.0)])
def test_masked_lm_term_is_the_divergence_on_the_selected_rows(tmp_path, tokenizer, divergence, temperature,
                                                              t_squared, positions, hard_weight):
    teacher, student, labels = _views(tmp_path, tokenizer)
    config = run_config.PredictionLoss(type=divergence, temperature=temperature, t_squared=t_squared, weight=5.0,
                                       hard_weight=hard_weight, beta=0.3, positions=positions)
    value = MaskedLMTerm(config)(teacher, student, labels)["mlm"]
    flat = labels.reshape(-1)
    valid = torch.where(student.mask.reshape(-1), 0, -100)
    options = {"divergence": "kl" if divergence == "none" else divergence, "beta": 0.3, "temperature": temperature,
               "scale_by_t2": t_squared}
    kd_weight = 0.0 if divergence == "none" else 5.0
    if positions == "masked":
        want, bound = _oracle_term(teacher, student, flat, kd_weight, hard_weight, options)
    else:
        kd, kd_bound = _oracle_term(teacher, student, valid, kd_weight, 0.0, options)
        ce, ce_bound = _oracle_term(teacher, student, flat, 0.0, 1.0, options)
        want, bound = kd + hard_weight * ce, kd_bound + hard_weight * ce_bound
    assert abs(float(value.detach()) - want) <= bound, (float(value.detach()), want, bound)
    value.backward()
    assert student.decoder.weight.grad is not None and teacher.decoder.weight.grad is None


def test_evaluation_logs_the_parts_unweighted(tmp_path, tokenizer):
    teacher, student, labels = _views(tmp_path, tokenizer)
    config = run_config.PredictionLoss(type="kl", temperature=2.0, t_squared=True, weight=5.0, hard_weight=2.0)
    with torch.no_grad():
        terms = MaskedLMTerm(config)(teacher, student, labels)
    assert set(terms) == {"mlm", "prediction", "hard_label", "teacher_hard_label"}
    flat = labels.reshape(-1)
    picked = flat != -100

    def cross_entropy(view):
        h = view.decoder.inputs.reshape(-1, view.decoder.inputs.shape[-1])[picked].double()
        return F.cross_entropy(F.linear(h, view.decoder.weight.double(), view.decoder.bias.double()), flat[picked])

    for name, view in (("hard_label", student), ("teacher_hard_label", teacher)):
        # fp32 against float64: the value bound of pykd.vocab_kd_loss's oracle for the hard term
        _, bound = _oracle_term(teacher, view, flat, 0.0, 1.0, {"temperature": 1.0})
        assert abs(float(terms[name]) - float(cross_entropy(view).detach())) <= bound
    assert float(terms["mlm"]) == pytest.approx(5.0 * float(terms["prediction"]) + 2.0 * float(terms["hard_label"]),
                                                rel=1e-5)


# ---- the engine end to end ----

def _mlm_values(tmp_path, output, **sections):
    values = {"teacher": {"path": str(tmp_path / "masked_lm")},
              "data": {"dataset": str(tmp_path / "sentiment.csv"), "kind": "mlm", "max_length": 20,
                       "eval_fraction": 0.2, "masking": {"whole_word": True}},
              "student": {"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 40},
              "losses": {"prediction": {"type": "kl", "temperature": 2.0, "t_squared": True, "weight": 5.0,
                                        "hard_weight": 2.0},
                         "hidden": {"type": "cosine", "mapping": "last"},
                         "relation": {"relation_heads": 2, "relations": ["qk", "vv"]}},
              "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "eval_every": 100, "log_every": 1,
                        "checkpoint_every": 100, "output_dir": str(tmp_path / output), "progress": False,
                        "optimizer": "sgd"}}
    for section, entries in sections.items():
        values.setdefault(section, {}).update(entries)
    return values


def test_mlm_distillation_runs_and_resumes_exactly(tmp_path):
    from pykd.distill.trainer import Trainer

    tiny_masked_lm(tmp_path)
    tiny_csv(tmp_path)
    history = Trainer(run_config.from_dict(_mlm_values(tmp_path, "straight")), "distill").train()
    steps = [r for r in history if "eval" not in r]
    assert {"mlm", "hidden", "relation", "loss"} <= set(steps[-1]) and all(math.isfinite(r["loss"]) for r in steps)
    final = next(r for r in history if r.get("final"))["eval"]
    assert {"mlm", "prediction", "hard_label", "teacher_hard_label", "hidden", "relation"} <= set(final)
    saved = models.load_masked_lm(str(tmp_path / "straight" / "model"))  # a complete AutoModelForMaskedLM
    assert saved.config.hidden_size == 24 and saved.get_output_embeddings().weight is \
        saved.get_input_embeddings().weight
    # the masks are keyed by sample position: a run stopped and resumed trains exactly as the straight one
    values = _mlm_values(tmp_path, "resumed")
    Trainer(run_config.from_dict(values), "distill").train(stop_after=2)
    Trainer(run_config.from_dict(values), "distill").train()
    straight, resumed = (torch.load(tmp_path / name / "checkpoint.pt")["model"] for name in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_cli_refuses_a_teacher_without_a_head(tmp_path, capsys):
    from pykd.cli import main

    code = main(["distill", "--set", f"teacher.path={tiny_teacher(tmp_path)}", "--set", "data.kind=mlm",
                 "--set", f"data.dataset={tiny_csv(tmp_path)}", "--set", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2 and "has no trained masked-LM head" in capsys.readouterr().err


def test_fitting_a_head_trains_only_the_head(tmp_path):
    from pykd.distill.mlm_head import fit_head

    headless = tiny_teacher(tmp_path)
    before = models.load_masked_lm(headless, require_head=False).state_dict()
    path = fit_head(str(tmp_path / "head"), [f"teacher.path={headless}", f"data.dataset={tiny_csv(tmp_path)}",
                                             "data.max_length=20", "train.steps=3", "train.batch_size=8",
                                             "train.progress=false", "train.log_every=1"])
    fitted = models.load_masked_lm(str(path))  # now with a head
    after = fitted.state_dict()
    encoder = [k for k in after if k.startswith("bert.")]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)
    head = [k for k in after if not k.startswith("bert.") and not k.endswith("decoder.weight")]
    assert head and all(not torch.equal(after[k], before[k]) for k in head if "LayerNorm.weight" not in k)
    logged = [json.loads(line) for line in (tmp_path / "head" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "mlm_ce" in r] == [1, 2, 3]
    assert math.isfinite(next(r for r in logged if r.get("final"))["eval"]["mlm_ce"])
