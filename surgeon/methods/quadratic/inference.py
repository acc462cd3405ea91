"""Merged (inference) quadratic depthwise conv in QuadraLib's dense layout.

State dict keys follow QuadraNet's ``QuadraConv_dw``: ``P.conv3`` is the primary depthwise conv (``[C,1,K,K]`` +
bias), ``P.conv1`` holds ``W_a`` and ``P.conv2`` holds ``W_b``, each written as a dense kernel covering the
primary's receptive field (``[C*r,1,S,S]``, groups = C, rank ``r`` as ``C*r`` outputs summed per channel).

The forward has routes with the same result: on CUDA with CuPy, the specialised kernel compiled for the layer's
geometry (when the dense kernels are zero outside their dilated pattern, which merge guarantees) or else the
generic fused kernel, each chosen over the torch route only where it is faster; the atrous torch route (only the
non-zero taps); and the dense three-conv route (any dense weights).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.methods.quadratic.layer import AtrousKernel, QuadraticDepthwiseConv2d, conv_span
from surgeon.ops.padding import Pair, branch_pads, same_pads, static_pads
from surgeon.ops.rank_groups import add_products_


class QuadraticParts(nn.Module):
    """The ``P`` container: ``conv1`` (W_a), ``conv2`` (W_b) dense over the span, ``conv3`` the primary."""

    def __init__(self, channels: int, kernel: Pair, dilation: Pair, rank: int, bias: bool) -> None:
        super().__init__()
        span = conv_span(kernel, dilation)
        self.conv1 = nn.Conv2d(channels, channels * rank, span, groups=channels, bias=False)
        self.conv2 = nn.Conv2d(channels, channels * rank, span, groups=channels, bias=False)
        self.conv3 = nn.Conv2d(channels, channels, kernel, dilation=dilation, groups=channels, bias=bias)


def _offsets(span: Pair, branch: AtrousKernel) -> Pair:
    return tuple((s - b) // 2 for s, b in zip(span, branch.span()))  # type: ignore[return-value]


def dense_from_atrous(compact: torch.Tensor, span: Pair, branch: AtrousKernel) -> torch.Tensor:
    """Write a dilated kernel into a dense kernel over ``span``, centred as the adapter centres it."""
    dense = compact.new_zeros(*compact.shape[:2], *span)
    oh, ow = _offsets(span, branch)
    dh, dw = branch.dilation
    kh, kw = branch.kernel
    dense[:, :, oh:oh + dh * (kh - 1) + 1:dh, ow:ow + dw * (kw - 1) + 1:dw] = compact
    return dense


def atrous_view(dense: torch.Tensor, span: Pair, branch: AtrousKernel) -> torch.Tensor:
    oh, ow = _offsets(span, branch)
    dh, dw = branch.dilation
    kh, kw = branch.kernel
    return dense[:, :, oh:oh + dh * (kh - 1) + 1:dh, ow:ow + dw * (kw - 1) + 1:dw]


def follows_pattern(dense: torch.Tensor, span: Pair, branch: AtrousKernel) -> bool:
    """Whether a dense kernel is zero outside the dilated pattern (so the atrous route is exact)."""
    return bool(torch.equal(dense_from_atrous(atrous_view(dense, span, branch), span, branch), dense))


class QuadraConvDW(nn.Module):
    """``conv3(x) + sum_r conv1_r(x) * conv2_r(x)`` with dense QuadraLib-style weights."""

    def __init__(self, channels: int, kernel_size: Pair, stride: Pair = (1, 1), padding: Any = 0,
                 dilation: Pair = (1, 1), bias: bool = True, rank: int = 1, same_dynamic: bool = False,
                 branch_a: AtrousKernel | None = None, branch_b: AtrousKernel | None = None) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.stride = channels, tuple(kernel_size), tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation, self.rank, self.same_dynamic = tuple(dilation), rank, same_dynamic
        self.branch_a, self.branch_b = branch_a, branch_b
        self.span = conv_span(self.kernel_size, self.dilation)
        self.P = QuadraticParts(channels, self.kernel_size, self.dilation, rank, bias)

    # ------------------------------------------------------------------------------------------ geometry
    def pads(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        if self.same_dynamic:
            return same_pads(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.dilation)
        return static_pads(self.padding, self.kernel_size, self.dilation)

    def geometry(self) -> dict[str, Any]:
        """Everything needed to rebuild this layer (stored per layer in merged checkpoints)."""
        return {
            "channels": self.channels, "kernel_size": list(self.kernel_size), "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation), "bias": self.P.conv3.bias is not None, "rank": self.rank,
            "same_dynamic": self.same_dynamic,
            "branch_a": None if self.branch_a is None else {"kernel": list(self.branch_a.kernel),
                                                            "dilation": list(self.branch_a.dilation)},
            "branch_b": None if self.branch_b is None else {"kernel": list(self.branch_b.kernel),
                                                            "dilation": list(self.branch_b.dilation)},
        }

    @classmethod
    def from_geometry(cls, geometry: dict[str, Any]) -> QuadraConvDW:
        def branch(data: dict[str, Any] | None) -> AtrousKernel | None:
            return None if data is None else AtrousKernel(tuple(data["kernel"]), tuple(data["dilation"]))

        padding = geometry["padding"]
        return cls(geometry["channels"], tuple(geometry["kernel_size"]), tuple(geometry["stride"]),
                   padding if isinstance(padding, str) else tuple(padding), tuple(geometry["dilation"]),
                   bias=geometry["bias"], rank=geometry["rank"], same_dynamic=geometry["same_dynamic"],
                   branch_a=branch(geometry["branch_a"]), branch_b=branch(geometry["branch_b"]))

    @classmethod
    def from_adapter(cls, layer: QuadraticDepthwiseConv2d) -> QuadraConvDW:
        """Fold a trained adapter layer into the dense inference layout (exact up to float summation order)."""
        merged = cls(layer.channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                     bias=layer.bias is not None, rank=layer.rank, same_dynamic=layer.same_dynamic,
                     branch_a=layer.branch_a, branch_b=layer.branch_b)
        merged = merged.to(device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            merged.P.conv3.weight.copy_(layer.weight)
            if layer.bias is not None:
                merged.P.conv3.bias.copy_(layer.bias)
            merged.P.conv1.weight.copy_(dense_from_atrous(layer.weight_a, merged.span, layer.branch_a))
            merged.P.conv2.weight.copy_(dense_from_atrous(layer.weight_b, merged.span, layer.branch_b))
        merged.requires_grad_(False)
        return merged

    def check_patterns(self) -> None:
        """Drop the atrous route if the dense weights do not follow the recorded pattern."""
        if self.branch_a is not None and not follows_pattern(self.P.conv1.weight, self.span, self.branch_a):
            self.branch_a = None
        if self.branch_b is not None and not follows_pattern(self.P.conv2.weight, self.span, self.branch_b):
            self.branch_b = None

    def reparameterize(self) -> None:
        """Pick the cheapest exact route for the current weights (timm's ``reparameterize_model`` calls this):
        the atrous route where the dense kernels follow their pattern, and the primary conv alone where a factor
        of the quadratic term is all zero (an adapter that never trained adds exactly 0). State dict unchanged; as
        with timm's other re-parameterisations, the weights are final afterwards (call it again if they change)."""
        self.check_patterns()
        self.linear_only = not bool(self.P.conv1.weight.any()) or not bool(self.P.conv2.weight.any())
        self.__dict__.pop("_kernel_weights", None)  # pre-cast kernel copies follow the weights again
        self.__dict__.pop("_atrous_kernel_weights", None)

    # ------------------------------------------------------------------------------------------- forward
    as_custom_op = False  # set while exporting: the layer is one ``surgeon.quadratic_dwconv`` node
    linear_only = False  # set by reparameterize() when the quadratic term is exactly zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from surgeon.ops.kernels import cuda as cuda_kernels
        from surgeon.ops.kernels import library as kernel_ops

        if self.linear_only:
            return self._primary(x)
        if self.as_custom_op:
            return kernel_ops.quadratic_dwconv(x, self.P.conv3.weight, self.P.conv3.bias, self.P.conv1.weight,
                                               self.P.conv2.weight, list(self.stride), list(self.pads(x)),
                                               list(self.dilation), self.rank)
        weights = (self.P.conv3.weight, self.P.conv3.bias, self.P.conv1.weight, self.P.conv2.weight)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights))
        if cuda_kernels.usable(x) and not needs_grad and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            if self.branch_a is not None and self.branch_b is not None:
                return self._forward_atrous_op(x)
            w3, b3, w1, w2 = cuda_kernels.layer_weights(self, x.dtype, x.device)
            return kernel_ops.quadratic_dwconv(x, w3, b3, w1, w2, list(self.stride), list(self.pads(x)),
                                               list(self.dilation), self.rank)
        if self.branch_a is not None and self.branch_b is not None:
            return self.forward_atrous(x)
        return self.forward_dense(x)

    def atrous_geometry(self) -> Any:
        """What the specialised CUDA kernel is compiled for (the branches must follow their pattern)."""
        from surgeon.ops.kernels import cuda as cuda_kernels

        assert self.branch_a is not None and self.branch_b is not None

        def branch(pattern: AtrousKernel) -> tuple[int, ...]:
            return (*pattern.kernel, *pattern.dilation, *_offsets(self.span, pattern))

        return cuda_kernels.AtrousGeometry(self.kernel_size, self.dilation, branch(self.branch_a),  # type: ignore[arg-type]
                                           branch(self.branch_b), self.rank, self.stride)  # type: ignore[arg-type]

    def atrous_kernel_weights(self, dtype: torch.dtype, device: torch.device, tap_major: bool
                              ) -> tuple[torch.Tensor | None, ...]:
        """(primary, bias, branch a, branch b) in the specialised kernel's layout, in ``dtype`` on ``device``;
        remembered until a weight changes (version counters). Made outside inference mode, so that they have version
        counters of their own (the launcher keeps fp32 copies of 16-bit ones by them)."""
        from surgeon.ops.kernels import cuda as cuda_kernels

        assert self.branch_a is not None and self.branch_b is not None
        params = [self.P.conv3.weight, self.P.conv3.bias, self.P.conv1.weight, self.P.conv2.weight]
        stamp = tuple((p.data_ptr(), p._version) if p is not None else None for p in params)
        cache: dict[Any, Any] = self.__dict__.setdefault("_atrous_kernel_weights", {})
        key = (dtype, str(device), tap_major)
        if key not in cache or cache[key][0] != stamp:
            with torch.inference_mode(False), torch.no_grad():
                w3, bias, w1, w2 = (p.detach().to(device=device, dtype=dtype) if p is not None else None
                                    for p in params)
                wa = atrous_view(w1, self.span, self.branch_a)
                wb = atrous_view(w2, self.span, self.branch_b)
                laid_out = cuda_kernels.atrous_weights(w3, wa, wb, self.rank, tap_major)
            cache[key] = (stamp, (laid_out[0], bias.contiguous() if bias is not None else None, *laid_out[1:]))
        return cache[key][1]

    def _forward_atrous_op(self, x: torch.Tensor) -> torch.Tensor:
        from surgeon.ops.kernels import cuda as cuda_kernels
        from surgeon.ops.kernels import library as kernel_ops

        geometry = self.atrous_geometry()
        tap_major = cuda_kernels.is_channels_last(x)
        w3, b3, wa, wb = self.atrous_kernel_weights(x.dtype, x.device, tap_major)
        return kernel_ops.quadratic_atrous(x, w3, b3, wa, wb, list(geometry.kernel), list(geometry.dilation),
                                           list(geometry.branch_a), list(geometry.branch_b), self.rank,
                                           list(self.stride), list(self.pads(x)), tap_major)

    def _primary(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.P.conv3.weight, self.P.conv3.bias
        if self.same_dynamic:
            return F.conv2d(F.pad(x, self.pads(x)), weight, bias, self.stride, (0, 0), self.dilation, self.channels)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.channels)

    def _combine(self, primary: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return add_products_(primary, a, b, self.rank)

    def _branch(self, x: torch.Tensor, weight: torch.Tensor, pads: tuple[int, int, int, int],
                dilation: Pair) -> torch.Tensor:
        left, right, top, bottom = pads
        if left == right and top == bottom and left >= 0 and top >= 0:
            return F.conv2d(x, weight, None, self.stride, (top, left), dilation, self.channels)
        return F.conv2d(F.pad(x, pads), weight, None, self.stride, (0, 0), dilation, self.channels)

    def forward_atrous(self, x: torch.Tensor) -> torch.Tensor:
        """Only the non-zero taps: primary + small dilated convs + one fused multiply-add."""
        assert self.branch_a is not None and self.branch_b is not None
        pads = self.pads(x)
        a = self._branch(x, atrous_view(self.P.conv1.weight, self.span, self.branch_a),
                         branch_pads(pads, self.span, self.branch_a.span()), self.branch_a.dilation)
        b = self._branch(x, atrous_view(self.P.conv2.weight, self.span, self.branch_b),
                         branch_pads(pads, self.span, self.branch_b.span()), self.branch_b.dilation)
        return self._combine(self._primary(x), a, b)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """QuadraLib's three dense convs (reference route; works for any dense weights)."""
        pads = self.pads(x)
        a = self._branch(x, self.P.conv1.weight, pads, (1, 1))
        b = self._branch(x, self.P.conv2.weight, pads, (1, 1))
        return self._combine(self._primary(x), a, b)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, rank={self.rank}"
