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

from surgeon.ops.device_route import takes_cpu_route
from surgeon.ops.kernels import cpu as cpu_kernels
from surgeon.ops.kernels import cuda as cuda_kernels
from surgeon.ops.kernels import library as kernel_ops
from surgeon.ops.memory_format import is_channels_last
from surgeon.ops.padding import Pads, Pair, branch_pads, pad_or_crop, same_pads, split_pads, static_pads
from surgeon.ops.precision import autocast_off, cast, compute_dtype, grad_as
from surgeon.ops.rank_groups import repeat_over_rank, sum_over_rank
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


def _conv_backward(grad: torch.Tensor, conv_input: _ConvInput, weight: torch.Tensor, stride: Pair, groups: int,
                   need_input: bool, need_weight: bool, bias_size: list[int] | None = None,
                   need_bias: bool = False) -> tuple[torch.Tensor | None, ...]:
    return torch.ops.aten.convolution_backward(
        grad, conv_input.tensor, weight, bias_size, list(stride), list(conv_input.padding), list(conv_input.dilation),
        False, [0, 0], groups, [need_input, need_weight, need_bias],
    )


@dataclass(frozen=True)
class _ConvInput:
    """What one of the layer's convs reads: a tensor (the input, a padded copy or a cropped view of either), the
    conv's own padding and dilation, and where the tensor's first row and column lie in the input's coordinates
    (negative: in the padding), so its gradient can be added back into the input's."""

    tensor: torch.Tensor
    padding: Pair
    dilation: Pair
    origin: Pair

    @classmethod
    def of_call(cls, source: torch.Tensor, call: _BranchCall) -> _ConvInput:
        """What a conv of ``call`` reads of the unpadded input: the input with the conv's own symmetric padding,
        or the input padded (or, a view, cropped) first."""
        if call.pre_pads is None:
            return cls(source, call.padding, call.dilation, (0, 0))
        tensor, origin = pad_or_crop(source, call.pre_pads)
        return cls(tensor, (0, 0), call.dilation, origin)

    def conv(self, weight: torch.Tensor, stride: Pair, groups: int) -> torch.Tensor:
        return F.conv2d(self.tensor, weight, None, stride, self.padding, self.dilation, groups)


def _add_window_gradient(grad_x: torch.Tensor | None, grad: torch.Tensor, origin: Pair, shape: torch.Size,
                         memory_format: torch.memory_format) -> torch.Tensor:
    """Add ``grad``, the gradient w.r.t. a window of the input that starts at ``origin`` (padding included), into
    the input's gradient ``grad_x`` (None: made from this one, without a copy where the window is the input)."""
    (top, left), (height, width) = origin, shape[-2:]
    rows = max(0, top), min(height, top + grad.shape[-2])
    cols = max(0, left), min(width, left + grad.shape[-1])
    part = grad[..., rows[0] - top:rows[1] - top, cols[0] - left:cols[1] - left]
    if grad_x is None:
        if rows == (0, height) and cols == (0, width):
            return grad if part.shape == grad.shape else part.contiguous(memory_format=memory_format)
        grad_x = grad.new_zeros(shape).contiguous(memory_format=memory_format)
    grad_x[..., rows[0]:rows[1], cols[0]:cols[1]].add_(part)
    return grad_x


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


def _keep_input(ctx: Any, layer: QuadraticDepthwiseConv2d, source: torch.Tensor, *rest: torch.Tensor) -> None:
    """Save the (padded) input at the layer's ``saved_input_bits`` and the weights (and kept branches)."""
    ctx.compressed = None
    if layer.saved_input_bits < 32:
        kept_x, ctx.compressed = quantize_image(source, layer.saved_input_bits)
        ctx.save_for_backward(*kept_x, *rest)
    else:
        ctx.save_for_backward(source, *rest)


