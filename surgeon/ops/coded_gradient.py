"""Backward of a coded activation without a decoded copy: ``grad_in = grad * table[code]``, chunk by chunk.

A mask or derivative-interval code stands for one derivative value, so the input gradient is the incoming gradient
times a table lookup. Decoding all codes first (unpack -> codes -> values) would materialise two or three
full-size temporaries beside the gradient; here a per-byte table maps each packed byte straight to its
``8 // bits`` values, and the tensor is walked in chunks of about a million elements, so the only full-size
allocation is the returned gradient.

Codes are packed in the *storage* order of the activation (a channels-last tensor is flattened as NHWC, no copy),
and the gradient is read and written in the same order.
"""

from __future__ import annotations

import torch

from surgeon.ops.bitpack import CHUNK_ELEMENTS

_BYTE_TABLES: dict[tuple[tuple[float, ...], int, torch.dtype, str], torch.Tensor] = {}


def storage_order(t: torch.Tensor) -> tuple[int, ...]:
    """The permutation of dims that lists ``t``'s elements in memory order: channels-last images as NHWC,
    everything else in its own dim order (copied to it if it is stored otherwise)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return (0, 2, 3, 1)
    return tuple(range(t.dim()))


def flat_in_order(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``t``'s elements as a 1-D tensor listed in the dim order ``order`` (a view when ``t`` is stored that way)."""
    return t.permute(order).reshape(-1)


def empty_in_order(like: torch.Tensor, order: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor shaped like ``like`` whose memory lists it in the dim order ``order``."""
    permuted_shape = [like.shape[d] for d in order]
    inverse = [order.index(d) for d in range(like.dim())]
    return torch.empty(permuted_shape, dtype=dtype, device=like.device).permute(inverse)


def byte_table(values: tuple[float, ...], bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 8 // bits]``: the values of the codes packed in each possible byte (lowest bits first)."""
    if torch.compiler.is_compiling():  # traced as a constant computation; no cache mutated inside a graph
        return _build_byte_table(values, bits, dtype, device)
    key = (values, bits, dtype, str(device))
    table = _BYTE_TABLES.get(key)
    if table is None:
        table = _BYTE_TABLES[key] = _build_byte_table(values, bits, dtype, device)
    return table


def _build_byte_table(values: tuple[float, ...], bits: int, dtype: torch.dtype, device: torch.device
                      ) -> torch.Tensor:
    byte = torch.arange(256, dtype=torch.int64, device=device)
    shifts = torch.arange(0, 8, bits, dtype=torch.int64, device=device)
    codes = (byte[:, None] >> shifts) & ((1 << bits) - 1)
    lookup = torch.tensor(values + (0.0,) * (2**bits - len(values)), dtype=torch.float32, device=device)
    return lookup[codes].to(dtype)


def coded_product(grad: torch.Tensor, packed: torch.Tensor, bits: int, values: tuple[float, ...],
                  order: tuple[int, ...]) -> torch.Tensor:
    """``grad * values[code]`` elementwise, codes packed at ``bits`` in dim order ``order`` of ``grad``'s shape."""
    per_byte = 8 // bits
    # fp32 factors for half gradients too: one rounding, of the product
    table = byte_table(values, bits, torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype,
                       grad.device)
    source = flat_in_order(grad, order)
    out = empty_in_order(grad, order, grad.dtype)
    target = flat_in_order(out, order)
    numel = source.numel()
    chunk = numel if torch.compiler.is_compiling() else CHUNK_ELEMENTS
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        byte_start, byte_stop = start // per_byte, (stop + per_byte - 1) // per_byte
        factors = table.index_select(0, packed[byte_start:byte_stop].int()).view(-1)[:stop - start]
        torch.mul(source[start:stop], factors, out=target[start:stop])
        del factors  # before the next chunk's are made
    return out
