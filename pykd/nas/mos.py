r"""Mixture-of-Supernets (arXiv 2306.04845) inside the SuperLM: expert weights routed by architecture.

A routed linear layer holds E experts W_e (F_max x D_max) and biases b_e, initialised as copies of
the teacher's dense layer plus Gaussian noise. For the active architecture a of a layer, the
layer's router maps the encoding of a to mixing weights alpha and the layer computes (through
pykd.routed_linear, which never materialises W)

    layer-wise   alpha = softmax(head(relu(body(enc))))            (E,)     W = sum_e alpha_e W_e[:f, :d]
    neuron-wise  alpha_j = softmax over e of the neuron's E logits  (f, E)   W[j] = sum_e alpha_je W_e[j, :d]

Encoding of a layer's architecture (3 numbers, the MoS paper's choice):

    enc = (hidden / hidden_max, heads / heads_max, ffn / ffn_max)

with the maxima the teacher's (hidden size, head count, FFN width); a per-layer architecture gives
each layer its own heads and ffn. One router per layer (`LayerRouter`): a shared body
MLP(3 -> router_hidden -> ReLU), then layer-wise one head of E logits shared by every routed linear
of the layer, or neuron-wise one head per routed linear with E logits per output neuron (only the
first f * E rows are computed for the active width f).

`RoutedElasticLinear.collapse()` / `.dense()` fold the experts into the plain weight of the active
architecture; SuperLM.export uses them, so the exported model is a stock dense model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.routed_linear import mixed_weight, routed_linear

ENCODING = ("hidden/hidden_max", "heads/heads_max", "ffn/ffn_max")
ROUTINGS = ("layer", "neuron")


def arch_encoding(hidden: int, heads: int, ffn: int, maxima: tuple[int, int, int]) -> torch.Tensor:
    """The router input of one layer: (hidden, heads, ffn) over the teacher's (hidden, heads, ffn)."""
    return torch.tensor([hidden / maxima[0], heads / maxima[1], ffn / maxima[2]], dtype=torch.float32)


class LayerRouter(nn.Module):
    """The router of one layer (module docstring).

    Args:
        num_experts: E.
        routing: "layer" (one alpha per layer) or "neuron" (one alpha per output neuron of each linear).
        max_out_features: {key: F_max} of the layer's routed linears (heads are built per key neuron-wise).
        hidden: width of the router's hidden layer (MoS: 128).
    """

    def __init__(self, num_experts: int, routing: str, max_out_features: dict[str, int], hidden: int = 128):
        super().__init__()
        self.num_experts, self.routing = num_experts, routing
        self.body = nn.Linear(len(ENCODING), hidden)
        if routing == "neuron":
            self.heads = nn.ModuleDict({key: nn.Linear(hidden, num_experts * out)
                                        for key, out in max_out_features.items()})
        else:
            self.head = nn.Linear(hidden, num_experts)

    def forward(self, encoding: torch.Tensor, key: str, out_features: int) -> torch.Tensor:
        """alpha: (E,) layer-wise, (out_features, E) neuron-wise for the routed linear `key`."""
        if encoding.shape != (len(ENCODING),):
            raise ValueError(f"the architecture encoding must have shape ({len(ENCODING)},) = {ENCODING}, got "
                             f"{tuple(encoding.shape)}")
        hidden = torch.relu(self.body(encoding))
        if self.routing == "layer":
            return torch.softmax(self.head(hidden), dim=-1)
        head = self.heads[key]
        rows = out_features * self.num_experts  # only the active neurons' logits
        logits = F.linear(hidden, head.weight[:rows], head.bias[:rows])
        return torch.softmax(logits.view(out_features, self.num_experts), dim=-1)


class RoutedElasticLinear(nn.Module):
    """An elastic linear layer whose weight the layer's router mixes from E experts.

    Shapes: experts_w (E, F_max, D_max), experts_b (E, F_max); x (..., d) -> (..., out_features).
    The router belongs to the layer (registered there); this module only refers to it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, num_experts: int, noise: float,
                 router: LayerRouter, key: str):
        super().__init__()
        with torch.no_grad():
            experts_w = weight.detach().expand(num_experts, *weight.shape).clone()
            self.experts_w = nn.Parameter(experts_w + noise * torch.randn_like(experts_w))
            self.experts_b = None
            if bias is not None:
                experts_b = bias.detach().expand(num_experts, *bias.shape).clone()
                self.experts_b = nn.Parameter(experts_b + noise * torch.randn_like(experts_b))
        self._router = (router,)  # a tuple: not registered as a child (the layer owns the router)
        self.key = key
        _, self.max_out_features, self.max_in_features = self.experts_w.shape
        self.out_features, self.in_features = self.max_out_features, self.max_in_features
        self.encoding = torch.ones(len(ENCODING))

    def set_active(self, out_features: int, in_features: int, encoding: torch.Tensor | None = None) -> None:
        if not (1 <= out_features <= self.max_out_features and 1 <= in_features <= self.max_in_features):
            raise ValueError(f"active shape ({out_features}, {in_features}) must fit the super-net's "
                             f"({self.max_out_features}, {self.max_in_features})")
        if encoding is None:
            raise ValueError("a routed linear needs the architecture encoding of its layer")
        self.out_features, self.in_features = out_features, in_features
        self.encoding = encoding.to(self.experts_w.device, self.experts_w.dtype)  # once, not per forward

    def alpha(self) -> torch.Tensor:
        encoding = self.encoding.to(self.experts_w.device, self.experts_w.dtype)
        return self._router[0](encoding, self.key, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routed_linear(x, self.experts_w, self.alpha(), self.experts_b, self.out_features)

    def dense(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) the experts give the active architecture, cut to (out_features x in_features)."""
        if out_features != self.out_features:
            raise ValueError(f"dense() of a routed layer needs the active out_features {self.out_features}, got "
                             f"{out_features}")
        return mixed_weight(self.experts_w, self.alpha(), self.experts_b, out_features, in_features)

    @torch.no_grad()
    def collapse(self) -> nn.Linear:
        """A plain nn.Linear of the active shape computing what this layer computes now."""
        weight, bias = self.dense(self.out_features, self.in_features)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear

    def extra_repr(self) -> str:
        return (f"experts={self.experts_w.shape[0]}, max_in={self.max_in_features}, max_out={self.max_out_features}, "
                f"key={self.key!r}, active=({self.out_features}, {self.in_features})")
