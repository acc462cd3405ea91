"""Functional sites in an fx graph: activation calls, ``x * gate(...)`` products and ``a @ b`` between computed
tensors, each with the module whose own forward makes the call (its *owner*) and its occurrence there."""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from surgeon.methods.s2a.activation import QuantizedActivation
from surgeon.ops.activations import FUNCTIONS, METHODS, module_op


class NodeSite(NamedTuple):
    """A functional site in one graph: the node, its owner, its op, its occurrence among the owner's calls of that
    op, and what the finder learned (gate operand index, which matmul operands are probabilities)."""

    node: torch.fx.Node
    owner: str
    op: str
    occurrence: int
    detail: Any = None


def functional_site_path(owner: str, op: str, occurrence: int) -> str:
    return f"{owner}::{op}#{occurrence}"


def _innermost_owner(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return path


def _node_op(node: torch.fx.Node) -> str | None:
    if node.op == "call_function":
        return FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    if node.op == "call_method":
        return METHODS.get(node.target)  # type: ignore[arg-type]
    return None


# calls whose result is a new tensor, never a view of an argument, and whose backward does not read that result
_FRESH_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm,
                  nn.GroupNorm)
_FRESH_FUNCTIONS = (F.linear, F.conv1d, F.conv2d, F.conv3d, F.layer_norm, F.batch_norm, F.group_norm, torch.matmul,
                    operator.matmul, torch.bmm, torch.addmm)


def input_reusable(node: torch.fx.Node, root: nn.Module) -> bool:
    """Whether the call ``node`` may overwrite its first argument: the argument is made by a linear, conv, norm or
    matmul (a new tensor, not a view, not read by its maker's backward) and nothing else in the graph reads it."""
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or len(source.users) != 1:
        return False
    if source.op == "call_module":
        return type(root.get_submodule(source.target)) in _FRESH_MODULES  # type: ignore[arg-type]
    return source.op == "call_function" and source.target in _FRESH_FUNCTIONS


def functional_nodes(graph: torch.fx.Graph, owner_filter: str | None = None
                     ) -> list[NodeSite]:
    """Every activation call in a graph, in graph order."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    found = []
    for node in graph.nodes:
        op = _node_op(node)
        if op is None:
            continue
        owner = _innermost_owner(node) if owner_filter is None else owner_filter
        found.append(NodeSite(node, owner, op, counts[(owner, op)]))
        counts[(owner, op)] += 1
    return found


GATE_OPS = ("sigmoid", "hardsigmoid")
_MUL_FUNCTIONS = (operator.mul, torch.mul)


def _is_gate_node(node: Any, root: nn.Module) -> bool:
    """A call of a sigmoid-like activation module (original or already quantized)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_module":
        return False
    module = root.get_submodule(node.target)  # type: ignore[arg-type]
    if isinstance(module, QuantizedActivation):
        return module.spec.op in GATE_OPS
    return module_op(module) in GATE_OPS


def gate_nodes(graph: torch.fx.Graph, root: nn.Module, owner_filter: str | None = None
               ) -> list[NodeSite]:
    """Every ``x * gate(...)`` multiply (detail: the gate's argument index), in graph order."""
    counts: dict[str, int] = defaultdict(int)
    found = []
    for node in _binary_calls(graph, _MUL_FUNCTIONS, "mul"):
        gate_index = next((i for i, arg in enumerate(node.args) if _is_gate_node(arg, root)), None)
        if gate_index is None or not isinstance(node.args[1 - gate_index], torch.fx.Node):
            continue
        owner = _innermost_owner(node) if owner_filter is None else owner_filter
        found.append(NodeSite(node, owner, "gate_mul", counts[owner], gate_index))
        counts[owner] += 1
    return found


def _binary_calls(graph: torch.fx.Graph, functions: tuple[Any, ...], method: str) -> list[torch.fx.Node]:
    """Nodes calling one of ``functions`` (or ``Tensor.<method>``) with exactly two positional arguments."""
    return [node for node in graph.nodes
            if ((node.op == "call_function" and node.target in functions)
                or (node.op == "call_method" and node.target == method))
            and len(node.args) == 2 and not node.kwargs]


_MATMUL_FUNCTIONS = (operator.matmul, torch.matmul)


def _is_probabilities(node: Any, root: nn.Module) -> bool:
    """A softmax output (original or already quantized), possibly through dropout: non-negative rows."""
    while isinstance(node, torch.fx.Node):
        if node.op == "call_module":
            module = root.get_submodule(node.target)  # type: ignore[arg-type]
            if isinstance(module, nn.Dropout):
                node = node.args[0]
                continue
            op = module.spec.op if isinstance(module, QuantizedActivation) else module_op(module)
            return op == "softmax"
        if node.op == "call_function" and node.target is torch.nn.functional.dropout:
            node = node.args[0]
            continue
        return _node_op(node) == "softmax"
    return False


def matmul_nodes(graph: torch.fx.Graph, root: nn.Module, owner_filter: str | None = None
                 ) -> list[NodeSite]:
    """Every ``a @ b`` between two computed tensors (explicit attention; detail: which operands are
    probabilities), in graph order. Products with a weight (a ``get_attr``) are not sites."""
    counts: dict[str, int] = defaultdict(int)
    found = []
    for node in _binary_calls(graph, _MATMUL_FUNCTIONS, "matmul"):
        if not all(isinstance(arg, torch.fx.Node) and arg.op != "get_attr" for arg in node.args):
            continue
        owner = _innermost_owner(node) if owner_filter is None else owner_filter
        probabilities = (_is_probabilities(node.args[0], root), _is_probabilities(node.args[1], root))
        found.append(NodeSite(node, owner, "matmul", counts[owner], probabilities))
        counts[owner] += 1
    return found


def node_sites(graph: torch.fx.Graph, root: nn.Module, owner_filter: str | None = None) -> Iterator[NodeSite]:
    """Every functional site of a graph: gate products, attention matmuls, then activation calls."""
    yield from gate_nodes(graph, root, owner_filter)
    yield from matmul_nodes(graph, root, owner_filter)
    yield from functional_nodes(graph, owner_filter)
