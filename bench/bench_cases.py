"""Benchmark cases: inputs and the fwd+bwd callables of each variant, shared by timing and memory."""
import functools

import torch

import pykd
from pykd.ops.attention_relation import RelationSpec, _reference

VARIANTS = ("fused", "eager", "compiled", "gemm_floor")


def relation_inputs(batch, heads, head_dim, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = heads * head_dim
    t_a, t_b, s_a, s_b = (torch.randn(batch, length, width, generator=gen) for _ in range(4))
    return t_a, t_b, s_a.requires_grad_(), s_b.requires_grad_()


@functools.cache
def _compiled_reference(heads, head_dim):
    spec = RelationSpec(heads=heads, loss="kl", scale_t=head_dim**-0.5, scale_s=head_dim**-0.5)
    return torch.compile(lambda t_a, t_b, s_a, s_b: _reference(t_a, t_b, s_a, s_b, None, spec))


def relation_step(variant, inputs, heads, head_dim):
    """Returns a callable running forward and backward of one variant."""
    t_a, t_b, s_a, s_b = inputs
    if variant == "gemm_floor":
        return _gemm_floor(inputs, heads)
    if variant == "compiled":
        compiled = _compiled_reference(heads, head_dim)
        return lambda: torch.autograd.grad(compiled(t_a, t_b, s_a, s_b), (s_a, s_b))
    backend = {"fused": "cpp", "eager": "reference"}[variant]
    return lambda: torch.autograd.grad(
        pykd.attention_relation_loss(t_a, t_b, s_a, s_b, heads, backend=backend), (s_a, s_b))


def _gemm_floor(inputs, heads):
    """The four products every path must do: T = Xt Yt^T, S = Xs Ys^T, dXs = G Ys, dYs = G^T Xs."""
    batch, length, width = inputs[0].shape
    xt, yt, xs, ys = (x.detach().view(batch, length, heads, width // heads).transpose(1, 2).contiguous()
                      for x in inputs)

    def step():
        torch.matmul(xt, yt.transpose(-1, -2))
        grad = torch.matmul(xs, ys.transpose(-1, -2))
        torch.matmul(grad, ys)
        torch.matmul(grad.transpose(-1, -2), xs)

    return step


def relation_flops(batch, heads, head_dim, length):
    return 4 * 2 * batch * heads * length * length * head_dim


def mi_inputs(n, embed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(n, embed, generator=gen) / embed**0.5 for _ in range(2))
    log_q = torch.randn(n, generator=gen)
    return a.requires_grad_(), b.requires_grad_(), log_q.requires_grad_()


@functools.cache
def _compiled_mi_reference(bound, alpha):
    from pykd.ops.mi_bound import BoundSpec
    from pykd.ops.mi_bound import _reference as mi_reference

    spec = BoundSpec(bound=bound, alpha=alpha, scale=1.0)
    return torch.compile(lambda a, b, log_q: mi_reference(a, b, log_q, spec))


def mi_step(variant, inputs, bound="alpha", alpha=0.9):
    """fwd+bwd of the MI bound (all of a, b, log_q trainable) for one variant."""
    a, b, log_q = inputs
    if variant == "gemm_floor":
        return _mi_gemm_floor(a.detach(), b.detach())
    if variant == "compiled":
        compiled = _compiled_mi_reference(bound, alpha)
        return lambda: torch.autograd.grad(compiled(a, b, log_q), inputs)
    backend = {"fused": "cpp", "eager": "reference"}[variant]
    return lambda: torch.autograd.grad(
        pykd.mi_lower_bound(a, b, log_q, bound=bound, alpha=alpha, backend=backend), inputs)


def _mi_gemm_floor(a, b):
    """The n x n x e products every path needs: S = a b^T, dA = G b, dB = G^T a."""
    def step():
        grad = a @ b.T
        grad @ b
        grad.T @ a

    return step


def mi_flops(n, embed):
    return 3 * 2 * n * n * embed


ROUTED_VARIANTS = ("fused", "reference", "dense")


def routed_inputs(tokens, d, f, experts, neuron_wise, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen).requires_grad_()
    experts_w = (torch.randn(experts, f, d, generator=gen) * d**-0.5).requires_grad_()
    experts_b = torch.zeros(experts, f).requires_grad_()
    logits = torch.randn(f, experts, generator=gen) if neuron_wise else torch.randn(experts, generator=gen)
    return x, experts_w, torch.softmax(logits, -1).requires_grad_(), experts_b


def routed_step(variant, inputs):
    """fwd+bwd of the routed linear (every input trainable), or of a dense nn.Linear of the active shape."""
    x, experts_w, alpha, experts_b = inputs
    f = experts_w.shape[1]
    if variant == "dense":
        weight = experts_w[0].detach().clone().requires_grad_()
        bias = experts_b[0].detach().clone().requires_grad_()
        return lambda: torch.autograd.grad(torch.nn.functional.linear(x, weight, bias).sum(), (x, weight, bias))
    backend = {"fused": "cpp", "reference": "reference"}[variant]
    return lambda: torch.autograd.grad(pykd.routed_linear(x, experts_w, alpha, experts_b, f, backend=backend).sum(),
                                       inputs)


def step_for(op: str, variant: str, case: tuple):
    """The fwd+bwd callable of `op` ("relation", "mi", "routed", "vocab", "kd" or "mlm") at `case`, for timing or
    memory."""
    if op == "mlm":
        from mlm_kd_step import mlm_kd_step

        return mlm_kd_step(variant, *case)
    if op == "kd":
        from kd_step import kd_step

        return kd_step(variant, *case)
    if op == "vocab":
        from vocab_kd_step import vocab_inputs, vocab_step

        return vocab_step(variant, vocab_inputs(*case))
    if op == "relation":
        return relation_step(variant, relation_inputs(*case), case[1], case[2])
    if op == "routed":
        return routed_step(variant, routed_inputs(*case))
    return mi_step(variant, mi_inputs(*case))
