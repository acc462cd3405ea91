"""QuadraNet V2 quadratic depthwise convolution, built around a frozen pretrained depthwise conv.

``y = conv(x, W_c) + b + sum_r conv_a_r(x) * conv_b_r(x)``

``W_c``/``b`` are the pretrained weights, computed with exactly the original call (plain, string or timm's
dynamic "same" padding), so with ``W_a = 0`` the output is bit-identical to the original layer. ``conv_a``
and ``conv_b`` are depthwise *atrous* convs: few taps, dilated so that their span fits inside the original
receptive field, centred on it, with the original stride, so every branch lands on the same output grid.
Rank ``r`` is stored as ``C * r`` output channels with ``groups = C`` (channel ``c`` owns ``c*r .. c*r+r-1``).

The autograd function keeps only ``x`` (and, if asked, the branch outputs) for backward - never the product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.ops.kernels import cpu as cpu_kernels
from surgeon.ops.memory_format import is_channels_last
from surgeon.ops.padding import Pads, Pair, branch_pads, same_pads, split_pads, static_pads
from surgeon.ops.precision import autocast_off, cast, compute_dtype, grad_as
from surgeon.ops.row_quantizer import dequantize_image, quantize_image


@dataclass(frozen=True)
class AtrousKernel:
    """A dilated kernel: taps per dim and dilation per dim."""

    kernel: Pair
    dilation: Pair

    def span(self) -> Pair:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))  # type: ignore[return-value]


def conv_span(kernel: Pair, dilation: Pair) -> Pair:
    return AtrousKernel(kernel, dilation).span()


def default_branches(kernel: Pair, dilation: Pair) -> tuple[AtrousKernel, AtrousKernel]:
    """QuadraNet V2's pattern per dim of size K: ``a`` = ceil(K/2) taps at dilation 2, ``b`` = 2 taps at dilation
    K-1 (scaled by the original dilation); a dim of size 1 stays 1."""
    a_kernel, a_dil, b_kernel, b_dil = [], [], [], []
    for k, d in zip(kernel, dilation):
        ka = math.ceil(k / 2)
        a_kernel.append(ka)
        a_dil.append(2 * d if ka > 1 else 1)
        kb = min(2, k)
        b_kernel.append(kb)
        b_dil.append((k - 1) * d if kb > 1 else 1)
    return AtrousKernel(tuple(a_kernel), tuple(a_dil)), AtrousKernel(tuple(b_kernel), tuple(b_dil))


@dataclass(frozen=True)
class _BranchCall:
    pre_pads: Pads | None
    padding: Pair
    dilation: Pair


def _branch_forward(x: torch.Tensor, weight: torch.Tensor, call: _BranchCall, stride: Pair, groups: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    xp = F.pad(x, call.pre_pads) if call.pre_pads is not None else x
    return F.conv2d(xp, weight, None, stride, call.padding, call.dilation, groups), xp


def _unpad(grad: torch.Tensor, pre_pads: Pads | None) -> torch.Tensor:
    if pre_pads is None:
        return grad
    return F.pad(grad, tuple(-p for p in pre_pads))


def _conv_backward(grad: torch.Tensor, xp: torch.Tensor, weight: torch.Tensor, call: _BranchCall, stride: Pair,
                   groups: int, need_input: bool, need_weight: bool, bias_size: list[int] | None = None,
                   need_bias: bool = False) -> tuple[torch.Tensor | None, ...]:
    return torch.ops.aten.convolution_backward(
        grad, xp, weight, bias_size, list(stride), list(call.padding), list(call.dilation), False, [0, 0], groups,
        [need_input, need_weight, need_bias],
    )


def _tap_positions(branch: AtrousKernel, span: Pair) -> tuple[slice, slice]:
    """Where a branch's taps sit in a dense ``span``-sized kernel, centred as :func:`branch_pads` centres the
    branch window."""
    (sh, sw), (bh, bw) = span, branch.span()
    top, left = (sh - bh) // 2, (sw - bw) // 2
    return slice(top, top + bh, branch.dilation[0]), slice(left, left + bw, branch.dilation[1])


def dense_branch_weight(weight: torch.Tensor, branch: AtrousKernel, span: Pair) -> torch.Tensor:
    """A branch's few dilated taps placed in a dense ``span``-sized kernel (zeros elsewhere): the same conv,
    expressed on the primary conv's grid."""
    dense = weight.new_zeros(*weight.shape[:2], *span)
    dense[(..., *_tap_positions(branch, span))] = weight
    return dense


