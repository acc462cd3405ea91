"""Measuring what a training step keeps for backward.

Counts unique tensor storages handed to autograd's saved-tensor hooks during the forward pass (parameters and
buffers excluded: they exist whether or not anything trains). This is the activation memory a training step
holds at its peak, independent of allocator behaviour, so it can be compared exactly between configurations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SavedMemory:
    bytes: int
    tensors: int

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def saved_for_backward(model: nn.Module, inputs: torch.Tensor,
                       loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       run_backward: bool = True) -> SavedMemory:
    """Bytes kept for backward by one forward pass of ``model`` (train mode as set by the caller)."""
    excluded = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
            count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(inputs)
        value = loss(output) if loss is not None else output.float().logsumexp(-1).mean()
    if run_backward and value.requires_grad:
        value.backward()
    return SavedMemory(bytes=sum(storages.values()), tensors=count)
