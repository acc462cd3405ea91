"""Site discovery: every place in a model where a recipe rule could apply.

Sources, combined so that nothing is skipped silently:

* the module tree - depthwise convs, convs, norms and activation modules, reached by swapping the submodule (this
  also reaches modules inside fx leaves, such as the activation inside timm's ``BatchNormAct2d``);
* the fx graph - ``call_function``/``call_method`` activations, gate products and attention matmuls, attributed to
  the module whose own ``forward`` makes the call (the *owner*, which becomes a GraphModule when rewritten);
* the run-time census - activation calls inside modules fx did not trace, call counts and shapes.

What a recipe does at each site is decided afterwards (:mod:`surgeon.graph.decisions`).
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from surgeon.graph.census import Census, take_census
from surgeon.graph.nodes import functional_nodes, functional_site_path, gate_nodes, input_reusable, matmul_nodes
from surgeon.graph.tracing import trace_model, trace_owner
from surgeon.methods.base import Site
from surgeon.methods.registry import built_types
from surgeon.methods.s2a.variants import layer_norm_channel_dim
from surgeon.methods.variant import is_variant
from surgeon.ops.activations import ActivationSpec, UnsupportedCall, module_op, spec_from_call, spec_from_module


def _timm_class(module: str, name: str) -> type | None:
    """A timm layer class, or None if this timm does not have it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # pragma: no cover
        return None


CONV2D_SAME = _timm_class("timm.layers.conv2d_same", "Conv2dSame")
BATCHNORM_ACT = _timm_class("timm.layers", "BatchNormAct2d")


@dataclass
class Analysis:
    sites: list[Site]
    trace_error: str | None
    census: Census  # the run-time census the sites were found with (its error says why it is empty)
    warnings: list[str]


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


def computes_as_conv2d(conv: nn.Module) -> bool:
    """A Conv2d subclass that only sets arguments (Hugging Face's ``EfficientNetDepthwiseConv2d``): it overrides
    neither ``forward`` nor ``_conv_forward``, so it computes what a Conv2d computes and is one."""
    cls = type(conv)
    return (isinstance(conv, nn.Conv2d) and cls.forward is nn.Conv2d.forward
            and cls._conv_forward is nn.Conv2d._conv_forward)


def _conv_op(conv: nn.Module) -> tuple[str, str]:
    """The conv call a conv site makes (``conv2d`` or timm's dynamic-"same" ``conv2d_same``), and why it cannot
    be replaced ('' when it can)."""
    if type(conv) is nn.Conv2d or computes_as_conv2d(conv):
        op = "conv2d"
    elif CONV2D_SAME is not None and type(conv) is CONV2D_SAME:
        op = "conv2d_same"
    else:
        return "conv2d", (f"{type(conv).__name__} is a Conv2d subclass with its own forward; replacing it could "
                          "change its output")
    if conv.padding_mode != "zeros":
        return op, f"padding_mode {conv.padding_mode!r} is not supported"
    return op, ""


def _module_paths(model: nn.Module) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        paths[id(module)].append(path)
    return paths


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
    modules_by_path = dict(model.named_modules(remove_duplicate=False))
    sites = _module_sites(model, graph, census, paths, modules_by_path)
    traced_owners = _graph_sites(model, graph, modules_by_path, sites) if graph is not None else set()
    _add_hidden_sites(model, census, traced_owners, paths, modules_by_path, sites)
    _add_functional_depthwise_sites(model, census, paths, sites)
    _functional_shapes(sites, census, modules_by_path)
    return Analysis(sites=sites, trace_error=trace_error, census=census, warnings=warnings)


