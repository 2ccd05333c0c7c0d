"""pykd.attention_relation_loss: fused C++ and Triton paths against the float64 reference."""
import math

import pytest
import torch
from tests.fp_bounds import rel_err
from tests.ops.devices import triton_device
from tests.ops.relation_cases import (MASKS, SHAPES, TRITON_SHAPE, reference_loss_and_grads, relation_inputs, students,
                                     token_mask)

import pykd

LOSSES = ("kl", "ce", "mse_prob", "mse_logit")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (loss, gradient) relative tolerances: inputs are exact in every dtype, so the loss carries only
# fp32 accumulation error; half-precision gradients are rounded to the student's dtype on output.
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-5, 5e-3), torch.bfloat16: (1e-5, 2e-2)}


def check_against_reference(backend, shape, relation, mask_kind, loss, dtype, rng, device="cpu"):
    heads = shape[4]
    t_a, t_b, s_a, s_b = relation_inputs(shape, relation, dtype, rng, device=device)
    mask = token_mask(mask_kind, shape[0], shape[1], rng)
    mask = mask.to(device) if mask is not None else None
    value = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, heads, mask=mask, loss=loss, backend=backend)
    grads = torch.autograd.grad(value, students(s_a, s_b))
    ref_value, ref_grads = reference_loss_and_grads(t_a, t_b, s_a, s_b, heads, mask, loss)
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert value.dtype == torch.float32 and value.dim() == 0
    assert abs(float(value.detach()) - float(ref_value)) <= loss_tol * abs(float(ref_value)) + 1e-7
    for grad, ref_grad, s in zip(grads, ref_grads, students(s_a, s_b)):
        assert grad.dtype == s.dtype and grad.shape == s.shape
        # Small gradients fall into fp16's subnormals: allow twice the error of rounding the exact one.
        output_rounding = rel_err(ref_grad.to(s.dtype), ref_grad)
        assert rel_err(grad, ref_grad) <= max(grad_tol, 2 * output_rounding)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("relation", ("qk", "self"))
@pytest.mark.parametrize("loss", LOSSES)
def test_cpp_matches_reference(loss, relation, mask_kind, shape, dtype, rng):
    check_against_reference("cpp", shape, relation, mask_kind, loss, dtype, rng)


TRITON_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", TRITON_DTYPES.values(), ids=TRITON_DTYPES.keys())
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("relation", ("qk", "self"))
@pytest.mark.parametrize("loss", LOSSES)
def test_triton_matches_reference(loss, relation, mask_kind, dtype, rng):
    pytest.importorskip("triton")
    check_against_reference("triton", TRITON_SHAPE, relation, mask_kind, loss, dtype, rng, device=triton_device())


@pytest.mark.parametrize("shape", ((2, 13, 24, 16, 1), (2, 19, 96, 72, 12)), ids=("A1", "A12"))
@pytest.mark.parametrize("loss", ("kl", "mse_prob"))
def test_triton_relation_head_counts(loss, shape, rng):
    pytest.importorskip("triton")
    check_against_reference("triton", shape, "qk", "ragged", loss, torch.float32, rng, device=triton_device())


@pytest.mark.parametrize("loss", LOSSES)
def test_reference_gradcheck(loss, rng):
    t_a, t_b, s_a, s_b = (x.detach().double() for x in relation_inputs((2, 5, 8, 6, 2), "qk", torch.float64, rng))
    mask = torch.tensor([[True, True, True, False, False], [False, True, True, True, True]])
    s_a.requires_grad_()
    s_b.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: pykd.attention_relation_loss_reference(t_a, t_b, a, b, 2, mask=mask, loss=loss), (s_a, s_b)
    )


def directional_derivative_error(backend, loss, rng, device="cpu"):
    """Central difference of the fused loss along a random direction vs the fused gradient (fp32)."""
    shape = (2, 11, 12, 8, 2)
    t_a, t_b, s_a, s_b = relation_inputs(shape, "qk", torch.float32, rng, device=device)
    mask = token_mask("ragged", 2, 11, rng).to(device)

    def f(a, b):
        return pykd.attention_relation_loss(t_a, t_b, a, b, 2, mask=mask, loss=loss, backend=backend).double()

    d_a = torch.randn(s_a.shape, generator=rng).to(device)
    d_b = torch.randn(s_b.shape, generator=rng).to(device)
    grad_a, grad_b = torch.autograd.grad(f(s_a, s_b), (s_a, s_b))
    eps = 1e-2
    with torch.no_grad():
        numeric = (f(s_a + eps * d_a, s_b + eps * d_b) - f(s_a - eps * d_a, s_b - eps * d_b)) / (2 * eps)
    analytic = (grad_a * d_a).sum() + (grad_b * d_b).sum()
    # Normalised by |g||d|, the largest derivative along d: an unlucky near-orthogonal d cannot fail it.
    scale = torch.cat([grad_a.flatten(), grad_b.flatten()]).norm() * torch.cat([d_a.flatten(), d_b.flatten()]).norm()
    return abs(float(numeric) - float(analytic)) / float(scale)


@pytest.mark.parametrize("loss", LOSSES)
def test_cpp_finite_differences(loss, rng):
    assert directional_derivative_error("cpp", loss, rng) < 1e-4


@pytest.mark.parametrize("loss", LOSSES)
def test_triton_finite_differences(loss, rng):
    pytest.importorskip("triton")
    assert directional_derivative_error("triton", loss, rng, device=triton_device()) < 1e-4


