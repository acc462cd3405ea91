"""Per-row quantization ranges over finite values only, decided on the device.

A row's range is the min and max of its finite values (0 and 0 for a row without any), so an inf or NaN never
spoils its row; the step is ``max((max - min) * (1 / levels), FLT_MIN)``. No branch reads a value on the host:
a training step that quantizes dozens of tensors would otherwise stall on a device sync for each.
This module is the torch route of ``surgeon::rows_range``; ``kernels/bitpack.cu`` computes the same floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from surgeon.ops import bitpack

SMALLEST_STEP = torch.finfo(torch.float32).tiny


def inverse_levels(bits: int) -> float:
    """``1 / (2**bits - 1)`` rounded to fp32 once: the factor both routes multiply by."""
    return float(np.float32(1.0 / (2**bits - 1)))


def step_of(low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 ``(high - low) * inverse_levels(bits)``, at least the smallest normal float (inf beyond fp32)."""
    return (high - low).mul_(inverse_levels(bits)).clamp_min_(SMALLEST_STEP)


def _finite_ends(values: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Max (and, unless ``nonnegative``, min) of each row's finite values: ±inf for a row with none."""
    # every non-finite value maps to the end that cannot win (nan_to_num's defaults would map -inf to the lowest
    # finite value, so each replacement is spelt out)
    high = torch.nan_to_num(values, nan=-math.inf, posinf=-math.inf, neginf=-math.inf).amax(-1, keepdim=True)
    if nonnegative:
        return high, None
    return high, torch.nan_to_num(values, nan=math.inf, posinf=math.inf, neginf=math.inf).amin(-1, keepdim=True)


def finite_row_range(rows: torch.Tensor, bits: int, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, step)``, each ``[rows, 1]`` fp32, for the rows along the last dim of ``rows`` (any leading dims,
    any strides). ``nonnegative`` rows start at 0. The finite-only copies are made a chunk of the first dim at a
    time, so the extra memory stays at a chunk whatever the tensor's size."""
    count = rows.numel() // max(rows.shape[-1], 1)
    first_dim = rows.shape[0] if rows.dim() > 1 else 1
    per_index = rows.numel() // max(first_dim, 1)
    per_chunk = max(1, bitpack.CHUNK_ELEMENTS // max(per_index, 1))
    if rows.dim() < 2 or torch.compiler.is_compiling() or per_chunk >= first_dim:
        high, low = _finite_ends(rows, nonnegative)
    else:
        ends = [_finite_ends(rows[first:first + per_chunk], nonnegative) for first in range(0, first_dim, per_chunk)]
        high = torch.cat([h for h, _ in ends])
        low = None if nonnegative else torch.cat([lo for _, lo in ends])  # type: ignore[misc]
    high = high.float().reshape(count, 1)
    empty = high == -math.inf  # no finite value in the row (then low is +inf)
    high = high.masked_fill(empty, 0.0)
    low = high.new_zeros(count, 1) if low is None else low.float().reshape(count, 1).masked_fill(empty, 0.0)
    return low, step_of(low, high, bits)
