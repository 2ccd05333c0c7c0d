"""pykd.vocab_kd_loss: the C++ and Triton paths and the reference against a float64 oracle.

Tolerances are the first-order rounding bounds of vocab_cases.bounds (derived in its docstring);
on rows peaked by tens of nats they shrink with the row's uncertainty 1 - max q, so a path that
lost the top word's component to cancellation fails them (test_naive_gradient_misses_the_bound...).
"""
import math

import pytest
import torch
from tests.ops.devices import triton_device
from tests.ops.vocab_cases import Case, bounds, check_against_oracle, make_case, oracle

import pykd
from pykd._extension import cpu_extension
from pykd.kernels.ids import VOCAB_DIVERGENCE_IDS, VOCAB_TEACHER_IDS
from pykd.ops.vocab_kd import checked_selection

DIVERGENCES = ("kl", "soft_ce", "reverse_kl", "jsd")
TEACHERS = ("projected", "logits", "topk", "topk_spread")


def case_for(rng, teacher, divergence, **kw):
    options = dict(divergence=divergence, beta=kw.pop("beta", 0.3), temperature=kw.pop("temperature", 2.0),
                   hard_label_weight=kw.pop("hard_label_weight", 0.5))
    kind = teacher
    if teacher == "topk_spread":
        kind, options["topk_tail"] = "topk", "spread"
    return make_case(rng, teacher=kind, **kw, **options)


def refused(teacher, divergence):
    """A renormalised top-k teacher has no mass off its k words: reverse KL is infinite (refused)."""
    return teacher == "topk" and divergence == "reverse_kl"


@pytest.mark.parametrize("temperature", (1.0, 2.0, 4.0))
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpp_matches_oracle(divergence, teacher, temperature, rng):
    if refused(teacher, divergence):
        pytest.skip("refused: test_vocab_kd_errors")
    # V = 1000: four 256-word tiles, the last partial.
    check_against_oracle(case_for(rng, teacher, divergence, vocab=1000, temperature=temperature), "cpp")


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_matches_oracle(divergence, teacher, rng):
    if refused(teacher, divergence):
        pytest.skip("refused: test_vocab_kd_errors")
    check_against_oracle(case_for(rng, teacher, divergence, vocab=300), "reference")


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_matches_oracle(divergence, teacher, rng):
    pytest.importorskip("triton")
    if refused(teacher, divergence):
        pytest.skip("refused: test_vocab_kd_errors")
    # Under the interpreter: 16-word tiles and 16-wide K chunks, so V = 37 and d = 24, 20 cross both.
    check_against_oracle(case_for(rng, teacher, divergence, vocab=37, device=triton_device()), "triton")


@pytest.mark.parametrize("vocab", (1, 7, 1000, 30522))
@pytest.mark.parametrize("divergence", ("kl", "jsd"))
def test_cpp_vocabulary_sizes(vocab, divergence, rng):
    case = case_for(rng, "projected", divergence, n=5, vocab=vocab, d_s=16, d_t=12)
    if vocab == 1:
        assert_exact_zero(case, "cpp")
    else:
        check_against_oracle(case, "cpp")


@pytest.mark.parametrize("vocab", (1, 7, 40))
def test_triton_vocabulary_sizes_and_row_blocks(vocab, rng):
    """n = 40 rows: three 16-row blocks for the forward and dh kernels, a loop of them in the dW kernel."""
    pytest.importorskip("triton")
    case = case_for(rng, "logits", "reverse_kl", n=40 if vocab == 40 else 5, vocab=vocab, d_s=16,
                    device=triton_device())
    if vocab == 1:
        assert_exact_zero(case, "triton")
    else:
        check_against_oracle(case, "triton")


def assert_exact_zero(case: Case, backend: str):
    """One word, or no selected row: every divergence and CE is 0, and so is G (exactly: the top
    word's component is minus an empty sum). jsd's log m = log(beta + (1 - beta)) rounds, so its
    value is 0 to a few units of fp32 rounding of the T^2-weighted terms."""
    value = case.run(backend)
    grads = torch.autograd.grad(value, case.students())
    tolerance = 4 * 2.0**-24 * case.options["temperature"] ** 2 if case.options["divergence"] == "jsd" else 0.0
    assert abs(float(value.detach())) <= tolerance
    assert all(not g.any() for g in grads)


