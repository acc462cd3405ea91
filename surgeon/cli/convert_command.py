"""The ``convert`` command: convert a model with a recipe, verify it, save it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated

import typer

from surgeon.cli.common import (
    ArchOpt,
    JsonOpt,
    ModelArg,
    NonStrictOpt,
    RecipeOpt,
    WeightsOpt,
    fail,
    friendly_errors,
    load_model_argument,
    progress,
    stderr,
    stdout,
)
from surgeon.errors import SurgeonWarning


@friendly_errors
def convert(model: ModelArg,
            out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory.")] = None,
            recipe: RecipeOpt = "quadranet-v2-s2a", weights: WeightsOpt = None, arch: ArchOpt = None,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="Convert and verify, write nothing.")] = False,
            force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
            json_output: JsonOpt = False, non_strict: NonStrictOpt = False,
            random_init: Annotated[bool, typer.Option("--random-init",
                                                      help="Use random weights (no download).")] = False) -> None:
    """Convert MODEL with RECIPE, verify the output is unchanged, and save it to OUT."""
    from surgeon.api import convert as convert_model
    from surgeon.api import trainable_parameters
    from surgeon.graph.probe import default_input, output_difference
    from surgeon.io.converted import save as save_converted

    if out is None and not dry_run:
        raise fail("--out DIR is required (or use --dry-run)")
    if out is not None and out.exists() and not force and not dry_run:
        raise fail(f"{out} already exists (use --force to replace it)")
    from surgeon.recipe import load_recipe

    resolved_recipe = load_recipe(recipe)  # a bad recipe is named before anything is downloaded or built
    loaded = load_model_argument(model, weights, arch, pretrained=not random_init, non_strict=non_strict)
    with progress("converting"), warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)  # printed below as one line, with the other warnings
        converted = convert_model(loaded.model, resolved_recipe, base=loaded.base)
        check = output_difference(loaded.model, converted, default_input(loaded.model, batch=2))
    info = converted.surgeon_info
    swapped = [s for s in info.sites if s.action == "swap"]
    unreachable = [s for s in info.sites if s.action == "unreachable"]
    trainable = sum(p.numel() for p in trainable_parameters(converted).values())
    if out is not None and not dry_run:
        with progress(f"writing {out}"):
            save_converted(converted, out, force=force)
    report = {
        "schema": "surgeon.convert/1", "model": model, "recipe": info.recipe.name, "out": None if dry_run else
        str(out), "dry_run": dry_run, "swapped": len(swapped), "unreachable": [s.to_dict() for s in unreachable],
        "swapped_by_op": {op: sum(1 for s in swapped if s.op == op) for op in sorted({s.op for s in swapped})},
        "swapped_by_target": {t: sum(1 for s in swapped if s.target == t) for t in sorted({s.target for s in swapped})},
        "trainable_parameters": trainable, "verification": check, "warnings": info.warnings,
    }
    if json_output:
        print(json.dumps(report, indent=2))
        return
    ops = ", ".join(f"{n} {op}" for op, n in report["swapped_by_op"].items())
    ops = f"{ops}; by target: " + ", ".join(f"{n} {t}" for t, n in report["swapped_by_target"].items())
    stdout.print(f"converted {model} with '{info.recipe.name}': {len(swapped)} sites swapped ({ops}); "
                 f"{trainable:,} trainable parameters", markup=False)
    for site in unreachable:
        stdout.print(f"  unreachable: {site.path}: {site.reason}", markup=False)
    stdout.print(f"verification (eval, batch 2): max |Δ logit| = {check['max_abs_diff']:.3g} "
                 f"({check['relative']:.3g} of max |logit| {check['max_abs_output']:.3g})", markup=False)
    stdout.print("dry run: nothing written" if dry_run else f"saved to {out}", markup=False)
    for warning in info.warnings:
        stderr.print(f"warning: {warning}", markup=False)
