"""surgeon's fused operations as ``torch.library`` custom ops: ``torch.ops.surgeon.*``.

Each op has one implementation for every device: the CUDA kernel when it can run (see :mod:`surgeon.ops.kernels.cuda`,
which falls back by itself), else the torch route, which is also the reference. A fake (meta) implementation gives
output shapes without computing, so ``torch.compile`` and ``torch.export`` see each op as one node instead of an
opaque CuPy call. The ops are forward-only: callers route any computation that needs a gradient through plain
torch ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from surgeon.ops import bitpack, coded_gradient
from surgeon.ops.derivative_codebook import grid_cells
from surgeon.ops.kernels import autotune
from surgeon.ops.kernels import cuda as cuda_kernels
from surgeon.ops.padding import pad_or_crop, split_pads
from surgeon.ops.rank_groups import add_products_, repeat_over_rank, sum_over_rank
from surgeon.ops.row_range import finite_row_range


def _packed_like(x: torch.Tensor, bits: int) -> torch.Tensor:
    return x.new_empty(bitpack.packed_numel(x.numel(), bits), dtype=torch.uint8)


# ------------------------------------------------------------------------------------------ ReLU-family masks
@torch.library.custom_op("surgeon::mask_pack", mutates_args=())
def mask_pack(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Bit-packed ``low < x < high`` (``high = inf``: no upper bound), NaN -> 0."""

    def in_interval(t: torch.Tensor) -> torch.Tensor:
        return t > low if high == float("inf") else (t > low).logical_and_(t < high)

    def torch_route() -> torch.Tensor:
        packed = bitpack.pack_interval_mask(x, low, high)
        return packed if packed is not None else bitpack.pack_by_chunks(x, 1, in_interval)

    packed = cuda_kernels.mask_pack(x, low, high, torch_route) if cuda_kernels.usable(x) else None
    return packed if packed is not None else torch_route()


