"""pykd.vocab_kd_loss refuses bad input with an error that names the argument, on every path."""
import re

import pytest
import torch

import pykd

PATHS = ("reference", "cpp", "triton")


def raises(error, message: str):
    return pytest.raises(error, match=re.escape(message))


def inputs(n=6, vocab=11, d_s=4, d_t=3, k=3):
    gen = torch.Generator().manual_seed(0)
    h_s, w_s = torch.randn(n, d_s, generator=gen), torch.randn(vocab, d_s, generator=gen)
    h_t, w_t = torch.randn(n, d_t, generator=gen), torch.randn(vocab, d_t, generator=gen)
    logits = torch.randn(n, vocab, generator=gen)
    values, indices = torch.topk(logits, k, dim=1)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return dict(h_s=h_s, w_s=w_s, h_t=h_t, w_t=w_t, logits=logits, values=values, indices=indices, labels=labels)


def run(x, backend="reference", **kw):
    teacher = kw.pop("teacher", None)
    if teacher is None:
        teacher = dict(h_t=x["h_t"], w_t=x["w_t"])
    h_s, w_s = kw.pop("h_s", x["h_s"]), kw.pop("w_s", x["w_s"])
    h_t, w_t, b_t = teacher.pop("h_t", None), teacher.pop("w_t", None), teacher.pop("b_t", None)
    return pykd.vocab_kd_loss(h_s, w_s, kw.pop("b_s", None), h_t, w_t, b_t, backend=backend, **teacher, **kw)


# ---- shapes and dtypes (checked before any path is chosen) ----

def test_student_shapes():
    x = inputs()
    with raises(ValueError, "h_s must have 2 dimensions, got shape (6, 4, 1)"):
        run(x, h_s=x["h_s"][..., None])
    with raises(ValueError, "w_s must have shape (V, 4) to match h_s of shape (6, 4), got (11, 5)"):
        run(x, w_s=torch.randn(11, 5))
    with raises(ValueError, "b_s must have shape (11,) to match w_s of shape (11, 4), got (10,)"):
        run(x, b_s=torch.randn(10))
    with raises(ValueError, "h_s has an empty dimension: shape (0, 4) for (positions, student width)"):
        run(x, h_s=torch.randn(0, 4), teacher=dict(h_t=torch.randn(0, 3), w_t=x["w_t"]))
    with raises(ValueError, "w_s has an empty dimension: shape (0, 4) for (vocabulary, student width)"):
        run(x, w_s=torch.randn(0, 4))
    with raises(TypeError, "h_s has dtype torch.int64"):
        run(x, h_s=x["h_s"].long())


def test_exactly_one_teacher():
    x = inputs()
    with raises(ValueError, "give the teacher as exactly one of (h_t, w_t[, b_t]), teacher_logits or "
                            "(teacher_topk_logits, teacher_topk_indices); got none"):
        run(x, teacher={})
    with raises(ValueError, "got ['projected', 'logits']"):
        run(x, teacher=dict(h_t=x["h_t"], w_t=x["w_t"], teacher_logits=x["logits"]))
    with raises(ValueError, "a projected teacher needs both h_t and w_t, got h_t=shape (6, 3), w_t=None"):
        run(x, teacher=dict(h_t=x["h_t"]))
    with raises(ValueError, "a top-k teacher needs both teacher_topk_logits and teacher_topk_indices"):
        run(x, teacher=dict(teacher_topk_logits=x["values"]))


def test_teacher_shapes_and_the_vocabulary():
    x = inputs()
    with raises(ValueError, "w_t must have shape (11, 3): the student's vocabulary (w_s) by h_t's width, got (12, 3)"):
        run(x, teacher=dict(h_t=x["h_t"], w_t=torch.randn(12, 3)))
    with raises(ValueError, "h_t must have 6 rows like h_s, got shape (5, 3)"):
        run(x, teacher=dict(h_t=x["h_t"][:5], w_t=x["w_t"]))
    with raises(ValueError, "b_t must have shape (11,) to match w_t of shape (11, 3), got (3,)"):
        run(x, teacher=dict(h_t=x["h_t"], w_t=x["w_t"], b_t=torch.randn(3)))
    with raises(ValueError, "teacher_logits must have shape (6, 11): h_s's rows by w_s's vocabulary, got (6, 12)"):
        run(x, teacher=dict(teacher_logits=torch.randn(6, 12)))
    with raises(ValueError, "teacher_topk_logits must have shape (6, k) with 1 <= k <= 11"):
        run(x, teacher=dict(teacher_topk_logits=torch.randn(6, 12), teacher_topk_indices=torch.zeros(6, 12).long()))
    with raises(ValueError, "teacher_topk_indices must have shape (6, 3), got (6, 2)"):
        run(x, teacher=dict(teacher_topk_logits=x["values"], teacher_topk_indices=x["indices"][:, :2]))
    with raises(TypeError, "teacher_topk_indices must have dtype torch.int64 or torch.int32, got torch.float32"):
        run(x, teacher=dict(teacher_topk_logits=x["values"], teacher_topk_indices=x["indices"].float()))


