"""Conv padding arithmetic in ``F.pad`` order (left, right, top, bottom): static, timm's dynamic "same", and the
pads that centre a smaller dilated kernel inside a larger one's window."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.padding import get_same_padding

Pair = tuple[int, int]
Pads = tuple[int, int, int, int]  # F.pad order: left, right, top, bottom


def same_pads(size: Pair, kernel: Pair, stride: Pair, dilation: Pair) -> Pads:
    """timm's dynamic TF-"same" padding for an input of ``size`` (as ``timm.layers.padding.pad_same`` splits it)."""
    (top, bottom), (left, right) = [
        (total // 2, total - total // 2)
        for total in (get_same_padding(length, k, s, d) for length, k, s, d in zip(size, kernel, stride, dilation))]
    return left, right, top, bottom


def static_pads(padding: Any, kernel: Pair, dilation: Pair) -> Pads:
    """Explicit pads of a conv's ``padding`` argument (ints, pairs, ``'same'`` or ``'valid'``)."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        (top, bottom), (left, right) = [(t // 2, t - t // 2) for t in totals]
        return left, right, top, bottom
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return pw, pw, ph, ph


def branch_pads(primary: Pads, primary_span: Pair, branch_span: Pair) -> Pads:
    """Pads that put a smaller-span branch's window at the centre of the primary window."""
    left, right, top, bottom = primary
    (sh, sw), (bh, bw) = primary_span, branch_span
    off_h, off_w = (sh - bh) // 2, (sw - bw) // 2
    return left - off_w, right - (sw - bw - off_w), top - off_h, bottom - (sh - bh - off_h)


def split_pads(pads: Pads) -> tuple[Pads | None, Pair]:
    """Symmetric non-negative pads go into the conv call; anything else is applied (or cropped) by F.pad."""
    left, right, top, bottom = pads
    if left == right and top == bottom and left >= 0 and top >= 0:
        return None, (top, left)
    return pads, (0, 0)


def pad_or_crop(t: torch.Tensor, pads: Pads) -> tuple[torch.Tensor, Pair]:
    """``F.pad(t, pads)`` and the origin (row, column) of the result in ``t``'s coordinates; pads that only crop
    give a view (no copy, no kernel)."""
    left, right, top, bottom = pads
    if max(pads) <= 0:
        height, width = t.shape[-2:]
        return t[..., -top:height + bottom, -left:width + right], (-top, -left)
    return F.pad(t, pads), (-top, -left)
