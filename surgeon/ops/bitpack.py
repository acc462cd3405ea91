"""Bit-packing of low-bit integer codes into uint8 storage.

Saved-for-backward tensors are only smaller than fp32 if the codes really occupy ``bits`` bits each: a
uint8 tensor holding a 1-bit mask is still 8 bits per element. ``pack`` puts ``8 // bits`` codes in a byte.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch

SUPPORTED_BITS = (1, 2, 4, 8)
CHUNK_ELEMENTS = 1 << 20  # a multiple of 8: chunk boundaries fall on byte boundaries at every width
_LITTLE_ENDIAN = sys.byteorder == "little"


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes that ``numel`` codes of ``bits`` bits occupy once packed."""
    _check_bits(bits)
    per_byte = 8 // bits
    return (numel + per_byte - 1) // per_byte


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape, any integer/bool dtype) into a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone() if flat.data_ptr() == codes.data_ptr() else flat
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if _LITTLE_ENDIAN and bits == 1:
        # eight 0/1 bytes read as one integer; one multiply gathers bit 0 of each byte into the top byte
        words = flat.view(-1, 8).view(torch.int64).view(-1)
        return ((words * 0x0102040810204080) >> 56).to(torch.uint8)
    if _LITTLE_ENDIAN and bits == 4:
        pairs = flat.view(-1, 2).view(torch.int16).view(-1)  # c0 + 256 * c1
        return (pairs | (pairs >> 4)).to(torch.uint8)  # low byte: c0 | c1 << 4
    groups = flat.view(-1, per_byte)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    return (groups << shifts).sum(dim=1, dtype=torch.uint8)


def pack_by_chunks(values: torch.Tensor, bits: int, to_codes: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``pack(to_codes(values.reshape(-1)), bits)`` computed a chunk at a time into one buffer, so the codes and
    whatever ``to_codes`` allocates exist for one chunk, not for the whole tensor."""
    flat = values.reshape(-1)
    numel = flat.numel()
    if torch.compiler.is_compiling() or numel <= CHUNK_ELEMENTS:
        return pack(to_codes(flat), bits)
    per_byte = 8 // bits
    out = flat.new_empty(packed_numel(numel, bits), dtype=torch.uint8)
    for start in range(0, numel, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, numel)
        out[start // per_byte:(stop + per_byte - 1) // per_byte] = pack(to_codes(flat[start:stop]), bits)
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat uint8 tensor."""
    _check_bits(bits)
    if bits == 8:
        return packed[:numel]
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(1) >> shifts) & mask
    return codes.reshape(-1)[:numel]


def codes_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """A float tensor of whole numbers in ``[0, 255]`` as uint8. On the CPU through numpy's cast: torch's
    float-to-uint8 conversion is not vectorised there and was the slowest step of row quantization (about 8x
    numpy's time); the values are exact either way. The result is allocated by torch, so memory measurements that
    follow torch's allocator see it."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64) and values.is_contiguous():
        out = torch.empty(values.shape, dtype=torch.uint8)
        np.copyto(out.numpy(), values.detach().numpy(), casting="unsafe")
        return out
    return values.to(torch.uint8)


def pack_interval_mask(values: torch.Tensor, low: float, high: float) -> torch.Tensor | None:
    """1-bit ``low < v < high`` (``high = inf``: no upper bound; NaN -> 0) of a 1-D fp32/fp64 CPU tensor, through
    numpy's comparisons and ``packbits`` a chunk at a time: on the CPU this takes about half the time of torch's
    comparisons into bool tensors plus the multiply-and-shift packing. None for other tensors (the caller packs
    with torch). Output and scratch are torch tensors, so memory measurements see them."""
    if values.device.type != "cpu" or values.dtype not in (torch.float32, torch.float64) or values.dim() != 1:
        return None
    source = values.detach().contiguous().numpy()
    out = torch.empty(packed_numel(source.size, 1), dtype=torch.uint8)
    scratch = torch.empty(2, min(source.size, CHUNK_ELEMENTS), dtype=torch.bool).numpy()
    packed = out.numpy()
    for start in range(0, source.size, CHUNK_ELEMENTS):  # CHUNK_ELEMENTS is a multiple of 8: chunks end on bytes
        chunk = source[start:start + CHUNK_ELEMENTS]
        inside, below = scratch[0, :chunk.size], scratch[1, :chunk.size]
        with np.errstate(invalid="ignore"):
            np.greater(chunk, low, out=inside)
            if high != float("inf"):
                np.logical_and(inside, np.less(chunk, high, out=below), out=inside)
        packed[start // 8:start // 8 + packed_numel(chunk.size, 1)] = np.packbits(inside, bitorder="little")
    return out
