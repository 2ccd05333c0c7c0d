"""Elastic layers of a SuperLM: one full-size weight, the active sub-network runs its top-left slice.

Input widths follow the input tensor (x.shape[-1]); output widths are set per architecture. The
parameters keep nn.Linear / nn.Embedding / nn.LayerNorm's names (weight, bias), so a SuperLM's
state dict reads like its teacher's. At full size the parameters are used unsliced: a slice's
backward allocates and zero-fills a full-size gradient, which the teacher-shaped sub-network
should not pay.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ElasticLinear(nn.Module):
    """A linear layer computing x W[:out, :d]^T + b[:out] with d = x.shape[-1].

    Shapes: weight (max_out, max_in), bias (max_out,); x (..., d) with d <= max_in -> (..., out).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.max_out_features, self.max_in_features = self.weight.shape
        self.out_features, self.in_features = self.max_out_features, self.max_in_features

    def set_active(self, out_features: int, in_features: int, encoding=None) -> None:
        """The active shape (in_features is what export cuts; forward takes x's width); encoding is unused."""
        if not (1 <= out_features <= self.max_out_features and 1 <= in_features <= self.max_in_features):
            raise ValueError(f"active shape ({out_features}, {in_features}) must fit the super-net's "
                             f"({self.max_out_features}, {self.max_in_features})")
        self.out_features, self.in_features = out_features, in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.dense(self.out_features, x.shape[-1]))

    def dense(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the (out_features x in_features) sub-layer, as plain tensors."""
        if (out_features, in_features) == (self.max_out_features, self.max_in_features):
            return self.weight, self.bias
        bias = self.bias[:out_features] if self.bias is not None else None
        return self.weight[:out_features, :in_features], bias

    def extra_repr(self) -> str:
        return (f"max_in={self.max_in_features}, max_out={self.max_out_features}, "
                f"active=({self.out_features}, {self.in_features})")


class ElasticEmbedding(nn.Module):
    """An embedding table returning the first `width` features of each row."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.weight = nn.Parameter(embedding.weight.detach().clone())
        self.padding_idx = embedding.padding_idx
        self.width = self.weight.shape[1]

    def set_active(self, width: int) -> None:
        if not 1 <= width <= self.weight.shape[1]:
            raise ValueError(f"embedding width must be in [1, {self.weight.shape[1]}], got {width}")
        self.width = width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Gather full rows, then slice the (few) looked-up vectors: the table's gradient is then
        # one full-size dense tensor (as the teacher's), not a sliced one copied into a zero-filled
        # full-size one.
        rows = F.embedding(ids, self.weight, self.padding_idx)
        return rows if self.width == self.weight.shape[1] else rows[..., :self.width]

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, active_width={self.width}"


class ElasticLayerNorm(nn.Module):
    """LayerNorm over the input's width d with the first d entries of the affine parameters."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        if len(norm.normalized_shape) != 1 or not norm.elementwise_affine:
            raise ValueError(f"an elastic LayerNorm needs a 1-d affine LayerNorm, got {norm}")
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.bias = nn.Parameter(norm.bias.detach().clone()) if norm.bias is not None else None
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        if d == self.weight.shape[0]:
            return F.layer_norm(x, (d,), self.weight, self.bias, self.eps)
        bias = self.bias[:d] if self.bias is not None else None
        return F.layer_norm(x, (d,), self.weight[:d], bias, self.eps)


class ActiveLayers(nn.ModuleList):
    """The encoder's layer list; iterating it yields only the active layers (the state dict keeps all)."""

    def __init__(self, layers):
        super().__init__(layers)
        self.active = list(range(len(self)))

    def __iter__(self):
        return iter([self._modules[str(i)] for i in self.active])
