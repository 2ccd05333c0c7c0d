"""torch.compile(fullgraph=True) and autocast with the ops: one graph, the values and gradients of eager;
torch.library.opcheck on every custom op.

Compiled, a fused path runs the same kernel on the same inputs as eager, so values and gradients
agree to the rounding of the few ops around it (casts, the constant of the MI bound): a relative
error of 8 fp32 unit roundoffs (8 u = 4.8e-7). The reference path runs in float64 here, traced
by AOT autograd without Inductor's code generation, so the same ATen ops run, possibly decomposed
into reductions of at most a few hundred terms in another order: gamma_n = n u64 relative to the
sum of magnitudes, which 1e-11 allows for a condition number up to about 100. The training
step compares parameter updates after fp32 steps through Linear layers that Inductor fuses
differently from eager: 1e-4 covers gamma_n (n <= 100, 6e-6) times the loss's condition (below
20 at these sizes).
"""
import copy
import math

import pytest
import torch

import pykd
from tests.fp_bounds import rel_err

FUSED_TOL = 8 * torch.finfo(torch.float32).eps / 2
REFERENCE_TOL = 1e-11
PATHS = ("cpp", "triton", "reference")


def relation_case(rng, dtype, loss="kl"):
    t = torch.randn(2, 5, 8, generator=rng, dtype=dtype)
    s_a, s_b = (torch.randn(2, 5, 4, generator=rng, dtype=dtype).requires_grad_() for _ in range(2))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])

    def run(s_a, s_b, backend):
        return pykd.attention_relation_loss(t, t.flip(1), s_a, s_b, 2, mask=mask, loss=loss, backend=backend)

    return run, (s_a, s_b)


def relation_mse_prob_case(rng, dtype):
    """mse_prob: its reference runs an autograd.Function (the stable backward), its kernels more statistics."""
    return relation_case(rng, dtype, loss="mse_prob")


def mi_case(rng, dtype):
    leaves = (torch.randn(6, 4, generator=rng, dtype=dtype).requires_grad_(),
              torch.randn(6, 4, generator=rng, dtype=dtype).requires_grad_(),
              torch.randn(6, generator=rng, dtype=dtype).requires_grad_())

    def run(a, b, log_q, backend):
        return pykd.mi_lower_bound(a, b, log_q, bound="alpha", alpha=0.5, scale=2.0, backend=backend)

    return run, leaves


def routed_case(rng, dtype):
    leaves = (torch.randn(3, 5, 6, generator=rng, dtype=dtype).requires_grad_(),
              torch.randn(2, 7, 6, generator=rng, dtype=dtype).requires_grad_(),
              torch.softmax(torch.randn(7, 2, generator=rng, dtype=dtype), dim=-1).requires_grad_(),
              torch.randn(2, 7, generator=rng, dtype=dtype).requires_grad_())
    weights = torch.randn(3, 5, 7, generator=rng, dtype=dtype)

    def run(x, experts_w, alpha, experts_b, backend):
        return (pykd.routed_linear(x, experts_w, alpha, experts_b, backend=backend) * weights).sum()

    return run, leaves


CASES = {"relation": relation_case, "relation_mse_prob": relation_mse_prob_case, "mi": mi_case,
         "routed": routed_case}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", sorted(CASES))
def test_fullgraph_compile_gives_eager_values_and_gradients(op, path, rng):
    torch._dynamo.reset()
    dtype = torch.float64 if path == "reference" else torch.float32
    run, leaves = CASES[op](rng, dtype)
    eager = run(*leaves, path)
    eager_grads = torch.autograd.grad(eager, leaves)
    # Inductor around the fused ops; the reference is plain PyTorch, so AOT autograd without
    # Inductor's code generation checks its part (the token-count op) at a fraction of the time.
    compiler = "aot_eager" if path == "reference" else "inductor"
    compiled = torch.compile(run, fullgraph=True, backend=compiler)(*leaves, path)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    tol = REFERENCE_TOL if path == "reference" else FUSED_TOL
    assert rel_err(compiled, eager) <= tol
    for got, expected in zip(compiled_grads, eager_grads):
        assert rel_err(got, expected) <= tol


