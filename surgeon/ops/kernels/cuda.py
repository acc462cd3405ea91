"""Launching the CUDA kernels in ``kernels/``: compiled at run time by NVRTC through CuPy's ``RawModule``.

Used when a tensor is on a CUDA device and CuPy is installed; otherwise, and whenever a kernel cannot be trusted,
the torch route runs (it is also the reference). Every entry returns ``None`` to mean "use the torch route", so a
kernel can never be the only way to a result:

* dtype guard: only fp32 / fp16 / bf16 storage goes to a kernel;
* autograd: a call whose output needs a gradient takes the torch route (the kernels are forward-only);
* device guard: every launch runs under ``torch.cuda.device(x.device)`` on that device's current torch stream,
  and tensors are handed to CuPy inside that stream;
* a compile failure is one warning naming the cause, remembered; the torch route runs from then on;
* first-use self-check: the first call of each (kernel, device) is compared with the torch route on that call's
  input; a mismatch beyond the dtype's tolerance disables that kernel on that device, with one warning.

Compiled functions and weights cast to the input's dtype are cached here, codebooks on the device by
:mod:`surgeon.ops.kernels.library`, so a steady-state call does no compile, lookup, cast or host-to-device copy.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from surgeon.ops.derivative_codebook import inverse_step
from surgeon.ops.kernels.fast_divisor import fast_divisor
from surgeon.ops.memory_format import is_channels_last
from surgeon.ops.package_data import data_dir

KERNEL_FILES = ("quadratic_dwconv.cu", "bitpack.cu", "layer_norm.cu")  # extern "C" entries
TEMPLATE_KERNEL_FILES = ("quadratic_atrous.cu",)  # instantiated per layer geometry (NVRTC name expressions)
MAX_SPAN = 31
BLOCK = 256
_DTYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# self-check tolerance, relative to the largest reference value: the kernels accumulate in fp32
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


class KernelWarning(UserWarning):
    """A CUDA kernel is not used (it failed to compile, or disagreed with the torch route)."""


def kernel_source(name: str) -> str:
    """A kernel file with ``common.cuh`` inlined (NVRTC then needs no include path for it)."""
    folder = data_dir("kernels")
    text = folder.joinpath(name).read_text(encoding="utf-8")
    common = folder.joinpath("common.cuh").read_text(encoding="utf-8").replace("#pragma once", "")
    return re.sub(r'#include "common\.cuh"', lambda _: common, text)


def _source_constant(name: str, file: str) -> int:
    """A ``#define`` of a kernel source, so a limit the kernel is compiled with is stated once, in the kernel."""
    match = re.search(rf"^#define {name} (\d+)\s*$", data_dir("kernels").joinpath(file).read_text(encoding="utf-8"),
                      re.MULTILINE)
    if match is None:  # pragma: no cover - the shipped source defines it
        raise RuntimeError(f"kernels/{file} does not define {name}")
    return int(match.group(1))


MAX_RANK = _source_constant("SURGEON_MAX_RANK", "quadratic_dwconv.cu")  # per-thread accumulator arrays


def nvrtc_options() -> tuple[str, ...]:
    """The kernels include no CUDA header (``common.cuh`` has its own 16-bit types), so no include path is
    passed and the toolkit's headers can never disagree with CuPy's NVRTC."""
    return ("-std=c++17",)


@lru_cache(maxsize=1)
def available() -> bool:
    """CuPy importable and a CUDA device visible."""
    if os.environ.get("SURGEON_DISABLE_CUDA_KERNELS"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def usable(tensor: torch.Tensor) -> bool:
    """Whether work on ``tensor`` should try the kernels: it is on a CUDA device and they can run."""
    return tensor.is_cuda and available()


# ------------------------------------------------------------------------------------------ state
class _Registry:
    """What was compiled, what failed and what passed or failed its self-check, for this process."""

    def __init__(self) -> None:
        self.modules: dict[str, Any] = {}
        self.functions: dict[tuple[str, str], Any] = {}
        self.compile_errors: dict[str, str] = {}
        self.checked: set[tuple[str, str]] = set()  # (kernel, device)
        self.disabled: dict[tuple[str, str], str] = {}  # (kernel, device) -> why
        self.value_tables: dict[tuple[tuple[float, ...], str], torch.Tensor] = {}  # coded products' factors
        # fp32 copies of 16-bit weights for kernels that read weights in fp32, each with its source's version,
        # dropped with the source tensor
        self.float_copies: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]


REGISTRY = _Registry()


def _module(name: str, name_expressions: tuple[str, ...] = ()) -> Any | None:
    """The compiled module (with these template instantiations), or None (with one warning, once) when it does not
    compile here."""
    key = name if not name_expressions else f"{name}:{'|'.join(name_expressions)}"
    if key in REGISTRY.modules:
        return REGISTRY.modules[key]
    if key in REGISTRY.compile_errors:
        return None
    try:
        import cupy

        module = cupy.RawModule(code=kernel_source(name), options=nvrtc_options(),
                                name_expressions=list(name_expressions) or None)
        module.compile()
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        REGISTRY.compile_errors[key] = cause
        warnings.warn(f"surgeon: the CUDA kernels in {name} did not compile ({cause}); the torch route runs "
                      "instead", KernelWarning, stacklevel=3)
        return None
    REGISTRY.modules[key] = module
    return module


