"""Site discovery: every place in a model where a recipe rule could apply, and what will happen there.

Sources, combined so that nothing is skipped silently:

* the module tree - depthwise convs and activation modules, reached by swapping the submodule (this also
  reaches modules inside fx leaves, such as the activation inside timm's ``BatchNormAct2d``);
* the fx graph - ``call_function``/``call_method`` activations, attributed to the module whose own ``forward``
  makes the call (the *owner*, which becomes a GraphModule when rewritten);
* the run-time census - activation calls inside modules fx did not trace, call counts and shapes.

Each site ends up with an action: ``swap``, ``skip`` (a rule or option excludes it, reason given), ``keep``
(no rule targets it) or ``unreachable`` (a rule wants it but surgeon cannot replace it, reason given).
"""

from __future__ import annotations

import importlib
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from surgeon.errors import RecipeError
from surgeon.graph.census import Census, take_census
from surgeon.graph.tracing import trace_model, trace_owner
from surgeon.methods.quadratic.inference import QuadraConvDW
from surgeon.methods.quadratic.layer import AtrousKernel, QuadraticDepthwiseConv2d, conv_span, default_branches
from surgeon.methods.s2a.activation import QuantizedActivation
from surgeon.methods.s2a.variants import is_variant, layer_norm_channel_dim
from surgeon.ops.activations import (
    FUNCTIONS,
    METHODS,
    ActivationSpec,
    UnsupportedCall,
    module_op,
    spec_from_call,
    spec_from_module,
)
from surgeon.recipe import Recipe, Rule, match_pattern


