"""Benchmark cases: inputs and the fwd+bwd callables of each variant, shared by timing and memory."""
import functools

import torch

import pykd
from pykd.ops.attention_relation import RelationSpec, _reference

RELATION_VARIANTS = ("fused", "eager", "compiled", "gemm_floor")


def relation_inputs(batch, heads, head_dim, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = heads * head_dim
    t_a, t_b, s_a, s_b = (torch.randn(batch, length, width, generator=gen) for _ in range(4))
    return t_a, t_b, s_a.requires_grad_(), s_b.requires_grad_()


@functools.lru_cache(maxsize=None)
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
