"""The ``plan`` command: every site of a model and what a recipe would do there."""

from __future__ import annotations

from surgeon.cli.common import (
    ArchOpt,
    JsonOpt,
    ModelArg,
    NonStrictOpt,
    RecipeOpt,
    WeightsOpt,
    friendly_errors,
    load_model_argument,
    progress,
    stderr,
    stdout,
)


@friendly_errors
def plan(model: ModelArg, recipe: RecipeOpt = "quadranet-v2-s2a", weights: WeightsOpt = None, arch: ArchOpt = None,
         json_output: JsonOpt = False, non_strict: NonStrictOpt = False) -> None:
    """Show every site of MODEL and what RECIPE would do there (nothing is written)."""
    from surgeon.api import plan as plan_model

    loaded = load_model_argument(model, weights, arch, pretrained=False, non_strict=non_strict)
    with progress("analysing"):
        result = plan_model(loaded.model, recipe)
    if json_output:
        print(result.to_json())
        return
    stdout.print(result.table())
    stdout.print(result.summary_line(), markup=False)
    for warning in result.warnings:
        stderr.print(f"warning: {warning}", markup=False)