def _function(module_name: str, entry: str, templated: bool = False) -> Any | None:
    """A kernel by name; ``templated``: ``entry`` is a template instantiation (an NVRTC name expression), compiled
    in a module of its own the first time it is asked for."""
    key = (module_name, entry)
    if key not in REGISTRY.functions:
        module = _module(module_name, (entry,) if templated else ())
        if module is None:
            return None
        REGISTRY.functions[key] = module.get_function(entry)
    return REGISTRY.functions[key]


@contextmanager
def device_guard(device: torch.device) -> Iterator[int]:
    """Current device = ``device`` while launching; yields the raw handle of its current torch stream."""
    with torch.cuda.device(device):
        yield torch.cuda.current_stream(device).cuda_stream


def _launch(module_name: str, entry: str, grid: int, device: torch.device,
            arguments: Callable[[Any], tuple[Any, ...]], templated: bool = False, block: int = BLOCK) -> bool:
    """Launch ``entry`` on ``device``'s current stream; ``arguments(cupy)`` builds the argument tuple inside the
    stream (so DLPack exports synchronise with the right stream). False: not launched (torch route)."""
    function = _function(module_name, entry, templated)
    if function is None or not _enabled(entry, device):
        return False
    import cupy

    try:
        with device_guard(device) as stream, cupy.cuda.ExternalStream(stream):
            function((grid,), (block,), arguments(cupy))
    except Exception as exc:  # an argument CuPy refuses, a launch failure: the torch route, said once
        cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        REGISTRY.disabled[(entry, str(device))] = cause
        warnings.warn(f"surgeon: CUDA kernel {entry} could not be launched on {device} ({type(exc).__name__}: "
                      f"{cause}); the torch route runs instead", KernelWarning, stacklevel=3)
        return False
    return True


def _flat(cupy: Any, tensor: torch.Tensor) -> Any:
    """A flat CuPy view of a tensor's storage in memory order (NHWC for channels-last; a dense tensor of any
    dimension order is a view, so a kernel's writes land in it)."""
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.permute(sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d)))
    flat = tensor.reshape(-1)
    if flat.element_size() == 2 and flat.is_floating_point():
        # same-size integer view: CuPy 14 takes bf16 through DLPack only with ml_dtypes installed, and the
        # kernel already knows its storage type (pointer arguments carry bytes, not dtypes)
        flat = flat.view(torch.int16)
    return cupy.from_dlpack(flat)


def _checked(entry: str, device: torch.device, kernel: torch.Tensor, reference: Callable[[], torch.Tensor],
             tolerance: float | None, scale_of: Callable[[], float] | None = None) -> torch.Tensor:
    """On a (kernel, device)'s first use: compare with the torch route; a mismatch disables the kernel there.
    ``scale_of``: the size the difference is relative to, where the output's own largest value is not it (an
    output that is a difference of larger terms, which may cancel to rounding noise)."""
    key = (entry, str(device))
    if key in REGISTRY.checked:
        return kernel
    with exact_fp32():
        want = reference()
    if tolerance is None:
        agrees, detail = torch.equal(kernel, want), "codes differ"
    else:
        diff = (kernel.float() - want.float()).abs().max().item() if want.numel() else 0.0
        # relative to this output's own scale (a layer whose outputs are all below 1 is held to its own size)
        if scale_of is not None:
            scale = scale_of()
        else:
            scale = want.float().abs().max().item() if want.numel() else 0.0
        scale = scale if scale > 0 else 1.0
        agrees = diff <= tolerance * scale and bool(torch.isfinite(kernel).all() == torch.isfinite(want).all())
        detail = f"max |Δ| {diff:.3g} against {tolerance:g} x {scale:.3g}"
    if agrees:
        REGISTRY.checked.add(key)
        return kernel
    REGISTRY.disabled[key] = detail
    warnings.warn(f"surgeon: CUDA kernel {entry} disagrees with the torch route on {device} ({detail}); it is "
                  "disabled there and the torch route runs", KernelWarning, stacklevel=3)
    return want


@contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off while the self-check's fp32 reference runs: it must be the exact route it vouches for."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _enabled(entry: str, device: torch.device) -> bool:
    return (entry, str(device)) not in REGISTRY.disabled


# ------------------------------------------------------------------------------------------ quadratic conv
def conv_span(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, int]:
    """The window a dilated kernel covers: ``d * (k - 1) + 1`` per dim."""
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))  # type: ignore[return-value]