@mask_pack.register_fake
def _(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return _packed_like(x, 1)


# ------------------------------------------------------------------------------------------ derivative codes
@torch.library.custom_op("surgeon::codebook_pack", mutates_args=())
def codebook_pack(x: torch.Tensor, cell_codes: torch.Tensor, low: float, step: float, bits: int) -> torch.Tensor:
    """Bit-packed derivative-interval codes: cell of the nearest grid point ``low + k * step`` -> its code."""

    cells = cell_codes.to(x.device)

    def torch_route() -> torch.Tensor:
        return bitpack.pack_by_chunks(x, bits, lambda t: cells.index_select(0, grid_cells(t, low, step, cells.numel())))

    packed = None
    if cuda_kernels.usable(x):
        packed = cuda_kernels.codebook_pack(x, cell_codes, low, step, bits, torch_route)
    return packed if packed is not None else torch_route()


@codebook_pack.register_fake
def _(x: torch.Tensor, cell_codes: torch.Tensor, low: float, step: float, bits: int) -> torch.Tensor:
    return _packed_like(x, bits)


# ------------------------------------------------------------------------------------------ per-row codes
@torch.library.custom_op("surgeon::rows_pack", mutates_args=())
def rows_pack(rows: torch.Tensor, offset: torch.Tensor | None, step: torch.Tensor, bits: int,
              in_range: bool = False) -> torch.Tensor:
    """Bit-packed ``round((row - offset) / step)`` clamped to ``[0, 2**bits - 1]`` per row (offset None: 0);
    +inf takes the top code, -inf and NaN code 0. Rows are along the last dim of ``rows``, which may have leading
    dims in any strides (codes in logical order); ``offset`` and ``step`` are ``[rows, 1]``. ``in_range``: the
    caller knows every value is finite and between its row's offset and top (the ends are the row's own min and
    max), so the clamp and the NaN pass are skipped: they would change nothing."""
    # per-row ends broadcast against chunks of ``rows`` taken along its first dim
    lead = rows.shape[:-1]
    offset_rows = offset.view(*lead, 1) if offset is not None else None
    step_rows = step.view(*lead, 1)

    def codes(first: int, last: int) -> torch.Tensor:
        values = rows[first:last]
        # one fp32 temporary in logical order (whatever the strides of ``rows``), updated in place (a division, not
        # a multiply by 1/step: the kernel divides too)
        shifted = torch.empty(values.shape, dtype=torch.float32, device=values.device)
        if offset_rows is not None:
            torch.sub(values, offset_rows[first:last], out=shifted).div_(step_rows[first:last])
        else:
            torch.div(values, step_rows[first:last], out=shifted)
        if in_range:
            return bitpack.codes_to_uint8(shifted.round_())
        return bitpack.codes_to_uint8(shifted.round_().clamp_(0, 2**bits - 1).nan_to_num_(0.0))  # NaN -> code 0

    def torch_route() -> torch.Tensor:
        per_byte = 8 // bits
        first_dim = rows.shape[0] if rows.dim() else 1
        inner = rows.numel() // max(first_dim, 1)  # elements per index of the first dim
        # whole first-dim slices per chunk, each chunk starting on a byte
        per_chunk = max(1, bitpack.CHUNK_ELEMENTS // max(inner, 1))
        while (per_chunk * inner) % per_byte:
            per_chunk += 1
        if torch.compiler.is_compiling() or rows.dim() < 2 or per_chunk >= first_dim:
            return bitpack.pack(codes(0, first_dim), bits)
        out = rows.new_empty(bitpack.packed_numel(rows.numel(), bits), dtype=torch.uint8)
        for first in range(0, first_dim, per_chunk):
            last = min(first + per_chunk, first_dim)
            chunk = codes(first, last)
            out[first * inner // per_byte:(last * inner + per_byte - 1) // per_byte] = (
                chunk.view(-1) if bits == 8 else bitpack.pack(chunk, bits))  # 8-bit codes are their own packing
        return out

    packed = None
    if cuda_kernels.usable(rows) and rows.dim() == 2:
        packed = cuda_kernels.rows_pack(rows, offset, step, bits, torch_route)
    return packed if packed is not None else torch_route()


@rows_pack.register_fake
def _(rows: torch.Tensor, offset: torch.Tensor | None, step: torch.Tensor, bits: int,
      in_range: bool = False) -> torch.Tensor:
    return _packed_like(rows, bits)


@torch.library.custom_op("surgeon::rows_range", mutates_args=())
def rows_range(rows: torch.Tensor, bits: int, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(low, step)`` (``[rows, 1]`` fp32) over each row's finite values, for ``rows_pack``; decided on the
    device, so quantizing reads nothing back to the host (see :mod:`surgeon.ops.row_range`)."""

    def torch_route() -> tuple[torch.Tensor, torch.Tensor]:
        return finite_row_range(rows, bits, nonnegative)

    ranged = None
    if cuda_kernels.usable(rows) and rows.dim() == 2:
        ranged = cuda_kernels.rows_range(rows, bits, nonnegative, torch_route)
    return ranged if ranged is not None else torch_route()


@rows_range.register_fake
def _(rows: torch.Tensor, bits: int, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    count = rows.numel() // max(rows.shape[-1], 1) if rows.dim() else 1
    return (rows.new_empty((count, 1), dtype=torch.float32), rows.new_empty((count, 1), dtype=torch.float32))


@torch.library.custom_op("surgeon::rows_quantize", mutates_args=())
def rows_quantize(rows: torch.Tensor, bits: int, nonnegative: bool, shift: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows_range`` and ``rows_pack`` in one op, one kernel on the GPU: ``(packed, offset, step)``, where
    ``offset`` is each row's low end minus ``shift`` (``[rows, 1]``; None: 0) and empty for ``nonnegative`` rows.
    Rows of any width (rows that share bytes are packed a few at a time by one block)."""

    def torch_route() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return rows_quantize_in_two(rows, bits, nonnegative, shift)

    quantized = None
    if cuda_kernels.usable(rows) and rows.dim() == 2:
        quantized = cuda_kernels.rows_quantize(rows, bits, nonnegative, shift, torch_route)
    return quantized if quantized is not None else torch_route()  # type: ignore[return-value]


def rows_quantize_in_two(rows: torch.Tensor, bits: int, nonnegative: bool, shift: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows_quantize`` as the ``rows_range`` and ``rows_pack`` ops: its torch route."""
    low, step = rows_range(rows, bits, nonnegative)
    packed = rows_pack(rows, None if nonnegative else low, step, bits)
    if nonnegative:
        return packed, low.new_zeros(0), step
    return packed, low if shift is None else low - shift.reshape(-1, 1).float(), step


@rows_quantize.register_fake
def _(rows: torch.Tensor, bits: int, nonnegative: bool, shift: torch.Tensor | None = None
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    count = rows.numel() // max(rows.shape[-1], 1) if rows.dim() else 1
    offset = rows.new_empty((0,) if nonnegative else (count, 1), dtype=torch.float32)
    return _packed_like(rows, bits), offset, rows.new_empty((count, 1), dtype=torch.float32)


@torch.library.custom_op("surgeon::rows_unpack", mutates_args=())
def rows_unpack(packed: torch.Tensor, offset: torch.Tensor | None, step: torch.Tensor, rows: int, width: int,
                bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, width]`` of ``dtype``: ``code * step + offset`` per row (offset None: 0), the inverse of
    ``rows_pack`` up to its rounding; one kernel on the GPU instead of an unpack, a cast and two passes."""

    def torch_route() -> torch.Tensor:
        codes = bitpack.unpack(packed, bits, rows * width).view(rows, width)
        values = codes.float().mul_(step)  # in place: one full-size fp32 tensor, not three
        return (values.add_(offset) if offset is not None else values).to(dtype)

    unpacked = None
    if cuda_kernels.usable(packed):
        unpacked = cuda_kernels.rows_unpack(packed, offset, step, rows, width, bits, dtype, torch_route)
    return unpacked if unpacked is not None else torch_route()


@rows_unpack.register_fake
def _(packed: torch.Tensor, offset: torch.Tensor | None, step: torch.Tensor, rows: int, width: int, bits: int,
      dtype: torch.dtype) -> torch.Tensor:
    return packed.new_empty((rows, width), dtype=dtype)


# ------------------------------------------------------------------------------------------ layer norm from codes
@torch.library.custom_op("surgeon::layer_norm_backward", mutates_args=())
def layer_norm_backward(grad: torch.Tensor, packed: torch.Tensor, offset: torch.Tensor, step: torch.Tensor,
                        rstd: torch.Tensor, weight: torch.Tensor | None, bits: int, dtype: torch.dtype
                        ) -> torch.Tensor:
    """The input gradient of a layer norm over the last dim of ``grad`` (``[rows, width]``) whose input rows were
    kept as codes centred on their mean (``rows_quantize`` with the mean as shift: ``packed``, ``offset``,
    ``step``) beside each row's ``rstd`` (``[rows, 1]``); ``weight``: the norm's scale, or None. Written in
    ``dtype`` (the norm's input dtype, which under autocast is not its gradient's). One kernel on the GPU instead of
    an unpack to fp32, casts of the gradient and ATen's backward."""

    def torch_route() -> torch.Tensor:
        grad_x, _, _ = layer_norm_backward_on_rows(grad, packed, offset, step, rstd, weight, bits, [True, False, False])
        return grad_x.to(dtype)

    grad_x = None
    if cuda_kernels.usable(grad) and grad.dim() == 2:
        grad_x = cuda_kernels.layer_norm_backward(grad, packed, offset, step, rstd, weight, bits, dtype, torch_route)
    return grad_x if grad_x is not None else torch_route()


def layer_norm_backward_on_rows(grad: torch.Tensor, packed: torch.Tensor, offset: torch.Tensor, step: torch.Tensor,
                                rstd: torch.Tensor, weight: torch.Tensor | None, bits: int, output_mask: list[bool]
                                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """ATen's fused layer-norm backward on the dequantized centred rows (mean zero), in fp32: ``(input, weight,
    bias)`` gradients as ``output_mask`` asks. The torch route of ``layer_norm_backward``, and the route where the
    norm's scale trains (its gradient needs the rows whole)."""
    rows, width = grad.shape
    centred = rows_unpack(packed, offset, step, rows, width, bits, torch.float32)
    scale = weight.float() if weight is not None else None
    # the bias only gives the bias gradient its shape: its values take no part in backward
    bias_like = (scale if scale is not None else grad.new_empty(width, dtype=torch.float32)) if output_mask[2] else None
    return torch.ops.aten.native_layer_norm_backward(grad.float(), centred, [width], _zero_means(rstd), rstd, scale,
                                                     bias_like, output_mask)


_ZERO_MEANS: dict[tuple[int, str], torch.Tensor] = {}


def _zero_means(rstd: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like ``rstd``: the mean of rows already centred. Made once per row count and device and
    only ever read, so a backward does not launch a fill for them each step."""
    if torch.compiler.is_compiling():
        return torch.zeros_like(rstd)
    key = (rstd.numel(), str(rstd.device))
    zeros = _ZERO_MEANS.get(key)
    if zeros is None:
        if len(_ZERO_MEANS) >= 64:  # a long run over many batch shapes: keep the cache small
            _ZERO_MEANS.clear()
        zeros = _ZERO_MEANS[key] = torch.zeros(rstd.numel(), dtype=torch.float32, device=rstd.device)
    return zeros.view(rstd.shape)


@layer_norm_backward.register_fake
def _(grad: torch.Tensor, packed: torch.Tensor, offset: torch.Tensor, step: torch.Tensor, rstd: torch.Tensor,
      weight: torch.Tensor | None, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return grad.new_empty(grad.shape, dtype=dtype)


# ------------------------------------------------------------------------------------------ coded gradients
@torch.library.custom_op("surgeon::coded_product", mutates_args=())
def coded_product(grad: torch.Tensor, packed: torch.Tensor, bits: int, values: list[float],
                  order: list[int]) -> torch.Tensor:
    """``grad * values[code]``: a coded activation's input gradient from its packed codes (stored in dim order
    ``order`` of ``grad``'s shape), one kernel on the GPU instead of a cast, a table gather and a multiply."""

    def torch_route() -> torch.Tensor:
        return coded_gradient.coded_product(grad, packed, bits, tuple(values), tuple(order))

    product = None
    if cuda_kernels.usable(grad):
        product = cuda_kernels.coded_product(grad, packed, bits, tuple(values), tuple(order), torch_route)
    return product if product is not None else torch_route()


@coded_product.register_fake
def _(grad: torch.Tensor, packed: torch.Tensor, bits: int, values: list[float], order: list[int]) -> torch.Tensor:
    return coded_gradient.empty_in_order(grad, tuple(order), grad.dtype)


# ------------------------------------------------------------------------------------------ quadratic conv
@torch.library.custom_op("surgeon::quadratic_dwconv", mutates_args=())
def quadratic_dwconv(x: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor | None, w1: torch.Tensor,
                     w2: torch.Tensor, stride: list[int], pads: list[int], dilation: list[int],
                     rank: int) -> torch.Tensor:
    """``conv3(x) + b + sum_r conv1(x) * conv2(x)`` over dense QuadraLib kernels (``pads``: left, right, top,
    bottom of the span window), fused on the GPU."""

    def torch_route() -> torch.Tensor:
        return dense_quadratic(x, w3, b3, w1, w2, stride, pads, dilation, rank)

    def fused_route() -> torch.Tensor | None:
        return cuda_kernels.fused_quadratic(x, w3, b3, w1, w2, tuple(stride), tuple(pads), tuple(dilation), rank,
                                            torch_route)

    return _tuned(x, (tuple(w3.shape[-2:]), tuple(dilation), tuple(w1.shape[-2:]), tuple(stride), tuple(pads), rank),
                  fused_route, torch_route)


def _tuned(x: torch.Tensor, geometry: tuple, fused_route: Callable[[], torch.Tensor | None],
           torch_route: Callable[[], torch.Tensor], op: str = "quadratic_atrous") -> torch.Tensor:
    """The route autotuning keeps for this geometry and input (the torch route off CUDA, and whenever the fused
    kernel cannot run). ``geometry``: kernel size, dilation, span, stride, pads, rank of the tuning key."""
    fused = None
    if cuda_kernels.usable(x):
        key = autotune.RouteKey(*geometry, tuple(x.shape), str(x.dtype).removeprefix("torch."),
                                cuda_kernels.is_channels_last(x), op)
        if autotune.TUNER.route(key, x.device, fused_route, torch_route) == "fused":
            fused = fused_route()
    return fused if fused is not None else torch_route()


def _quadconv_output_like(x: torch.Tensor, span: tuple[int, ...], stride: list[int], pads: list[int]) -> torch.Tensor:
    """The (meta) output of a quadratic conv: its size and the input's memory format."""
    n, c, h, w = x.shape
    out_h, out_w = cuda_kernels.output_size((h, w), span, tuple(stride), tuple(pads))
    memory_format = torch.channels_last if cuda_kernels.is_channels_last(x) else torch.contiguous_format
    return x.new_empty((n, c, out_h, out_w)).contiguous(memory_format=memory_format)


@quadratic_dwconv.register_fake
def _(x: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
      stride: list[int], pads: list[int], dilation: list[int], rank: int) -> torch.Tensor:
    return _quadconv_output_like(x, tuple(w1.shape[-2:]), stride, pads)


@torch.library.custom_op("surgeon::quadratic_atrous", mutates_args=())
def quadratic_atrous(x: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor | None, wa: torch.Tensor, wb: torch.Tensor,
                     kernel: list[int], dilation: list[int], branch_a: list[int], branch_b: list[int], rank: int,
                     stride: list[int], pads: list[int], tap_major: bool) -> torch.Tensor:
    """``conv3(x) + b + sum_r conv_a(x) * conv_b(x)`` computing only the non-zero taps: the primary kernel and two
    dilated branch kernels (``branch_*``: rows, cols, dilation h, dilation w, top, left inside the primary's
    span; ``pads``: left, right, top, bottom of that span). Weights in the kernel's layout
    (:func:`surgeon.ops.kernels.cuda.atrous_weights`, tap-major for channels-last inputs). On CUDA the first call
    of each shape picks the specialised kernel or the torch route, whichever is faster."""
    geometry = cuda_kernels.AtrousGeometry(tuple(kernel), tuple(dilation), tuple(branch_a), tuple(branch_b),  # type: ignore[arg-type]
                                           rank, tuple(stride))  # type: ignore[arg-type]

    def torch_route() -> torch.Tensor:
        return atrous_quadratic(x, w3, b3, wa, wb, geometry, pads, tap_major)

    def fused_route() -> torch.Tensor | None:
        if tap_major != cuda_kernels.is_channels_last(x):
            return None  # weights laid out for the other memory format
        return cuda_kernels.fused_atrous(x, w3, b3, wa, wb, geometry, tuple(pads), torch_route)  # type: ignore[arg-type]

    return _tuned(x, (tuple(kernel), tuple(dilation), (*branch_a, *branch_b), tuple(stride), tuple(pads), rank),
                  fused_route, torch_route)


@quadratic_atrous.register_fake
def _(x: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor | None, wa: torch.Tensor, wb: torch.Tensor,
      kernel: list[int], dilation: list[int], branch_a: list[int], branch_b: list[int], rank: int, stride: list[int],
      pads: list[int], tap_major: bool) -> torch.Tensor:
    return _quadconv_output_like(x, cuda_kernels.conv_span(tuple(kernel), tuple(dilation)), stride, pads)


def atrous_quadratic(x: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor | None, wa: torch.Tensor, wb: torch.Tensor,
                     geometry: cuda_kernels.AtrousGeometry, pads: list[int], tap_major: bool) -> torch.Tensor:
    """The torch route of ``quadratic_atrous``: the primary conv and one dilated conv per branch, each on the
    input padded for its own window inside the span."""
    channels = x.shape[1]
    w3c, wac, wbc = cuda_kernels.conv_weights(w3, wa, wb, geometry, channels, tap_major)

    primary = window_conv(x, w3c.to(x.dtype), b3, geometry.kernel, geometry.dilation, (0, 0), geometry, pads)
    a = branch_conv(x, wac, geometry.branch_a, geometry, pads)
    b = branch_conv(x, wbc, geometry.branch_b, geometry, pads)
    return add_products_(primary, a, b, geometry.rank)


def window_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, taps: tuple[int, ...],
                dilation: tuple[int, ...], at: tuple[int, int], geometry: cuda_kernels.AtrousGeometry,
                pads: list[int] | tuple[int, ...]) -> torch.Tensor:
    """A depthwise conv whose window sits at ``at`` (top, left) inside the span of a layer padded by ``pads``:
    the conv's own padding where that is symmetric, else the input padded or (a view) cropped first."""
    span, reach = geometry.span(), cuda_kernels.conv_span(taps, dilation)
    left, right, top, bottom = pads
    own = (left - at[1], right - (span[1] - reach[1] - at[1]), top - at[0], bottom - (span[0] - reach[0] - at[0]))
    pre_pads, padding = split_pads(own)
    if pre_pads is not None:
        x = pad_or_crop(x, pre_pads)[0]
    return F.conv2d(x, weight.to(x.dtype), bias, tuple(geometry.stride), padding, tuple(dilation), x.shape[1])


def branch_conv(x: torch.Tensor, weight: torch.Tensor, branch: tuple[int, ...], geometry: cuda_kernels.AtrousGeometry,
                pads: list[int] | tuple[int, ...]) -> torch.Tensor:
    """One branch (rows, cols, dilation h, dilation w, top, left) of a quadratic layer, conv layout weights."""
    rows, cols, dil_h, dil_w, top, left = branch
    return window_conv(x, weight, None, (rows, cols), (dil_h, dil_w), (top, left), geometry, pads)


# ------------------------------------------------------------------------------------------ training's quadratic term
@torch.library.custom_op("surgeon::quadratic_term", mutates_args=())
def quadratic_term(mode: str, x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, given: torch.Tensor,
                   kernel: list[int], dilation: list[int], branch_a: list[int], branch_b: list[int], rank: int,
                   stride: list[int], pads: list[int]) -> torch.Tensor:
    """A training step's quadratic term (``branch_*`` and ``pads`` as for ``quadratic_atrous``; weights in the conv
    layout): ``given + sum_r conv_a(x)_r * conv_b(x)_r`` for ``mode`` "add" (``given``: the primary conv's output),
    or ``conv_a(x) * given`` / ``conv_b(x) * given`` for "a_times" / "b_times" (``given``: the output gradient,
    repeated over the rank), the factors that branch b's and branch a's gradients need, or both of them stacked on
    a new first dimension for "a_and_b_times". One kernel on the GPU instead of two convs and a product (or a conv
    and a product); autotuned against the torch route."""
    if mode not in cuda_kernels.TERM_MODES:
        raise ValueError(f"unknown quadratic term mode {mode!r}")
    geometry = cuda_kernels.AtrousGeometry(tuple(kernel), tuple(dilation), tuple(branch_a), tuple(branch_b),  # type: ignore[arg-type]
                                           rank, tuple(stride))  # type: ignore[arg-type]

    def torch_route() -> torch.Tensor:
        return quadratic_term_reference(mode, x, wa, wb, given, geometry, pads)

    def fused_route() -> torch.Tensor | None:
        return cuda_kernels.quadratic_term(mode, x, wa, wb, given, geometry, tuple(pads), torch_route)  # type: ignore[arg-type]

    return _tuned(x, (tuple(kernel), tuple(dilation), (*branch_a, *branch_b), tuple(stride), tuple(pads), rank),
                  fused_route, torch_route, op=f"quadratic_term_{mode}")


@quadratic_term.register_fake
def _(mode: str, x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, given: torch.Tensor, kernel: list[int],
      dilation: list[int], branch_a: list[int], branch_b: list[int], rank: int, stride: list[int],
      pads: list[int]) -> torch.Tensor:
    return cuda_kernels.term_output(mode, given, rank, cuda_kernels.is_channels_last(x))


def quadratic_term_reference(mode: str, x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, given: torch.Tensor,
                             geometry: cuda_kernels.AtrousGeometry, pads: list[int]) -> torch.Tensor:
    """The torch route of ``quadratic_term``: dilated convs, then the product."""
    rank = geometry.rank
    if mode == "add":  # out of place: an op does not write its inputs
        a = branch_conv(x, wa, geometry.branch_a, geometry, pads)
        b = branch_conv(x, wb, geometry.branch_b, geometry, pads)
        return torch.addcmul(given, a, b) if rank == 1 else given + sum_over_rank(a * b, rank)
    given = repeat_over_rank(given, rank)
    if mode == "a_and_b_times":
        both = cuda_kernels.term_output(mode, given, 1, cuda_kernels.is_channels_last(x))
        for index, (weight, branch) in enumerate(((wa, geometry.branch_a), (wb, geometry.branch_b))):
            torch.mul(branch_conv(x, weight, branch, geometry, pads), given, out=both[index])
        return both
    weight, branch = (wa, geometry.branch_a) if mode == "a_times" else (wb, geometry.branch_b)
    return branch_conv(x, weight, branch, geometry, pads).mul_(given)


def dense_quadratic(x: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
                    stride: list[int], pads: list[int], dilation: list[int], rank: int) -> torch.Tensor:
    """The torch route: QuadraLib's three dense convs on the padded input."""
    channels = x.shape[1]
    padded = F.pad(x, tuple(pads))
    primary = F.conv2d(padded, w3, b3, tuple(stride), 0, tuple(dilation), channels)
    a = F.conv2d(padded, w1, None, tuple(stride), 0, 1, channels)
    b = F.conv2d(padded, w2, None, tuple(stride), 0, 1, channels)
    return primary + sum_over_rank(a * b, rank)
