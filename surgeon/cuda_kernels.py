"""Loader for the CUDA kernels in ``kernels/``: compiled at run time by NVRTC through CuPy's ``RawModule``.

Used automatically by merged models when a tensor is on a CUDA device and CuPy is installed; otherwise the
torch route runs (and is the reference). The launch arguments are computed by :func:`quadconv_arguments`,
which the CPU numerics tests share, so what is tested is what a GPU launch passes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import torch

from surgeon.layers.row_quantizer import is_channels_last
from surgeon.resources import data_dir

KERNEL_FILES = ("quadratic_dwconv.cu", "bitpack.cu")
MAX_RANK = 8
MAX_SPAN = 31
BLOCK = 256
_DTYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def kernel_source(name: str) -> str:
    """A kernel file with ``common.cuh`` inlined (NVRTC then needs no include path for it)."""
    folder = data_dir("kernels")
    text = folder.joinpath(name).read_text(encoding="utf-8")
    common = folder.joinpath("common.cuh").read_text(encoding="utf-8").replace("#pragma once", "")
    return re.sub(r'#include "common\.cuh"', lambda _: common, text)


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
    """Whether work on ``tensor`` should go to the kernels: it is on a CUDA device and they can run."""
    return tensor.is_cuda and available()


@cache
def _module(name: str) -> Any:
    import cupy

    return cupy.RawModule(code=kernel_source(name), options=nvrtc_options())


@dataclass(frozen=True)
class QuadconvLaunch:
    kernel: str
    grid: int
    block: int
    ints: tuple[int, ...]
    output_shape: tuple[int, int, int, int]
    channels_last: bool


def quadconv_arguments(layer: Any, x: torch.Tensor, channels_last: bool | None = None) -> QuadconvLaunch | None:
    """Kernel name and integer arguments for a :class:`QuadraConvDW` on input ``x`` (None: unsupported)."""
    if x.dtype not in _DTYPE_SUFFIX or layer.rank > MAX_RANK or max(layer.span) > MAX_SPAN:
        return None
    if channels_last is None:
        channels_last = is_channels_last(x)
    n, c, h, w = x.shape
    left, right, top, bottom = layer.pads(x)
    sh, sw = layer.span
    ho = (h + top + bottom - sh) // layer.stride[0] + 1
    wo = (w + left + right - sw) // layer.stride[1] + 1
    total = n * c * ho * wo
    grid = max(1, min((total + BLOCK - 1) // BLOCK, 65535 * 8))
    kh, kw = layer.kernel_size
    dh, dw = layer.dilation
    ints = (n, c, h, w, ho, wo, kh, kw, dh, dw, sh, sw, layer.stride[0], layer.stride[1], top, left, layer.rank,
            int(layer.P.conv3.bias is not None))
    name = f"quadconv_fwd_{_DTYPE_SUFFIX[x.dtype]}_{'nhwc' if channels_last else 'nchw'}"
    return QuadconvLaunch(name, grid, BLOCK, ints, (n, c, ho, wo), channels_last)


def output_tensor(launch: QuadconvLaunch, like: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if launch.channels_last else torch.contiguous_format
    return torch.empty(launch.output_shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def quadratic_dwconv(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """Fused forward on the GPU; falls back to the torch route for unsupported shapes."""
    import cupy
    import numpy as np

    launch = quadconv_arguments(layer, x)
    if launch is None:
        return layer.forward_dense(x)
    fmt = torch.channels_last if launch.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    weights = [t.detach().to(x.dtype).contiguous() for t in (layer.P.conv3.weight, layer.P.conv1.weight,
                                                             layer.P.conv2.weight)]
    bias = layer.P.conv3.bias
    bias = bias.detach().to(x.dtype).contiguous() if bias is not None else weights[0]
    y = output_tensor(launch, x)
    # a channels-last tensor's storage is NHWC; hand CuPy flat views of the raw storage
    flat = [cupy.from_dlpack(t.view(-1) if t.is_contiguous() else t.permute(0, 2, 3, 1).reshape(-1))
            for t in (x, weights[0], bias, weights[1], weights[2])]
    out = cupy.from_dlpack(y.view(-1) if y.is_contiguous() else y.permute(0, 2, 3, 1).view(-1))
    function = _module("quadratic_dwconv.cu").get_function(launch.kernel)
    with cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream):
        function((launch.grid,), (launch.block,), (*flat, out, *(np.int32(v) for v in launch.ints)))
    return y


# ------------------------------------------------------------------------------------------ quantize + pack
def mask_pack(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """1-bit mask ``low < x < high`` of a CUDA tensor, packed in one kernel (layout of ``bitpack.pack``)."""
    import numpy as np

    from surgeon.layers.bitpack import packed_numel

    flat = x.detach().contiguous().view(-1)
    out = torch.empty(packed_numel(flat.numel(), 1), dtype=torch.uint8, device=x.device)
    _run_pack("mask_pack", flat, out, np.float32(low), np.float32(high), np.int64(flat.numel()))
    return out


def codebook_pack(x: torch.Tensor, book: Any, bits: int) -> torch.Tensor:
    """Derivative-interval codes of a CUDA tensor, packed in one kernel."""
    import numpy as np

    from surgeon.layers.bitpack import packed_numel

    flat = x.detach().contiguous().view(-1)
    out = torch.empty(packed_numel(flat.numel(), bits), dtype=torch.uint8, device=x.device)
    cells = book.cell_codes.to(x.device)
    _run_pack("codebook_pack", flat, out, np.float32(book.low), np.float32(book.step), cells,
              np.int32(cells.numel()), np.int64(flat.numel()), np.int32(bits), out_position=5)
    return out


def rows_pack(rows: torch.Tensor, offset: torch.Tensor | None, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row affine codes of a CUDA matrix, packed in one kernel (offset None: rows start at 0)."""
    import numpy as np

    from surgeon.layers.bitpack import packed_numel

    flat = rows.detach().contiguous().view(-1)
    out = torch.empty(packed_numel(flat.numel(), bits), dtype=torch.uint8, device=rows.device)
    _run_pack("rows_pack", flat, out, offset.contiguous() if offset is not None else np.uint64(0), step.contiguous(),
              np.int64(rows.shape[1]), np.int64(flat.numel()), np.int32(bits), out_position=4)
    return out


def _run_pack(name: str, flat: torch.Tensor, out: torch.Tensor, *arguments: Any, out_position: int = 3) -> None:
    """Launch ``name_<dtype>(x, *arguments with out inserted at out_position)``."""
    import cupy

    converted: list[Any] = [cupy.from_dlpack(flat)]
    for value in arguments:
        converted.append(cupy.from_dlpack(value) if isinstance(value, torch.Tensor) else value)
    converted.insert(out_position, cupy.from_dlpack(out))
    grid = max(1, min((out.numel() + BLOCK - 1) // BLOCK, 65535 * 8))
    function = _module("bitpack.cu").get_function(f"{name}_{_DTYPE_SUFFIX[flat.dtype]}")
    with cupy.cuda.ExternalStream(torch.cuda.current_stream(flat.device).cuda_stream):
        function((grid,), (BLOCK,), tuple(converted))
