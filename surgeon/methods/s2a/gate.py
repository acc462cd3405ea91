"""Gate multiplies (``x * sigmoid(s)`` in squeeze-excitation blocks) that keep their big input at 8 bits.

``x * gate`` with ``x`` of shape ``[N, C, H, W]`` and ``gate`` of shape ``[N, C, 1, 1]`` makes autograd keep ``x``
in full precision for the gate's gradient. This variant computes the same product (operands in the original
order, so the output is bit-identical), keeps ``gate`` (small) and ``x`` quantized per channel plane, and gives
the exact input gradient ``g * gate`` and a gate gradient from the dequantized ``x``.
"""

from __future__ import annotations

from typing import Any

import torch

from surgeon.ops.precision import grad_as
from surgeon.ops.row_quantizer import dequantize_image, quantize_image


def _is_gate_pair(x: torch.Tensor, gate: torch.Tensor) -> bool:
    return (x.dim() == 4 and gate.dim() == 4 and gate.shape[2:] == (1, 1) and x.shape[:2] == gate.shape[:2]
            and x.shape[2] * x.shape[3] > 1)


class _GatedMultiplyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate: torch.Tensor, gate_first: bool, bits: int) -> torch.Tensor:
        y = gate * x if gate_first else x * gate
        ctx.input_dtype = x.dtype
        kept_x, ctx.layout = quantize_image(x, bits)
        ctx.save_for_backward(*kept_x, gate)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        packed, offset, step, gate = ctx.saved_tensors
        grad_x = grad_as(grad * gate, ctx.input_dtype) if ctx.needs_input_grad[0] else None
        grad_gate = None
        if ctx.needs_input_grad[1]:
            x = dequantize_image(packed, offset, step, ctx.layout)
            grad_gate = (grad * x).sum(dim=(2, 3), keepdim=True).to(gate.dtype)
        return grad_x, grad_gate, None, None


def gated_multiply(x: torch.Tensor, gate: torch.Tensor, gate_first: bool = False, bits: int = 8) -> torch.Tensor:
    """``x * gate`` (or ``gate * x``); low-memory backward when the shapes are a channel gate."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or gate.requires_grad)
    if not needs_grad or not _is_gate_pair(x, gate):
        return gate * x if gate_first else x * gate
    return _GatedMultiplyFn.apply(x, gate, gate_first, bits)


torch.fx.wrap("gated_multiply")