def dense_branch_grad(dense_grad: torch.Tensor, branch: AtrousKernel, span: Pair) -> torch.Tensor:
    """The taps of :func:`dense_branch_weight` picked back out of a dense kernel's gradient."""
    return dense_grad[(..., *_tap_positions(branch, span))].contiguous()


def _dense_branch_conv(xp: torch.Tensor, weight: torch.Tensor, branch: AtrousKernel, span: Pair, stride: Pair,
                       groups: int) -> torch.Tensor:
    """A branch computed on an input already padded for the primary conv (no padding of its own)."""
    return F.conv2d(xp, dense_branch_weight(weight, branch, span), None, stride, (0, 0), (1, 1), groups)


class _QuadraticDepthwiseFn(torch.autograd.Function):
    """Forward: the primary conv plus the product of two dilated branch convs, products formed in place.

    Backward recomputes the branches from the (dequantized) input. The branch gradients run as *dense* depthwise
    convs on the primary's grid (taps embedded in a span-sized kernel): PyTorch's CPU backward for dilated
    depthwise convs falls back to an im2col route that allocates ``taps x input`` columns and runs several times
    slower, while the dense depthwise backward takes the oneDNN path. Each branch gradient is formed in the
    recomputed branch's own buffer and freed before the next, so at most four full-size tensors are alive."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                weight_a: torch.Tensor, weight_b: torch.Tensor, layer: QuadraticDepthwiseConv2d) -> torch.Tensor:
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (x, weight, bias, weight_a, weight_b))
        dtype = compute_dtype(x)
        x, weight, bias, weight_a, weight_b = (cast(t, dtype) for t in (x, weight, bias, weight_a, weight_b))
        with autocast_off(x):
            return _QuadraticDepthwiseFn._forward(ctx, x, weight, bias, weight_a, weight_b, layer)

    @staticmethod
    def _forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 weight_a: torch.Tensor, weight_b: torch.Tensor, layer: QuadraticDepthwiseConv2d) -> torch.Tensor:
        ctx.kernel = _cpu_kernel(ctx, x, weight, weight_a, weight_b, layer)
        if ctx.kernel is not None:
            return _forward_cpu_kernel(ctx, x, weight, bias, weight_a, weight_b, layer)
        primary_call, call_a, call_b = layer.branch_calls(x)
        ctx.padded = layer.same_dynamic and primary_call.pre_pads is not None
        if ctx.padded:
            # timm's dynamic "same" padding: pad once, run the primary conv exactly as the original did and both
            # branches as dense convs on the same padded input (not two more padded copies), keep it padded
            xp = F.pad(x, primary_call.pre_pads)
            primary = F.conv2d(xp, weight, bias, layer.stride, (0, 0), layer.dilation, layer.channels)
            span = conv_span(layer.kernel_size, layer.dilation)
            a = _dense_branch_conv(xp, weight_a, layer.branch_a, span, layer.stride, layer.channels)
            b = _dense_branch_conv(xp, weight_b, layer.branch_b, span, layer.stride, layer.channels)
        else:
            xp = x
            primary = layer.primary_conv(x, weight, bias)
            a, _ = _branch_forward(x, weight_a, call_a, layer.stride, layer.channels)
            b, _ = _branch_forward(x, weight_b, call_b, layer.stride, layer.channels)
        ctx.layer, ctx.has_bias = layer, bias is not None
        ctx.calls = (primary_call, call_a, call_b)
        kept = (a, b) if layer.keep_branches else ()
        ctx.compressed = None
        if layer.saved_input_bits < 32:
            kept_x, ctx.compressed = quantize_image(xp, layer.saved_input_bits)
            xp = None  # the padded copy is not needed past here (a plain rebinding: compiled code cannot delete it)
            ctx.save_for_backward(*kept_x, weight, weight_a, weight_b, *kept)
        else:
            ctx.save_for_backward(x, weight, weight_a, weight_b, *kept)
        product = a * b if layer.keep_branches else a.mul_(b)
        return primary.add_(layer.reduce_rank(product))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with autocast_off(grad):
            grads = _QuadraticDepthwiseFn._backward(ctx, grad)
        return (*(grad_as(g, dtype) for g, dtype in zip(grads, ctx.dtypes)), None)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.kernel is not None:
            return _backward_cpu_kernel(ctx, grad)
        layer: QuadraticDepthwiseConv2d = ctx.layer
        primary_call, call_a, call_b = ctx.calls
        if ctx.compressed is not None:
            packed, offset, step, weight, weight_a, weight_b, *kept = ctx.saved_tensors
            x = dequantize_image(packed, offset, step, ctx.compressed)  # padded already if ctx.padded
            xp = x if ctx.padded or primary_call.pre_pads is None else F.pad(x, primary_call.pre_pads)
        else:
            x, weight, weight_a, weight_b, *kept = ctx.saved_tensors
            xp = F.pad(x, primary_call.pre_pads) if primary_call.pre_pads is not None else x
        grad = grad.to(xp.dtype)
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        stride, groups = layer.stride, layer.channels
        channels_last = is_channels_last(xp)
        grad = grad.contiguous(memory_format=torch.channels_last) if channels_last else grad
        grad_x = grad_w = grad_bias = grad_a = grad_b = None

        def accumulate(gx: torch.Tensor) -> None:
            """Add a gradient w.r.t. the padded input into the input's gradient (made on the first call)."""
            nonlocal grad_x
            pads = primary_call.pre_pads
            if pads is not None and min(pads) >= 0:
                left, right, top, bottom = pads
                gx = gx[..., top:gx.shape[-2] - bottom, left:gx.shape[-1] - right]
                if grad_x is None:
                    grad_x = gx.contiguous(memory_format=torch.channels_last if channels_last else
                                           torch.contiguous_format)
                    return
            elif pads is not None:
                gx = _unpad(gx, pads)
            grad_x = gx if grad_x is None else grad_x.add_(gx)

        if need_x or need_w or need_bias:
            gx, grad_w, grad_bias = _conv_backward(grad, xp, weight, primary_call, stride, groups, need_x,
                                                   need_w, [weight.shape[0]], need_bias)
            if need_x:
                accumulate(gx)
            del gx
        if not (need_x or need_a or need_b):
            return grad_x, grad_w, grad_bias, grad_a, grad_b
        span = conv_span(layer.kernel_size, layer.dilation)
        dense_call = _BranchCall(primary_call.pre_pads, primary_call.padding, (1, 1))
        grad_r = layer.expand_rank(grad)
        # branch a's gradient needs grad * b and branch b's needs grad * a: each product overwrites its recomputed
        # factor (unless the factors were kept), the input gradients accumulate into one tensor
        for own_weight, branch, other, call, need_own in (
                (weight_a, layer.branch_a, 1, call_b, need_a), (weight_b, layer.branch_b, 0, call_a, need_b)):
            if not (need_x or need_own):
                continue
            if kept:
                factor_grad = grad_r * kept[other]
            else:
                other_weight, other_branch = (weight_a, weight_b)[other], (layer.branch_a, layer.branch_b)[other]
                if ctx.padded:  # as the forward computed it: dense on the padded input
                    factor = _dense_branch_conv(xp, other_weight, other_branch, span, stride, groups)
                else:
                    factor, _ = _branch_forward(x, other_weight, call, stride, groups)
                factor_grad = factor.mul_(grad_r)
            dense = dense_branch_weight(own_weight, branch, span)
            gx, dense_grad, _ = _conv_backward(factor_grad, xp, dense, dense_call, stride, groups, need_x,
                                               need_own)
            del factor_grad
            if need_own:
                if branch is layer.branch_a:
                    grad_a = dense_branch_grad(dense_grad, branch, span)
                else:
                    grad_b = dense_branch_grad(dense_grad, branch, span)
            if need_x:
                accumulate(gx)
            del gx
        return grad_x, grad_w, grad_bias, grad_a, grad_b


