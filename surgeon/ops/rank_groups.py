"""A low-rank quadratic layer's branch channels: ``C * rank`` of them, channel ``c * rank + r`` being rank ``r`` of
channel ``c``. Summing a product over the rank, or repeating a ``C``-channel tensor over it, is the same reshape
everywhere (training layer, merged layer, the kernels' torch routes)."""

from __future__ import annotations

import torch


def sum_over_rank(product: torch.Tensor, rank: int) -> torch.Tensor:
    """``[N, C*rank, H, W]`` -> ``[N, C, H, W]``: each channel's sum over its ranks."""
    if rank == 1:
        return product
    n, channels, h, w = product.shape
    return product.view(n, channels // rank, rank, h, w).sum(dim=2)


def repeat_over_rank(t: torch.Tensor, rank: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C*rank, H, W]``: each channel repeated for each of its ranks."""
    if rank == 1:
        return t
    n, channels, h, w = t.shape
    return t.unsqueeze(2).expand(n, channels, rank, h, w).reshape(n, channels * rank, h, w)


def add_products_(primary: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int) -> torch.Tensor:
    """``primary += sum_r a_r * b_r``, in place (one fused multiply-add at rank 1)."""
    if rank == 1:
        return primary.addcmul_(a, b)
    return primary.add_(sum_over_rank(a * b, rank))
