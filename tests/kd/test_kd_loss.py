"""pykd.KDLoss: the KD engine's objective as a loss module for any loop (plain, compiled)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
import pykd
from pykd.distill.config import StudentConfig
from pykd.distill.losses import masked_mse
from pykd.distill.models import build_student

LOSSES = {"relation": {"relation_heads": 2, "relations": ["qk", "vv"]}, "hidden": {"include_embeddings": True},
          "mi": {"bound": "alpha", "critic_hidden": 16, "critic_dim": 8}}


def tiny_pair(labels: int = 3, seed: int = 0):
    """A random 3-layer BERT classifier as the teacher and a 2-layer, narrower student cut from it."""
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=labels)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    teacher = transformers.BertForSequenceClassification(config)
    student = build_student(teacher, StudentConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                                   intermediate_size=24, dropout=0.0))
    return teacher.eval(), student


def tiny_batch(rows: int = 5, length: int = 9, labels: int = 3, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(rows):  # odd lengths, padded, one of length 1
        mask[row, max(1, length - 2 * row):] = 0
    return {"input_ids": torch.randint(1, 50, (rows, length), generator=generator) * mask, "attention_mask": mask,
            "labels": torch.randint(0, labels, (rows,), generator=generator)}


def test_terms_are_the_configured_ones_and_match_float64_references():
    teacher, student = tiny_pair()
    kd = pykd.KDLoss(teacher, student, LOSSES, prediction={"hard_weight": 0.5, "temperature": 3.0})
    batch = tiny_batch()
    out = kd(batch)
    assert set(out.terms) == {"prediction", "hard_label", "hidden", "relation", "mi"}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=True)
        s_out = student(**inputs, output_hidden_states=True)
    target = torch.softmax(t_out.logits.double() / 3.0, -1)
    expected = -(target * torch.log_softmax(s_out.logits.double() / 3.0, -1)).sum(-1).mean()
    assert torch.allclose(out.terms["prediction"].double(), expected, rtol=1e-5)
    assert torch.allclose(out.terms["hard_label"].double(),
                          torch.nn.functional.cross_entropy(s_out.logits.double(), batch["labels"]), rtol=1e-5)
    # hidden: mapping skip (student 1 <- teacher 1, 2 <- 3) plus the embeddings, each through its projection
    mask = batch["attention_mask"].bool()
    pairs = kd.objective.hidden.pairs
    assert pairs == [(0, 0), (1, 1), (2, 3)]
    with torch.no_grad():
        hidden = torch.stack([masked_mse(project(s_out.hidden_states[s]), t_out.hidden_states[t], mask)
                              for (s, t), project in zip(pairs, kd.objective.hidden.projections)]).mean()
    assert torch.allclose(out.terms["hidden"], hidden, rtol=1e-5)
    weights = kd.config
    total = (out.terms["prediction"] + 0.5 * out.terms["hard_label"] + out.terms["hidden"]
             + weights.relation.weight * out.terms["relation"] + weights.mi.weight * out.terms["mi"])
    assert torch.allclose(out.loss, total, rtol=1e-5)
    assert torch.equal(out.logits, s_out.logits)


def test_its_parameters_are_the_learned_parts_only():
    teacher, student = tiny_pair()
    kd = pykd.KDLoss(teacher, student, LOSSES)
    own = {id(p) for p in kd.parameters()}
    assert own and own == {id(p) for p in kd.objective.parameters()}
    assert not own & {id(p) for p in student.parameters()} and not own & {id(p) for p in teacher.parameters()}
    assert all(key.startswith("objective.") for key in kd.state_dict())
    assert any(".teacher_critics." in key for key in kd.state_dict())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_plain_loop_trains_student_and_projections_and_leaves_the_teacher():
    teacher, student = tiny_pair()
    kd = pykd.KDLoss(teacher, student, LOSSES)
    before = {name: [p.clone() for p in module.parameters()]
              for name, module in (("teacher", teacher), ("student", student), ("kd", kd))}
    optimizer = torch.optim.AdamW([*student.parameters(), *kd.parameters()], lr=1e-2)
    batch = tiny_batch()
    losses = []
    for _ in range(4):
        out = kd(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before["teacher"], teacher.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before["kd"], kd.parameters()))
    assert sum(not torch.equal(a, b) for a, b in zip(before["student"], student.parameters())) > 0


def test_the_losses_section_as_dataclass_dict_and_keywords_agree():
    from pykd.distill.config import from_dict

    teacher, student = tiny_pair()
    section = from_dict({"losses": LOSSES}).losses
    batch = tiny_batch()
    torch.manual_seed(3)
    by_dataclass = pykd.KDLoss(teacher, student, section)(batch)
    torch.manual_seed(3)
    by_keywords = pykd.KDLoss(teacher, student, **LOSSES)(batch)
    for name in by_dataclass.terms:
        assert torch.equal(by_dataclass.terms[name], by_keywords.terms[name]), name


@pytest.mark.parametrize(("arguments", "message"), [
    (dict(losses={"hidden": {"tpye": "mse"}}), "losses.hidden"),
    (dict(prediction={"temperature": 0}), "losses.prediction.temperature"),
    (dict(relation={"relation_heads": 5}), "relation_heads"),
    (dict(task_kind="ranking"), "task_kind"),
    (dict(mi=3), "mi="),
])
def test_bad_input_names_the_key(arguments, message):
    teacher, student = tiny_pair()
    with pytest.raises(ValueError, match=message):
        pykd.KDLoss(teacher, student, **arguments)


@pytest.mark.slow  # dynamo + AOT autograd tracing of two BERT forwards: 17-35 s on the 2 loaded cores
def test_torch_compile_gives_the_eager_loss():
    teacher, student = tiny_pair()
    kd = pykd.KDLoss(teacher, student, {"relation": {"relation_heads": 2}})
    batch = tiny_batch()
    eager = kd(batch)
    compiled = torch.compile(kd, backend="aot_eager")(batch)
    assert set(compiled.terms) == set(eager.terms)
    for name in eager.terms:
        assert torch.allclose(compiled.terms[name], eager.terms[name], rtol=1e-5, atol=1e-6), name
    compiled.loss.backward()
    assert any(p.grad is not None for p in student.parameters())


def test_an_accelerate_loop_runs_the_prepared_student():
    accelerate = pytest.importorskip("accelerate")
    teacher, student = tiny_pair()
    kd = pykd.KDLoss(teacher, student, LOSSES)
    accelerator = accelerate.Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([*student.parameters(), *kd.parameters()], lr=1e-2)
    prepared, optimizer = accelerator.prepare(student, optimizer)
    kd.to(accelerator.device)
    before = [p.clone() for p in kd.parameters()]
    out = kd(tiny_batch(), student=prepared)
    accelerator.backward(out.loss)
    optimizer.step()
    assert set(out.terms) == {"prediction", "hidden", "relation", "mi"}
    assert all(not torch.equal(a, b) for a, b in zip(before, kd.parameters()))


def test_cached_teacher_logits_replace_the_teacher_forward():
    teacher, student = tiny_pair()
    kd = pykd.KDLoss(teacher, student, hidden={"type": "none"}, relation={"relations": []})
    batch = tiny_batch()
    live = kd(batch)
    with torch.no_grad():
        cached = dict(batch, teacher_logits=teacher(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"]).logits)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    out = kd(cached)
    assert calls == [] and torch.allclose(out.terms["prediction"], live.terms["prediction"], rtol=1e-6)
