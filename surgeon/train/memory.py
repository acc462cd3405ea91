"""Measuring training memory: what a step keeps for backward, and the peak of live tensor bytes over a step.

``saved_for_backward`` counts unique tensor storages handed to autograd's saved-tensor hooks during the forward
pass (parameters and buffers excluded: they exist whether or not anything trains). ``peak_memory`` measures what
decides whether a batch fits: the highest number of tensor bytes alive at once while a function runs (forward,
backward, optimizer step and every temporary in between). On CUDA that is the caching allocator's own peak; on the
CPU it is replayed from the profiler's allocation events, which is deterministic and, unlike RSS, independent of
how the C allocator returns memory to the system.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's C++ start/stop chatter on stderr


@dataclass
class SavedMemory:
    bytes: int
    tensors: int

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


class KeptForBackward:
    """Every tensor autograd keeps for backward while the context is open (through ``saved_tensors_hooks``).

    ``bytes`` counts distinct storages once, leaving out those of ``exclude`` (parameters and buffers exist whether
    or not anything trains). The one counter behind :func:`saved_for_backward` and the tests' kept-bytes checks."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.tensors: list[torch.Tensor] = []
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in self._excluded:
            self.tensors.append(tensor)
        return tensor

    def __enter__(self) -> KeptForBackward:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return live_bytes(self.tensors)


def saved_for_backward(model: nn.Module, inputs: torch.Tensor,
                       loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       run_backward: bool = True) -> SavedMemory:
    """Bytes kept for backward by one forward pass of ``model`` (train mode as set by the caller)."""
    with KeptForBackward(exclude=[*model.parameters(), *model.buffers()]) as kept:
        output = model(inputs)
        value = loss(output) if loss is not None else output.float().logsumexp(-1).mean()
    if run_backward and value.requires_grad:
        value.backward()
    return SavedMemory(bytes=kept.bytes, tensors=len(kept.tensors))


@dataclass
class PeakMemory:
    """Tensor bytes alive while a function ran: at its start (as given), at its highest point and at its end."""

    start: int
    peak: int
    end: int
    peak_op: str  # the innermost op running when the peak was reached ("" if unknown, e.g. on CUDA)

    @property
    def rise(self) -> int:
        """How far the peak rose above what was alive at the start: the step's own working memory."""
        return self.peak - self.start


def live_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats counted once)."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def peak_memory(fn: Callable[[], object], alive: Iterable[torch.Tensor] = (),
                device: torch.device | str = "cpu") -> PeakMemory:
    """Run ``fn`` once and measure its peak of live tensor bytes. ``alive``: the tensors that exist before it
    runs and count toward the peak (weights, optimizer state, the batch); what ``fn`` allocates is measured."""
    device = torch.device(device)
    start = live_bytes(alive)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak, end = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        return PeakMemory(start, start + peak - base, start + end - base, "")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"
                         and e.device_type() == torch.autograd.DeviceType.CPU)
    live = highest = 0
    highest_at = None
    for at, nbytes in allocations:
        live += nbytes
        if live > highest:
            highest, highest_at = live, at
    return PeakMemory(start, start + highest, start + live, _op_at(events, highest_at))


def _op_at(events: list, at: int | None) -> str:
    """The shortest (innermost) op whose span contains time ``at``."""
    if at is None:
        return ""
    best, best_span = "", None
    for event in events:
        if event.name() == "[memory]" or event.is_python_function():
            continue
        begin, end = event.start_ns(), event.end_ns()
        if begin <= at <= end and (best_span is None or end - begin < best_span):
            best, best_span = event.name(), end - begin
    return best
