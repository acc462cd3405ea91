"""The ``merge`` command: fold trained adapters into an inference checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from surgeon.cli.common import JsonOpt, fail, friendly_errors, progress, stdout


@friendly_errors
def merge(directory: Annotated[str, typer.Argument(help="Converted (trained) model: directory or hf-hub:org/name.")],
          out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
          fold_bn: Annotated[bool, typer.Option("--fold-bn", help="Fold a BatchNorm that follows a quadratic "
                                                                  "layer into it.")] = False,
          dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16.")] = "fp32",
          force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
          no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the SHA-256 check of DIR.")] = False,
          json_output: JsonOpt = False) -> None:
    """Fold adapters into the QuadraLib-style inference checkpoint and save it to OUT."""
    from surgeon.graph.merge import merge as merge_model
    from surgeon.io.artifacts import load as load_artifact
    from surgeon.io.merged import save_merged

    if out.exists() and not force:
        raise fail(f"{out} already exists (use --force to replace it)")
    with progress(f"loading {directory}"):
        model = load_artifact(directory, verify=not no_verify)
    with progress("merging"):
        merged = merge_model(model, fold_bn=fold_bn, dtype=dtype)
        save_merged(merged, out, force=force)
    info = merged.surgeon_merge
    candidates = len(info.folded) + len(info.unfolded)
    report = {"schema": "surgeon.merge/1", "source": directory, "out": str(out), "quadratic_layers": len(info.layers),
              "folded_batchnorm": sorted(info.folded), "fold_candidates": candidates if fold_bn else 0,
              "unfolded_batchnorm": info.unfolded, "dtype": dtype, "verification": info.verification}
    if json_output:
        print(json.dumps(report, indent=2))
        return
    check = info.verification
    stdout.print(f"merged {len(info.layers)} quadratic layers"
                 + (f", folded {len(info.folded)} of {candidates} BatchNorm candidates" if fold_bn else "")
                 + f" ({dtype}) into {out}", markup=False)
    for path, reason in info.unfolded.items():
        stdout.print(f"  not folded after {path}: {reason}", markup=False)
    stdout.print(f"verification (fp32, eval, batch 2): merged vs unmerged max |Δ| = {check['max_abs_diff']:.3g} "
                 f"(relative {check['relative']:.3g})", markup=False)