# ------------------------------------------------------------------------------------ CPU kernel route
@dataclass(frozen=True)
class _KernelGeometry:
    """What the CPU kernels need to place every tap: pads (top, left) of the primary window, its span, stride,
    and each kernel's taps as (kh, kw, top, left, dilation h, dilation w) inside the window."""

    pads: list[int]
    span: list[int]
    stride: list[int]
    taps_primary: list[int]
    taps_a: list[int]
    taps_b: list[int]

    @classmethod
    def of(cls, layer: QuadraticDepthwiseConv2d, x: torch.Tensor) -> _KernelGeometry:
        left, _, top, _ = layer.primary_pads(x)
        span = conv_span(layer.kernel_size, layer.dilation)

        def taps(branch: AtrousKernel) -> list[int]:
            rows, cols = _tap_positions(branch, span)
            return [*branch.kernel, rows.start, cols.start, *branch.dilation]

        return cls([top, left], list(span), list(layer.stride), [*layer.kernel_size, 0, 0, *layer.dilation],
                   taps(layer.branch_a), taps(layer.branch_b))


def _cpu_kernel(ctx: Any, x: torch.Tensor, weight: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                layer: QuadraticDepthwiseConv2d) -> Any | None:
    """The CPU kernels where they apply: fp32 on the CPU, eager, frozen primary weight (its gradient would need
    the torch route), branches not kept. None means the torch route."""
    if (x.device.type != "cpu" or x.dim() != 4 or layer.keep_branches or torch.compiler.is_compiling()
            or ctx.needs_input_grad[1] or not cpu_kernels.enabled()
            or any(t.dtype != torch.float32 for t in (x, weight, weight_a, weight_b))):
        return None
    return cpu_kernels.module()


