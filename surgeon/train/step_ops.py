"""Counting what a training step asks of the device: host syncs and kernel-launching ops.

A host sync is an ``aten._local_scalar_dense`` call (``.item()``, ``bool(tensor)``, ``if tensor:``): on CUDA each
one stalls the CPU until the GPU has caught up, so a step with syncs cannot queue work ahead. A launching op is an
op that runs a kernel: views, allocations and metadata queries launch nothing and are left out. An op of
surgeon's own (``torch.ops.surgeon.*``) counts as one launch, as its CUDA kernel is one; the ops it runs inside are
still watched for syncs, which its torch route would make on any device.

Count inside ``surgeon.ops.device_route.cuda_route()`` to see the route a CUDA device takes: surgeon's CPU kernels
are C++ calls the dispatcher never sees, and the GPU trains through the torch route, without the CPU's workarounds.

The counts are the same on the CPU as on CUDA for the same code path (dispatch is device-independent), so CI
checks them without a GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

from surgeon.ops.model_outputs import logits as logits_of

SYNC_OP = "aten._local_scalar_dense"
# ops that read a value back to the host: ``_local_scalar_dense`` is what reaches the mode from user code; inside
# one of surgeon's ops (run below autograd) composite ops that end in it arrive before decomposing
SYNC_OPS = frozenset({SYNC_OP, "aten.is_nonzero", "aten.item", "aten.equal"})
# ops that run no kernel although they are not views: allocations and metadata
_NO_LAUNCH = frozenset({
    "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
    "aten.lift_fresh", "aten.set_", "aten.resize_", "aten.is_same_size", "aten.sym_size", "aten.sym_stride",
    "aten.sym_numel", "aten.sym_storage_offset", "aten._to_copy_noop", "aten.is_coalesced",
    "aten._unsafe_view",  # a view without autograd's view tracking (reshape's result after a copy): no kernel
})
OWN_NAMESPACE = "surgeon"
# surgeon's ops whose CUDA route is more than one kernel (any other counts as one)
KERNELS_PER_OWN_OP = {"surgeon.rows_range": 2}


def _packet_name(func: Any) -> str:
    return f"{func.namespace}.{func._opname}"


def _own_op_definition(func: Any) -> Callable[..., Any] | None:
    """The Python body of one of surgeon's custom ops (None for any other op).

    Calling the op itself under the mode would dispatch straight back to the mode; its body is plain Python
    over torch ops."""
    if func.namespace != OWN_NAMESPACE:
        return None
    definition = custom_ops.OPDEFS.get(f"{func.namespace}::{func._opname}")
    return definition._init_fn if definition is not None else None


def launches_kernel(func: Any) -> bool:
    """Whether ``func`` (an ``OpOverload``) runs a kernel: not a view, an allocation or a metadata query."""
    name = _packet_name(func)
    return not (func.is_view or name in _NO_LAUNCH or name in SYNC_OPS)


@dataclass
class StepOps:
    """Ops seen while a :class:`OpCounter` was open."""

    syncs: int = 0
    launches: int = 0
    by_op: Counter[str] = field(default_factory=Counter)  # launching ops by name
    sync_sites: Counter[str] = field(default_factory=Counter)  # the op a sync happened inside ('' at top level)


class OpCounter(TorchDispatchMode):
    """Counts host syncs and launching ops of everything dispatched while open (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = StepOps()
        self._inside: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = _packet_name(func)
        if name in SYNC_OPS:
            self.ops.syncs += 1
            self.ops.sync_sites[self._inside[-1] if self._inside else ""] += 1
        elif self._inside:
            pass  # inside one of surgeon's ops: its launches are the op's own single launch
        elif launches_kernel(func):
            kernels = KERNELS_PER_OWN_OP.get(name, 1)
            self.ops.launches += kernels
            self.ops.by_op[name] += kernels
        definition = _own_op_definition(func)
        if definition is None:
            return func(*args, **kwargs)
        self._inside.append(name)
        try:
            with self:  # run the op's Python body under the mode, so the ops its torch route runs are watched
                return definition(*args, **kwargs)
        finally:
            self._inside.pop()


def count_step_ops(step: Callable[[], Any]) -> StepOps:
    """Syncs and launching ops of one call of ``step`` (e.g. a forward and a backward)."""
    with OpCounter() as counter:
        step()
    return counter.ops


def forward_backward(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    """One training forward + backward of ``model`` on ``images`` (a loss that reads every logit)."""

    def step() -> None:
        for parameter in model.parameters():
            parameter.grad = None  # a fresh step: no accumulation into the previous step's gradients
        logits = logits_of(model(images))
        logits.float().logsumexp(-1).mean().backward()

    return step