@pytest.mark.parametrize("temperature", (1.0, 2.0, 4.0))
@pytest.mark.parametrize("gap", (30.0, 100.0))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpp_peaked_teacher(divergence, gap, temperature, rng):
    check_against_oracle(case_for(rng, "logits", divergence, vocab=1000, gap=gap, temperature=temperature), "cpp")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_peaked_teacher(divergence, rng):
    pytest.importorskip("triton")
    check_against_oracle(case_for(rng, "logits", divergence, vocab=37, gap=60.0, device=triton_device()), "triton")


PEAKED_BACKENDS = ("cpp", "triton", "reference")


@pytest.mark.parametrize("backend", PEAKED_BACKENDS)
@pytest.mark.parametrize("agree", (True, False), ids=("right", "wrong"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_confident_student(divergence, agree, backend, rng):
    """Student and teacher peaked by 25 nats (1 - q_top ~ e^-25), on the same word (a confidently
    right student) or on different ones (confidently wrong): the regime of q_top - p_top, d_top - R
    and log q - log m cancelling. The bounds scale with 1 - q_top here, so only exact forms meet
    them (the reference, in the float64 it is meant for, against float64's bounds)."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = triton_device() if backend == "triton" else "cpu"
    dtype = torch.float64 if backend == "reference" else torch.float32
    check_against_oracle(peaked_case(rng, divergence, agree, device=device, dtype=dtype), backend)


def peaked_case(rng, divergence, agree: bool, device="cpu", dtype=torch.float32):
    vocab, n = 37, 6
    case = case_for(rng, "logits", divergence, n=n, vocab=vocab, d_s=16, hard_label_weight=0.0, temperature=1.0,
                    dtype=dtype)
    words = torch.randint(0, vocab, (n,), generator=rng)
    with torch.no_grad():
        b_s = torch.randn(vocab, generator=rng, dtype=dtype) * 0.1
        b_s[words[0]] += 25.0
        logits = torch.randn(n, vocab, generator=rng, dtype=dtype)
        logits[torch.arange(n), words[0] if agree else (words[0] + 1) % vocab] += 25.0
    case.b_s = b_s.to(device).requires_grad_()
    case.teacher = dict(teacher_logits=logits.to(device))
    return case


@pytest.mark.parametrize("divergence", ("kl", "reverse_kl"))
def test_naive_gradient_misses_the_bound_on_confident_rows(divergence, rng):
    """The textbook forms q - p and q (d - R) through autograd in fp32 (what a kernel written with
    them computes) leave the top word's component to rounding at 25 nats: q_top = 1 - e^-25 rounds
    to 1. The oracle's bound rejects them, so it tells the exact forms from the naive ones."""
    case = peaked_case(rng, divergence, agree=divergence == "kl")
    ref = oracle(case)
    tol = bounds(case, ref)["grads"][2]  # the bias: every row's top-word component lands on one entry
    b_s = case.b_s.detach().requires_grad_()
    z_s = case.h_s.detach() @ case.w_s.detach().T + b_s
    log_q = torch.log_softmax(z_s, 1)
    log_p = torch.log_softmax(case.teacher["teacher_logits"], 1)
    if divergence == "kl":
        value = (log_p.exp() * (log_p - log_q)).sum(1)
    else:
        value = (log_q.exp() * (log_q - log_p)).sum(1)
    selected = case.labels != -100
    (grad_b,) = torch.autograd.grad(value[selected].mean(), b_s)
    assert float((grad_b.double() - ref.grads[2]).norm()) > tol


@pytest.mark.parametrize("backend", ("cpp", "triton", "reference"))
@pytest.mark.parametrize("ignored", ("none", "some", "all"))
def test_ignored_rows(ignored, backend, rng):
    if backend == "triton":
        pytest.importorskip("triton")
    device = triton_device() if backend == "triton" else "cpu"
    case = case_for(rng, "projected", "kl", vocab=37, ignored=ignored, device=device)
    if ignored == "all":  # defined as 0 with zero gradients
        assert_exact_zero(case, backend)
    else:
        check_against_oracle(case, backend)


@pytest.mark.parametrize("backend", ("cpp", "triton", "reference"))
def test_unselected_rows_are_never_read(backend, rng):
    """NaN in the ignored rows of every input changes nothing."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = triton_device() if backend == "triton" else "cpu"
    clean = case_for(rng, "topk_spread", "jsd", vocab=37, device=device)
    expected = clean.run(backend)
    expected_grads = torch.autograd.grad(expected, clean.students())
    ignored = clean.labels == -100
    with torch.no_grad():
        h_s = clean.h_s.detach().clone()
        h_s[ignored] = float("nan")
        values = clean.teacher["teacher_topk_logits"].clone()
        values[ignored] = float("nan")
        indices = clean.teacher["teacher_topk_indices"].clone()
        indices[ignored] = -7  # out of range, and repeated
    poisoned = Case(h_s.requires_grad_(), clean.w_s, clean.b_s,
                    dict(teacher_topk_logits=values, teacher_topk_indices=indices), clean.labels, clean.options)
    got = poisoned.run(backend)
    grads = torch.autograd.grad(got, poisoned.students())
    assert torch.equal(got, expected)
    for grad, want in zip(grads, expected_grads):
        assert torch.equal(grad, want)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpp_half_precision_inputs(divergence, dtype, rng):
    check_against_oracle(case_for(rng, "projected", divergence, vocab=1000, dtype=dtype), "cpp")


@pytest.mark.parametrize("divergence", ("kl", "jsd"))
def test_triton_bf16_inputs(divergence, rng):
    pytest.importorskip("triton")
    check_against_oracle(case_for(rng, "projected", divergence, vocab=37, dtype=torch.bfloat16,
                                  device=triton_device()), "triton")


def test_mixed_student_dtypes(rng):
    case = case_for(rng, "logits", "kl", vocab=300)
    case.h_s = case.h_s.detach().bfloat16().requires_grad_()
    check_against_oracle(case, "cpp")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpp_several_row_blocks(divergence, rng):
    """Blocks of 16 rows and tiles of 64 words (the op picks larger ones at these sizes): the C++
    kernel's results match the public op's to rounding and the oracle within its bound."""
    case = case_for(rng, "projected", divergence, n=50, vocab=1000)
    value = case.run("cpp")
    grads = torch.autograd.grad(value, case.students())
    o = case.options
    selected, _ = checked_selection(50, 1000, case.labels, None, None, -100, False, torch.device("cpu"))
    rows = selected.nonzero().flatten()
    kd_value = o["temperature"] ** 2
    t = case.teacher
    loss, dh, dw, db = cpu_extension().vocab_kd_forward(
        case.h_s, case.w_s, case.b_s, VOCAB_TEACHER_IDS["projected"], t["h_t"], t["w_t"], t["b_t"], None, None, None,
        None, rows, case.labels, VOCAB_DIVERGENCE_IDS[divergence], o["beta"], o["temperature"], kd_value,
        o["hard_label_weight"], 1.0 / rows.numel(), True, True, True, 16, 64)
    ref = oracle(case)
    bound = bounds(case, ref)
    assert abs(float(loss) - ref.value) <= bound["value"]
    for got, want, tol, public in zip((dh, dw, db), ref.grads, bound["grads"], grads):
        assert float((got.double() - want).norm()) <= tol
        assert float((got.double() - public.double()).norm()) <= 2 * tol


@pytest.mark.parametrize("backend", ("cpp", "triton"))
@pytest.mark.parametrize("divergence", ("kl", "soft_ce", "reverse_kl"))
def test_identical_teacher_gives_exact_zero_gradients(divergence, backend, rng):
    """Teacher = student: the same fp32 logits on both sides, so p = q to the last bit and every
    gradient component of kl, soft_ce and reverse_kl is exactly 0; kl's and reverse_kl's value is 0
    up to the rounding of the Triton path's cross sums (exact on the C++ path's direct sums)."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = triton_device() if backend == "triton" else "cpu"
    case = case_for(rng, "projected", divergence, vocab=37, hard_label_weight=0.0, device=device)
    case.teacher = dict(h_t=case.h_s.detach(), w_t=case.w_s.detach(), b_t=case.b_s.detach())
    value = float(case.run(backend).detach())
    case.h_s.grad = None
    loss = case.run(backend)
    grads = torch.autograd.grad(loss, case.students())
    assert all(float(g.abs().max()) == 0.0 for g in grads)
    if divergence != "soft_ce":  # soft_ce is the entropy H(p) here
        # |value| <= T^2 u max|log-sums|: the cross sums hold terms of the size of log Z (~ log V = 3.6)
        assert abs(value) <= (0.0 if backend == "cpp" else 4.0 * 2.0**-24 * 8 * math.log(37))


def test_jsd_endpoints_are_the_kl_divergences(rng):
    """By TRL's and Liger's convention beta = 0 is forward KL and beta = 1 reverse KL; the formula
    itself tends to 0 there as beta KL(p||q) and (1 - beta) KL(q||p)."""
    case = case_for(rng, "logits", "kl", vocab=300, hard_label_weight=0.0, dtype=torch.float64)

    def value(divergence, beta):
        case.options.update(divergence=divergence, beta=beta)
        return float(case.run("reference").detach())

    kl, rkl = value("kl", 0.5), value("reverse_kl", 0.5)
    assert value("jsd", 0.0) == kl and value("jsd", 1.0) == rkl
    small = 1e-4
    assert abs(value("jsd", small) / small - kl) <= 10 * small * kl  # JSD_b = b KL(p||q) + O(b^2)
    assert abs(value("jsd", 1 - small) / small - rkl) <= 10 * small * rkl


@pytest.mark.parametrize("backend", ("cpp", "reference"))
def test_soft_ce_is_kl_plus_teacher_entropy_with_the_same_gradient(backend, rng):
    case = case_for(rng, "logits", "kl", vocab=300, hard_label_weight=0.0, temperature=2.0)
    kl = case.run(backend)
    kl_grads = torch.autograd.grad(kl, case.students())
    case.options["divergence"] = "soft_ce"
    ce = case.run(backend)
    ce_grads = torch.autograd.grad(ce, case.students())
    p = torch.softmax(case.teacher["teacher_logits"].double() / 2.0, 1)
    selected = case.labels != -100
    entropy = float(-(p * p.log()).sum(1)[selected].mean()) * 4.0  # times T^2
    assert abs(float(ce.detach()) - float(kl.detach()) - entropy) <= 1e-5 * float(ce.detach())
    for a, b in zip(kl_grads, ce_grads):
        assert float((a - b).norm()) <= 1e-6 * float(a.norm())


@pytest.mark.parametrize("backend", ("cpp", "reference"))
def test_temperature_squared_scaling(backend, rng):
    case = case_for(rng, "logits", "reverse_kl", vocab=300, hard_label_weight=0.0, temperature=4.0)
    scaled = float(case.run(backend))
    case.options["scale_by_t2"] = False
    assert abs(scaled / 16.0 - float(case.run(backend))) <= 1e-6 * abs(scaled / 16.0)


def test_hard_term_is_cross_entropy_at_temperature_one(rng):
    case = case_for(rng, "logits", "kl", vocab=300, hard_label_weight=1.0, temperature=3.0)
    case.options["kd_weight"] = 0.0
    got = case.run("cpp")
    z_s = case.h_s.detach().double() @ case.w_s.detach().double().T + case.b_s.detach().double()
    expected = torch.nn.functional.cross_entropy(z_s, case.labels, ignore_index=-100)
    assert abs(float(got) - float(expected)) <= 1e-6 * float(expected)


def test_reference_matches_the_textbook_formulas_at_moderate_logits(rng):
    """Away from peaked rows the stable forms equal log_softmax-based ones to float64 rounding."""
    case = case_for(rng, "projected", "jsd", vocab=100, dtype=torch.float64)
    value = case.run("reference")
    grads = torch.autograd.grad(value, case.students())
    t = case.teacher
    z_s = case.h_s @ case.w_s.T + case.b_s
    z_t = t["h_t"] @ t["w_t"].T + t["b_t"]
    log_q, log_p = torch.log_softmax(z_s / 2, 1), torch.log_softmax(z_t / 2, 1)
    log_m = torch.logaddexp(math.log(0.3) + log_p, math.log(0.7) + log_q)
    jsd = 0.3 * (log_p.exp() * (log_p - log_m)).sum(1) + 0.7 * (log_q.exp() * (log_q - log_m)).sum(1)
    ce = torch.nn.functional.cross_entropy(z_s, case.labels, reduction="none", ignore_index=-100)
    selected = case.labels != -100
    expected = (4.0 * jsd + 0.5 * ce)[selected].mean()
    expected_grads = torch.autograd.grad(expected, case.students())
    assert abs(float(value) - float(expected)) <= 1e-13 * float(expected)
    for got, want in zip(grads, expected_grads):
        assert float((got - want).norm()) <= 1e-12 * float(want.norm())


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradcheck(divergence, rng):
    case = case_for(rng, "projected", divergence, n=5, vocab=9, d_s=4, d_t=3, dtype=torch.float64)
    t = case.teacher

    def f(h_s, w_s, b_s):
        return pykd.vocab_kd_loss_reference(h_s, w_s, b_s, t["h_t"], t["w_t"], t["b_t"], labels=case.labels,
                                            **case.options)

    assert torch.autograd.gradcheck(f, tuple(case.students()))


def test_topk_spread_of_every_word_is_the_dense_teacher(rng):
    case = case_for(rng, "logits", "reverse_kl", vocab=40)
    dense = float(case.run("cpp"))
    log_p = torch.log_softmax(case.teacher["teacher_logits"], 1)
    values, indices = torch.topk(log_p, 40, dim=1)
    case.teacher = dict(teacher_topk_logits=values, teacher_topk_indices=indices)
    case.options["topk_tail"] = "spread"
    assert abs(float(case.run("cpp")) - dense) <= 1e-6 * abs(dense)


@pytest.mark.parametrize("backend", ("cpp", "triton", "reference"))
def test_renormalised_topk_is_the_dense_teacher_with_the_rest_at_minus_infinity(backend, rng):
    if backend == "triton":
        pytest.importorskip("triton")
    device = triton_device() if backend == "triton" else "cpu"
    case = case_for(rng, "topk", "jsd", vocab=37, device=device)
    topk = case.run(backend)
    values, indices = case.teacher["teacher_topk_logits"], case.teacher["teacher_topk_indices"]
    dense = torch.full((values.shape[0], 37), float("-inf"), device=device).scatter(1, indices, values)
    case.teacher = dict(teacher_logits=dense)
    assert abs(float(case.run(backend)) - float(topk)) <= 1e-6 * float(topk)


@pytest.mark.parametrize("backend", ("cpp", "triton", "reference"))
def test_teacher_is_a_constant_and_frozen_inputs_get_no_gradient(backend, rng):
    if backend == "triton":
        pytest.importorskip("triton")
    device = triton_device() if backend == "triton" else "cpu"
    case = case_for(rng, "projected", "kl", vocab=37, device=device)
    for x in case.teacher.values():
        x.requires_grad_()
    case.w_s.requires_grad_(False)
    value = case.run(backend)
    value.backward()
    assert all(x.grad is None for x in case.teacher.values())
    assert case.w_s.grad is None and case.h_s.grad is not None and case.b_s.grad is not None


@pytest.mark.parametrize("backend", ("cpp", "triton"))
def test_without_grad_the_value_only(backend, rng):
    if backend == "triton":
        pytest.importorskip("triton")
    device = triton_device() if backend == "triton" else "cpu"
    case = case_for(rng, "logits", "jsd", vocab=37, device=device)
    with torch.no_grad():
        value = case.run(backend)
    assert not value.requires_grad
    ref = oracle(case)
    assert abs(float(value) - ref.value) <= bounds(case, ref)["value"]


def test_cpp_backward_scales_in_place_and_refuses_a_second_pass(rng):
    """The C++ path's backward returns the gradients the forward formed, scaled in place (one (V, d)
    dW at the peak, not two), and so refuses to run twice on one graph, naming the way out."""
    case = case_for(rng, "projected", "kl", vocab=37)
    value = case.run("cpp")
    (d_w,) = torch.autograd.grad(3.0 * value, case.w_s, retain_graph=True)
    ref = oracle(case)
    error = torch.linalg.vector_norm(d_w.double().cpu() - 3.0 * ref.grads[1])
    assert error <= 3.0 * bounds(case, ref)["grads"][1]  # the bound scales with the incoming gradient
    with pytest.raises(RuntimeError, match="vocab_kd_loss: its backward ran already.*retain_graph"):
        torch.autograd.grad(value, case.w_s)
