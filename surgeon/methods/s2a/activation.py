"""S2A quantized-activation layers: exact forward, low-bit tensors saved for backward.

The forward pass calls the *original* module or function, so outputs are bit-identical to the unconverted
model (including ``inplace=True`` behaviour). Only what autograd keeps changes: a 1-bit mask, a ``bits``-bit
derivative-interval code, or a ``bits``-bit output with per-row scale, all bit-packed and registered through
``ctx.save_for_backward`` (so ``saved_tensors_hooks`` see exactly what is kept).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from surgeon.ops.activations import FUNCTION_KEYS, ActivationSpec, inplace_forward
from surgeon.ops.coded_gradient import flat_in_order, storage_order
from surgeon.ops.derivative_codebook import ready_codebook
from surgeon.ops.precision import grad_as
from surgeon.ops.row_quantizer import as_groups, dequantize_rows, quantize_rows

_STATE = threading.local()


@contextmanager
def inside_replacement() -> Iterator[None]:
    """Marks calls made by surgeon's own layers, so a census does not count them as unconverted sites."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def in_replacement() -> bool:
    return getattr(_STATE, "depth", 0) > 0


def _mask_bounds(spec: ActivationSpec) -> tuple[float, float]:
    """The open interval where the derivative takes its 'high' value (torch's own backward at the edges)."""
    if spec.op in ("relu", "leaky_relu"):
        return 0.0, math.inf
    if spec.op == "relu6":
        return 0.0, 6.0
    if spec.op == "hardtanh":
        return spec.param("min_val"), spec.param("max_val")
    if spec.op == "hardsigmoid":
        return -3.0, 3.0
    raise AssertionError(spec.op)


