"""Mixture-of-Supernets layers: an architecture router and a linear layer whose weight it mixes.

MoS (arXiv 2306.04845): a sub-network's linear weight is W(a) = sum_e alpha_e(a) W_e (layer-wise)
or mixed per output neuron (neuron-wise), with alpha = softmax over experts of a router MLP fed an
encoding of the architecture (e.g. hidden size, heads and FFN width over the super-net maxima).
After search, `RoutedLinear.collapse()` folds the experts into a plain nn.Linear.
"""
import numbers

import torch
from torch import nn

from .ops.routed_linear import mixed_weight, routed_linear


def _count(name: str, value, minimum: int = 1) -> int:
    """An int argument of at least `minimum`; the error names the argument and what it got."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class ArchRouter(nn.Module):
    """MLP(arch encoding -> hidden -> ReLU -> E [x F_max]) with a softmax over experts.

    Layer-wise it returns alpha (E,); neuron-wise (out_features, E), computing only the first
    out_features neurons' logits as MoS does for the active width.

    Args:
        encoding_size: length of the architecture encoding.
        num_experts: E.
        hidden: width of the MLP's hidden layer.
        neuron_wise: one mixture per output neuron instead of one per layer.
        max_out_features: F_max, the most output neurons a neuron-wise router mixes (required then).
    """

    def __init__(self, encoding_size: int, num_experts: int, hidden: int = 128, neuron_wise: bool = False,
                 max_out_features: int | None = None):
        super().__init__()
        encoding_size, num_experts, hidden = (_count(name, value) for name, value in (
            ("encoding_size", encoding_size), ("num_experts", num_experts), ("hidden", hidden)))
        if neuron_wise and max_out_features is None:
            raise ValueError("a neuron-wise ArchRouter needs max_out_features")
        if neuron_wise:
            max_out_features = _count("max_out_features", max_out_features)
        self.num_experts, self.neuron_wise = num_experts, neuron_wise
        self.max_out_features = max_out_features
        self.hidden = nn.Linear(encoding_size, hidden)
        self.head = nn.Linear(hidden, num_experts * (max_out_features if neuron_wise else 1))

    def forward(self, encoding: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        """Mixing coefficients for one architecture.

        Args:
            encoding: the architecture's encoding.
            out_features: active output width f of a neuron-wise router (default F_max); unused
                layer-wise.
        Shapes:
            encoding (encoding_size,) -> alpha (E,) layer-wise, (f, E) neuron-wise.
        Returns:
            alpha, a softmax over the experts (each row sums to 1), in the router's dtype.
        """
        if encoding.dim() != 1 or encoding.shape[0] != self.hidden.in_features:
            raise ValueError(f"encoding must have shape ({self.hidden.in_features},), got {tuple(encoding.shape)}")
        hidden = torch.relu(self.hidden(encoding))
        if not self.neuron_wise:
            return torch.softmax(self.head(hidden), dim=-1)
        f = self.max_out_features if out_features is None else _count("out_features", out_features)
        if not f <= self.max_out_features:
            raise ValueError(f"out_features must be in [1, {self.max_out_features}], got {f}")
        rows = f * self.num_experts  # only the active neurons' logits are computed
        logits = nn.functional.linear(hidden, self.head.weight[:rows], self.head.bias[:rows])
        return torch.softmax(logits.view(f, self.num_experts), dim=-1)


class RoutedLinear(nn.Module):
    """A super-net linear layer with E expert weights mixed per architecture by an ArchRouter.

    Select a sub-network with `set_active(out_features, in_features, arch_encoding)`; forward then
    runs pykd.routed_linear on the top-left (out_features x in_features) slice.

    Args:
        max_in_features, max_out_features: the super-net's D_max and F_max.
        num_experts: E; encoding_size: length of the architecture encoding.
        bias: whether the experts carry biases.
        neuron_wise, router_hidden: the ArchRouter's mixing granularity and hidden width.
        init_weight, init_bias: a dense (F_max, D_max) weight and (F_max,) bias every expert starts
            from (default: nn.Linear's initialisation per expert); init_noise: std of the Gaussian
            noise added to each expert's copy.
    """

    def __init__(self, max_in_features: int, max_out_features: int, num_experts: int, encoding_size: int,
                 bias: bool = True, neuron_wise: bool = False, router_hidden: int = 128,
                 init_weight: torch.Tensor | None = None, init_bias: torch.Tensor | None = None,
                 init_noise: float = 0.0):
        super().__init__()
        shape = tuple(_count(name, value) for name, value in (
            ("num_experts", num_experts), ("max_out_features", max_out_features), ("max_in_features", max_in_features)))
        router_hidden = _count("router_hidden", router_hidden)
        self.experts_w = nn.Parameter(torch.empty(shape))
        self.experts_b = nn.Parameter(torch.empty(num_experts, max_out_features)) if bias else None
        self.router = ArchRouter(encoding_size, num_experts, router_hidden, neuron_wise, max_out_features)
        self._init_experts(init_weight, init_bias, init_noise)
        self.set_active(max_out_features, max_in_features, torch.ones(encoding_size))

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_experts: int, encoding_size: int, noise: float = 1e-3,
                    **kwargs) -> "RoutedLinear":
        """Experts initialised as copies of a pretrained dense layer plus Gaussian noise (MoS).

        Args:
            linear: the pretrained layer; its shape becomes the super-net's maxima.
            num_experts, encoding_size: as in RoutedLinear; noise: std of each expert's noise.
            **kwargs: RoutedLinear's other arguments (neuron_wise, router_hidden).
        Returns:
            a RoutedLinear whose active sub-network is the whole layer.
        """
        return cls(linear.in_features, linear.out_features, num_experts, encoding_size,
                   bias=linear.bias is not None, init_weight=linear.weight.detach(),
                   init_bias=linear.bias.detach() if linear.bias is not None else None, init_noise=noise, **kwargs)

    def _init_experts(self, init_weight, init_bias, noise: float) -> None:
        with torch.no_grad():
            if init_weight is None:
                for expert in self.experts_w:
                    nn.init.kaiming_uniform_(expert, a=5**0.5)  # nn.Linear's default
                if self.experts_b is not None:
                    bound = self.experts_w.shape[2] ** -0.5
                    self.experts_b.uniform_(-bound, bound)
                return
            if tuple(init_weight.shape) != tuple(self.experts_w.shape[1:]):
                raise ValueError(f"init_weight must have shape {tuple(self.experts_w.shape[1:])}, got "
                                 f"{tuple(init_weight.shape)}")
            self.experts_w.copy_(init_weight.expand_as(self.experts_w))
            self.experts_w.add_(noise * torch.randn_like(self.experts_w))
            if self.experts_b is not None:
                self.experts_b.copy_((init_bias if init_bias is not None else torch.zeros(1)).expand_as(self.experts_b))
                self.experts_b.add_(noise * torch.randn_like(self.experts_b))

    def set_active(self, out_features: int, in_features: int, arch_encoding: torch.Tensor) -> None:
        """Selects the sub-network forward runs.

        Args:
            out_features, in_features: the active shape (f, d), at most (F_max, D_max).
            arch_encoding: the encoding the router mixes the experts for.
        Shapes:
            arch_encoding (encoding_size,).
        """
        _, f_max, d_max = self.experts_w.shape
        out_features, in_features = _count("out_features", out_features), _count("in_features", in_features)
        if not (1 <= out_features <= f_max and 1 <= in_features <= d_max):
            raise ValueError(f"active shape ({out_features}, {in_features}) must fit the super-net's "
                             f"({f_max}, {d_max})")
        self.out_features, self.in_features = out_features, in_features
        self.arch_encoding = arch_encoding

    def alpha(self) -> torch.Tensor:
        """The router's mixing coefficients for the active architecture.

        Shapes:
            (E,) layer-wise, (out_features, E) neuron-wise.
        Returns:
            alpha in the experts' dtype and device; gradients reach the router.
        """
        encoding = self.arch_encoding.to(self.experts_w.device, self.experts_w.dtype)
        return self.router(encoding, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The active sub-network's output, through pykd.routed_linear.

        Args:
            x: input features of the active width.
        Shapes:
            x (..., in_features) -> (..., out_features).
        Returns:
            y in x's dtype (the autocast dtype inside autocast); gradients reach x, the experts and
            the router.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in the active in_features={self.in_features}, got shape {tuple(x.shape)}")
        return routed_linear(x, self.experts_w, self.alpha(), self.experts_b, self.out_features)

    @torch.no_grad()
    def collapse(self) -> nn.Linear:
        """A plain nn.Linear of the active shape computing what this layer computes now.

        Returns:
            nn.Linear(in_features, out_features) with the mixed weight and bias, on the experts'
            device and dtype.
        """
        weight, bias = mixed_weight(self.experts_w, self.alpha(), self.experts_b, self.out_features,
                                    self.in_features)
        dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                          device=weight.device, dtype=weight.dtype)
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
        return dense
