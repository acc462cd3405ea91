"""Bit-packing of low-bit integer codes into uint8 storage.

Saved-for-backward tensors are only smaller than fp32 if the codes really occupy ``bits`` bits each: a
uint8 tensor holding a 1-bit mask is still 8 bits per element. ``pack`` puts ``8 // bits`` codes in a byte.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 4, 8)


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
    groups = flat.view(-1, per_byte)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    return (groups << shifts).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat uint8 tensor."""
    _check_bits(bits)
    if bits == 8:
        return packed[:numel]
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(1) >> shifts) & mask
    return codes.reshape(-1)[:numel]