def _taps_last(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """``[C*rank, 1, kh, kw]`` weights as ``[rank, taps, C]``: one contiguous channel vector per tap, as the
    channels-last kernels read them."""
    channels = weight.shape[0] // rank
    return weight.reshape(channels, rank, -1).permute(1, 2, 0).contiguous()


def _channels_first(grad_t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_taps_last` for a gradient."""
    return grad_t.permute(2, 0, 1).reshape(like.shape).contiguous()


def _forward_cpu_kernel(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        weight_a: torch.Tensor, weight_b: torch.Tensor, layer: QuadraticDepthwiseConv2d
                        ) -> torch.Tensor:
    """The primary conv exactly as the original layer ran it, then the quadratic term added into its output in
    one pass over ``x`` (no branch or product tensors). ``x`` is kept unpadded, at ``saved_input_bits``. Channels-
    last inputs take the kernels that vectorize over channels, others those that vectorize along rows."""
    geometry = _KernelGeometry.of(layer, x)
    ctx.channels_last = is_channels_last(x)
    output = layer.primary_conv(x, weight, bias)
    ctx.kernel.quadratic_forward_add(x.detach(), output, *_kernel_weights(ctx, weight_a, weight_b, rank=layer.rank),
                                     layer.rank, geometry.stride, geometry.pads, geometry.span, geometry.taps_a,
                                     geometry.taps_b, ctx.channels_last)
    ctx.layer, ctx.geometry, ctx.shape, ctx.compressed = layer, geometry, tuple(x.shape), None
    # the parameters themselves are kept (no copy is kept): the kernels' layout is made again in backward
    if layer.saved_input_bits < 32:
        kept_x, ctx.compressed = quantize_image(x, layer.saved_input_bits)
        ctx.save_for_backward(*kept_x, weight, weight_a, weight_b)
    else:
        ctx.save_for_backward(x, weight, weight_a, weight_b)
    return output


def _kernel_weights(ctx: Any, *weights: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """Weights in the layout the chosen kernels read: ``[rank, taps, C]`` for channels-last, as stored otherwise
    (``rank`` 1 for the primary conv's weight)."""
    if ctx.channels_last:
        return tuple(_taps_last(w, rank) for w in weights)
    return tuple(w.contiguous() for w in weights)


def _backward_cpu_kernel(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Input and branch-weight gradients in one kernel pass; 8-bit inputs are read as codes (never dequantized
    into a full-size tensor)."""
    layer: QuadraticDepthwiseConv2d = ctx.layer
    geometry: _KernelGeometry = ctx.geometry
    need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
    grad = grad.float().contiguous(memory_format=layout)
    codes = offset = step = x = None
    if ctx.compressed is None:
        x, weight, weight_a, weight_b = ctx.saved_tensors
    else:
        codes, offset, step, weight, weight_a, weight_b = ctx.saved_tensors
        if ctx.compressed.bits != 8:
            x, codes = dequantize_image(codes, offset, step, ctx.compressed), None
    (weight,) = _kernel_weights(ctx, weight, rank=1)
    weight_a, weight_b = _kernel_weights(ctx, weight_a, weight_b, rank=layer.rank)
    grad_x = torch.empty(ctx.shape, dtype=torch.float32, memory_format=layout) if need_x else None
    grad_a = torch.empty_like(weight_a) if need_a else None
    grad_b = torch.empty_like(weight_b) if need_b else None
    if need_x or need_a or need_b:
        ctx.kernel.quadratic_backward(grad, x, codes, offset, step, list(ctx.shape), weight, weight_a, weight_b,
                                      grad_x, grad_a, grad_b, layer.rank, geometry.stride, geometry.pads,
                                      geometry.span, geometry.taps_primary, geometry.taps_a, geometry.taps_b,
                                      ctx.channels_last)
        if ctx.channels_last:
            grad_a = _channels_first(grad_a, layer.weight_a) if need_a else None
            grad_b = _channels_first(grad_b, layer.weight_b) if need_b else None
    grad_bias = grad.sum(dim=(0, 2, 3)) if need_bias else None
    return grad_x, None, grad_bias, grad_a, grad_b


class QuadraticDepthwiseConv2d(nn.Module):
    """Frozen depthwise conv plus a trainable low-rank atrous quadratic term (exact at init)."""

    def __init__(self, channels: int, kernel_size: Pair, stride: Pair = (1, 1), padding: Any = 0,
                 dilation: Pair = (1, 1), bias: bool = True, rank: int = 1, same_dynamic: bool = False,
                 branch_a: AtrousKernel | None = None, branch_b: AtrousKernel | None = None,
                 keep_branches: bool = False, b_init_std: float | None = None, train_bias: bool = False,
                 saved_input_bits: int = 32) -> None:
        super().__init__()
        self.train_bias = train_bias
        self.saved_input_bits = saved_input_bits
        default_a, default_b = default_branches(kernel_size, dilation)
        self.channels, self.kernel_size, self.stride = channels, tuple(kernel_size), tuple(stride)
        self.padding, self.dilation, self.same_dynamic = padding, tuple(dilation), same_dynamic
        self.rank, self.keep_branches = rank, keep_branches
        self.branch_a, self.branch_b = branch_a or default_a, branch_b or default_b
        span = conv_span(self.kernel_size, self.dilation)
        for name, branch in (("a", self.branch_a), ("b", self.branch_b)):
            if any(s > t for s, t in zip(branch.span(), span)):
                raise ValueError(f"branch {name} spans {branch.span()}, more than the kernel's {span}")
        self.weight = nn.Parameter(torch.empty(channels, 1, *self.kernel_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False) if bias else None
        self.weight_a = nn.Parameter(torch.zeros(channels * rank, 1, *self.branch_a.kernel))
        self.weight_b = nn.Parameter(torch.empty(channels * rank, 1, *self.branch_b.kernel))
        std = b_init_std if b_init_std is not None else 1.0 / math.sqrt(math.prod(self.branch_b.kernel))
        nn.init.normal_(self.weight_b, 0.0, std)

    # ------------------------------------------------------------------------------------------- geometry
    def primary_pads(self, x: torch.Tensor) -> Pads:
        if self.same_dynamic:
            return same_pads(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.dilation)
        return static_pads(self.padding, self.kernel_size, self.dilation)

    def branch_calls(self, x: torch.Tensor) -> tuple[_BranchCall, _BranchCall, _BranchCall]:
        pads = self.primary_pads(x)
        span = conv_span(self.kernel_size, self.dilation)
        calls = [_BranchCall(*split_pads(pads), self.dilation)]
        for branch in (self.branch_a, self.branch_b):
            calls.append(_BranchCall(*split_pads(branch_pads(pads, span, branch.span())), branch.dilation))
        return tuple(calls)  # type: ignore[return-value]

    def primary_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Exactly the call the original layer made (same padding argument), so init output is identical."""
        if self.same_dynamic:
            x = F.pad(x, self.primary_pads(x))
            return F.conv2d(x, weight, bias, self.stride, (0, 0), self.dilation, self.channels)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.channels)

    def reduce_rank(self, product: torch.Tensor) -> torch.Tensor:
        if self.rank == 1:
            return product
        n, _, h, w = product.shape
        return product.view(n, self.channels, self.rank, h, w).sum(dim=2)

    def expand_rank(self, grad: torch.Tensor) -> torch.Tensor:
        if self.rank == 1:
            return grad
        n, c, h, w = grad.shape
        return grad.unsqueeze(2).expand(n, c, self.rank, h, w).reshape(n, c * self.rank, h, w)

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = (self.weight, self.bias, self.weight_a, self.weight_b)
        if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
            return _QuadraticDepthwiseFn.apply(x, self.weight, self.bias, self.weight_a, self.weight_b, self)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The formula with plain autograd ops: the reference that the custom backward is tested against."""
        _, call_a, call_b = self.branch_calls(x)
        a, _ = _branch_forward(x, self.weight_a, call_a, self.stride, self.channels)
        b, _ = _branch_forward(x, self.weight_b, call_b, self.stride, self.channels)
        return self.primary_conv(x, self.weight, self.bias) + self.reduce_rank(a * b)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, same_dynamic: bool = False, rank: int = 1,
                  branch_a: AtrousKernel | None = None, branch_b: AtrousKernel | None = None,
                  keep_branches: bool = False, b_init_std: float | None = None,
                  train_bias: bool = False, saved_input_bits: int = 32) -> QuadraticDepthwiseConv2d:
        layer = cls(conv.in_channels, tuple(conv.kernel_size), tuple(conv.stride), conv.padding,
                    tuple(conv.dilation), bias=conv.bias is not None or train_bias, rank=rank,
                    same_dynamic=same_dynamic, branch_a=branch_a, branch_b=branch_b, keep_branches=keep_branches,
                    b_init_std=b_init_std, train_bias=train_bias, saved_input_bits=saved_input_bits)
        layer = layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        if layer.bias is not None:
            layer.bias.requires_grad_(train_bias)
        return layer

    def added_parameters(self) -> int:
        return self.weight_a.numel() + self.weight_b.numel()

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, rank={self.rank}, "
                f"a={self.branch_a.kernel}@{self.branch_a.dilation}, b={self.branch_b.kernel}@{self.branch_b.dilation}"
                + (", same_dynamic=True" if self.same_dynamic else ""))
