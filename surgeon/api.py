"""Python API: plan and convert any ``nn.Module`` with a recipe."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.errors import SurgeonError, SurgeonWarning
from surgeon.graph.decisions import decide
from surgeon.graph.discovery import Analysis, discover
from surgeon.graph.plan import Plan
from surgeon.graph.probe import default_input, model_name
from surgeon.graph.rewrite import ConversionInfo, apply_decisions, deep_copy, set_trainable
from surgeon.methods.registry import get_method
from surgeon.recipe import Recipe, load_recipe

RecipeLike = str | Path | Recipe | dict[str, Any]
DEFAULT_RECIPE = "quadranet-v2-s2a"


def _analyse(model: nn.Module, recipe: Recipe, example_input: torch.Tensor | None) -> Analysis:
    was_training = model.training
    model.eval()  # the census must not update BatchNorm statistics
    try:
        analysis = discover(model, example_input)
    finally:
        model.train(was_training)
    decide(analysis, model, recipe)
    reason = nothing_trainable(analysis, recipe)
    if reason:
        analysis.warnings.append(reason)
    return analysis


def nothing_trainable(analysis: Analysis, recipe: Recipe) -> str | None:
    """Why a conversion would leave no parameter to train (None when something will train)."""
    def adds_parameters(rule_index: int | None) -> bool:
        rule = recipe.rules[rule_index] if rule_index is not None else None
        return rule is not None and get_method(rule.target, rule.layer).adds_parameters

    if recipe.trainable or any(s.action == "swap" and adds_parameters(s.rule) for s in analysis.sites):
        return None
    if not any(adds_parameters(index) for index in range(len(recipe.rules))):
        why = f"recipe '{recipe.name}' has no depthwise_conv rule and no 'trainable' parameters"
    else:
        depthwise = [s for s in analysis.sites if s.target == "depthwise_conv"]
        why = (f"no depthwise conv matched (groups == in == out channels; found {len(depthwise)}"
               + (f", none swapped: {depthwise[0].reason}" if depthwise and depthwise[0].reason else "") + ")")
    return (f"nothing will be trainable: {why}; adapt will refuse this model unless a recipe lists parameters "
            "in 'trainable'")


def plan(model: nn.Module, recipe: RecipeLike = DEFAULT_RECIPE, example_input: torch.Tensor | None = None) -> Plan:
    """What ``convert`` would do, site by site, without changing the model."""
    resolved = load_recipe(recipe)
    example = example_input if example_input is not None else default_input(model)
    analysis = _analyse(model, resolved, example)
    return Plan(model=model_name(model), recipe=resolved, sites=analysis.sites, input_shape=tuple(example.shape),
                warnings=analysis.warnings)


def convert(model: nn.Module, recipe: RecipeLike = DEFAULT_RECIPE, example_input: torch.Tensor | None = None,
            inplace: bool = False, base: dict[str, Any] | None = None, check_complete: bool = True) -> nn.Module:
    """Apply a recipe. Returns the converted model (the same object when ``inplace``, unless its root forward
    had to be rewritten); only adapter parameters (and the recipe's ``trainable`` globs) require grad.

    ``check_complete`` re-plans the result to prove no site was missed (a second forward pass); ``load`` skips it
    for artifacts that passed it when they were converted."""
    resolved = load_recipe(recipe)
    work = model if inplace else deep_copy(model)
    example = example_input if example_input is not None else default_input(work)
    analysis = _analyse(work, resolved, example)
    # how each owner was called (non-tensor arguments), from the census discovery already took
    observed = {key: record.arguments for key, record in analysis.census.modules.items()}
    converted = apply_decisions(work, analysis, resolved, observed)
    set_trainable(converted, resolved)
    if check_complete:
        _check_complete(converted, resolved, example)
    idle = nothing_trainable(analysis, resolved)
    if idle:
        warnings.warn(idle, SurgeonWarning, stacklevel=2)
    recorded = dict(base or {"architecture": model_name(model),
                             "class": f"{type(model).__module__}.{type(model).__qualname__}"})
    recorded["example_input_shape"] = list(example.shape)
    converted.surgeon_info = ConversionInfo(recipe=resolved, sites=analysis.sites, base=recorded,
                                            warnings=list(analysis.warnings))
    return converted


def _check_complete(converted: nn.Module, recipe: Recipe, example: torch.Tensor) -> None:
    """Re-planning a converted model must find nothing left to swap; otherwise a site was missed."""
    analysis = _analyse(converted, recipe, example)
    left = [s.path for s in analysis.sites if s.action == "swap"]
    if left:
        raise SurgeonError(f"conversion left {len(left)} site(s) unconverted: {', '.join(left[:5])}")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name → parameter for everything that requires grad (what an optimizer should get)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
