"""The rewrite engine: apply a recipe's decisions to a model.

Module sites are swapped in place (every alias path gets the same new object, so shared modules stay
shared); functional sites are rewritten in the fx graph of their *owner* module only, which then becomes a
GraphModule holding the same children and parameters - so ``state_dict`` keys do not change.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.graph.discovery import Analysis
from surgeon.graph.nodes import node_sites
from surgeon.graph.tracing import trace_owner
from surgeon.methods.base import Site
from surgeon.methods.registry import get_method, method_of
from surgeon.recipe import Recipe, match_pattern

# attributes that timm and users read from a model root; kept if the root itself becomes a GraphModule
_ROOT_ATTRIBUTES = ("pretrained_cfg", "default_cfg", "num_classes", "num_features", "global_pool")
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"forward"}


class RewrittenModule(torch.fx.GraphModule):
    """A module whose own forward was rewritten. It remembers the module it was traced from (``merge`` puts that
    back) and, unlike a plain GraphModule, keeps that and ``surgeon_info`` through ``copy.deepcopy``.

    Tracing fixes every Python branch at its traced value, ``self.training`` included (timm's attention passes
    ``dropout_p = p if self.training else 0.``). So the owner is traced in both modes; when the two graphs
    differ, the eval graph is kept beside the training one and ``forward`` follows ``self.training`` as the
    original module's forward did."""

    _kept_attributes = ("_surgeon_original", "surgeon_info", "_surgeon_eval_graph")

    def set_eval_graph(self, graph: torch.fx.Graph) -> None:
        """Run ``graph`` instead of ``self.graph`` while the module is in eval mode."""
        object.__setattr__(self, "_surgeon_eval_graph", graph)
        self.recompile()

    def recompile(self) -> Any:
        result = super().recompile()
        eval_graph = self.__dict__.get("_surgeon_eval_graph")
        if eval_graph is not None:
            train_forward = type(self).forward
            eval_forward = self._forward_of(eval_graph)

            def forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
                return (train_forward if module.training else eval_forward)(module, *args, **kwargs)

            type(self).forward = forward  # GraphModule gives every instance a class of its own
        return result

    def _forward_of(self, graph: torch.fx.Graph) -> Any:
        """The generated forward function of ``graph``; it is called with this module as ``self``, so it always
        sees the module's current children."""
        compiled = torch.fx.GraphModule(self, graph)
        for node in graph.nodes:
            if node.op == "get_attr" and not _resolves(self, node.target):
                if "." in node.target:  # a child's attribute the rewritten module does not have
                    raise SurgeonError(f"internal: eval-mode graph reads a nested attribute {node.target!r}")
                self.__dict__[node.target] = getattr(compiled, node.target)
        return type(compiled).forward

    def __deepcopy__(self, memo: dict[int, Any]) -> RewrittenModule:
        copied = super().__deepcopy__(memo)
        for name in self._kept_attributes:
            if name in self.__dict__:
                object.__setattr__(copied, name, copy.deepcopy(self.__dict__[name], memo))
        if "_surgeon_eval_graph" in self.__dict__:
            # constants only the eval graph reads (``_tensor_constantN``) live in this module's __dict__, which
            # GraphModule's own copy drops: carry them over before the eval forward is rebuilt
            for node in self.__dict__["_surgeon_eval_graph"].nodes:
                if node.op == "get_attr" and node.target in self.__dict__ and not _resolves(copied, node.target):
                    copied.__dict__[node.target] = copy.deepcopy(self.__dict__[node.target], memo)
            copied.recompile()
        return copied


def _resolves(module: nn.Module, target: str) -> bool:
    """Whether a (dotted) ``get_attr`` target is reachable from ``module``: ``qkv.weight`` through its child."""
    found: Any = module
    for part in target.split("."):
        if not hasattr(found, part):
            return False
        found = getattr(found, part)
    return True


def original_of(module: nn.Module) -> nn.Module | None:
    """The module a :class:`RewrittenModule` was traced from."""
    return module.__dict__.get("_surgeon_original")


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _trace_in_mode(owner: nn.Module, training: bool, observed: dict[str, Any] | None) -> torch.fx.Graph:
    """The owner's graph with ``self.training`` (and every branch on it) at ``training``; modes are restored."""
    modes = [(module, module.training) for module in owner.modules()]
    owner.train(training)
    try:
        return trace_owner(owner, observed)
    finally:
        for module, mode in modes:
            module.training = mode


def _rewrite_owner(owner: nn.Module, owner_path: str, sites: list[Site], recipe: Recipe,
                   observed: dict[str, Any] | None) -> RewrittenModule:
    graphs = {mode: _rewrite_graph(_trace_in_mode(owner, mode, observed), owner, owner_path, sites, recipe)
              for mode in (True, False)}
    rewritten = RewrittenModule(owner, graphs[True], class_name=type(owner).__name__)
    _carry_over_state(owner, rewritten)
    if graphs[False].python_code("self").src != rewritten.code:
        # constants the tracer stored on the owner for the eval-mode trace (``_tensor_constantN``)
        for node in graphs[False].nodes:
            if node.op == "get_attr" and not hasattr(rewritten, node.target) and hasattr(owner, node.target):
                rewritten.__dict__[node.target] = getattr(owner, node.target)
        rewritten.set_eval_graph(graphs[False])
    object.__setattr__(rewritten, "_surgeon_original", owner)  # not registered: no duplicate state_dict keys
    return rewritten


