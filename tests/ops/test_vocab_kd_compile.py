"""pykd.vocab_kd_loss under torch.compile(fullgraph=True) and autocast, and torch.library.opcheck on its ops.

Compiled, a fused path runs the same kernel on the same inputs, so values and gradients agree with
eager to the rounding of the few ops around it (the casts and the backward's scaling): 8 fp32 unit
roundoffs. The reference runs in float64 here through AOT autograd without Inductor's code
generation, so the same ATen ops run, possibly decomposed into reductions in another order:
gamma_n u64 relative to the sum of magnitudes, which 1e-11 allows for n in the thousands and a
condition number up to about 100 (tests/test_compile.py's reasoning).
"""
import pytest
import torch
from tests.fp_bounds import rel_err

import pykd
from pykd.kernels.ids import VOCAB_DIVERGENCE_IDS, VOCAB_TEACHER_IDS

FUSED_TOL = 8 * torch.finfo(torch.float32).eps / 2
REFERENCE_TOL = 1e-11
PATHS = ("cpp", "triton", "reference")


def case(rng, dtype, teacher="projected"):
    n, vocab, d_s, d_t = 7, 37, 16, 12
    leaves = (torch.randn(n, d_s, generator=rng, dtype=dtype).requires_grad_(),
              (torch.randn(vocab, d_s, generator=rng, dtype=dtype) / 2).requires_grad_(),
              torch.randn(vocab, generator=rng, dtype=dtype).requires_grad_())
    h_t, w_t = torch.randn(n, d_t, generator=rng, dtype=dtype), torch.randn(vocab, d_t, generator=rng, dtype=dtype)
    logits = torch.randn(n, vocab, generator=rng, dtype=dtype)
    values, indices = torch.topk(torch.log_softmax(logits, 1), 5, dim=1)
    labels = torch.tensor([3, -100, 5, 0, 36, -100, 2])
    teachers = {"projected": dict(h_t=h_t, w_t=w_t), "logits": dict(teacher_logits=logits),
                "topk": dict(teacher_topk_logits=values, teacher_topk_indices=indices, topk_tail="spread")}

    def run(h_s, w_s, b_s, backend):
        return pykd.vocab_kd_loss(h_s, w_s, b_s, labels=labels, divergence="jsd", beta=0.3, temperature=2.0,
                                  hard_label_weight=0.5, backend=backend, **teachers[teacher])

    return run, leaves


@pytest.mark.parametrize("teacher", ("projected", "logits", "topk"))
@pytest.mark.parametrize("path", PATHS)
def test_fullgraph_compile_gives_eager_values_and_gradients(path, teacher, rng):
    torch._dynamo.reset()
    dtype = torch.float64 if path == "reference" else torch.float32
    run, leaves = case(rng, dtype, teacher)
    eager = run(*leaves, path)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiler = "aot_eager" if path == "reference" else "inductor"
    compiled = torch.compile(run, fullgraph=True, backend=compiler)(*leaves, path)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    tol = REFERENCE_TOL if path == "reference" else FUSED_TOL
    assert rel_err(compiled, eager) <= tol
    for got, expected in zip(compiled_grads, eager_grads):
        assert rel_err(got, expected) <= tol


@pytest.mark.parametrize("path", PATHS)
def test_the_loss_computes_in_fp32_under_autocast(path, rng):
    """Autocast leaves the loss's arithmetic (its GEMMs included) alone: the values and gradients of
    outside it (the backward runs after the region, as torch's autocast documentation asks)."""
    run, leaves = case(rng, torch.float32)
    expected = run(*leaves, path)
    expected_grads = torch.autograd.grad(expected, leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(*leaves, path)
    got_grads = torch.autograd.grad(got, leaves)
    assert got.dtype == torch.float32
    assert rel_err(got, expected) <= FUSED_TOL
    for grad, expected_grad in zip(got_grads, expected_grads):
        assert rel_err(grad, expected_grad) <= FUSED_TOL


def test_compiled_under_autocast_follows_eager_under_autocast(rng):
    torch._dynamo.reset()
    run, leaves = case(rng, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = run(*leaves, "auto")
        compiled = torch.compile(run, fullgraph=True)(*leaves, "auto")
    assert rel_err(compiled, eager) <= FUSED_TOL


def opcheck_cases(rng):
    n, vocab = 6, 19
    h_s = torch.randn(n, 16, generator=rng).requires_grad_()
    w_s = torch.randn(vocab, 16, generator=rng).requires_grad_()
    b_s = torch.randn(vocab, generator=rng).requires_grad_()
    h_t, w_t = torch.randn(n, 12, generator=rng), torch.randn(vocab, 12, generator=rng)
    labels = torch.tensor([1, -100, 4, 18, 0, 7])
    values, indices = torch.topk(torch.log_softmax(torch.randn(n, vocab, generator=rng), 1), 4, dim=1)
    jsd, projected, topk = VOCAB_DIVERGENCE_IDS["jsd"], VOCAB_TEACHER_IDS["projected"], VOCAB_TEACHER_IDS["topk"]
    spec = (jsd, 0.3, 2.0, 4.0, 0.5, -100, False)
    ops = torch.ops.pykd
    projected_args = (h_s, w_s, b_s, h_t, w_t, None, None, None, None, labels, projected, *spec)
    topk_args = (h_s, w_s, None, None, None, None, None, values, indices, labels, topk, *spec)
    detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in projected_args]

    def backward_args():
        _, stats, top = ops.vocab_kd_triton(*detached)
        return (*detached[:10], stats, top, torch.tensor(1.5), projected, *spec, [True, True, True])

    return {
        "cpp": lambda: (ops.vocab_kd_cpp, (*projected_args, [True, True, True])),
        "cpp_topk_some_grads": lambda: (ops.vocab_kd_cpp, (*topk_args, [False, True, False])),
        "triton": lambda: (ops.vocab_kd_triton, projected_args),
        "triton_backward": lambda: (ops.vocab_kd_triton_backward, backward_args()),
        "checks": lambda: (ops.vocab_kd_checks, (h_s.detach(), labels, values, indices, vocab, -100, True)),
    }


@pytest.mark.parametrize("name", ("cpp", "cpp_topk_some_grads", "triton", "triton_backward", "checks"))
def test_custom_ops_pass_torch_opcheck(name, rng):
    """Schema, fake shapes against real outputs, autograd registration and AOT dispatch with
    dynamic shapes, for each custom op vocab_kd_loss calls."""
    pytest.importorskip("triton") if "triton" in name else None
    op, args = opcheck_cases(rng)[name]()
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("path", ("cpp", "reference"))
def test_compiled_code_keeps_the_checks_that_read_values(path, rng):
    torch._dynamo.reset()
    h_s, w_s = torch.randn(4, 8, generator=rng), torch.randn(9, 8, generator=rng)
    logits = torch.randn(4, 9, generator=rng)
    compiled = torch.compile(lambda labels: pykd.vocab_kd_loss(h_s, w_s, teacher_logits=logits, labels=labels,
                                                               backend=path), fullgraph=True, backend="aot_eager")
    assert torch.isfinite(compiled(torch.tensor([1, 2, -100, 8])))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\) or ignore_index=-100, got 9 at row 3"):
        compiled(torch.tensor([1, 2, -100, 9]))
