"""A model's output in whatever structure it returns: a tensor, a tuple or list, a dict, or a Hugging Face
``ModelOutput`` (an ordered dict whose unset fields are absent). Every comparison works on its tensor leaves, and
a classifier's logits are picked as users expect: ``.logits`` where there is one, else the first tensor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree


def tensor_leaves(output: Any) -> list[torch.Tensor]:
    """The tensors in ``output``, in order (mappings by their own order, e.g. a ``ModelOutput``'s fields)."""
    leaves: list[torch.Tensor] = []
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            leaves.append(leaf)
        elif isinstance(leaf, Mapping):  # a mapping type pytree does not know (not registered as a node)
            leaves.extend(tensor_leaves(list(leaf.values())))
        elif isinstance(leaf, (tuple, list)):
            leaves.extend(tensor_leaves(list(leaf)))
    return leaves


def logits(output: Any) -> torch.Tensor:
    """The classification logits of ``output``: its ``logits`` field or key, else its first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    field = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(field, torch.Tensor):
        return field
    leaves = tensor_leaves(output)
    if not leaves:
        raise TypeError(f"the model returned {type(output).__name__} with no tensor in it: no logits to use")
    return leaves[0]


def max_difference(reference: Any, result: Any) -> tuple[float, float]:
    """(max |Δ| over every pair of matching tensor leaves, max |reference|). Outputs of different structure or
    shapes are an error: they cannot be the same model's."""
    expected, got = tensor_leaves(reference), tensor_leaves(result)
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got)):
        raise ValueError(f"the outputs differ in structure: {[tuple(t.shape) for t in expected]} against "
                         f"{[tuple(t.shape) for t in got]}")
    diff = max(((a.float() - b.float()).abs().max().item() for a, b in zip(expected, got) if a.numel()),
               default=0.0)
    scale = max((a.float().abs().max().item() for a in expected if a.numel()), default=0.0)
    return diff, scale