def _module_sites(model: nn.Module, graph: torch.fx.Graph | None, census: Census, paths: dict[int, list[str]],
                  modules_by_path: dict[str, nn.Module]) -> list[Site]:
    """Sites reached through the module tree: one per module object, with every path it has."""
    module_calls: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.nodes if graph is not None else ():
        if node.op == "call_module":
            module_calls[node.target].append(node)  # type: ignore[index]
    surgeon_layers = built_types()
    sites: list[Site] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        if id(module) in seen or isinstance(module, surgeon_layers):
            continue
        seen.add(id(module))
        target = site_target(module)
        if target is None or _inside_surgeon_layer(path, modules_by_path):
            continue
        aliases = paths[id(module)]
        calls = [node for alias in aliases for node in module_calls.get(alias, ())]
        access = "call_module" if calls else "module_tree"
        record = census.record(module)
        op = {"depthwise_conv": "conv2d", "conv": "conv2d", "norm": norm_op(module)}.get(target) or module_op(module)
        site = Site(path=path, target=target, op=op or "",
                    access=access, module_type=type(module).__name__, aliases=aliases,
                    calls=record.calls if record else 0,
                    input_shape=record.input_shape if record else None,
                    output_shape=record.output_shape if record else None)
        if target in ("depthwise_conv", "conv"):
            site.op, site.blocker = _conv_op(module)
        if target == "activation":
            try:
                site.spec = spec_from_module(module)
            except UnsupportedCall as exc:
                site.blocker = str(exc)
            site.input_reusable = bool(calls) and all(input_reusable(n, model) for n in calls)
        sites.append(site)
    return sites


def _graph_sites(model: nn.Module, graph: torch.fx.Graph, modules_by_path: dict[str, nn.Module],
                 sites: list[Site]) -> set[str]:
    """Functional sites of the whole-model trace (activation calls, gate products, attention matmuls); returns
    the owners whose forward was traced."""
    traced_owners: set[str] = set()
    for node, owner, op, occurrence, _ in functional_nodes(graph):
        owner_module = modules_by_path.get(owner)
        if owner_module is not None and (module_op(owner_module) or _is_built_layer(owner_module)):
            continue
        traced_owners.add(owner)
        site = _functional_site(node.op, owner, op, occurrence, owner_module)
        site.input_reusable = input_reusable(node, model)
        try:
            site.spec = _spec_of_node(node, op)
        except UnsupportedCall as exc:
            site.blocker = str(exc)
        sites.append(site)
    for target, found in (("gate", gate_nodes(graph, model)), ("matmul", matmul_nodes(graph, model))):
        for node, owner, op, occurrence, detail in found:
            owner_module = modules_by_path.get(owner)
            sites.append(Site(path=functional_site_path(owner, op, occurrence), target=target, op=op,
                              access=node.op,
                              module_type=type(owner_module).__name__ if owner_module is not None else "?",
                              owner=owner, occurrence=occurrence, aliases=[owner], detail=detail))
    return traced_owners


def _functional_shapes(sites: list[Site], census: Census, modules_by_path: dict[str, nn.Module]) -> None:
    """Input shapes and call counts of functional sites, from their owner's census record."""
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


def _inside_surgeon_layer(path: str, modules_by_path: dict[str, nn.Module]) -> bool:
    """Whether a module belongs to a layer a method built (a wrapped original, a merged layer's convs). Variants
    are the original module itself: their children are sites of their own."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if _is_built_layer(modules_by_path.get(".".join(parts[:i]))):
            return True
    return False


def _is_built_layer(module: nn.Module | None) -> bool:
    """A layer a method built around the original (not a variant, which is the original module itself)."""
    return isinstance(module, built_types()) and not is_variant(module)


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
        if _is_built_layer(module) or any(p in traced_owners for p in paths[id(module)]):
            continue
        owner = paths[id(module)][0]
        if _inside_surgeon_layer(owner, modules_by_path) or _is_built_layer(modules_by_path.get(owner)):
            continue
        per_call = len(record.activations) // max(record.calls, 1)
        counts: dict[str, int] = defaultdict(int)
        for call in record.activations[:per_call]:
            site = _functional_site("hidden_function", owner, call.op, counts[call.op], module)
            counts[call.op] += 1
            site.input_shape = call.shape
            try:
                graph = trace_owner(module, record.arguments)
                ops = [found.op for found in functional_nodes(graph, owner)]
                if ops.count(call.op) <= site.occurrence:
                    raise UnsupportedCall("its traced forward does not contain this call")
                node = next(found.node for found in functional_nodes(graph, owner)
                            if found.op == call.op and found.occurrence == site.occurrence)
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