def _timm_class(module: str, name: str) -> type | None:
    """A timm layer class, or None if this timm does not have it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # pragma: no cover
        return None


CONV2D_SAME = _timm_class("timm.layers.conv2d_same", "Conv2dSame")
BATCHNORM_ACT = _timm_class("timm.layers", "BatchNormAct2d")


@dataclass
class Site:
    """One replaceable place in the model."""

    path: str
    target: str  # "depthwise_conv" | "activation"
    op: str
    access: str  # call_module | module_tree | call_function | call_method | hidden_function
    module_type: str
    action: str = "keep"
    reason: str = ""
    rule: int | None = None
    aliases: list[str] = field(default_factory=list)
    calls: int = 0
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    added_params: int = 0
    added_macs: int = 0
    saved_bytes_before: int = 0
    saved_bytes_after: int = 0
    # for functional sites: owner module path and occurrence of this op in the owner's forward
    owner: str | None = None
    occurrence: int = 0
    spec: ActivationSpec | None = None
    blocker: str = ""  # why this site cannot be replaced, should a rule want it

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "target": self.target, "op": self.op, "access": self.access,
            "module_type": self.module_type, "action": self.action, "reason": self.reason, "rule": self.rule,
            "aliases": self.aliases, "calls": self.calls,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "output_shape": list(self.output_shape) if self.output_shape else None,
            "added_params": self.added_params, "added_macs": self.added_macs,
            "saved_bytes_before": self.saved_bytes_before, "saved_bytes_after": self.saved_bytes_after,
        }


@dataclass
class Analysis:
    sites: list[Site]
    trace_error: str | None
    census: Census  # the run-time census the sites were found with (its error says why it is empty)
    warnings: list[str]


def functional_site_path(owner: str, op: str, occurrence: int) -> str:
    return f"{owner}::{op}#{occurrence}"


def is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def norm_op(module: nn.Module) -> str | None:
    """Norm layers with a memory variant: exact BatchNorm2d / timm BatchNormAct2d / LayerNorm(2d)."""
    if type(module) is nn.BatchNorm2d:
        return "batchnorm"
    if BATCHNORM_ACT is not None and type(module) is BATCHNORM_ACT:
        return "batchnorm_act"
    dim = layer_norm_channel_dim(module)
    if dim is not None:
        return "layernorm2d" if dim == 1 else "layernorm"
    return None


def site_target(module: nn.Module) -> str | None:
    if is_depthwise(module):
        return "depthwise_conv"
    if module_op(module):
        return "activation"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if norm_op(module):
        return "norm"
    return None


def rule_targets(rule: Rule, site: Site) -> bool:
    """A ``conv`` rule also covers depthwise convs that no quadratic rule took."""
    return rule.target == site.target or (rule.target == "conv" and site.target == "depthwise_conv")


# ------------------------------------------------------------------------------------------- branches
def quadratic_branches(rule: Rule, conv: nn.Conv2d) -> tuple[AtrousKernel, AtrousKernel]:
    """The atrous kernels a rule asks for at one conv; a span beyond the kernel's is a RecipeError."""
    kernel, dilation = tuple(conv.kernel_size), tuple(conv.dilation)
    span = conv_span(kernel, dilation)
    default_a, default_b = default_branches(kernel, dilation)
    result = []
    for name, default in (("a", default_a), ("b", default_b)):
        k_opt, d_opt = rule.option(f"{name}_kernel"), rule.option(f"{name}_dilation")
        taps = tuple(min(k_opt, k) if k_opt is not None else dk for k, dk in zip(kernel, default.kernel))
        dil = tuple(d_opt if d_opt is not None and t > 1 else (dd if t == dk else max(1, (s - 1) // max(t - 1, 1)))
                    for t, dk, dd, s in zip(taps, default.kernel, default.dilation, span))
        branch = AtrousKernel(taps, dil)  # type: ignore[arg-type]
        if any(b > s for b, s in zip(branch.span(), span)):
            field_name = f"{name}_dilation" if d_opt is not None else f"{name}_kernel"
            raise RecipeError(f"recipe field '{field_name}': branch {name} spans {branch.span()}, more than the "
                              f"kernel's receptive field {span} (kernel {kernel}, dilation {dilation})")
        result.append(branch)
    return result[0], result[1]


# ------------------------------------------------------------------------------------------- estimates
def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape else 0


def _estimate_quadratic(site: Site, rule: Rule, conv: nn.Conv2d) -> None:
    a, b = quadratic_branches(rule, conv)
    rank = rule.option("rank")
    taps = math.prod(a.kernel) + math.prod(b.kernel)
    site.added_params = conv.in_channels * rank * taps
    out = _numel(site.output_shape)
    site.added_macs = out * rank * (taps + 1)
    element = conv.weight.element_size()
    site.saved_bytes_before = _numel(site.input_shape) * element
    kept_input = site.saved_bytes_before if rule.option("saved_input_bits") == 32 else _numel(site.input_shape)
    site.saved_bytes_after = kept_input + (2 * rank * out * element if rule.option("keep_branches") else 0)


def _estimate_frozen(site: Site, rule: Rule) -> None:
    numel = _numel(site.input_shape)
    site.saved_bytes_before = numel * 4
    if site.op.startswith("layernorm"):
        width = site.input_shape[1 if site.op == "layernorm2d" else -1] if site.input_shape else 1
        rows = numel // max(width, 1)
        site.saved_bytes_after = math.ceil(numel * rule.option("layernorm_bits") / 8) + 12 * rows
    else:
        site.saved_bytes_after = 0


def _estimate_activation(site: Site, rule: Rule) -> None:
    """Bytes kept before (the fp32 input or output) and after (packed codes plus per-row/group scales).

    Fused attention is left at 0/0: what the fused kernel keeps is not visible from the site."""
    spec = site.spec
    if spec is None or spec.family == "attention":
        return
    numel = _numel(site.input_shape)
    site.saved_bytes_before = numel * 4
    if spec.family == "mask":
        bits, overhead = 1, 0
    elif spec.family == "derivative":
        bits, overhead = rule.option("bits"), 0
    elif spec.op == "softmax":  # one step per row along the softmax dim
        width = site.input_shape[spec.param("dim")] if site.input_shape else 1
        bits, overhead = rule.option("output_bits"), 4 * (numel // max(width, 1))
    else:  # min and step per group
        bits, overhead = rule.option("output_bits"), 8 * math.ceil(numel / rule.option("group_size"))
    site.saved_bytes_after = math.ceil(numel * bits / 8) + overhead


# ------------------------------------------------------------------------------------------- discovery
def _module_paths(model: nn.Module) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        paths[id(module)].append(path)
    return paths


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


def functional_nodes(graph: torch.fx.Graph, owner_filter: str | None = None
                     ) -> list[tuple[torch.fx.Node, str, str, int]]:
    """(node, owner, op, occurrence) of every activation call in a graph, in graph order."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    found = []
    for node in graph.nodes:
        op = _node_op(node)
        if op is None:
            continue
        owner = _innermost_owner(node) if owner_filter is None else owner_filter
        found.append((node, owner, op, counts[(owner, op)]))
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
               ) -> list[tuple[torch.fx.Node, str, int, int]]:
    """(node, owner, occurrence, gate argument index) of every ``x * gate(...)`` multiply, in graph order."""
    counts: dict[str, int] = defaultdict(int)
    found = []
    for node in _binary_calls(graph, _MUL_FUNCTIONS, "mul"):
        gate_index = next((i for i, arg in enumerate(node.args) if _is_gate_node(arg, root)), None)
        if gate_index is None or not isinstance(node.args[1 - gate_index], torch.fx.Node):
            continue
        owner = _innermost_owner(node) if owner_filter is None else owner_filter
        found.append((node, owner, counts[owner], gate_index))
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
                 ) -> list[tuple[torch.fx.Node, str, int, tuple[bool, bool]]]:
    """(node, owner, occurrence, which operands are probabilities) of every ``a @ b`` between two computed
    tensors (explicit attention), in graph order. Products with a weight (a ``get_attr``) are not sites."""
    counts: dict[str, int] = defaultdict(int)
    found = []
    for node in _binary_calls(graph, _MATMUL_FUNCTIONS, "matmul"):
        if not all(isinstance(arg, torch.fx.Node) and arg.op != "get_attr" for arg in node.args):
            continue
        owner = _innermost_owner(node) if owner_filter is None else owner_filter
        probabilities = (_is_probabilities(node.args[0], root), _is_probabilities(node.args[1], root))
        found.append((node, owner, counts[owner], probabilities))
        counts[owner] += 1
    return found


def _spec_of_node(node: torch.fx.Node, op: str) -> ActivationSpec:
    rest = node.args[1:]
    if any(isinstance(a, torch.fx.Node) for a in rest) or any(
            isinstance(v, torch.fx.Node) and k not in ("attn_mask",) for k, v in node.kwargs.items()):
        if op != "scaled_dot_product_attention":
            raise UnsupportedCall("arguments computed at run time")
    if op == "scaled_dot_product_attention":
        return ActivationSpec(op)
    return spec_from_call(op, (None, *rest), dict(node.kwargs))


def discover(model: nn.Module, example_input: torch.Tensor | None) -> Analysis:
    """All candidate sites of a model, before any rule is applied."""
    warnings: list[str] = []
    census = take_census(model, example_input) if example_input is not None else Census({}, "no example input")
    if census.error:
        warnings.append(f"run-time census unavailable ({census.error}); hidden activation calls cannot be "
                        "detected and shapes are unknown")
    graph = None
    trace_error = None
    try:
        graph = trace_model(model)
    except Exception as exc:
        trace_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        warnings.append(f"torch.fx could not trace the model ({trace_error}); falling back to the module-tree "
                        "pass and the run-time census")
    paths = _module_paths(model)
    call_module_targets = {n.target for n in graph.nodes if n.op == "call_module"} if graph is not None else set()
    modules_by_path = dict(model.named_modules(remove_duplicate=False))
    sites: list[Site] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        if id(module) in seen or isinstance(module, (QuadraticDepthwiseConv2d, QuantizedActivation, QuadraConvDW)):
            continue
        seen.add(id(module))
        target = None if is_variant(module) else site_target(module)
        if target is None or _inside_surgeon_layer(path, modules_by_path):
            continue
        aliases = paths[id(module)]
        access = "call_module" if any(a in call_module_targets for a in aliases) else "module_tree"
        record = census.record(module)
        op = {"depthwise_conv": "conv2d", "conv": "conv2d", "norm": norm_op(module)}.get(target) or module_op(module)
        site = Site(path=path, target=target, op=op or "",
                    access=access, module_type=type(module).__name__, aliases=aliases,
                    calls=record.calls if record else 0,
                    input_shape=record.input_shape if record else None,
                    output_shape=record.output_shape if record else None)
        if target == "activation":
            try:
                site.spec = spec_from_module(module)
            except UnsupportedCall as exc:
                site.blocker = str(exc)
        sites.append(site)

    traced_owners: set[str] = set()
    if graph is not None:
        for node, owner, op, occurrence in functional_nodes(graph):
            owner_module = modules_by_path.get(owner)
            if owner_module is not None and (module_op(owner_module) or isinstance(owner_module, QuantizedActivation)):
                continue
            traced_owners.add(owner)
            site = _functional_site(node.op, owner, op, occurrence, owner_module)
            try:
                site.spec = _spec_of_node(node, op)
            except UnsupportedCall as exc:
                site.blocker = str(exc)
            sites.append(site)
        for node, owner, occurrence, _ in gate_nodes(graph, model):
            owner_module = modules_by_path.get(owner)
            site = Site(path=functional_site_path(owner, "gate_mul", occurrence), target="gate", op="gate_mul",
                        access=node.op, module_type=type(owner_module).__name__ if owner_module is not None else "?",
                        owner=owner, occurrence=occurrence, aliases=[owner])
            sites.append(site)
        for node, owner, occurrence, _ in matmul_nodes(graph, model):
            owner_module = modules_by_path.get(owner)
            sites.append(Site(path=functional_site_path(owner, "matmul", occurrence), target="matmul", op="matmul",
                              access=node.op,
                              module_type=type(owner_module).__name__ if owner_module is not None else "?",
                              owner=owner, occurrence=occurrence, aliases=[owner]))
    _add_hidden_sites(model, census, traced_owners, paths, modules_by_path, sites)
    _add_functional_depthwise_sites(model, census, paths, sites)
    for site in sites:
        if site.owner is not None:
            owner_module = modules_by_path.get(site.owner)
            record = census.record(owner_module) if owner_module is not None else None
            if record is not None:
                calls = [c for c in record.activations if c.op == site.op]
                per_call = len(calls) // max(record.calls, 1)
                if per_call and site.occurrence < len(calls):
                    site.input_shape = calls[site.occurrence % per_call].shape
                site.calls = record.calls
    return Analysis(sites=sites, trace_error=trace_error, census=census, warnings=warnings)


def _inside_surgeon_layer(path: str, modules_by_path: dict[str, nn.Module]) -> bool:
    parts = path.split(".")
    for i in range(1, len(parts)):
        if isinstance(modules_by_path.get(".".join(parts[:i])), (QuantizedActivation, QuadraConvDW)):
            return True
    return False


def _functional_site(node_kind: str, owner: str, op: str, occurrence: int, owner_module: nn.Module | None) -> Site:
    access = {"call_function": "call_function", "call_method": "call_method"}.get(node_kind, node_kind)
    return Site(path=functional_site_path(owner, op, occurrence), target="activation", op=op, access=access,
                module_type=type(owner_module).__name__ if owner_module is not None else "?", owner=owner,
                occurrence=occurrence, aliases=[owner])


def _add_hidden_sites(model: nn.Module, census: Census, traced_owners: set[str], paths: dict[int, list[str]],
                      modules_by_path: dict[str, nn.Module], sites: list[Site]) -> None:
    """Activation calls the census saw in modules whose own forward fx did not trace."""
    for module in {id(m): m for m in model.modules()}.values():
        record = census.record(module)
        if record is None or not record.activations or module_op(module) is not None:
            continue
        if isinstance(module, QuantizedActivation) or any(p in traced_owners for p in paths[id(module)]):
            continue
        owner = paths[id(module)][0]
        if _inside_surgeon_layer(owner, modules_by_path) or isinstance(modules_by_path.get(owner),
                                                                        QuantizedActivation):
            continue
        per_call = len(record.activations) // max(record.calls, 1)
        counts: dict[str, int] = defaultdict(int)
        for call in record.activations[:per_call]:
            site = _functional_site("hidden_function", owner, call.op, counts[call.op], module)
            counts[call.op] += 1
            site.input_shape = call.shape
            try:
                graph = trace_owner(module, record.arguments)
                ops = [op for _, _, op, _ in functional_nodes(graph, owner)]
                if ops.count(call.op) <= site.occurrence:
                    raise UnsupportedCall("its traced forward does not contain this call")
                node = next(n for n, _, op, occ in functional_nodes(graph, owner)
                        if op == call.op and occ == site.occurrence)
                site.spec = _spec_of_node(node, call.op)
            except Exception as exc:
                site.blocker = (f"{call.kind} {call.op} inside {type(module).__name__}, which could not be traced: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            sites.append(site)


def _add_functional_depthwise_sites(model: nn.Module, census: Census, paths: dict[int, list[str]],
                                    sites: list[Site]) -> None:
    """Depthwise convs called as ``F.conv2d(..., groups=C)``: listed as unreachable, with what would fix it."""
    for module in {id(m): m for m in model.modules()}.values():
        record = census.record(module)
        if record is None or not record.functional_depthwise:
            continue
        owner = paths[id(module)][0]
        per_call = len(record.functional_depthwise) // max(record.calls, 1)
        for occurrence, shape in enumerate(record.functional_depthwise[:max(per_call, 1)]):
            sites.append(Site(
                path=functional_site_path(owner, "conv2d", occurrence), target="depthwise_conv", op="conv2d",
                access="call_function", module_type=type(module).__name__, aliases=[owner], calls=record.calls,
                input_shape=shape, owner=owner, occurrence=occurrence,
                blocker=f"depthwise F.conv2d called in {type(module).__name__}.forward: its kernel is a plain "
                        "tensor, not an nn.Conv2d module, so there is no layer to swap (make it an nn.Conv2d)"))


# ------------------------------------------------------------------------------------------- decisions
def decide(analysis: Analysis, model: nn.Module, recipe: Recipe) -> None:
    """Apply the recipe's rules to every site (first matching rule wins)."""
    modules_by_path = dict(model.named_modules(remove_duplicate=False))
    for index, rule in enumerate(recipe.rules):
        names = [name for site in analysis.sites if site.target == rule.target for name in (site.path, *site.aliases)]
        for pattern in rule.include:
            if not any(match_pattern(pattern, name) for name in names):
                raise RecipeError(f"recipe field 'rules[{index}].include': pattern {pattern!r} matches no "
                                  f"{rule.target} site")
    for site in analysis.sites:
        skipped = ""
        for index, rule in enumerate(recipe.rules):
            if not rule_targets(rule, site) or not _rule_accepts(rule, site):
                continue
            if not (rule.selects(site.path) or _alias_selected(rule, site)):
                skipped = skipped or f"excluded by rules[{index}] patterns"
                continue
            if rule.target == "depthwise_conv" and not site.blocker:
                conv = modules_by_path[site.path]
                if max(conv.kernel_size) < rule.option("min_kernel"):
                    skipped = f"kernel {tuple(conv.kernel_size)} is below min_kernel={rule.option('min_kernel')}"
                    continue
            site.rule = index
            if site.blocker:
                site.action, site.reason = "unreachable", site.blocker
                break
            site.action, site.reason = "swap", ""
            if rule.target in ("depthwise_conv", "conv"):
                _decide_conv(site, rule, modules_by_path[site.path])
            elif rule.target == "norm":
                _estimate_frozen(site, rule)
            elif rule.target in ("gate", "matmul"):
                pass  # shapes are only known at run time
            else:
                _estimate_activation(site, rule)
            break
        if site.rule is None and skipped:
            site.action, site.reason = "skip", skipped


def _rule_accepts(rule: Rule, site: Site) -> bool:
    """Op-level filters of a rule (activation ops, attention, which norms)."""
    if rule.target == "activation":
        if site.spec is not None and site.spec.recipe_op not in rule.option("ops"):
            return False
        return not (site.op == "scaled_dot_product_attention" and not rule.option("attention"))
    if rule.target == "norm":
        return rule.option("batchnorm") if site.op.startswith("batchnorm") else rule.option("layernorm")
    return True


def _alias_selected(rule: Rule, site: Site) -> bool:
    return any(rule.selects(alias) for alias in site.aliases if alias != site.path)


def _decide_conv(site: Site, rule: Rule, conv: nn.Module) -> None:
    if type(conv) is nn.Conv2d:
        site.op = "conv2d"
    elif CONV2D_SAME is not None and type(conv) is CONV2D_SAME:
        site.op = "conv2d_same"
    else:
        site.action = "unreachable"
        site.reason = f"{type(conv).__name__} is a Conv2d subclass with its own forward; replacing it could " \
                      "change its output"
        return
    if conv.padding_mode != "zeros":
        site.action, site.reason = "unreachable", f"padding_mode {conv.padding_mode!r} is not supported"
        return
    if rule.target == "conv":
        site.saved_bytes_before = _numel(site.input_shape) * conv.weight.element_size()
        site.saved_bytes_after = 0
        return
    if rule.layer == "linear":
        site.added_params = conv.weight.numel()
        site.saved_bytes_before = site.saved_bytes_after = _numel(site.input_shape) * conv.weight.element_size()
        return
    _estimate_quadratic(site, rule, conv)
