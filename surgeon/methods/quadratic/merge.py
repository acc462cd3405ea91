"""Merging extras of the quadratic method: a BatchNorm that only consumes a merged quadratic layer folds into it."""

from __future__ import annotations

import torch
from torch import nn

from surgeon.methods.quadratic.inference import QuadraConvDW


def fold_batchnorm(layer: QuadraConvDW, bn: nn.Module) -> None:
    """``s*(conv3 x + b + sum a*b) + t`` = ``conv3'(x) + b' + sum (s a) * b`` with ``s = γ/σ``, ``t = β - μ s``."""
    with torch.no_grad():
        scale = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        conv3 = layer.P.conv3
        bias = conv3.bias if conv3.bias is not None else torch.zeros_like(shift)
        conv3.weight.mul_(scale.view(-1, 1, 1, 1))
        new_bias = bias * scale + shift
        if conv3.bias is None:
            conv3.bias = nn.Parameter(new_bias, requires_grad=False)
        else:
            conv3.bias.copy_(new_bias)
        layer.P.conv1.weight.mul_(scale.repeat_interleave(layer.rank).view(-1, 1, 1, 1))
