"""Merge: fold trained adapters into the inference format and revert everything that only mattered for training.

* every layer a method built becomes that method's inference form (``Method.merge``): a quadratic layer a dense
  :class:`QuadraConvDW` (QuadraLib layout), a linear delta is added to its kernel, memory variants and quantized
  activations give back the original module;
* each rewritten owner gives back its original module;
* optionally (``fold_bn``) a BatchNorm that only consumes a quadratic layer's output is folded into it.

The result is the original model class with quadratic layers in place (:mod:`surgeon.io.merged` saves it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgeon.errors import SurgeonError, first_line
from surgeon.graph.discovery import norm_op
from surgeon.graph.probe import default_input, output_difference
from surgeon.graph.rewrite import original_of, set_submodule
from surgeon.methods.quadratic.inference import QuadraConvDW
from surgeon.methods.quadratic.merge import fold_batchnorm
from surgeon.methods.registry import method_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MergeInfo:
    """Attached to merged models as ``surgeon_merge``: what a merged checkpoint must record."""

    base: dict[str, Any]
    recipe: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> geometry (+ aliases)
    folded: dict[str, str] = field(default_factory=dict)  # BN path -> kind
    unfolded: dict[str, str] = field(default_factory=dict)  # quadratic layer path -> why no BatchNorm was folded
    verification: dict[str, float] = field(default_factory=dict)
    dtype: str = "fp32"


class FoldedNormAct(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its normalisation is folded away: dropout + activation."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _check_finite(model: nn.Module) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            layer = name.rpartition(".")[0] or name
            raise SurgeonError(f"refusing to merge: layer '{layer}' has NaN/Inf in '{name}'")


def _revert(module: nn.Module, memo: dict[int, tuple[nn.Module, nn.Module]]) -> nn.Module:
    """Reverted module, once per object (shared modules stay shared); memo keeps originals alive so ids stay
    unique."""
    if id(module) in memo:
        return memo[id(module)][1]
    original = original_of(module)
    result = original if original is not None else module
    method = method_of(result)
    if method is not None:
        result = method.merge(result)
    memo[id(module)] = (module, result)
    for name, child in list(result.named_children()):
        new = _revert(child, memo)
        if new is not child:
            setattr(result, name, new)
    return result


def _batchnorm_kind(module: nn.Module) -> str | None:
    """``batchnorm`` / ``batchnorm_act`` for the norms a quadratic layer can absorb, else None."""
    op = norm_op(module)
    return op if op in ("batchnorm", "batchnorm_act") else None


def _fold_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(quadratic path, BN path) where the BN's only input is the quadratic layer's only use; and, for every
    other quadratic layer (each one is a fold candidate), why nothing was folded into it."""
    from surgeon.graph.tracing import trace_model

    layers = [path for path, module in model.named_modules() if isinstance(module, QuadraConvDW)]
    try:
        graph = trace_model(model)
    except Exception as exc:
        reason = f"the model could not be traced to find what follows it ({type(exc).__name__}: " \
                 f"{first_line(exc, 120)})"
        return [], dict.fromkeys(layers, reason)
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    pairs, unfolded = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), QuadraConvDW):
            continue
        reason = _fold_blocker(model, node, uses)
        if reason:
            unfolded[node.target] = reason
        else:
            pairs.append((node.target, next(iter(node.users)).target))
    for path in layers:
        if path not in unfolded and all(path != conv for conv, _ in pairs):
            unfolded[path] = "not called in the traced forward"
    return pairs, unfolded


def _fold_blocker(model: nn.Module, node: torch.fx.Node, uses: dict[str, int]) -> str:
    """Why the BatchNorm after this quadratic layer's call cannot be folded into it ('' when it can)."""
    if uses.get(node.target) != 1:
        return f"the layer is called at {uses.get(node.target)} sites"
    users = list(node.users)
    if len(users) != 1:
        return f"its output has {len(users)} users"
    user = users[0]
    if user.op != "call_module" or user.args[0] is not node:
        return f"its output goes to {user.op} {getattr(user.target, '__name__', user.target)}, not a BatchNorm"
    follower = model.get_submodule(user.target)
    if not _batchnorm_kind(follower):
        return f"it is followed by {type(follower).__name__} ({user.target}), not a BatchNorm"
    if uses.get(user.target) != 1:
        return f"the BatchNorm {user.target} is called at {uses.get(user.target)} sites"
    return ""


def apply_folds(model: nn.Module, folded: dict[str, str]) -> None:
    for bn_path, kind in folded.items():
        bn = model.get_submodule(bn_path)
        set_submodule(model, bn_path, nn.Identity() if kind == "batchnorm" else FoldedNormAct(bn.drop, bn.act))


def merge(model: nn.Module, fold_bn: bool = False, dtype: str = "fp32",
          example_input: torch.Tensor | None = None) -> nn.Module:
    """Merged copy of a converted (and usually trained) model; the input model is not changed."""
    info = getattr(model, "surgeon_info", None)
    if info is None:
        raise SurgeonError("merge needs a model produced by surgeon.convert / surgeon.load")
    if dtype not in DTYPES:
        raise SurgeonError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    _check_finite(model)
    merged = _revert(copy.deepcopy(model), {})
    merged.eval()
    folded: dict[str, str] = {}
    unfolded: dict[str, str] = {}
    if fold_bn:
        pairs, unfolded = _fold_pairs(merged)
        for conv_path, bn_path in pairs:
            bn = merged.get_submodule(bn_path)
            fold_batchnorm(merged.get_submodule(conv_path), bn)
            folded[bn_path] = _batchnorm_kind(bn) or "batchnorm"
        apply_folds(merged, folded)
    layers: dict[int, dict[str, Any]] = {}  # one entry per layer object, listing every path it has
    for path, module in merged.named_modules(remove_duplicate=False):
        if isinstance(module, QuadraConvDW):
            layers.setdefault(id(module), {"path": path, "aliases": [], **module.geometry()})["aliases"].append(path)
    example = example_input if example_input is not None else default_input(model, batch=2)
    verification = output_difference(model, merged, example)
    if dtype != "fp32":
        merged = merged.to(DTYPES[dtype])
    merged.requires_grad_(False)
    merged.surgeon_merge = MergeInfo(base=dict(info.base), recipe=info.recipe.to_dict(),
                                     layers={e["path"]: e for e in layers.values()}, folded=folded,
                                     unfolded=unfolded, verification=verification, dtype=dtype)
    return merged
