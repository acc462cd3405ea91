"""Memory variants of frozen layers: same parameters, same state_dict keys, same forward, less kept for backward.

A variant is the original class with a mixin in front (made once per class), so the module keeps every
attribute and key, ``super().forward`` still defines the exact output, and :func:`revert_variant` restores the
original class for inference checkpoints.

* frozen ``Conv2d`` / timm ``Conv2dSame``: the input gradient needs only the weight, so the input is not kept;
* ``BatchNorm2d`` / timm ``BatchNormAct2d``: frozen - always the running statistics (timm's
  ``freeze_batch_norm_2d`` semantics), backward is a per-channel scale;
* ``LayerNorm`` / timm ``LayerNorm2d``: the normalised input is kept at ``bits`` (8) with per-row scale.

Whenever a layer's own weights require grad, the variant falls back to the original autograd path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.ops.kernels import library as kernel_ops
from surgeon.ops.padding import same_pads
from surgeon.ops.precision import grad_as
from surgeon.ops.row_quantizer import quantize_rows


def _needs_backward(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


# ------------------------------------------------------------------------------------------ convolution
def conv_input_gradient(grad: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size, stride: Any,
                        padding: Any, dilation: Any, groups: int) -> torch.Tensor:
    """The input gradient of a conv as the transposed conv of its output gradient, in the gradient's memory
    format. (``torch.nn.grad.conv2d_input`` passes an expanded stand-in input, which sends channels-last gradients
    through NCHW copies: four input-sized allocations and 2-4x the time.)"""
    stride, padding, dilation = (tuple(v) if isinstance(v, (tuple, list)) else (v, v)
                                 for v in (stride, padding, dilation))
    output_padding = tuple(
        input_shape[i + 2] - ((grad.shape[i + 2] - 1) * stride[i] - 2 * padding[i]
                              + dilation[i] * (weight.shape[i + 2] - 1) + 1) for i in range(2))
    return F.conv_transpose2d(grad, weight, None, stride, padding, output_padding, groups, dilation)


class _InputFreeConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d,
                pads: tuple[int, int, int, int] | None) -> torch.Tensor:
        ctx.conv, ctx.pads, ctx.input_shape = conv, pads, x.shape
        ctx.padded_shape = x.shape if pads is None else (*x.shape[:2], x.shape[2] + pads[2] + pads[3],
                                                          x.shape[3] + pads[0] + pads[1])
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(weight)
        return conv._surgeon_base_class.forward(conv, x)  # under autocast as the original ran

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        weight = weight.to(grad.dtype)  # the forward ran in the autocast dtype, which the gradient carries
        conv = ctx.conv
        padding = (0, 0) if ctx.pads is not None else conv.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            padding = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = conv_input_gradient(grad, weight, ctx.padded_shape, conv.stride, padding, conv.dilation,
                                         conv.groups)
            if ctx.pads is not None:
                grad_x = F.pad(grad_x, tuple(-p for p in ctx.pads))
        grad_bias = grad.sum(dim=(0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_as(grad_x, ctx.dtypes[0]), None, grad_as(grad_bias, ctx.dtypes[1]), None, None


class InputFreeConv:
    """Mixin for a frozen conv: keeps nothing of its input for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: Any = self
        if conv.weight.requires_grad or not (_needs_backward(x) or (conv.bias is not None and
                                                                   conv.bias.requires_grad)):
            return super().forward(x)  # type: ignore[misc]
        if isinstance(conv.padding, str) and conv.padding == "same" and any(k % 2 == 0 for k in conv.kernel_size):
            return super().forward(x)  # type: ignore[misc]  # asymmetric implicit padding: keep torch's path
        pads = None
        if getattr(conv, "_surgeon_same_dynamic", False):
            pads = same_pads(tuple(x.shape[-2:]), tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation))
        return _InputFreeConvFn.apply(x, conv.weight, conv.bias, conv, pads)


