"""Rows along the last dim of a tensor in any strides: the same codes as the rows of its contiguous copy, without
making that copy."""

from __future__ import annotations

import math

import pytest
import torch

from surgeon.ops import bitpack
from surgeon.ops.row_quantizer import dequantize_rows, quantize_rows
from surgeon.train.memory import peak_memory


def _attention_operand(batch: int = 4, tokens: int = 50, heads: int = 3, dim: int = 16) -> torch.Tensor:
    """``q`` as attention code makes it: a permuted slice of one qkv projection (not viewable as a matrix)."""
    qkv = torch.randn(batch, tokens, 3, heads, dim) * 3
    return qkv.permute(2, 0, 3, 1, 4)[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("chunk", [bitpack.CHUNK_ELEMENTS, 200])  # one chunk; chunks of whole first-dim slices
def test_strided_rows_match_the_contiguous_matrix(seeded, monkeypatch, bits, chunk):
    monkeypatch.setattr(bitpack, "CHUNK_ELEMENTS", chunk)
    q = _attention_operand()
    q[1, 2, 7, 3] = math.inf
    q[0, 0, 5, 1] = math.nan
    assert not q.is_contiguous()
    got = quantize_rows(q, bits)
    want = quantize_rows(q.contiguous().view(-1, q.shape[-1]), bits)
    assert (got.rows, got.width) == (want.rows, want.width) == (4 * 3 * 50, 16)
    for a, b in zip(got.tensors(), want.tensors(), strict=True):
        assert torch.equal(a, b)
    restored = dequantize_rows(*got.tensors(), got.rows, got.width, bits, torch.float32).view(q.shape)
    finite = torch.isfinite(q)
    step = got.step.view(*q.shape[:-1], 1).expand_as(q)
    assert ((restored - q).abs() <= step / 2 + 1e-6)[finite].all()


def test_nonnegative_strided_rows(seeded):
    probs = torch.softmax(torch.randn(4, 3, 40, 40), dim=-1).transpose(-2, -1).transpose(-2, -1)[:, :, ::2]
    got = quantize_rows(probs, 4, nonnegative=True)
    want = quantize_rows(probs.contiguous().view(-1, 40), 4, nonnegative=True)
    assert torch.equal(got.packed, want.packed) and torch.equal(got.step, want.step)


def test_no_copy_of_a_permuted_operand(seeded):
    q = _attention_operand(batch=32, tokens=197, heads=6, dim=64)  # ViT-S at batch 32: 2.4 M elements
    fp32_bytes = q.numel() * 4
    rise = peak_memory(lambda: quantize_rows(q, 8), [q]).rise
    # the 1-byte codes and one chunk's fp32 temporaries (a chunk is at most 4 MB), never a full fp32 copy
    assert rise < q.numel() + 2 * 4 * bitpack.CHUNK_ELEMENTS + fp32_bytes // 4
    assert rise < fp32_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_in_their_own_range_skip_nothing_that_matters(seeded, dtype):
    """Rows whose ends are their own min and max take the short route (no clamp, no NaN pass): the codes equal the
    full route's, the extreme values included."""
    from surgeon.ops.kernels import library as kernel_ops

    rows = (torch.randn(64, 300) * torch.logspace(-3, 3, 64).unsqueeze(1)).to(dtype)
    rows[3] = 7.0  # a constant row
    q = quantize_rows(rows, 8)
    full = kernel_ops.rows_pack(rows, q.offset, q.step, 8, False)
    assert torch.equal(q.packed, full)
    assert torch.equal(kernel_ops.rows_pack(rows, q.offset, q.step, 8, True), full)
    codes = q.packed.view(64, 300)
    assert (codes.amax(dim=1)[torch.arange(64) != 3] == 255).all() and (codes.amin(dim=1) == 0).all()


def test_a_range_beyond_float32_takes_the_clamped_route():
    rows = torch.tensor([[-3e38, 3e38, 0.0, 1.0]])
    q = quantize_rows(rows, 8)
    assert torch.isinf(q.step).all()
    assert torch.equal(q.packed, torch.zeros(4, dtype=torch.uint8))  # inf/inf = NaN -> code 0, as the kernel does


def test_codes_to_uint8_is_the_plain_cast():
    values = torch.arange(256, dtype=torch.float32).repeat(3)
    assert torch.equal(bitpack.codes_to_uint8(values), values.to(torch.uint8))
    assert torch.equal(bitpack.codes_to_uint8(values.double()[::2]), values[::2].to(torch.uint8))  # strided
    assert torch.equal(bitpack.codes_to_uint8(values.half()), values.to(torch.uint8))  # torch's own route


def test_numpy_routes_allocate_through_torch():
    """What the numpy routes return is torch-allocated, so peak measurements count it."""
    x = torch.randn(1 << 22)
    rise = peak_memory(lambda: bitpack.pack_interval_mask(x, 0.0, 6.0), [x]).rise
    assert rise >= x.numel() // 8  # the packed output
    codes = (x.abs() * 10).round().clamp(0, 255)
    rise = peak_memory(lambda: bitpack.codes_to_uint8(codes), [codes]).rise
    assert rise >= codes.numel()
