"""Activation-by-activation matmuls (explicit attention's ``q @ k.T`` and ``attn @ v``) that keep their operands
at low bit-width.

``a @ b`` makes autograd keep both operands in full precision: ``a`` for ``b``'s gradient and ``b`` for ``a``'s.
In explicit attention those are ``q`` and ``k``, then the ``N x N`` probabilities and ``v``: more than all the
other activations of a block. This variant computes the same product (bit-identical) and keeps each operand
quantized per row along its contiguous dim: 8 bits for ``q``/``k``/``v``, 4 bits (non-negative) for
probabilities, which is what the softmax before it keeps too.
"""

from __future__ import annotations

from typing import Any

import torch

from surgeon.ops.precision import grad_as
from surgeon.ops.row_quantizer import as_matrix, dequantize_rows, quantize_rows


def _row_major(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``t`` or its last-two-dims transpose, whichever has unit stride along its last dim (True if transposed),
    so that quantization rows follow memory."""
    if t.dim() >= 2 and t.stride(-1) != 1 and t.stride(-2) == 1:
        return t.transpose(-2, -1), True
    return t, False


def _readable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy (in ``t``'s orientation) where its rows are no matrix view (heads permuted out
    of one projection): made once, the copy serves both the product, which would copy such an operand itself, and
    the row quantizer, whose CUDA kernel reads a matrix."""
    rows, transposed = _row_major(t)
    if as_matrix(rows) is not None:
        return t
    rows = rows.contiguous()
    return rows.transpose(-2, -1) if transposed else rows


def _keep(t: torch.Tensor, bits: int, nonnegative: bool) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
    rows, transposed = _row_major(t.detach())
    quantized = quantize_rows(rows, bits, nonnegative=nonnegative)  # no copy of a permuted operand
    return quantized.tensors(), (rows.shape, transposed, quantized.rows, quantized.width, bits, t.dtype)


def _restore(tensors: tuple[torch.Tensor, ...], layout: tuple[Any, ...]) -> torch.Tensor:
    shape, transposed, rows, width, bits, dtype = layout
    values = dequantize_rows(*tensors, rows, width, bits, dtype).view(shape)
    return values.transpose(-2, -1) if transposed else values


class _QuantizedMatmulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, a_bits: int, b_bits: int, a_nonnegative: bool,
                b_nonnegative: bool) -> torch.Tensor:
        need_a, need_b = ctx.needs_input_grad[:2]
        a, b = _readable(a) if need_b else a, _readable(b) if need_a else b  # the operands kept for backward
        out = a @ b
        ctx.layouts = []
        kept: list[torch.Tensor] = []
        # a's gradient needs b and b's gradient needs a: keep only what a requested gradient needs
        for operand, bits, nonnegative, wanted in ((b, b_bits, b_nonnegative, need_a), (a, a_bits, a_nonnegative,
                                                                                       need_b)):
            if wanted:
                tensors, layout = _keep(operand, bits, nonnegative)
                kept += tensors
                ctx.layouts.append(layout)
            else:
                ctx.layouts.append(None)
        ctx.dtypes, ctx.shapes = (a.dtype, b.dtype), (a.shape, b.shape)
        ctx.save_for_backward(*kept)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        b_layout, a_layout = ctx.layouts
        grad_a = grad_b = None
        if b_layout is not None:
            b = _restore(tuple(saved[:3]), b_layout)
            saved = saved[3:]
            grad_a = grad @ b.transpose(-2, -1).to(grad.dtype)
            del b
        if a_layout is not None:
            a = _restore(tuple(saved[:3]), a_layout)
            grad_b = a.transpose(-2, -1).to(grad.dtype) @ grad
        # an operand broadcast over batch dims gets its gradient summed back to its own shape
        grad_a, grad_b = (g.sum_to_size(shape) if g is not None and g.shape != shape else g
                          for g, shape in zip((grad_a, grad_b), ctx.shapes))
        return grad_as(grad_a, ctx.dtypes[0]), grad_as(grad_b, ctx.dtypes[1]), None, None, None, None


def quantized_matmul(a: torch.Tensor, b: torch.Tensor, a_bits: int = 8, b_bits: int = 8,
                     a_nonnegative: bool = False, b_nonnegative: bool = False) -> torch.Tensor:
    """``a @ b``; when a backward will follow, the operands it needs are kept at ``a_bits`` / ``b_bits``."""
    batched = a.dim() >= 2 and b.dim() >= 2
    if not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)) or not batched:
        return a @ b
    return _QuantizedMatmulFn.apply(a, b, a_bits, b_bits, a_nonnegative, b_nonnegative)


torch.fx.wrap("quantized_matmul")