def _rewrite_graph(graph: torch.fx.Graph, owner: nn.Module, owner_path: str, sites: list[Site],
                   recipe: Recipe) -> torch.fx.Graph:
    """Replace each site's node in one traced graph of ``owner`` with the call its method asks for."""
    wanted = {(s.op, s.occurrence): s for s in sites}
    done = set()
    for found in list(node_sites(graph, owner, owner_path)):
        site = wanted.get((found.op, found.occurrence))
        if site is None:
            continue
        rule = recipe.rules[site.rule]  # type: ignore[index]
        # what the finder saw in this trace (the owner's own), not in the whole-model trace discovery used
        function, args, kwargs = get_method(rule.target, rule.layer).call(
            replace(site, detail=found.detail), rule.options, found.node)
        with graph.inserting_after(found.node):
            new = graph.call_function(function, args, kwargs)
        found.node.replace_all_uses_with(new)
        graph.erase_node(found.node)
        done.add((found.op, found.occurrence))
    missing = set(wanted) - done
    if missing:
        raise SurgeonError(f"internal: sites {sorted(missing)} of {owner_path or '<root>'} vanished on re-trace")
    graph.lint()
    return graph


def _carry_over_state(original: nn.Module, rewritten: nn.Module) -> None:
    """GraphModule keeps only what its graph touches; keep every child, parameter and buffer so ``state_dict``
    keys and ``.train()``/``.eval()`` propagation are unchanged."""
    for name, child in original.named_children():
        if name not in rewritten._modules:
            rewritten.add_module(name, child)
    for name, param in original.named_parameters(recurse=False):
        if name not in rewritten._parameters:
            rewritten.register_parameter(name, param)
    for name, buffer in original.named_buffers(recurse=False):
        if name not in rewritten._buffers:
            rewritten.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)
    for name in list(rewritten._buffers):
        if name not in original._buffers:
            # a constant the tracer lifted (``_tensor_constantN``), often a view of a real buffer: not state (the
            # conversion re-creates it), so it must not appear in state_dict beside, or instead of, that buffer
            rewritten._non_persistent_buffers_set.add(name)
    for name in _ROOT_ATTRIBUTES:
        if hasattr(original, name) and not hasattr(rewritten, name):
            setattr(rewritten, name, getattr(original, name))
    # plain attributes (``resolution``, ``num_heads``, ``scale``...) that code outside the forward reads, as timm's
    # EfficientViT reads ``attn.resolution`` from the block around it
    for name, value in original.__dict__.items():
        if name not in _MODULE_INTERNALS and not hasattr(rewritten, name):
            rewritten.__dict__[name] = value
    rewritten.train(original.training)


@dataclass
class ConversionInfo:
    """What was done to a model; attached to the converted model as ``surgeon_info``."""

    recipe: Recipe
    sites: list[Site]
    base: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def apply_decisions(model: nn.Module, analysis: Analysis, recipe: Recipe,
                    observed: dict[int, dict[str, Any] | None] | None = None) -> nn.Module:
    """Swap modules and rewrite owners for every site whose action is ``swap``. Returns the (possibly new)
    root."""
    for site in analysis.sites:
        if site.action != "swap" or site.owner is not None:
            continue
        original = model.get_submodule(site.path)
        rule = recipe.rules[site.rule]  # type: ignore[index]
        replacement = get_method(rule.target, rule.layer).build(site, rule.options, original)
        for alias in site.aliases:
            set_submodule(model, alias, replacement)
    by_owner: dict[str, list[Site]] = defaultdict(list)
    for site in analysis.sites:
        if site.action == "swap" and site.owner is not None:
            by_owner[site.owner].append(site)
    # deepest owners first, so a parent's re-trace sees already rewritten children as leaves
    for owner_path in sorted(by_owner, key=lambda p: -p.count(".") - (p != "")):
        owner = model.get_submodule(owner_path) if owner_path else model
        paths = [p for p, m in model.named_modules(remove_duplicate=False) if m is owner] or [owner_path]
        rewritten = _rewrite_owner(owner, owner_path, by_owner[owner_path], recipe,
                                   (observed or {}).get(id(owner)))
        if owner_path == "":
            model = rewritten
        else:
            for alias in paths:
                set_submodule(model, alias, rewritten)
    return model


def set_trainable(model: nn.Module, recipe: Recipe) -> None:
    """Freeze everything, then unfreeze what each method's layers train and the recipe's ``trainable`` globs."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        method = method_of(module)
        if method is not None:
            for param in method.trainable(module):
                param.requires_grad_(True)
    names = [name for name, _ in model.named_parameters()]
    for pattern in recipe.trainable:
        hits = [n for n in names if match_pattern(pattern, n)]
        if not hits:
            raise SurgeonError(f"recipe field 'trainable': pattern {pattern!r} matches no parameter")
        for name in hits:
            model.get_parameter(name).requires_grad_(True)


def deep_copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise SurgeonError(f"cannot copy the model for conversion ({exc}); pass inplace=True") from exc