def test_mixed_teacher_and_student_dtypes(rng):
    shape = SHAPES["A4"]
    t_a, t_b, s_a, s_b = relation_inputs(shape, "qk", torch.bfloat16, rng, student_dtype=torch.float32)
    mask = token_mask("ragged", shape[0], shape[1], rng)
    value = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, 4, mask=mask)
    grads = torch.autograd.grad(value, [s_a, s_b])
    ref_value, ref_grads = reference_loss_and_grads(t_a, t_b, s_a, s_b, 4, mask, "kl")
    assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
    assert all(rel_err(g, r) <= 1e-4 for g, r in zip(grads, ref_grads))


def test_teacher_requiring_grad_is_a_constant(rng):
    t_a, t_b, s_a, s_b = relation_inputs(SHAPES["A4"], "qk", torch.float32, rng)
    t_a.requires_grad_()
    value = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, 4)
    value.backward()
    assert t_a.grad is None and s_a.grad is not None


def test_student_without_grad_returns_loss_only(rng):
    t_a, t_b, s_a, s_b = relation_inputs(SHAPES["A4"], "qk", torch.float32, rng)
    with torch.no_grad():
        value = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, 4, loss="ce")
    ref_value, _ = reference_loss_and_grads(t_a, t_b, s_a, s_b, 4, None, "ce")
    assert not value.requires_grad
    assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))


def test_explicit_scales_override_one_over_sqrt_d(rng):
    t_a, t_b, s_a, s_b = relation_inputs(SHAPES["A4"], "qk", torch.float32, rng)
    value = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, 4, scale_t=0.3, scale_s=0.05, loss="mse_logit")
    ref_value, _ = reference_loss_and_grads(t_a, t_b, s_a, s_b, 4, None, "mse_logit", scale_t=0.3, scale_s=0.05)
    default = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, 4, loss="mse_logit")
    assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
    assert abs(float(value) - float(default)) > 1e-3 * abs(float(default))


def test_ce_equals_kl_plus_teacher_entropy(rng):
    shape = SHAPES["A4"]
    t_a, t_b, s_a, s_b = relation_inputs(shape, "qk", torch.float32, rng)
    mask = token_mask("ragged", shape[0], shape[1], rng)
    kl = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, 4, mask=mask, loss="kl")
    ce = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, 4, mask=mask, loss="ce")
    entropy = pykd.attention_relation_loss(t_a, t_b, t_a, t_b, 4, mask=mask, loss="ce")  # H(p) = CE(p, p)
    assert abs(float(ce) - float(kl) - float(entropy)) <= 1e-5 * float(ce)


def test_qk_relation_is_the_attention_map(rng):
    """(Q, K) with A_r = the model's heads is MiniLM's attention KL; a map against itself gives zero."""
    batch, length, heads, head_dim = 2, 9, 3, 4

    def attention(q, k):
        qh = q.view(batch, length, heads, head_dim).transpose(1, 2)
        kh = k.view(batch, length, heads, head_dim).transpose(1, 2)
        return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)

    q = torch.randn(batch, length, heads * head_dim, generator=rng)
    k = torch.randn(batch, length, heads * head_dim, generator=rng)
    student_q = q * 1.05 + 0.1
    p, p_student = attention(q, k), attention(student_q, k)
    expected = (p * (p.log() - p_student.log())).sum(-1).mean()
    value = pykd.attention_relation_loss(q, k, student_q, k, heads, loss="kl")
    assert abs(float(value) - float(expected)) <= 1e-5 * float(expected)
    assert float(pykd.attention_relation_loss(q, k, q, k, heads)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("backend", ("cpp", "triton"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("loss", LOSSES)
def test_large_scores_stay_finite(backend, dtype, loss, rng):
    if backend == "triton":
        pytest.importorskip("triton")
    device = triton_device() if backend == "triton" else "cpu"
    shape = (2, 21, 16, 16, 2)
    t_a, t_b, s_a, s_b = relation_inputs(shape, "qk", torch.float32, rng)
    # Vectors of norm ~100 per head give scaled scores around 1e4.
    t_a, t_b = (x * 40 for x in (t_a, t_b))
    s_a, s_b = (x.detach() * 40 for x in (s_a, s_b))
    t_a, t_b, s_a, s_b = (x.to(device=device, dtype=dtype) for x in (t_a, t_b, s_a, s_b))
    s_a.requires_grad_()
    s_b.requires_grad_()
    value = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, 2, loss=loss, backend=backend)
    grads = torch.autograd.grad(value, [s_a, s_b])
    assert torch.isfinite(value)
    assert all(torch.isfinite(g).all() for g in grads)
    scores = (t_a.float().view(2, 21, 2, 8)[:, :, 0] @ t_b.float().view(2, 21, 2, 8)[:, :, 0].transpose(1, 2)).abs()
    assert float(scores.max()) / math.sqrt(8) > 3e3


def test_gradient_check_rows_split_across_threads(rng):
    """One example and one head: the C++ path splits rows over threads with private dY buffers."""
    shape = (1, 301, 16, 8, 1)
    check_against_reference("cpp", shape, "qk", "none", "kl", torch.float32, rng)
    check_against_reference("cpp", shape, "self", "ragged", "mse_prob", torch.float32, rng)
