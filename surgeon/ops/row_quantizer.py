"""Affine low-bit quantization of a tensor in rows (per-row or per-group scale).

Used to keep the *output* of Sigmoid, Tanh and Softmax for backward: their derivatives are functions of the
output. Each row (a softmax row along its dim, or a fixed-size group of a flattened tensor) gets its own
minimum and step, stored in fp32 beside the bit-packed codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.ops.device_route import takes_cpu_route
from surgeon.ops.memory_format import is_channels_last


@dataclass
class QuantizedRows:
    """Bit-packed codes of a ``[rows, width]`` matrix plus per-row offset and step."""

    packed: torch.Tensor
    offset: torch.Tensor
    step: torch.Tensor
    rows: int
    width: int
    bits: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.packed, self.offset, self.step


def quantize_rows(matrix: torch.Tensor, bits: int, nonnegative: bool = False,
                  shift: torch.Tensor | None = None) -> QuantizedRows:
    """Quantize every row of a tensor (its last dim; any leading dims, in any strides) to ``2**bits`` levels between
    the row's min and max (round to nearest). The codes are packed in the rows' logical order, so a permuted
    tensor (attention's ``q``/``k``/``v``) is not copied into a matrix first.

    ``nonnegative`` rows (probabilities) use 0 as the lower end and store no offset. Non-finite values do not
    spoil their row: the range is that of the row's finite values, +inf saturates at the top code, -inf and NaN
    take the bottom code, so every row dequantizes to finite values (the CUDA kernel codes them the same way).
    ``shift`` (one value per row) is subtracted from the offset kept: the rows then dequantize minus it (a layer
    norm keeps its rows centred on their mean)."""
    width = matrix.shape[-1]
    rows = matrix.numel() // max(width, 1)
    if matrix.dim() != 2:
        flat = as_matrix(matrix)
        # the CUDA kernels read a matrix: copy only there (and where the CPU takes the CUDA route, to count it)
        if flat is not None or not takes_cpu_route(matrix.device):
            matrix = flat if flat is not None else matrix.reshape(rows, width)
    from surgeon.ops.kernels import (
        library as kernel_ops,  # imported here: kernel_ops (through cuda_kernels) imports this module
    )

    # range and codes in one op (one kernel on the GPU), both decided on the device: nothing here reads a value
    # back to the host
    packed, offset, step = kernel_ops.rows_quantize(matrix.detach(), bits, nonnegative, shift)
    return QuantizedRows(packed, offset, step, rows, width, bits)


def as_matrix(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a ``[rows, last dim]`` view, or None where that needs a copy."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def dequantize_rows(packed: torch.Tensor, offset: torch.Tensor, step: torch.Tensor, rows: int, width: int,
                    bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` (up to the rounding): a ``[rows, width]`` tensor of ``dtype``."""
    from surgeon.ops.kernels import library as kernel_ops

    return kernel_ops.rows_unpack(packed, offset if offset.numel() else None, step, rows, width, bits, dtype)


def as_groups(tensor: torch.Tensor, group_size: int) -> torch.Tensor:
    """Flatten and zero-pad ``tensor`` into ``[groups, group_size]`` rows."""
    flat = tensor.reshape(-1)
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, group_size)


@dataclass(frozen=True)
class ImageRows:
    """How a 4-D tensor was cut into quantization rows, so it can be put back in its own layout."""

    shape: torch.Size
    dtype: torch.dtype
    channels_last: bool
    rows: int
    width: int
    bits: int


def quantize_image(x: torch.Tensor, bits: int) -> tuple[tuple[torch.Tensor, ...], ImageRows]:
    """An ``[N, C, H, W]`` tensor at ``bits`` with one scale per image row (NHWC storage: ``W*C`` values) or
    per channel plane (NCHW: ``H*W`` values) - both views of the storage, so nothing is copied before quantizing.
    Returns the tensors to keep and the layout :func:`dequantize_image` needs."""
    n, c, h, w = x.shape
    channels_last = is_channels_last(x)
    rows = x.detach().permute(0, 2, 3, 1).reshape(n * h, w * c) if channels_last else x.detach().reshape(n * c, h * w)
    quantized = quantize_rows(rows, bits)
    return quantized.tensors(), ImageRows(x.shape, x.dtype, channels_last, quantized.rows, quantized.width, bits)


def dequantize_image(packed: torch.Tensor, offset: torch.Tensor, step: torch.Tensor, layout: ImageRows
                     ) -> torch.Tensor:
    flat = dequantize_rows(packed, offset, step, layout.rows, layout.width, layout.bits, layout.dtype)
    n, c, h, w = layout.shape
    return flat.view(n, h, w, c).permute(0, 3, 1, 2) if layout.channels_last else flat.view(layout.shape)