def test_labels_shape_dtype_and_the_hard_term():
    x = inputs()
    with raises(ValueError, "labels must have shape (6,), got (5,)"):
        run(x, labels=x["labels"][:5])
    with raises(TypeError, "labels must have dtype torch.int64 or torch.int32, got torch.float32"):
        run(x, labels=x["labels"].float())
    with raises(ValueError, "hard_label_weight=0.5 needs labels (the hard targets)"):
        run(x, hard_label_weight=0.5)


@pytest.mark.parametrize("name, value, error, message", [
    ("divergence", "js", ValueError, "divergence must be one of ('kl', 'soft_ce', 'reverse_kl', 'jsd'), got 'js'"),
    ("beta", 1.5, ValueError, "beta must be in [0, 1], got 1.5"),
    ("beta", -0.1, ValueError, "beta must be in [0, 1], got -0.1"),
    ("temperature", 0.0, ValueError, "temperature must be a positive finite number, got 0.0"),
    ("temperature", -2.0, ValueError, "temperature must be a positive finite number, got -2.0"),
    ("temperature", float("inf"), ValueError, "temperature must be a positive finite number, got inf"),
    ("temperature", torch.tensor(2.0), TypeError, "temperature must be a Python float (or NumPy scalar), got a "
                                                  "torch.Tensor"),
    ("scale_by_t2", 1, TypeError, "scale_by_t2 must be a bool, got int 1"),
    ("kd_weight", -1.0, ValueError, "kd_weight must be a finite number >= 0, got -1.0"),
    ("hard_label_weight", float("nan"), ValueError, "hard_label_weight must be a finite number >= 0, got nan"),
    ("ignore_index", 1.5, TypeError, "ignore_index must be a Python int (or NumPy integer), got float 1.5"),
    ("topk_tail", "uniform", ValueError, "topk_tail must be one of ('renormalise', 'spread'), got 'uniform'"),
])
def test_scalar_arguments(name, value, error, message):
    x = inputs()
    with raises(error, message):
        run(x, labels=x["labels"], **{name: value})


@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("jsd", 1.0)])
def test_reverse_kl_of_a_renormalised_topk_teacher_is_refused(divergence, beta):
    x = inputs()
    with raises(ValueError, f"divergence={divergence!r} (beta={beta}) with a top-k teacher and "
                            "topk_tail='renormalise' is infinite"):
        run(x, teacher=dict(teacher_topk_logits=x["values"], teacher_topk_indices=x["indices"]), divergence=divergence,
            beta=beta)


def test_devices_must_agree():
    x = inputs()
    with raises(ValueError, "h_s is on device meta"):
        run(x, h_s=x["h_s"].to("meta"))
    with raises(ValueError, "labels is on device meta (shape (6,)): the op reads its values"):
        run(x, labels=x["labels"].to("meta"))


def test_unknown_backend():
    with raises(ValueError, "backend must be one of ('auto', 'reference', 'cpp', 'triton'), got 'gpu'"):
        run(inputs(), backend="gpu")


# ---- values, checked when the op runs, by every path ----

@pytest.mark.parametrize("backend", PATHS)
def test_labels_out_of_range(backend):
    pytest.importorskip("triton") if backend == "triton" else None
    x = inputs()
    labels = x["labels"].clone()
    labels[4] = 11
    with raises(ValueError, "labels must be in [0, 11) or ignore_index=-100, got 11 at row 4"):
        run(x, backend, labels=labels)
    labels[4] = -1  # a negative label that is not ignore_index
    with raises(ValueError, "got -1 at row 4"):
        run(x, backend, labels=labels)
    labels[4] = -1
    run(x, backend, labels=labels, ignore_index=-1)  # fine: -1 is the ignore index now


@pytest.mark.parametrize("backend", PATHS)
def test_topk_indices_out_of_range_or_repeated(backend):
    pytest.importorskip("triton") if backend == "triton" else None
    x = inputs()
    indices = x["indices"].clone()
    indices[2, 1] = 11
    with raises(ValueError, "teacher_topk_indices must be in [0, 11), got 11 at row 2, column 1"):
        run(x, backend, teacher=dict(teacher_topk_logits=x["values"], teacher_topk_indices=indices))
    indices[2, 1] = indices[2, 0]
    with raises(ValueError, "teacher_topk_indices must be distinct within a row, row 2 repeats a word"):
        run(x, backend, teacher=dict(teacher_topk_logits=x["values"], teacher_topk_indices=indices))
    labels = x["labels"].clone()
    labels[2] = -100  # an unselected row is never read
    run(x, backend, labels=labels, teacher=dict(teacher_topk_logits=x["values"], teacher_topk_indices=indices))


@pytest.mark.parametrize("backend", PATHS)
def test_spread_needs_log_probabilities(backend):
    pytest.importorskip("triton") if backend == "triton" else None
    x = inputs()
    with raises(ValueError, "teacher_topk_logits with topk_tail='spread' must be the teacher's log-probabilities "
                            "(log_softmax over all 11 words): row 0's probabilities sum to"):
        run(x, backend, teacher=dict(teacher_topk_logits=x["values"] + 5, teacher_topk_indices=x["indices"]),
            topk_tail="spread")
