"""The memory format a model's conv weights are stored in, recorded in artifacts and restored on load.

A channels-last model and a contiguous copy of it with identical weights run different CPU conv kernels and
differ in the last bits. ``adapt`` trains channels-last, so an artifact records the format its weights had and
``load`` puts it back: the reloaded model computes the same thing the same way as the one that was saved.
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS_LAST = "channels_last"
CONTIGUOUS = "contiguous"
FORMATS = {CHANNELS_LAST: torch.channels_last, CONTIGUOUS: torch.contiguous_format}


def model_memory_format(model: nn.Module) -> str:
    """``channels_last`` when the model's 4-D weights are stored NHWC. The first weight whose layout tells the
    two apart decides (a depthwise ``[C, 1, k, k]`` kernel is both at once)."""
    for tensor in model.parameters():
        if tensor.dim() != 4:
            continue
        nhwc, nchw = tensor.is_contiguous(memory_format=torch.channels_last), tensor.is_contiguous()
        if nhwc != nchw:
            return CHANNELS_LAST if nhwc else CONTIGUOUS
    return CONTIGUOUS


def apply_memory_format(model: nn.Module, name: str | None) -> nn.Module:
    """Store the model's 4-D weights in the recorded format (unknown or missing: left as loaded)."""
    if name in FORMATS:
        model.to(memory_format=FORMATS[name])
    return model


def is_channels_last(x: torch.Tensor) -> bool:
    """Stored NHWC (and not also plain contiguous, as 1x1 images are)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
