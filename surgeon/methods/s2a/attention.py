"""Scaled dot-product attention whose softmax is saved at low bit-width.

Fused ``F.scaled_dot_product_attention`` hides its softmax, so there is no site to quantize. This module
provides an equivalent: without autograd it calls the fused op itself (bit-identical outputs); when a backward
will follow it computes attention explicitly and keeps ``q``, ``k``, ``v`` and the probabilities quantized
per row (plus a 1-bit dropout mask when dropout is active) - never the fp32 ``N x N`` matrix. With
``input_bits = 8`` the ``q``, ``k``, ``v`` kept for the backward are 8-bit per token and head as well. For long
sequences, where even low-bit ``N x N`` probabilities outweigh what the fused op keeps (``O(N)`` per head beside
its inputs and output), the fused op itself runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from surgeon.methods.s2a.activation import inside_replacement
from surgeon.ops import bitpack
from surgeon.ops.precision import autocast_off, cast, compute_dtype, grad_as
from surgeon.ops.row_quantizer import dequantize_rows, quantize_rows


def _additive_mask(attn_mask: torch.Tensor | None, is_causal: bool, q: torch.Tensor, k: torch.Tensor
                   ) -> torch.Tensor | None:
    length_q, length_k = q.shape[-2], k.shape[-2]
    mask = None
    if is_causal:
        keep = torch.ones(length_q, length_k, dtype=torch.bool, device=q.device).tril()
        mask = torch.zeros(length_q, length_k, dtype=q.dtype, device=q.device).masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        extra = attn_mask
        if attn_mask.dtype == torch.bool:
            extra = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, -math.inf)
        mask = extra if mask is None else mask + extra
    return mask


class _QuantizedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                dropout_p: float, scale: float, bits: int, input_bits: int) -> torch.Tensor:
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        dtype = compute_dtype(q)
        q, k, v, mask = (cast(t, dtype) for t in (q, k, v, mask))
        with autocast_off(q):
            return _QuantizedAttentionFn._forward(ctx, q, k, v, mask, dropout_p, scale, bits, input_bits)

    @staticmethod
    def _forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 dropout_p: float, scale: float, bits: int, input_bits: int) -> torch.Tensor:
        # scale both factors, as torch's math route does: q @ k.T alone can overflow fp16. Heads are permuted views
        # (of one qkv projection): the scaled factors and v are written contiguous once, so neither the matmuls
        # (bmm takes one batch stride) nor the row quantizer (whose CUDA kernel reads a matrix) copy them again
        root = math.sqrt(scale)
        q, k = (torch.mul(t, root, out=t.new_empty(t.shape)) for t in (q, k))  # q * sqrt(scale), k * sqrt(scale)
        v = v.contiguous()
        scores = q @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        if mask is not None:
            # a query that may attend to nothing gets zeros (output and gradients), as the fused op returns
            # (decided on the device: a host-side "any dead?" test would be a sync per attention call)
            probs = probs.masked_fill(torch.isneginf(mask).all(dim=-1, keepdim=True), 0.0)
        ctx.probs_shape, ctx.bits, ctx.scale, ctx.dropout_p = probs.shape, bits, scale, dropout_p
        dropped = probs
        saved_mask: tuple[torch.Tensor, ...] = ()
        if dropout_p > 0:
            keep = torch.rand_like(probs) >= dropout_p
            dropped = probs * keep / (1 - dropout_p)
            saved_mask = (bitpack.pack(keep, 1),)
        out = dropped @ v
        quantized = quantize_rows(probs, bits, nonnegative=True)
        ctx.rows, ctx.width = quantized.rows, quantized.width
        ctx.input_bits, ctx.input_shapes, ctx.input_dtype = input_bits, (q.shape, k.shape, v.shape), q.dtype
        if input_bits < 32:  # scaled q, k and v kept per row (one token of one head) at input_bits
            kept = [t for x in (q, k, v) for t in quantize_rows(x.detach(), input_bits).tensors()]
        else:
            kept = [q, k, v]
        ctx.save_for_backward(*kept, *quantized.tensors(), *saved_mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with autocast_off(grad):
            grads = _QuantizedAttentionFn._backward(ctx, grad.to(ctx.input_dtype))
        return (*(grad_as(g, dtype) for g, dtype in zip(grads, ctx.dtypes)), None, None, None, None, None)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        saved = ctx.saved_tensors
        if ctx.input_bits < 32:
            q, k, v = (dequantize_rows(*saved[3 * i:3 * i + 3], shape[:-1].numel(), shape[-1], ctx.input_bits,
                                       ctx.input_dtype).view(shape) for i, shape in enumerate(ctx.input_shapes))
            saved = saved[9:]
        else:
            q, k, v = saved[:3]
            saved = saved[3:]
        packed, offset, step, *rest = saved
        probs = dequantize_rows(packed, offset, step, ctx.rows, ctx.width, ctx.bits, grad.dtype)
        probs = probs.view(ctx.probs_shape)
        dropped = probs
        if ctx.dropout_p > 0:
            keep = bitpack.unpack(rest[0], 1, probs.numel()).view(ctx.probs_shape).to(grad.dtype)
            keep = keep / (1 - ctx.dropout_p)
            dropped = probs * keep
        grad = grad.contiguous()  # read by two matmuls: one copy of a permuted gradient, not one per matmul
        grad_v = dropped.transpose(-2, -1) @ grad
        del dropped
        grad_probs = grad @ v.transpose(-2, -1)
        if ctx.dropout_p > 0:
            grad_probs.mul_(keep)
            del keep
        # softmax backward in the N x N buffer it starts from: the row dot product as a batched matmul (no
        # product matrix), then subtract, multiply and scale in place; two N x N tensors alive, not five
        row_dot = (grad_probs.unsqueeze(-2) @ probs.unsqueeze(-1)).squeeze(-1)
        # q and k were kept times sqrt(scale): d(scores)/dq = sqrt(scale) * k_kept, likewise for k
        grad_scores = grad_probs.sub_(row_dot).mul_(probs).mul_(math.sqrt(ctx.scale))
        del probs
        grad_q = grad_scores @ k
        grad_k = grad_scores.transpose(-2, -1) @ q
        return grad_q, grad_k, grad_v


def _quantized_keeps_more(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int, input_bits: int) -> bool:
    """Whether the explicit route would keep more bytes for backward than fused attention does."""
    rows = q.shape[:-1].numel()
    element = q.element_size()
    row_scales = 8  # fp32 offset and step per quantized row
    probabilities = rows * k.shape[-2] * bits / 8 + rows * row_scales
    operands = sum(t.numel() * (input_bits / 8 if input_bits < 32 else element)
                   + (t.shape[:-1].numel() * row_scales if input_bits < 32 else 0) for t in (q, k, v))
    fused = sum(t.numel() for t in (q, k, v)) * element + q.shape[:-1].numel() * v.shape[-1] * element + rows * 4
    return probabilities + operands > fused


def quantized_scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
    *, bits: int = 4, input_bits: int = 32,
) -> torch.Tensor:
    """Same signature and result as ``F.scaled_dot_product_attention``; low-bit probabilities for backward."""
    with inside_replacement():
        return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, bits, input_bits)


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **options: Any) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; where a fused CPU kernel refuses the machine (torch's bf16 flash
    attention needs AVX-512 instructions that ``ATEN_CPU_CAPABILITY=default`` or an older CPU lacks), the same
    call on the math backend, which every CPU runs."""
    try:
        return F.scaled_dot_product_attention(query, key, value, **options)
    except RuntimeError:
        if query.device.type != "cpu":
            raise
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # a real error (shapes, dtypes) is raised again from here
            return F.scaled_dot_product_attention(query, key, value, **options)


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
               dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool, bits: int,
               input_bits: int) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    grouped = enable_gqa and query.shape[-3] != key.shape[-3]
    # the fused op also runs for long sequences, where N x N probabilities, even at low bits, outweigh what it
    # keeps (q, k, v, its output and one log-sum-exp per row, recomputing the probabilities in backward)
    if (not needs_grad or grouped or (attn_mask is not None and attn_mask.requires_grad)
            or _quantized_keeps_more(query, key, value, bits, input_bits)):
        return fused_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                               scale=scale, enable_gqa=enable_gqa)
    scale_value = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    mask = _additive_mask(attn_mask, is_causal, query, key)
    return _QuantizedAttentionFn.apply(query, key, value, mask, float(dropout_p), scale_value, bits, input_bits)


torch.fx.wrap("quantized_scaled_dot_product_attention")