class _QuadraticDepthwiseFn(torch.autograd.Function):
    """Forward: the primary conv plus the product of two dilated branch convs, products formed in place.

    Backward recomputes the branches from the (dequantized) input, and forms each branch gradient in the
    recomputed branch's own buffer, freed before the next, so at most four full-size tensors are alive (five where
    the term kernel forms both branch factors in one pass). On CUDA
    every branch conv is cuDNN's dilated conv, on the input or a cropped view of its padded copy. The CPU's own
    route runs the branch gradients as *dense* depthwise convs on the primary's grid (taps embedded in a
    span-sized kernel): PyTorch's CPU backward for dilated depthwise convs falls back to an im2col route that
    allocates ``taps x input`` columns and runs several times slower, while the dense depthwise backward takes
    the oneDNN path."""

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
        primary_call = layer.branch_calls(x)[0]
        padded = layer.same_dynamic and primary_call.pre_pads is not None
        ctx.pads = primary_call.pre_pads if padded else None  # the pads the kept input already has
        ctx.dense = takes_cpu_route(x.device)
        if padded:
            # timm's dynamic "same" padding: pad once, run the primary conv exactly as the original did and both
            # branches on the same padded input (not two more padded copies), keep it padded
            source = F.pad(x, primary_call.pre_pads)
            primary = F.conv2d(source, weight, bias, layer.stride, (0, 0), layer.dilation, layer.channels)
        else:
            source = x
            primary = layer.primary_conv(x, weight, bias)
        ctx.layer, ctx.has_bias, ctx.shape = layer, bias is not None, x.shape
        # the quadratic term as one op (one kernel on the GPU) where the specialised kernels take the layer
        ctx.term_op = not (ctx.dense or layer.keep_branches) and cuda_kernels.atrous_applies(source,
                                                                                           layer.atrous_geometry())
        if ctx.term_op:
            output = layer.quadratic_term("add", source, weight_a, weight_b, primary, ctx.pads)
            _keep_input(ctx, layer, source, weight, weight_a, weight_b)
            return output
        a = layer.factor(source, weight_a, layer.branch_a, ctx.pads, ctx.dense)
        b = layer.factor(source, weight_b, layer.branch_b, ctx.pads, ctx.dense)
        kept = (a, b) if layer.keep_branches else ()
        _keep_input(ctx, layer, source, weight, weight_a, weight_b, *kept)
        source = None  # the padded copy is not needed past here (a plain rebinding: compiled code cannot delete it)
        if layer.rank == 1:
            return primary.addcmul_(a, b)
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
        if ctx.compressed is not None:
            packed, offset, step, weight, weight_a, weight_b, *kept = ctx.saved_tensors
            source = dequantize_image(packed, offset, step, ctx.compressed)  # padded already if ctx.pads
        else:
            source, weight, weight_a, weight_b, *kept = ctx.saved_tensors
        grad = grad.to(source.dtype)
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        stride, groups = layer.stride, layer.channels
        memory_format = torch.channels_last if is_channels_last(source) else torch.contiguous_format
        grad = grad.contiguous(memory_format=memory_format)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        primary = layer.primary_input(source, ctx.pads)
        if need_x or need_w or need_bias:
            gx, grad_w, grad_bias = _conv_backward(grad, primary, weight, stride, groups, need_x, need_w,
                                                   [weight.shape[0]], need_bias)
            if need_x:
                grad_x = _add_window_gradient(grad_x, gx, primary.origin, ctx.shape, memory_format)
            del gx
        if not (need_x or need_a or need_b):
            return grad_x, grad_w, grad_bias, grad_a, grad_b
        span = conv_span(layer.kernel_size, layer.dilation)
        grad_r = None if ctx.term_op else layer.expand_rank(grad)  # the term kernel reads grad itself
        # branch a's gradient needs grad * b and branch b's needs grad * a: each product overwrites its recomputed
        # factor (unless the factors were kept), the input gradients accumulate into one tensor
        branches = ((weight_a, layer.branch_a), (weight_b, layer.branch_b))
        # where both branches need their factor, the term kernel forms the two in one pass (a * grad, b * grad)
        both = ctx.term_op and (need_x or (need_a and need_b))
        factors = list(layer.quadratic_term("a_and_b_times", source, weight_a, weight_b, grad, ctx.pads).unbind(0)
                       )[::-1] if both else [None, None]
        for own, other, need_own in ((0, 1, need_a), (1, 0, need_b)):
            if not (need_x or need_own):
                continue
            if kept:
                factor_grad = grad_r * kept[other]
            elif both:
                factor_grad, factors[own] = factors[own], None
            elif ctx.term_op:  # grad times the other branch, recomputed in the same kernel
                factor_grad = layer.quadratic_term(("b_times", "a_times")[own], source, weight_a, weight_b, grad,
                                                   ctx.pads)
            else:
                factor_grad = layer.factor(source, *branches[other], ctx.pads, ctx.dense).mul_(grad_r)
            own_weight, own_branch = branches[own]
            conv_input = layer.branch_input(source, own_branch, ctx.pads, dense=ctx.dense)
            conv_weight = dense_branch_weight(own_weight, own_branch, span) if ctx.dense else own_weight
            gx, weight_grad, _ = _conv_backward(factor_grad, conv_input, conv_weight, stride, groups, need_x,
                                                need_own)
            del factor_grad
            if need_own and ctx.dense:
                weight_grad = dense_branch_grad(weight_grad, own_branch, span)
            if own == 0:
                grad_a = weight_grad
            else:
                grad_b = weight_grad
            if need_x:
                grad_x = _add_window_gradient(grad_x, gx, conv_input.origin, ctx.shape, memory_format)
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

    def primary_input(self, source: torch.Tensor, pads: Pads | None) -> _ConvInput:
        """What the primary conv reads of ``source``: the input, or its copy already padded by ``pads``."""
        if pads is not None:
            return _ConvInput(source, (0, 0), self.dilation, (-pads[2], -pads[0]))
        return _ConvInput.of_call(source, self.branch_calls(source)[0])

    def branch_input(self, source: torch.Tensor, branch: AtrousKernel, pads: Pads | None,
                     dense: bool) -> _ConvInput:
        """What a branch's conv reads of ``source`` (``pads`` as for :meth:`primary_input`): its window centred
        in the primary's (a view where that only crops), or, ``dense``, the primary's own input for a span-sized
        dense kernel."""
        primary = self.primary_input(source, pads)
        if dense:
            return _ConvInput(primary.tensor, primary.padding, (1, 1), primary.origin)
        if pads is not None:
            span = conv_span(self.kernel_size, self.dilation)
            view, (top, left) = pad_or_crop(source, branch_pads((0, 0, 0, 0), span, branch.span()))
            return _ConvInput(view, (0, 0), branch.dilation, (primary.origin[0] + top, primary.origin[1] + left))
        return _ConvInput.of_call(source, self.branch_calls(source)[1 if branch is self.branch_a else 2])

    def atrous_geometry(self) -> cuda_kernels.AtrousGeometry:
        """The layer as the specialised CUDA kernels are compiled for it."""
        span = conv_span(self.kernel_size, self.dilation)

        def placed(branch: AtrousKernel) -> tuple[int, int, int, int, int, int]:
            rows, cols = _tap_positions(branch, span)
            return (*branch.kernel, *branch.dilation, rows.start, cols.start)  # type: ignore[return-value]

        return cuda_kernels.AtrousGeometry(self.kernel_size, self.dilation, placed(self.branch_a),  # type: ignore[arg-type]
                                           placed(self.branch_b), self.rank, self.stride)  # type: ignore[arg-type]

    def quadratic_term(self, mode: str, source: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                       given: torch.Tensor, pads: Pads | None) -> torch.Tensor:
        """``surgeon::quadratic_term`` on the input (``pads`` None) or its padded copy (``pads``: already there)."""
        geometry = self.atrous_geometry()
        window = (0, 0, 0, 0) if pads is not None else self.primary_pads(source)
        return kernel_ops.quadratic_term(mode, source, weight_a, weight_b, given, list(geometry.kernel),
                                         list(geometry.dilation), list(geometry.branch_a), list(geometry.branch_b),
                                         self.rank, list(self.stride), list(window))

    def factor(self, source: torch.Tensor, weight: torch.Tensor, branch: AtrousKernel, pads: Pads | None,
               dense: bool) -> torch.Tensor:
        """One branch's output as the forward computes it: on the CPU's route (``dense``) an input padded once
        takes the dense form, on the primary's grid; any other input the dilated conv."""
        dense = dense and pads is not None
        weight = dense_branch_weight(weight, branch, conv_span(self.kernel_size, self.dilation)) if dense else weight
        return self.branch_input(source, branch, pads, dense).conv(weight, self.stride, self.channels)

    def reduce_rank(self, product: torch.Tensor) -> torch.Tensor:
        return sum_over_rank(product, self.rank)

    def expand_rank(self, grad: torch.Tensor) -> torch.Tensor:
        return repeat_over_rank(grad, self.rank)

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
