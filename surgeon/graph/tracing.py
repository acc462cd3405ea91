"""torch.fx tracing with timm's leaf modules and autowrapped functions honoured.

Two tracers: :class:`ModelTracer` traces a whole model (activation modules and surgeon's own layers are leaves,
so they show up as ``call_module`` sites), :class:`OwnerTracer` traces one module's own ``forward`` with every
child as a leaf, which is what a functional-call rewrite needs: only that module becomes a GraphModule.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.fx
from torch import nn

from surgeon.methods.registry import all_methods, built_types
from surgeon.ops.activations import module_op


def _timm_leaves() -> tuple[set[type], tuple[Any, ...]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # pragma: no cover
        return set(), ()
    functions = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    return set(timm_fx.get_notrace_modules()), functions


class ModelTracer(torch.fx.Tracer):
    """Whole-model tracer: timm leaves, activation modules and surgeon layers are not traced through."""

    def __init__(self) -> None:
        leaves, functions = _timm_leaves()
        inserted = tuple(f for method in all_methods() for f in method.leaf_functions)  # what rewrites insert
        super().__init__(autowrap_modules=(math,), autowrap_functions=functions + inserted)
        self.leaf_types = leaves
        self.surgeon_layers = built_types()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self.leaf_types or isinstance(m, self.surgeon_layers) or module_op(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


class OwnerTracer(ModelTracer):
    """Traces only the root's own forward: every submodule is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name != ""


def trace_model(model: nn.Module) -> torch.fx.Graph:
    return ModelTracer().trace(model)


def owner_concrete_args(module: nn.Module, observed: dict[str, Any] | None) -> dict[str, Any]:
    """Non-tensor arguments of ``module.forward`` fixed to the values seen at run time (or their defaults),
    so data-independent branches such as ``if attn_mask is not None`` trace the way the model runs."""
    concrete: dict[str, Any] = {}
    signature = inspect.signature(module.forward)
    for name, parameter in signature.parameters.items():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if observed is not None and name in observed:
            if not isinstance(observed[name], torch.Tensor):
                concrete[name] = observed[name]
        elif parameter.default is not inspect.Parameter.empty and not isinstance(parameter.default, torch.Tensor):
            concrete[name] = parameter.default
    return concrete


def trace_owner(module: nn.Module, observed: dict[str, Any] | None = None) -> torch.fx.Graph:
    """Graph of ``module``'s own forward. Placeholders keep the original parameter names, so callers that pass
    arguments by keyword (``attn(x, attn_mask=None)``) still work after the rewrite."""
    graph = OwnerTracer().trace(module, concrete_args=owner_concrete_args(module, observed) or None)
    names = [name for name, p in inspect.signature(module.forward).parameters.items()
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) == len(names):
        for node, name in zip(placeholders, names):
            node.target = name
    return graph