def output_size(size: tuple[int, int], span: tuple[int, ...], stride: tuple[int, ...],
                pads: tuple[int, ...]) -> tuple[int, int]:
    """Output (height, width) of a ``span`` window at ``stride`` over an input padded by (left, right, top,
    bottom)."""
    left, right, top, bottom = pads
    return ((size[0] + top + bottom - span[0]) // stride[0] + 1, (size[1] + left + right - span[1]) // stride[1] + 1)


@dataclass(frozen=True)
class QuadconvLaunch:
    kernel: str
    grid: int
    block: int
    ints: tuple[int, ...]
    output_shape: tuple[int, int, int, int]
    channels_last: bool


def quadconv_launch(x: torch.Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int],
                    span: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int], rank: int,
                    has_bias: bool, channels_last: bool | None = None) -> QuadconvLaunch | None:
    """Kernel name and integer arguments for input ``x`` (None: a case the kernel does not cover)."""
    if x.dtype not in _DTYPE_SUFFIX or x.dim() != 4 or rank > MAX_RANK or max(span) > MAX_SPAN:
        return None
    if channels_last is None:
        channels_last = is_channels_last(x)
    n, c, h, w = x.shape
    left, _, top, _ = pads
    ho, wo = output_size((h, w), span, stride, pads)
    total = n * c * ho * wo
    grid = max(1, min((total + BLOCK - 1) // BLOCK, 65535 * 8))
    ints = (n, c, h, w, ho, wo, *kernel_size, *dilation, *span, *stride, top, left, rank, int(has_bias))
    name = f"quadconv_fwd_{_DTYPE_SUFFIX[x.dtype]}_{'nhwc' if channels_last else 'nchw'}"
    return QuadconvLaunch(name, grid, BLOCK, ints, (n, c, ho, wo), channels_last)


def quadconv_arguments(layer: Any, x: torch.Tensor, channels_last: bool | None = None) -> QuadconvLaunch | None:
    """:func:`quadconv_launch` for a :class:`QuadraConvDW` on input ``x``."""
    return quadconv_launch(x, tuple(layer.kernel_size), tuple(layer.dilation), tuple(layer.span),
                           tuple(layer.stride), tuple(layer.pads(x)), layer.rank, layer.P.conv3.bias is not None,
                           channels_last)


def output_tensor(launch: QuadconvLaunch, like: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if launch.channels_last else torch.contiguous_format
    return torch.empty(launch.output_shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def layer_weights(layer: Any, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """(conv3 weight, bias or None, conv1 weight, conv2 weight) in ``dtype`` on ``device``, contiguous, cached on
    the layer until a weight changes (tracked by the tensors' version counters)."""
    params = [layer.P.conv3.weight, layer.P.conv3.bias, layer.P.conv1.weight, layer.P.conv2.weight]
    stamp = tuple((p.data_ptr(), p._version) if p is not None else None for p in params)
    cache: dict[Any, Any] = layer.__dict__.setdefault("_kernel_weights", {})
    key = (dtype, str(device))
    if key not in cache or cache[key][0] != stamp:
        cache[key] = (stamp, tuple(p.detach().to(device=device, dtype=dtype).contiguous() if p is not None
                                   else None for p in params))
    return cache[key][1]


def fused_quadratic(x: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
                    stride: tuple[int, ...], pads: tuple[int, ...], dilation: tuple[int, ...], rank: int,
                    reference: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """The fused quadratic depthwise forward on the GPU; None when the torch route must run instead. Weights
    must already have ``x``'s dtype (:func:`layer_weights` keeps such copies)."""
    import numpy as np

    if any(t.dtype != x.dtype for t in (w3, w1, w2) + ((b3,) if b3 is not None else ())):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w3, b3, w1, w2)):
        return None  # forward-only kernel: autograd goes through the torch route
    kernel_size, span = tuple(w3.shape[-2:]), tuple(w1.shape[-2:])
    launch = quadconv_launch(x, kernel_size, dilation, span, stride, pads, rank, b3 is not None)  # type: ignore[arg-type]
    if launch is None or not _enabled(launch.kernel, x.device):
        return None
    x = x.contiguous(memory_format=torch.channels_last if launch.channels_last else torch.contiguous_format)
    weights = tuple(t.contiguous() for t in (w3, b3 if b3 is not None else w3, w1, w2))
    y = output_tensor(launch, x)

    def arguments(cupy: Any) -> tuple[Any, ...]:
        return (*(_flat(cupy, t) for t in (x, *weights)), _flat(cupy, y), *(np.int32(v) for v in launch.ints))

    if not _launch("quadratic_dwconv.cu", launch.kernel, launch.grid, x.device, arguments):
        return None
    return _checked(launch.kernel, x.device, y, reference, SELF_CHECK_TOLERANCE[x.dtype])


# ------------------------------------------------------------------------------------------ quantize + pack
def _pack_input(x: torch.Tensor) -> torch.Tensor | None:
    return x.detach().contiguous().view(-1) if x.dtype in _DTYPE_SUFFIX else None


def _packed_output(flat: torch.Tensor, bits: int) -> torch.Tensor:
    from surgeon.ops.bitpack import packed_numel

    return torch.empty(packed_numel(flat.numel(), bits), dtype=torch.uint8, device=flat.device)


def mask_pack(x: torch.Tensor, low: float, high: float, reference: Callable[[], torch.Tensor]
              ) -> torch.Tensor | None:
    """1-bit mask ``low < x < high`` of a CUDA tensor, packed in one kernel (layout of ``bitpack.pack``)."""
    import numpy as np

    flat = _pack_input(x)
    entry = f"mask_pack_{_DTYPE_SUFFIX.get(x.dtype)}"
    if flat is None or not _enabled(entry, x.device):
        return None
    out = _packed_output(flat, 1)
    if not _launch("bitpack.cu", entry, _pack_grid(out), x.device, lambda cupy: (
            _flat(cupy, flat), np.float32(low), np.float32(high), _flat(cupy, out), np.int64(flat.numel()))):
        return None
    return _checked(entry, x.device, out, reference, None)


def codebook_pack(x: torch.Tensor, cell_codes: torch.Tensor, low: float, step: float, bits: int,
                  reference: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """Derivative-interval codes of a CUDA tensor (grid ``low + k * step``, cell k -> ``cell_codes[k]``), packed
    in one kernel."""
    import numpy as np

    flat = _pack_input(x)
    entry = f"codebook_pack_{_DTYPE_SUFFIX.get(x.dtype)}"
    if flat is None or not _enabled(entry, x.device):
        return None
    out = _packed_output(flat, bits)
    cells = cell_codes.to(x.device).contiguous()  # a no-op once the caller keeps it on the device
    if not _launch("bitpack.cu", entry, _pack_grid(out), x.device, lambda cupy: (
            _flat(cupy, flat), np.float32(low), np.float32(inverse_step(step)), _flat(cupy, cells),
            np.int32(cells.numel()), _flat(cupy, out), np.int64(flat.numel()), np.int32(bits))):
        return None
    return _checked(entry, x.device, out, reference, None)


def rows_pack(rows: torch.Tensor, offset: torch.Tensor | None, step: torch.Tensor, bits: int,
              reference: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """Per-row affine codes of a CUDA matrix, packed in one kernel (offset None: rows start at 0)."""
    import numpy as np

    flat = _pack_input(rows)
    entry = f"rows_pack_{_DTYPE_SUFFIX.get(rows.dtype)}"
    if flat is None or not _enabled(entry, rows.device):
        return None
    out = _packed_output(flat, bits)
    low = offset.detach().float().contiguous() if offset is not None else None
    scale = step.detach().float().contiguous()
    if not _launch("bitpack.cu", entry, _pack_grid(out), rows.device, lambda cupy: (
            _flat(cupy, flat), _flat(cupy, low) if low is not None else np.uint64(0), _flat(cupy, scale),
            np.int64(rows.shape[1]), _flat(cupy, out), np.int64(flat.numel()), np.int32(bits))):
        return None
    return _checked(entry, rows.device, out, reference, None)


RANGE_SEGMENT = 64  # elements per thread of a row's range pass (at most MAX_RANGE_SEGMENTS threads per row)
MAX_RANGE_SEGMENTS = 1024


def rows_range(rows: torch.Tensor, bits: int, nonnegative: bool,
               reference: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row finite ``(low, step)`` of a CUDA matrix in two kernels: partial ends of row segments (neighbouring
    threads read neighbouring elements), then one thread per row. Nothing is read back to the host."""
    import numpy as np

    from surgeon.ops.row_range import inverse_levels

    flat = _pack_input(rows)
    entry = f"rows_range_partial_{_DTYPE_SUFFIX.get(rows.dtype)}"
    if flat is None or not (_enabled(entry, rows.device) and _enabled("rows_range_finish", rows.device)):
        return None
    count, width = rows.shape
    segments = max(1, min(MAX_RANGE_SEGMENTS, (width + RANGE_SEGMENT - 1) // RANGE_SEGMENT))
    partial = torch.empty(count * segments * 2, dtype=torch.float32, device=rows.device)
    low = torch.empty(count, 1, dtype=torch.float32, device=rows.device)
    step = torch.empty(count, 1, dtype=torch.float32, device=rows.device)
    if not _launch("bitpack.cu", entry, _grid(count * segments), rows.device, lambda cupy: (
            _flat(cupy, flat), np.int64(count), np.int64(width), np.int32(segments), _flat(cupy, partial))):
        return None
    if not _launch("bitpack.cu", "rows_range_finish", _grid(count), rows.device, lambda cupy: (
            _flat(cupy, partial), np.int64(count), np.int32(segments), np.float32(inverse_levels(bits)),
            np.int32(nonnegative), _flat(cupy, low), _flat(cupy, step))):
        return None
    both = torch.cat((low, step), dim=1)
    if _checked(entry, rows.device, both, lambda: torch.cat(reference(), dim=1), None) is not both:
        return None  # disagreed on its first use: the torch route from now on
    return low, step


ROWS_BLOCK = _source_constant("SURGEON_ROWS_BLOCK", "common.cuh")  # a block-per-row kernel's largest block
MAX_GRID = 1 << 20  # blocks of a block-per-row launch (each block loops over its further rows)
ROWS_GROUP = _source_constant("SURGEON_ROWS_GROUP", "bitpack.cu")  # the most rows one rows_quantize block packs


def rows_group(width: int, bits: int) -> int:
    """The fewest consecutive rows whose codes end on a byte: rows_quantize packs them in one block, so no byte
    holds codes of two blocks (1 where a row fills whole bytes; 2, 4 or 8 for rows that share bytes)."""
    return 8 // math.gcd(width * bits, 8)


def rows_block(width: int) -> int:
    """Threads per row of a block-per-row kernel (rows_quantize, layer_norm_backward): a power of two from a warp
    to ROWS_BLOCK, about four elements each."""
    threads = 32
    while threads < ROWS_BLOCK and threads * 4 < width:
        threads *= 2
    return threads


def rows_quantize(rows: torch.Tensor, bits: int, nonnegative: bool, shift: torch.Tensor | None,
                  reference: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...] | None:
    """``(packed, offset, step)`` of a CUDA matrix in one kernel, a block per :func:`rows_group` rows: finite
    range, then codes. ``offset`` is ``low - shift`` where a shift is given, empty for ``nonnegative`` rows.
    Nothing is read back to the host."""
    import numpy as np

    from surgeon.ops.row_range import inverse_levels

    flat = _pack_input(rows)
    entry = f"rows_quantize_{_DTYPE_SUFFIX.get(rows.dtype)}"
    count, width = rows.shape
    group = rows_group(width, bits)
    if flat is None or group > ROWS_GROUP or not _enabled(entry, rows.device):
        return None
    packed = _packed_output(flat, bits)
    offset = torch.empty((0,) if nonnegative else (count, 1), dtype=torch.float32, device=rows.device)
    step = torch.empty(count, 1, dtype=torch.float32, device=rows.device)
    centre = shift.detach().float().contiguous() if shift is not None and not nonnegative else None
    if not _launch("bitpack.cu", entry, max(1, min(-(-count // group), MAX_GRID)), rows.device, lambda cupy: (
            _flat(cupy, flat), np.int64(count), np.int64(width), np.int32(bits), np.int32(group),
            np.float32(inverse_levels(bits)),
            np.int32(nonnegative), _flat(cupy, centre) if centre is not None else np.uint64(0),
            _flat(cupy, offset) if not nonnegative else np.uint64(0), _flat(cupy, step), _flat(cupy, packed)),
            block=rows_block(width)):
        return None
    got = (packed, offset, step)

    def joined(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat([t.reshape(-1).float() for t in tensors])  # codes are exact in fp32

    if _checked(entry, rows.device, joined(got), lambda: joined(reference()), None) is not None and \
            _enabled(entry, rows.device):
        return got
    return None  # disagreed on its first use: the torch route from now on


def rows_unpack(packed: torch.Tensor, offset: torch.Tensor | None, step: torch.Tensor, rows: int, width: int,
                bits: int, dtype: torch.dtype, reference: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """``code * step + offset`` per row, written in ``dtype`` by one kernel."""
    import numpy as np

    entry = f"rows_unpack_{_DTYPE_SUFFIX.get(dtype)}"
    if dtype not in _DTYPE_SUFFIX or packed.dtype != torch.uint8 or not _enabled(entry, packed.device):
        return None
    out = torch.empty(rows, width, dtype=dtype, device=packed.device)
    source = packed.detach().contiguous()
    low = offset.detach().float().contiguous() if offset is not None else None
    scale = step.detach().float().contiguous()
    if not _launch("bitpack.cu", entry, _grid(out.numel()), packed.device, lambda cupy: (
            _flat(cupy, source), _flat(cupy, low) if low is not None else np.uint64(0), _flat(cupy, scale),
            np.int64(width), _flat(cupy, out), np.int64(out.numel()), np.int32(bits))):
        return None
    return _checked(entry, packed.device, out, reference, None)


def layer_norm_backward(grad: torch.Tensor, packed: torch.Tensor, offset: torch.Tensor, step: torch.Tensor,
                        rstd: torch.Tensor, weight: torch.Tensor | None, bits: int, dtype: torch.dtype,
                        reference: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """A layer norm's input gradient (``[rows, width]`` of ``dtype``) from the codes of its centred input rows
    (``offset``, ``step``, ``rstd``: ``[rows, 1]``), in one kernel, a block per row."""
    import numpy as np

    if grad.dtype not in _DTYPE_SUFFIX or dtype not in _DTYPE_SUFFIX or grad.dim() != 2 or \
            packed.dtype != torch.uint8:
        return None
    entry = f"layer_norm_backward_{_DTYPE_SUFFIX[grad.dtype]}_to_{_DTYPE_SUFFIX[dtype]}"
    if not _enabled(entry, grad.device):
        return None
    rows, width = grad.shape
    source = grad.detach().contiguous()
    out = torch.empty((rows, width), dtype=dtype, device=grad.device)
    per_row = tuple(t.detach().float().contiguous() for t in (offset, step, rstd))
    scale = weight.detach().float().contiguous() if weight is not None else None
    codes = packed.detach().contiguous()
    if not _launch("layer_norm.cu", entry, max(1, min(rows, MAX_GRID)), grad.device, lambda cupy: (
            _flat(cupy, source), _flat(cupy, codes), *(_flat(cupy, t) for t in per_row),
            _flat(cupy, scale) if scale is not None else np.uint64(0), _flat(cupy, out), np.int64(rows),
            np.int64(width), np.int32(bits)), block=rows_block(width)):
        return None

    def term_scale() -> float:  # rstd * |grad * weight|: the first of the terms the gradient is the difference of
        scaled = source.float().abs() * per_row[2]
        return (scaled * scale.abs() if scale is not None else scaled).max().item() if scaled.numel() else 0.0

    return _checked(entry, grad.device, out, reference, SELF_CHECK_TOLERANCE[dtype], term_scale)


def coded_product(grad: torch.Tensor, packed: torch.Tensor, bits: int, values: tuple[float, ...],
                  order: tuple[int, ...], reference: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """``grad * values[code]`` in one kernel, over the elements in the codes' order (``order``: see
    :mod:`surgeon.ops.coded_gradient`); the result is stored in that order too."""
    import numpy as np

    from surgeon.ops.coded_gradient import empty_in_order, flat_in_order

    entry = f"coded_product_{_DTYPE_SUFFIX.get(grad.dtype)}"
    if grad.dtype not in _DTYPE_SUFFIX or packed.dtype != torch.uint8 or not _enabled(entry, grad.device):
        return None
    source = flat_in_order(grad.detach(), order).contiguous()  # a view where grad is stored in that order
    out = empty_in_order(grad, order, grad.dtype)
    target = flat_in_order(out, order)  # a view by construction
    key = (tuple(values), str(grad.device))
    if key not in REGISTRY.value_tables:  # one small host-to-device copy per code table and device
        padded = tuple(values) + (0.0,) * ((1 << bits) - len(values))
        REGISTRY.value_tables[key] = torch.tensor(padded, dtype=torch.float32, device=grad.device)
    table, codes = REGISTRY.value_tables[key], packed.detach().contiguous()
    if not _launch("bitpack.cu", entry, _grid(source.numel()), grad.device, lambda cupy: (
            _flat(cupy, source), _flat(cupy, codes), _flat(cupy, table), _flat(cupy, target),
            np.int64(source.numel()), np.int32(bits))):
        return None
    return _checked(entry, grad.device, out, reference, None)


def _grid(threads: int) -> int:
    return max(1, min((threads + BLOCK - 1) // BLOCK, 65535 * 8))


def _pack_grid(out: torch.Tensor) -> int:
    return max(1, min((out.numel() + BLOCK - 1) // BLOCK, 65535 * 8))


# ------------------------------------------------------------------------------------------ atrous quadratic conv
# outputs per thread (a template parameter of the kernel), and the fewer taken where that many outputs' branch sums
# (2 * rank per output) beside a span row's inputs need more than 64 registers (nvcc 13, sm_80 and sm_90, measured):
# above rank 2 (96 registers at rank 3 with 4 outputs), and at rank 2 in channels-last storage (72 at sm_80)
ATROUS_OUT_W = 4
ATROUS_OUT_W_NARROW = 2
ATROUS_MAX_RANK = 4
ATROUS_MAX_SPAN = 15  # every row of the span is unrolled: wider spans take the generic kernel
ATROUS_MAX_COLUMNS = 32  # input columns of one thread's span row: bits of the kernel's column mask
ATROUS_MAX_CHANNELS = 1 << 14
_STORAGE_TYPE = {torch.float32: "float", torch.float16: "surgeon_half", torch.bfloat16: "surgeon_bfloat16"}


@dataclass(frozen=True)
class AtrousGeometry:
    """What ``quadconv_atrous`` is compiled for: primary taps and dilation, each branch's taps, dilation and place
    in the primary's span (rows, cols, dilation h, dilation w, top, left), the rank and the stride."""

    kernel: tuple[int, int]
    dilation: tuple[int, int]
    branch_a: tuple[int, int, int, int, int, int]
    branch_b: tuple[int, int, int, int, int, int]
    rank: int
    stride: tuple[int, int]

    def span(self) -> tuple[int, int]:
        return conv_span(self.kernel, self.dilation)

    def out_w(self, channels_last: bool) -> int:
        """Neighbouring outputs one thread computes in this layout (the register budget is met alike for every
        storage type, so only the rank and the layout decide)."""
        narrow = self.rank > 2 or (self.rank == 2 and channels_last)
        return ATROUS_OUT_W_NARROW if narrow else ATROUS_OUT_W

    def tiles(self, output_width: int, channels_last: bool) -> int:
        """Threads along an output row."""
        out_w = self.out_w(channels_last)
        return (output_width + out_w - 1) // out_w

    def columns(self, channels_last: bool) -> int:
        """Input columns of one span row that a thread's outputs read (the kernel's ``COLS``)."""
        return (self.out_w(channels_last) - 1) * self.stride[1] + self.span()[1]

    def supported(self) -> bool:
        # a thread's span row must fit the kernel's 32-bit mask of columns inside the image, in either layout
        # (NCHW takes at least as many outputs per thread)
        return (self.rank <= ATROUS_MAX_RANK and max(self.span()) <= ATROUS_MAX_SPAN and min(self.stride) >= 1
                and self.columns(False) <= ATROUS_MAX_COLUMNS)

    def name_expression(self, dtype: torch.dtype, channels_last: bool, channels: int) -> str:
        """The template instantiation for this geometry, storage type and layout (NHWC: also the channel count)."""
        values = [_STORAGE_TYPE[dtype], "true" if channels_last else "false", str(channels if channels_last else 0),
                  *map(str, (*self.kernel, *self.dilation, *self.branch_a, *self.branch_b, self.rank, *self.stride,
                             self.out_w(channels_last)))]
        return f"quadconv_atrous<{', '.join(values)}>"


    def term_expression(self, dtype: torch.dtype, channels_last: bool, channels: int, mode: int) -> str:
        """The instantiation of ``quadratic_term`` (training's quadratic term, :data:`TERM_MODES`)."""
        return self.name_expression(dtype, channels_last, channels).replace(
            "quadconv_atrous<", "quadratic_term<", 1).removesuffix(">") + f", {mode}>"


# quadratic_term's modes: the quadratic term added to the primary's output, or one branch's factor times a gradient,
# or both branches' factors (one result of two stacked tensors)
TERM_MODES = {"add": 0, "a_times": 1, "b_times": 2, "a_and_b_times": 3}


def term_output(mode: str, given: torch.Tensor, rank: int, channels_last: bool) -> torch.Tensor:
    """An empty result of ``quadratic_term``: ``given``'s shape (mode "add"), ``C * rank`` channels (one factor),
    or two such tensors stacked on a new first dimension, each in ``given``'s memory format."""
    n, c, h, w = given.shape
    channels = c if mode == "add" else c * rank
    count = 2 if mode == "a_and_b_times" else 1
    if channels_last:
        out = given.new_empty((count, n, h, w, channels)).permute(0, 1, 4, 2, 3)
    else:
        out = given.new_empty((count, n, channels, h, w))
    return out if count == 2 else out[0]


def placement_divisors(tiles: int, rows: int, channels: int) -> tuple[Any, ...]:
    """The specialised kernels' last arguments: multiplier and shift of each divisor a thread's placement divides
    by (tiles per output row, output rows, channels), as ``uint32`` kernel arguments."""
    import numpy as np

    return tuple(np.uint32(v) for d in (tiles, rows, channels) for v in fast_divisor(d))


def atrous_applies(x: torch.Tensor, geometry: AtrousGeometry) -> bool:
    """Whether the specialised kernels take this input and geometry (device apart): a decision the same on every
    device, so the launches counted on the CPU are those a GPU makes."""
    return (x.dtype in _DTYPE_SUFFIX and x.dim() == 4 and geometry.supported() and x.numel() < 2**31
            and x.shape[1] <= ATROUS_MAX_CHANNELS)


def quadratic_term(mode: str, x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, given: torch.Tensor,
                   geometry: AtrousGeometry, pads: tuple[int, int, int, int], reference: Callable[[], torch.Tensor]
                   ) -> torch.Tensor | None:
    """A training step's quadratic term in one kernel: ``given + sum_r a_r * b_r`` (``mode`` "add", ``given`` the
    primary conv's output), or ``a_r * given`` / ``b_r * given`` ("a_times" / "b_times", ``given`` the output
    gradient, the result of ``C * rank`` channels), or both stacked ("a_and_b_times"). Branch weights in the conv
    layout (``[C*r, 1, kh, kw]``); x, given and the result share x's memory format. None: the torch route runs
    instead."""
    import numpy as np

    if not atrous_applies(x, geometry) or any(t.dtype != x.dtype for t in (wa, wb, given)):
        return None
    channels_last = is_channels_last(x)
    n, c, h, w = x.shape
    left, _, top, _ = pads
    ho, wo = output_size((h, w), geometry.span(), geometry.stride, pads)
    if ho <= 0 or wo <= 0 or tuple(given.shape) != (n, c, ho, wo):
        return None
    count = 2 if mode == "a_and_b_times" else 1
    if count * n * c * (1 if mode == "add" else geometry.rank) * ho * wo >= 2**31:
        return None  # the kernel's offsets are 32-bit
    entry = geometry.term_expression(x.dtype, channels_last, c, TERM_MODES[mode])
    if not _enabled(entry, x.device):
        return None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, given = x.contiguous(memory_format=fmt), given.contiguous(memory_format=fmt)
    wa_k, wb_k = branch_weights(wa.detach(), wb.detach(), c, geometry.rank, channels_last)
    y = term_output(mode, given, geometry.rank, channels_last)
    tiles = geometry.tiles(wo, channels_last)

    def arguments(cupy: Any) -> tuple[Any, ...]:
        return (_flat(cupy, x), _flat(cupy, wa_k), _flat(cupy, wb_k), _flat(cupy, given), _flat(cupy, y),
                *(np.int32(v) for v in (n, c, h, w, ho, wo, top, left)), *placement_divisors(tiles, ho, c))

    if not _launch("quadratic_atrous.cu", entry, _grid(n * c * ho * tiles), x.device, arguments, templated=True):
        return None
    return _checked(entry, x.device, y, reference, SELF_CHECK_TOLERANCE[x.dtype])


def atrous_weights(w3: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, rank: int, tap_major: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conv-layout weights (``[C,1,KH,KW]``, ``[C*r,1,AH,AW]``, ``[C*r,1,BH,BW]``) in the kernel's layout:
    tap-major (``[taps, C]``, ``[r, taps, C]``) for NHWC, channel-major (``[C, taps]``, ``[C, r, taps]``) for
    NCHW."""
    primary = w3.reshape(w3.shape[0], -1)
    return (primary.t().contiguous() if tap_major else primary.contiguous(),
            *branch_weights(wa, wb, w3.shape[0], rank, tap_major))


def branch_weights(wa: torch.Tensor, wb: torch.Tensor, channels: int, rank: int, tap_major: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The branch weights of :func:`atrous_weights` (``[r, taps, C]`` or ``[C, r, taps]``): for NCHW a view of
    contiguous conv-layout weights, no copy."""
    branches = [w.reshape(channels, rank, -1) for w in (wa, wb)]
    if tap_major:
        return tuple(w.permute(1, 2, 0).contiguous() for w in branches)  # type: ignore[return-value]
    return tuple(w.contiguous() for w in branches)  # type: ignore[return-value]


def conv_weights(w3: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, geometry: AtrousGeometry, channels: int,
                 tap_major: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`atrous_weights`: the conv layout the torch route convolves with."""
    kh, kw = geometry.kernel
    shapes = [(channels, 1, kh, kw), (channels * geometry.rank, 1, *geometry.branch_a[:2]),
              (channels * geometry.rank, 1, *geometry.branch_b[:2])]
    if tap_major:
        ordered = [w3.t(), wa.permute(2, 0, 1), wb.permute(2, 0, 1)]
    else:
        ordered = [w3, wa, wb]
    return tuple(w.reshape(shape) for w, shape in zip(ordered, shapes))  # type: ignore[return-value]


def float_weights(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in fp32 for a kernel that reads its weights in fp32: the tensor itself when it is fp32, else a copy
    kept until the weight changes (its version counter) or is freed, so a steady-state call converts nothing. An
    inference tensor has no version counter: it is converted at every call (a layer makes its kernel weights
    outside inference mode, so this is only a caller's own tensor)."""
    if weight.dtype == torch.float32:
        return weight
    if weight.is_inference():
        return weight.float()
    kept = REGISTRY.float_copies.get(weight)
    if kept is None or kept[0] != weight._version:
        kept = (weight._version, weight.detach().float())
        REGISTRY.float_copies[weight] = kept
    return kept[1]


def fused_atrous(x: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor | None, wa: torch.Tensor, wb: torch.Tensor,
                 geometry: AtrousGeometry, pads: tuple[int, int, int, int], reference: Callable[[], torch.Tensor]
                 ) -> torch.Tensor | None:
    """The specialised quadratic depthwise forward on the GPU (weights in :func:`atrous_weights`' layout for
    ``x``'s memory format, in ``x``'s dtype; the kernel reads them in fp32, :func:`float_weights`); None when the
    torch route must run instead."""
    import numpy as np

    if x.dtype not in _DTYPE_SUFFIX or x.dim() != 4 or not geometry.supported():
        return None
    if any(t.dtype != x.dtype for t in (w3, wa, wb) + ((b3,) if b3 is not None else ())):
        return None
    channels_last = is_channels_last(x)
    n, c, h, w = x.shape
    if channels_last and c > ATROUS_MAX_CHANNELS:
        return None
    left, _, top, _ = pads
    ho, wo = output_size((h, w), geometry.span(), geometry.stride, pads)
    if ho <= 0 or wo <= 0 or x.numel() >= 2**31 or n * c * ho * wo >= 2**31:
        return None  # the kernel's offsets are 32-bit
    entry = geometry.name_expression(x.dtype, channels_last, c)
    if not _enabled(entry, x.device):
        return None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    tiles = geometry.tiles(wo, channels_last)
    weights = tuple(float_weights(t) if t is not None else None for t in (w3, b3, wa, wb))

    def arguments(cupy: Any) -> tuple[Any, ...]:
        pointers = [_flat(cupy, t) if t is not None else np.uint64(0) for t in weights]
        return (_flat(cupy, x), *pointers, _flat(cupy, y),
                *(np.int32(v) for v in (n, c, h, w, ho, wo, top, left)), *placement_divisors(tiles, ho, c))

    if not _launch("quadratic_atrous.cu", entry, _grid(n * c * ho * tiles), x.device, arguments, templated=True):
        return None
    return _checked(entry, x.device, y, reference, SELF_CHECK_TOLERANCE[x.dtype])