# ------------------------------------------------------------------------------------------ batch norm
def frozen_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """``weight / sqrt(running_var + eps)``, the frozen norm's whole backward. Made once and remembered on the
    module until the running variance or the weight changes (their version counters say when), so a training
    step does not recompute the same constant with three small ops per norm."""
    if torch.compiler.is_compiling():  # a compiled graph computes it once per graph anyway, fused
        scale = bn.running_var.add(bn.eps).rsqrt()
        return (scale * bn.weight if bn.weight is not None else scale).detach()
    tensors = [t for t in (bn.running_var, bn.weight) if t is not None]
    stamp = (*((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors), bn.eps)
    cached = bn.__dict__.get("_surgeon_frozen_scale")
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with torch.no_grad():
        scale = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
    bn.__dict__["_surgeon_frozen_scale"] = (stamp, scale)
    return scale


class _FrozenBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        ctx.save_for_backward(frozen_scale(bn))
        ctx.input_dtype = x.dtype
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (scale,) = ctx.saved_tensors
        return grad_as(grad * scale.view(1, -1, 1, 1).to(grad.dtype), ctx.input_dtype), None


def frozen_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode batch norm whatever the module's mode; affine-only backward unless its params train."""
    affine_trains = any(p is not None and p.requires_grad for p in (bn.weight, bn.bias))
    if affine_trains or not _needs_backward(x):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return _FrozenBatchNormFn.apply(x, bn)


class FrozenBatchNorm:
    """Mixin for ``BatchNorm2d`` (and timm's ``BatchNormAct2d``, whose drop/act still run normally)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: Any = self
        y = frozen_batch_norm(bn, x)
        if hasattr(bn, "act") and hasattr(bn, "drop"):
            y = bn.act(bn.drop(y))
        return y


# ------------------------------------------------------------------------------------------ layer norm
class _QuantizedLayerNormFn(torch.autograd.Function):
    """Keeps the input rows at ``bits`` (each row's offset shifted by its mean) and the per-row ``rstd`` that the
    forward computed. Backward forms the input gradient straight from the codes (``surgeon::layer_norm_backward``,
    one kernel on a GPU) unless the norm's scale trains; then ATen's fused layer-norm backward runs on the
    dequantized, centred rows, as the scale's gradient needs them whole. Quantizing
    ``x`` or the normalised rows is the same precision (one is an affine map of the other, row by row), and
    keeping ``x`` lets the forward be one ``native_layer_norm``: the module's output plus the statistics backward
    needs, with no second normalisation pass and no chain of small ops."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, norm: nn.Module,
                channel_dim: int, bits: int) -> torch.Tensor:
        moved = x.movedim(channel_dim, -1)
        width = moved.shape[-1]
        if getattr(norm, "_fast_norm", False):  # timm's fused kernels: the module's own output, statistics apart
            y = norm._surgeon_base_class.forward(norm, x)
            _, mean, rstd = torch.native_layer_norm(moved.float(), [width], None, None, norm.eps)
        else:
            # what F.layer_norm runs (aten's layer_norm is native_layer_norm's first output); under autocast
            # layer_norm runs in fp32 on fp32 copies of its tensors, so do the same
            autocast = torch.is_autocast_enabled(x.device.type)
            args = (moved, weight, bias)
            if autocast:
                args = tuple(t.float() if t is not None else None for t in args)
            y_moved, mean, rstd = torch.native_layer_norm(args[0], [width], args[1], args[2], norm.eps)
            y = y_moved.movedim(-1, channel_dim)
        # backward needs only x - mean: each row's offset is shifted by its mean instead of keeping the mean
        # (rows in any strides: no copy of a permuted input)
        quantized = quantize_rows(moved.detach(), bits, shift=mean.detach())
        ctx.meta = (moved.shape, channel_dim, bits, quantized.rows, quantized.width, x.dtype)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.param_dtype = next((t.dtype for t in (weight, bias) if t is not None), None)
        ctx.save_for_backward(quantized.packed, quantized.offset, quantized.step, rstd.float().reshape(-1, 1),
                              *(t for t in (weight,) if t is not None))
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        shape, channel_dim, bits, rows, width, dtype = ctx.meta
        packed, centred_offset, step, rstd, *rest = ctx.saved_tensors
        need_w = ctx.has_weight and ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        g_rows = grad.movedim(channel_dim, -1).reshape(rows, width)
        weight = rest[0] if ctx.has_weight else None
        if need_w:  # the scale's gradient needs the rows whole: ATen's backward on the dequantized rows
            grad_x, grad_w, grad_b = kernel_ops.layer_norm_backward_on_rows(
                g_rows, packed, centred_offset, step, rstd, weight, bits, [ctx.needs_input_grad[0], True, need_b])
            if grad_x is not None:
                grad_x = grad_x.to(dtype)
        else:  # the input gradient straight from the codes (one kernel on a GPU); the bias's: a sum of grad
            grad_w, grad_x = None, None
            if ctx.needs_input_grad[0]:
                grad_x = kernel_ops.layer_norm_backward(g_rows, packed, centred_offset, step, rstd, weight, bits, dtype)
            grad_b = g_rows.sum(0, dtype=torch.float32) if need_b else None
        if grad_x is not None:
            grad_x = grad_x.view(shape).movedim(-1, channel_dim)
        return grad_x, grad_as(grad_w, ctx.param_dtype), grad_as(grad_b, ctx.param_dtype), None, None, None


class QuantizedLayerNorm:
    """Mixin for ``LayerNorm`` over the last dim or timm's ``LayerNorm2d`` over channels."""

    _surgeon_channel_dim = -1
    _surgeon_bits = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm: Any = self
        if not _needs_backward(x) and not any(p is not None and p.requires_grad for p in (norm.weight, norm.bias)):
            return super().forward(x)  # type: ignore[misc]
        return _QuantizedLayerNormFn.apply(x, norm.weight, norm.bias, norm, norm._surgeon_channel_dim,
                                           norm._surgeon_bits)


def layer_norm_channel_dim(module: nn.Module) -> int | None:
    """Which dim a supported LayerNorm normalises (None: unsupported form)."""
    try:
        from timm.layers.norm import LayerNorm as TimmLayerNorm
        from timm.layers.norm import LayerNorm2d
    except ImportError:  # pragma: no cover
        TimmLayerNorm = LayerNorm2d = None
    if len(getattr(module, "normalized_shape", ())) != 1:
        return None
    if LayerNorm2d is not None and type(module) is LayerNorm2d:
        return 1
    if type(module) is nn.LayerNorm or (TimmLayerNorm is not None and type(module) is TimmLayerNorm):
        return -1
    return None