def pack_mask(x: torch.Tensor, spec: ActivationSpec, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """1-bit ``low < x < high`` of ``x``'s elements in dim order ``order``: ±inf follow the derivative's limit
    (ReLU passes +inf, ReLU6 blocks it), NaN blocks the gradient. The CUDA kernel computes the same bits."""
    from surgeon.ops.kernels import library as kernel_ops

    low, high = _mask_bounds(spec)
    return kernel_ops.mask_pack(flat_in_order(x.detach(), order or storage_order(x)), low, high)


def coded_product(grad: torch.Tensor, packed: torch.Tensor, bits: int, values: tuple[float, ...],
                  order: tuple[int, ...]) -> torch.Tensor:
    from surgeon.ops.kernels import library as kernel_ops

    return kernel_ops.coded_product(grad, packed, bits, list(values), list(order))


def pack_codes(x: torch.Tensor, book: Any, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    from surgeon.ops.kernels import library as kernel_ops

    cells = book.tensor_on("cell_codes", x.device)
    flat = flat_in_order(x.detach(), order or storage_order(x))
    return kernel_ops.codebook_pack(flat, cells, book.low, book.step, bits)


def mask_values(spec: ActivationSpec) -> tuple[float, float]:
    """The derivative outside and inside the mask's interval (code 0 and code 1)."""
    if spec.op == "leaky_relu":
        return float(spec.param("negative_slope")), 1.0
    if spec.op == "hardsigmoid":
        return 0.0, 1.0 / 6.0
    return 0.0, 1.0


def _codebook_name(spec: ActivationSpec) -> str:
    if spec.op == "gelu" and spec.param("approximate") == "tanh":
        return "gelu_tanh"
    return spec.op


class _QuantizedActivationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_fn: Callable[[torch.Tensor], torch.Tensor],
                spec: ActivationSpec, bits: int, group_size: int, reuse_input: bool = False) -> torch.Tensor:
        ctx.spec, ctx.bits, ctx.shape, ctx.dtype = spec, bits, x.shape, x.dtype
        ctx.order = storage_order(x)
        family = spec.family
        if family == "mask":
            saved = (pack_mask(x, spec, ctx.order),)
        elif family == "derivative":
            saved = (pack_codes(x, ready_codebook(_codebook_name(spec), bits), bits, ctx.order),)
        if reuse_input:
            # nothing else reads x (the graph said so): write into its storage and return a new alias of it.
            # Marking x dirty instead would, for x a view (a Linear's output on 3-D input is one), make autograd
            # route the gradient through a copy of the whole base.
            y = forward_fn(x.detach()).detach()
        else:
            y = forward_fn(x)
            # compiled code has no data pointers; there, an in-place op returns its input object
            if y is x or (not torch.compiler.is_compiling() and y.data_ptr() == x.data_ptr()
                          and y.shape == x.shape):
                ctx.mark_dirty(x)
                y = x
        if family == "output":
            if spec.op == "softmax":
                dim = spec.param("dim") % y.dim()
                moved = y.movedim(dim, -1)
                ctx.moved_shape = moved.shape
                rows = moved  # rows along the softmax dim, quantized without a copy
            else:
                rows = as_groups(y, group_size)
            q = quantize_rows(rows, bits, nonnegative=spec.op == "softmax")
            ctx.rows, ctx.width = q.rows, q.width
            saved = q.tensors()
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec: ActivationSpec = ctx.spec
        numel = grad.numel()
        if spec.family == "mask":
            (packed,) = ctx.saved_tensors
            grad_in = coded_product(grad, packed, 1, mask_values(spec), ctx.order)
        elif spec.family == "derivative":
            (packed,) = ctx.saved_tensors
            book = ready_codebook(_codebook_name(spec), ctx.bits)
            grad_in = coded_product(grad, packed, ctx.bits, book.value_floats, ctx.order)
        else:
            packed, offset, step = ctx.saved_tensors
            rows = dequantize_rows(packed, offset, step, ctx.rows, ctx.width, ctx.bits, grad.dtype)
            if spec.op == "softmax":
                dim = spec.param("dim") % grad.dim()
                y = rows.view(ctx.moved_shape).movedim(-1, dim)
                grad_in = y * (grad - (grad * y).sum(dim=dim, keepdim=True))
            else:
                y = rows.reshape(-1)[:numel].view(ctx.shape)
                grad_in = grad * (y * (1 - y) if spec.op == "sigmoid" else 1 - y * y)
        return grad_as(grad_in, ctx.dtype), None, None, None, None, None


def prepare(spec: ActivationSpec, bits: int) -> None:
    """Build the derivative codebook now rather than inside the first training step."""
    if spec.family == "derivative":
        ready_codebook(_codebook_name(spec), bits)


def quantized_apply(x: torch.Tensor, forward_fn: Callable[[torch.Tensor], torch.Tensor], spec: ActivationSpec,
                    bits: int, group_size: int, inplace: bool = False, reuse_input: bool = False) -> torch.Tensor:
    """Run ``forward_fn(x)``; if a backward will follow, keep only the low-bit tensors for it.

    ``reuse_input``: nothing else reads ``x`` (the graph says so), so a training forward computes into it - the
    same kernel, hence the same values - instead of allocating an output beside it."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return forward_fn(x)
    into_input = inplace_forward(spec) if reuse_input and not inplace and not torch.compiler.is_compiling() else None
    if into_input is not None:
        return _QuantizedActivationFn.apply(x, into_input, spec, bits, group_size, True)
    if inplace and torch.compiler.is_compiling():
        # a compiled autograd function cannot mark its input dirty (a graph break per site): compute out of place,
        # then write into ``x`` as the in-place op would have
        y = _QuantizedActivationFn.apply(x, lambda t: forward_fn(t.clone()), spec, bits, group_size)
        return x.copy_(y)
    return _QuantizedActivationFn.apply(x, forward_fn, spec, bits, group_size)


class QuantizedActivation(nn.Module):
    """Drop-in replacement for an activation module; ``original`` is kept and computes the forward."""

    def __init__(self, original: nn.Module, spec: ActivationSpec, bits: int = 4, group_size: int = 128,
                 reuse_input: bool = False) -> None:
        super().__init__()
        self.original = original
        self.spec = spec
        self.bits = bits
        self.group_size = group_size
        self.reuse_input = reuse_input
        prepare(spec, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with inside_replacement():
            return quantized_apply(x, self.original, self.spec, self.bits, self.group_size,
                                   inplace=getattr(self.original, "inplace", False) is True,
                                   reuse_input=self.reuse_input)

    def extra_repr(self) -> str:
        return (f"op={self.spec.op}, bits={1 if self.spec.family == 'mask' else self.bits}"
                + (", reuse_input=True" if self.reuse_input else ""))


def quantized_call(x: torch.Tensor, target: str, op: str, params: tuple[tuple[str, Any], ...], bits: int,
                   group_size: int, reuse_input: bool, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Functional site after rewriting: ``target`` is a function key of ``FUNCTION_KEYS`` or ``"method:name"``;
    ``reuse_input`` as in :func:`quantized_apply`.

    Only strings, numbers and tuples are passed so the rewritten GraphModule's generated code stays plain.
    """
    # an in-place call: a method ending in "_", or ``inplace=True`` (F.relu(x, True) passes it positionally; no
    # other argument of these functions is a bool)
    inplace = target.endswith("_") or kwargs.get("inplace") is True or any(a is True for a in args)
    if target.startswith("method:"):
        name = target[len("method:"):]

        def forward_fn(t: torch.Tensor) -> torch.Tensor:
            return getattr(t, name)(*args, **kwargs)
    else:
        fn = FUNCTION_KEYS[target]

        def forward_fn(t: torch.Tensor) -> torch.Tensor:
            return fn(t, *args, **kwargs)

    with inside_replacement():
        return quantized_apply(x, forward_fn, ActivationSpec(op, params), bits, group_size, inplace=inplace,
                               reuse_input=reuse_input)


torch.fx.wrap("quantized_call")
