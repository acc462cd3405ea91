"""The rewrite engine: apply a recipe's decisions to a model.

Module sites are swapped in place (every alias path gets the same new object, so shared modules stay
shared); functional sites are rewritten in the fx graph of their *owner* module only, which then becomes a
GraphModule holding the same children and parameters - so ``state_dict`` keys do not change.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.graph.sites import (
    CONV2D_SAME,
    Analysis,
    Site,
    functional_nodes,
    gate_nodes,
    matmul_nodes,
    quadratic_branches,
)
from surgeon.graph.tracing import trace_owner
from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d
from surgeon.methods.s2a.activation import QuantizedActivation, prepare, quantized_call
from surgeon.methods.s2a.attention import quantized_scaled_dot_product_attention
from surgeon.methods.s2a.gate import gated_multiply
from surgeon.methods.s2a.matmul import quantized_matmul
from surgeon.methods.s2a.variants import (
    FrozenBatchNorm,
    InputFreeConv,
    QuantizedLayerNorm,
    add_linear_delta,
    make_variant,
)
from surgeon.ops.activations import FUNCTION_KEY_OF, ActivationSpec
from surgeon.recipe import Recipe, Rule, match_pattern

# attributes that timm and users read from a model root; kept if the root itself becomes a GraphModule
_ROOT_ATTRIBUTES = ("pretrained_cfg", "default_cfg", "num_classes", "num_features", "global_pool")


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
            if node.op == "get_attr" and not hasattr(self, node.target):
                if "." in node.target:
                    raise SurgeonError(f"internal: eval-mode graph reads a nested attribute {node.target!r}")
                self.__dict__[node.target] = getattr(compiled, node.target)
        return type(compiled).forward

    def __deepcopy__(self, memo: dict[int, Any]) -> RewrittenModule:
        copied = super().__deepcopy__(memo)
        for name in self._kept_attributes:
            if name in self.__dict__:
                object.__setattr__(copied, name, copy.deepcopy(self.__dict__[name], memo))
        if "_surgeon_eval_graph" in self.__dict__:
            copied.recompile()
        return copied


def original_of(module: nn.Module) -> nn.Module | None:
    """The module a :class:`RewrittenModule` was traced from."""
    return module.__dict__.get("_surgeon_original")


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _build_replacement(site: Site, rule: Rule, original: nn.Module) -> nn.Module:
    if rule.target == "conv":
        variant = make_variant(original, InputFreeConv)
        variant._surgeon_same_dynamic = site.op == "conv2d_same"
        return variant
    if rule.target == "norm":
        if site.op.startswith("batchnorm"):
            return make_variant(original, FrozenBatchNorm)
        variant = make_variant(original, QuantizedLayerNorm)
        variant._surgeon_channel_dim = 1 if site.op == "layernorm2d" else -1
        variant._surgeon_bits = rule.option("layernorm_bits")
        return variant
    if rule.target == "depthwise_conv" and rule.layer == "linear":
        return add_linear_delta(original, same_dynamic=site.op == "conv2d_same")  # type: ignore[arg-type]
    if rule.target == "depthwise_conv":
        branch_a, branch_b = quadratic_branches(rule, original)  # type: ignore[arg-type]
        return QuadraticDepthwiseConv2d.from_conv(
            original,  # type: ignore[arg-type]
            same_dynamic=CONV2D_SAME is not None and type(original) is CONV2D_SAME,
            rank=rule.option("rank"), branch_a=branch_a, branch_b=branch_b,
            keep_branches=rule.option("keep_branches"), b_init_std=rule.option("b_init_std"),
            train_bias=rule.option("train_bias"), saved_input_bits=rule.option("saved_input_bits"))
    assert site.spec is not None
    return QuantizedActivation(original, site.spec, bits=activation_bits(rule, site.spec),
                               group_size=rule.option("group_size"))


def activation_bits(rule: Rule, spec: ActivationSpec) -> int:
    """The rule's bit-width for what this activation keeps (its output, or its input's derivative code)."""
    return rule.option("output_bits") if spec.family == "output" else rule.option("bits")


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
    """Replace each site's node in one traced graph of ``owner``."""
    wanted = {(s.op, s.occurrence): s for s in sites}
    done = set()
    for node, _, occurrence, gate_index in gate_nodes(graph, owner, owner_path):
        site = wanted.get(("gate_mul", occurrence))
        if site is None:
            continue
        rule = recipe.rules[site.rule]  # type: ignore[index]
        with graph.inserting_after(node):
            new = graph.call_function(gated_multiply, (node.args[1 - gate_index], node.args[gate_index],
                                                       gate_index == 0, rule.option("bits")))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done.add(("gate_mul", occurrence))
    for node, _, occurrence, probabilities in matmul_nodes(graph, owner, owner_path):
        site = wanted.get(("matmul", occurrence))
        if site is None:
            continue
        rule = recipe.rules[site.rule]  # type: ignore[index]
        a_bits, b_bits = (rule.option("probability_bits") if p else rule.option("bits") for p in probabilities)
        with graph.inserting_after(node):
            new = graph.call_function(quantized_matmul, (*node.args, a_bits, b_bits, *probabilities))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done.add(("matmul", occurrence))
    for node, _, op, occurrence in functional_nodes(graph, owner_path):
        site = wanted.get((op, occurrence))
        if site is None:
            continue
        rule = recipe.rules[site.rule]  # type: ignore[index]
        assert site.spec is not None
        with graph.inserting_after(node):
            if op == "scaled_dot_product_attention":
                new = graph.call_function(quantized_scaled_dot_product_attention, node.args,
                                          {**node.kwargs, "bits": rule.option("output_bits"),
                                           "input_bits": rule.option("attention_input_bits")})
            else:
                target = f"method:{node.target}" if node.op == "call_method" else FUNCTION_KEY_OF[node.target]
                bits = activation_bits(rule, site.spec)
                prepare(site.spec, bits)
                new = graph.call_function(
                    quantized_call,
                    (node.args[0], target, op, site.spec.params, bits, rule.option("group_size"), *node.args[1:]),
                    dict(node.kwargs))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done.add((op, occurrence))
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
    for name in _ROOT_ATTRIBUTES:
        if hasattr(original, name) and not hasattr(rewritten, name):
            setattr(rewritten, name, getattr(original, name))
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
        replacement = _build_replacement(site, recipe.rules[site.rule], original)  # type: ignore[index]
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


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters that surgeon layers add (quadratic ``weight_a``/``weight_b``, linear ``weight_delta``)."""
    found = []
    for path, module in model.named_modules():
        if "weight_delta" in module._parameters:
            found.append((f"{path}.weight_delta" if path else "weight_delta", module.weight_delta))
        if isinstance(module, QuadraticDepthwiseConv2d):
            found.append((f"{path}.weight_a" if path else "weight_a", module.weight_a))
            found.append((f"{path}.weight_b" if path else "weight_b", module.weight_b))
    return found


def set_trainable(model: nn.Module, recipe: Recipe) -> None:
    """Freeze everything, then unfreeze adapters, requested biases and the recipe's ``trainable`` globs."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, param in adapter_parameters(model):
        param.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, QuadraticDepthwiseConv2d) and module.bias is not None and module.train_bias:
            module.bias.requires_grad_(True)
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
