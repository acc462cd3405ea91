"""A run-time census of a model: every module call and every activation call, attributed to its module.

It also records depthwise convolutions called as functions (``F.conv2d(x, w, groups=C)``): they have no module
to swap, and are reported rather than passed over.

fx sees only what it traces; a forward pass sees everything. The census runs one forward pass under a
``TorchFunctionMode`` with global module hooks, so it finds activation calls hidden inside leaf modules,
counts how often shared modules are called, records shapes for the plan's estimates, and - after conversion -
proves that every replaced layer is actually used.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from surgeon.methods.registry import built_types
from surgeon.methods.s2a.activation import in_replacement
from surgeon.ops.activations import FUNCTIONS, METHODS

_METHOD_FUNCS = {getattr(torch.Tensor, name): op for name, op in METHODS.items()}


@dataclass
class ActivationCall:
    op: str
    kind: str  # "function" or "method"
    shape: tuple[int, ...]


@dataclass
class ModuleRecord:
    calls: int = 0
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    arguments: dict[str, Any] | None = None
    activations: list[ActivationCall] = field(default_factory=list)
    functional_depthwise: list[tuple[int, ...]] = field(default_factory=list)  # input shapes of F.conv2d calls


@dataclass
class Census:
    """Records keyed by ``id(module)``; ``error`` says why the forward pass failed, if it did."""

    modules: dict[int, ModuleRecord]
    error: str | None = None

    def record(self, module: nn.Module) -> ModuleRecord | None:
        return self.modules.get(id(module))


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return tuple(value[0].shape)
    return None


class _ActivationSpy(TorchFunctionMode):
    def __init__(self, stack: list[nn.Module], records: dict[int, ModuleRecord]) -> None:
        super().__init__()
        self.stack, self.records = stack, records
        self.conv_layers = (nn.Conv2d, *built_types())  # their own forward calls conv2d

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        op, kind = FUNCTIONS.get(func), "function"
        if op is None:
            op, kind = _METHOD_FUNCS.get(func), "method"
        if op is not None and self.stack and not in_replacement():
            shape = _shape(args[0]) if args else None
            self.records[id(self.stack[-1])].activations.append(ActivationCall(op, kind, shape or ()))
        elif func in _CONV_FUNCTIONS and self.stack and not isinstance(self.stack[-1], self.conv_layers):
            if _is_depthwise_call(args, kwargs):
                self.records[id(self.stack[-1])].functional_depthwise.append(tuple(args[0].shape))
        return func(*args, **kwargs)


_CONV_FUNCTIONS = (torch.conv2d, torch.nn.functional.conv2d)


def _is_depthwise_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``conv2d(x, weight, ..., groups=C)`` with one input channel per group and C == in == out channels."""
    values = [*args, *([None] * (7 - len(args)))]
    x, weight, groups = values[0], kwargs.get("weight", values[1]), kwargs.get("groups", values[6])
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or x.dim() != 4:
        return False
    groups = 1 if groups is None else groups
    return groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups == x.shape[1]


def _bound_arguments(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return None


def take_census(model: nn.Module, example_input: torch.Tensor) -> Census:
    """One forward pass (no grad) recording module calls and activation calls."""
    records: dict[int, ModuleRecord] = defaultdict(ModuleRecord)
    stack: list[nn.Module] = []

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        record = records[id(module)]
        record.calls += 1
        if record.input_shape is None:
            record.input_shape = _shape(args[0]) if args else None
            record.arguments = _bound_arguments(module, args, kwargs)
        stack.append(module)

    def post_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()
        record = records[id(module)]
        if record.output_shape is None:
            record.output_shape = _shape(output)

    hooks = []
    for module in {id(m): m for m in model.modules()}.values():
        hooks.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooks.append(module.register_forward_hook(post_hook, with_kwargs=True, always_call=True))
    error = None
    try:
        with torch.no_grad(), _ActivationSpy(stack, records):
            model(example_input)
    except Exception as exc:  # the census is advisory: a failing forward is reported, not raised
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        for hook in hooks:
            hook.remove()
    return Census(modules=dict(records), error=error)
