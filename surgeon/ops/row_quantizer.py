"""Affine low-bit quantization of a tensor in rows (per-row or per-group scale).

Used to keep the *output* of Sigmoid, Tanh and Softmax for backward: their derivatives are functions of the
output. Each row (a softmax row along its dim, or a fixed-size group of a flattened tensor) gets its own
minimum and step, stored in fp32 beside the bit-packed codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surgeon.ops import bitpack
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


def quantize_rows(matrix: torch.Tensor, bits: int, nonnegative: bool = False) -> QuantizedRows:
    """Quantize every row of a tensor (its last dim; any leading dims, in any strides) to ``2**bits`` levels between
    the row's min and max (round to nearest). The codes are packed in the rows' logical order, so a permuted
    tensor (attention's ``q``/``k``/``v``) is not copied into a matrix first.

    ``nonnegative`` rows (probabilities) use 0 as the lower end and store no offset. Non-finite values do not
    spoil their row: the range is that of the row's finite values, +inf saturates at the top code, -inf and NaN
    take the bottom code, so every row dequantizes to finite values (the CUDA kernel codes them the same way)."""
    width = matrix.shape[-1]
    rows = matrix.numel() // max(width, 1)
    levels = 2**bits - 1
    if matrix.dim() != 2:
        flat = _as_matrix(matrix)
        if flat is not None or matrix.is_cuda:  # the CUDA kernel reads a matrix: copy only there
            matrix = flat if flat is not None else matrix.reshape(rows, width)
    # row ends in the input's own dtype (exact), then fp32: no fp32 copy of a half-precision matrix (amax and amin
    # separately: torch.aminmax is several times slower on the CPU)
    high = matrix.amax(dim=-1, keepdim=True).float().reshape(rows, 1)
    low = high.new_zeros(rows, 1) if nonnegative else matrix.amin(dim=-1, keepdim=True).float().reshape(rows, 1)
    # compiled graphs take the finite-only range unconditionally (no data-dependent branch; fused anyway)
    finite_ends = not torch.compiler.is_compiling() and bool(torch.isfinite(high).all() and torch.isfinite(low).all())
    if not finite_ends:
        low, high = _finite_range(matrix, nonnegative)
    step = ((high - low) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    # every value lies between its row's own min and max, so the packer may skip its clamp and NaN passes - not for
    # probabilities (their 0 is a promise, not a min) nor for a range beyond fp32 (±3e38 in one row)
    in_range = finite_ends and not nonnegative and bool(torch.isfinite(step).all())
    offset = high.new_zeros(0) if nonnegative else low
    from surgeon.ops.kernels import (
        library as kernel_ops,  # imported here: kernel_ops (through cuda_kernels) imports this module
    )

    packed = kernel_ops.rows_pack(matrix.detach(), None if nonnegative else low, step, bits, in_range)
    return QuantizedRows(packed, offset, step, rows, width, bits)


def _as_matrix(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a ``[rows, last dim]`` view, or None where that needs a copy."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _finite_range(values: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ends over finite values only (0 for a row with none). Only runs when a row holds a non-finite
    value; the packer then saturates ±inf and sends NaN to code 0."""
    rows = values.numel() // max(values.shape[-1], 1)
    finite = torch.isfinite(values)
    high = values.masked_fill(~finite, -math.inf).amax(dim=-1, keepdim=True).float().reshape(rows, 1)
    low = high.new_zeros(rows, 1) if nonnegative else \
        values.masked_fill(~finite, math.inf).amin(dim=-1, keepdim=True).float().reshape(rows, 1)
    empty = ~finite.any(dim=-1, keepdim=True).reshape(rows, 1)
    high = high.masked_fill(empty, 0.0)
    low = low.masked_fill(empty, 0.0)
    return low, high


def dequantize_rows(packed: torch.Tensor, offset: torch.Tensor, step: torch.Tensor, rows: int, width: int,
                    bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` (up to the rounding): a ``[rows, width]`` tensor of ``dtype``."""
    codes = bitpack.unpack(packed, bits, rows * width).view(rows, width)
    values = codes.float().mul_(step)  # in place: one full-size fp32 tensor, not three
    return (values.add_(offset) if offset.numel() else values).to(dtype)


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
