"""The linear depthwise adapter layer: a zero-initialised trainable kernel delta beside the frozen kernel."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.methods.variant import make_variant, revert_variant
from surgeon.ops.padding import same_pads


class LinearDeltaConv:
    """Mixin for a depthwise conv with a zero-initialised trainable kernel delta: ``conv(x, W + ΔW) + b``.

    Exact at init (``W + 0 == W``) and exactly mergeable (``W += ΔW``). The delta is the parameter
    ``weight_delta`` beside the frozen ``weight``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: Any = self
        weight = conv.weight + conv.weight_delta
        if getattr(conv, "_surgeon_same_dynamic", False):
            pads = same_pads(tuple(x.shape[-2:]), tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation))
            return F.conv2d(F.pad(x, pads), weight, conv.bias, conv.stride, (0, 0), conv.dilation, conv.groups)
        return conv._conv_forward(x, weight, conv.bias)


def add_linear_delta(conv: nn.Conv2d, same_dynamic: bool) -> nn.Module:
    variant = make_variant(conv, LinearDeltaConv)
    variant._surgeon_same_dynamic = same_dynamic
    variant.register_parameter("weight_delta", nn.Parameter(torch.zeros_like(conv.weight)))
    return variant


def fold_linear_delta(conv: nn.Module) -> nn.Module:
    """``W += ΔW``, drop the delta, back to the original class."""
    with torch.no_grad():
        conv.weight.add_(conv.weight_delta)
    del conv.weight_delta
    return revert_variant(conv)