class TinyStudent(torch.nn.Module):
    """A routed layer feeding a relation loss against a teacher and an MI bound against its pooled states."""

    def __init__(self):
        super().__init__()
        self.routed = pykd.RoutedLinear(8, 8, num_experts=2, encoding_size=2, router_hidden=4)
        self.query, self.key, self.critic = (torch.nn.Linear(8, 4) for _ in range(3))

    def forward(self, x, teacher_q, teacher_k, mask, teacher_pooled):
        hidden = torch.relu(self.routed(x))
        relation = pykd.attention_relation_loss(teacher_q, teacher_k, self.query(hidden), self.key(hidden), 2,
                                                mask=mask)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return relation - 0.1 * pykd.mi_lower_bound(self.critic(pooled), teacher_pooled, bound="alpha", alpha=0.5)


def test_compiled_training_step_follows_eager(rng):
    """The forward (all three ops) compiles to one graph, backward runs its compiled graph, and two
    SGD steps move the parameters as eager's do."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyStudent()
    initial = copy.deepcopy(model.state_dict())
    batch = (torch.randn(5, 6, 8, generator=rng), torch.randn(5, 6, 6, generator=rng),
             torch.randn(5, 6, 6, generator=rng), torch.ones(5, 6, dtype=torch.bool), torch.randn(5, 4, generator=rng))
    batch[3][2, 4:] = False
    compiled_model = copy.deepcopy(model)
    for module, forward in ((model, model), (compiled_model, torch.compile(compiled_model, fullgraph=True))):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        for _ in range(2):
            optimizer.zero_grad()
            forward(*batch).backward()
            optimizer.step()
    compiled_params = dict(compiled_model.named_parameters())
    for name, eager in model.named_parameters():
        assert rel_err(compiled_params[name] - initial[name], eager - initial[name]) <= 1e-4, name


def test_forward_and_backward_trace_into_one_graph(rng):
    """With Dynamo tracing autograd calls, loss.backward() joins the forward in one fullgraph graph."""
    torch._dynamo.reset()
    run, leaves = relation_case(rng, torch.float32)

    def forward_backward(s_a, s_b):
        loss = run(s_a, s_b, "auto")
        loss.backward()
        return loss.detach()

    eager = forward_backward(*leaves)
    eager_grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(forward_backward, fullgraph=True)(*leaves)
    assert rel_err(compiled, eager) <= FUSED_TOL
    for leaf, expected in zip(leaves, eager_grads):
        assert rel_err(leaf.grad, expected) <= FUSED_TOL


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", ("relation", "mi"))
def test_losses_compute_in_fp32_under_autocast(op, path, rng):
    """Autocast leaves the losses' arithmetic alone: same values and gradients as outside it (the
    backward runs after the region, as torch's autocast documentation asks)."""
    run, leaves = CASES[op](rng, torch.float32)
    expected = run(*leaves, path)
    expected_grads = torch.autograd.grad(expected, leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(*leaves, path)
    got_grads = torch.autograd.grad(got, leaves)
    assert got.dtype == torch.float32
    assert rel_err(got, expected) <= FUSED_TOL
    for grad, expected_grad in zip(got_grads, expected_grads):
        assert rel_err(grad, expected_grad) <= FUSED_TOL


@pytest.mark.parametrize("path", PATHS)
def test_routed_linear_under_autocast_returns_the_autocast_dtype(path, rng):
    """As nn.Linear: x is cast to the autocast dtype and y comes out in it."""
    x, experts_w, alpha, experts_b = (leaf.detach() for leaf in routed_case(rng, torch.float32)[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pykd.routed_linear(x, experts_w, alpha, experts_b, backend=path)
    expected = pykd.routed_linear(x.bfloat16(), experts_w, alpha, experts_b, backend=path)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_compiled_under_autocast_follows_eager_under_autocast(rng):
    torch._dynamo.reset()
    run, leaves = mi_case(rng, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = run(*leaves, "auto")
        compiled = torch.compile(run, fullgraph=True)(*leaves, "auto")
    assert rel_err(compiled, eager) <= FUSED_TOL


def opcheck_cases(rng):
    t = torch.randn(2, 5, 8, generator=rng)
    s_a, s_b = (torch.randn(2, 5, 4, generator=rng).requires_grad_() for _ in range(2))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    a, b = (torch.randn(6, 4, generator=rng).requires_grad_() for _ in range(2))
    log_q = torch.randn(6, generator=rng).requires_grad_()
    x, experts_w = (torch.randn(*shape, generator=rng).requires_grad_() for shape in ((7, 6), (2, 5, 6)))
    alpha = torch.rand(5, 2, generator=rng).requires_grad_()
    experts_b = torch.randn(2, 5, generator=rng).requires_grad_()
    ops = torch.ops.pykd
    return {
        "relation_cpp": (ops.attention_relation_cpp, (t, t, s_a, s_b, mask, 2, 0, 0.5, 0.5, False, True)),
        "relation_triton": (ops.attention_relation_triton, (t, t, s_a, s_b, mask, 2, 2, 0.5, 0.5, False)),
        "token_counts": (ops.relation_token_counts, (t, t, s_a.detach(), s_b.detach(), mask, True)),
        "mi_cpp": (ops.mi_bound_cpp, (a, b, log_q, 4, 0.5, 1.0, 0, True)),
        "mi_triton": (ops.mi_bound_triton, (a, b, log_q, 4, 0.5, 1.0, 0)),
        "routed_cpp": (ops.routed_linear_cpp, (x, experts_w, alpha, experts_b, 5)),
        "routed_triton": (ops.routed_linear_triton, (x, experts_w, alpha, experts_b, 5)),
    }


@pytest.mark.parametrize("name", ("relation_cpp", "relation_triton", "token_counts", "mi_cpp", "mi_triton",
                                  "routed_cpp", "routed_triton"))
def test_custom_ops_pass_torch_opcheck(name, rng):
    """Schema, fake shapes against real outputs, autograd registration and AOT dispatch with
    dynamic shapes (torch.library.opcheck), for each custom op the public functions call."""
    op, args = opcheck_cases(rng)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("path", ("cpp", "reference"))
def test_compiled_code_keeps_the_checks_that_read_values(path, rng):
    torch._dynamo.reset()
    t, s = torch.randn(2, 4, 8, generator=rng), torch.randn(2, 4, 4, generator=rng)
    compiled = torch.compile(lambda t, s, mask, check: pykd.attention_relation_loss(
        t, t, s, s, 2, mask=mask, backend=path, check_inputs_finite=check), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"mask has no valid token in example\(s\) \[1\]"):
        compiled(t, s, torch.tensor([[True] * 4, [False] * 4]), False)
    s[0, 2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"s_a contains NaN or Inf at a valid token"):
        compiled(t, s, torch.ones(2, 4, dtype=torch.bool), True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", ("mi", "relation"))
def test_dynamic_shapes_compile_with_the_scale_check(op, path, rng):
    """dynamic=True makes a float argument a symbolic float: the scale's finiteness check traces (as a
    guard run on every call), the values follow eager on two batch sizes and scales, and a non-finite
    scale is still refused, in eager with the same message."""
    torch._dynamo.reset()
    dtype = torch.float64 if path == "reference" else torch.float32
    a, b = (torch.randn(6, 5, 4, generator=rng, dtype=dtype) for _ in range(2))

    def step(a, b, scale):
        if op == "mi":
            return pykd.mi_lower_bound(a[:, 0], b[:, 0], bound="alpha", alpha=0.5, scale=scale, backend=path)
        return pykd.attention_relation_loss(b, b, a, a, 2, loss="mse_prob", scale_s=scale, backend=path)

    backend = "aot_eager" if path == "reference" else "inductor"
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=backend)
    tol = REFERENCE_TOL if path == "reference" else FUSED_TOL
    for rows, scale in ((6, 2.0), (4, 0.5)):
        leaves = [x[:rows].clone().requires_grad_() for x in (a, b)]
        eager = step(*leaves, scale)
        compiled_value = compiled(*leaves, scale)
        assert rel_err(compiled_value, eager) <= tol
        eager_grad = torch.autograd.grad(eager, leaves[0])[0]
        assert rel_err(torch.autograd.grad(compiled_value, leaves[0])[0], eager_grad) <= tol
    name = "scale" if op == "mi" else "scale_s"
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match=f"{name} must be a positive finite number|{name} must be a finite number"):
            step(a, b, bad)
    # The last call's inputs but the scale: nothing else may make Dynamo recompile (and so re-run the
    # check at trace time). Compiled, the ValueError surfaces inside Dynamo's error.
    for bad in (math.inf, -math.inf):
        with pytest.raises(Exception, match=f"{name} must be a (positive )?finite number, got -?inf"):
            compiled(*leaves, bad)
