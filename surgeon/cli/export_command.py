"""The ``export`` command: a merged model to ONNX or torch.export, checked before it is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from surgeon.cli.common import JsonOpt, fail, friendly_errors, progress, stdout


@friendly_errors
def export(directory: Annotated[str, typer.Argument(help="Merged model: directory or hf-hub:org/name.")],
           format: Annotated[str, typer.Option("--format", "-f", help="onnx or torch-export.")] = "onnx",
           out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file (default: model.onnx or "
                                                    "model.pt2 inside DIR, listed in its model card).")] = None,
           images: Annotated[Path | None, typer.Option("--images", help="Folder of real images to check the "
                                                       "export on (default: seeded random inputs).")] = None,
           tolerance: Annotated[float | None, typer.Option("--tolerance", help="Largest max |Δ| / max |output| "
                                                           "accepted (default 1e-5 for fp32).")] = None,
           opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: the exporter's).")] = None,
           no_check: Annotated[bool, typer.Option("--no-check", help="Write without running the file.")] = False,
           force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
           no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the SHA-256 check of DIR.")] = False,
           json_output: JsonOpt = False) -> None:
    """Export a merged model to ONNX or torch.export (dynamic batch), checked against PyTorch before writing."""
    from surgeon.io.artifacts import load as load_artifact
    from surgeon.io.export import FORMATS, export_model, image_inputs, record_export
    from surgeon.io.layout import resolve_directory

    if format not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    from_hub = str(directory).startswith("hf-hub:")
    if from_hub and out is None:
        raise fail("--out FILE is required when exporting an hf-hub: model (the download cache is not written to)")
    with progress(f"loading {directory}"):
        model = load_artifact(directory, verify=not no_verify)
    if getattr(model, "surgeon_merge", None) is None:
        raise fail(f"{directory} is not a merged model; run `surgeon merge {directory} --out MERGED` and export "
                   "MERGED")
    local = resolve_directory(directory)
    target = out if out is not None else local / f"model{FORMATS[format]}"
    inputs, described = image_inputs(model, images) if images is not None else (None, None)
    with progress(f"exporting to {target}"):
        result = export_model(model, target, format=format, inputs=inputs, inputs_description=described,
                                      tolerance=tolerance, check=not no_check, opset=opset, force=force)
    recorded = record_export(local, result) if not from_hub else False
    if json_output:
        print(json.dumps({"schema": "surgeon.export/1", "source": directory, **result.to_dict(),
                          "recorded_in_card": recorded}, indent=2))
        return
    layers = f", {result.quadratic_ops} quadratic layers as surgeon.quadratic_dwconv" if format != "onnx" else ""
    stdout.print(f"exported {directory} to {result.path} ({format}, dynamic batch{layers}; "
                 f"{result.bytes / 1e6:.1f} MB, {result.seconds:.1f} s)", markup=False)
    check = result.check
    if check is not None:
        stdout.print(f"check with {check.runtime} on {check.inputs}, batch {' and '.join(map(str, check.batch_sizes))}"
                     f": max |Δ| = {check.max_abs_diff:.3g} (relative {check.relative:.3g}, tolerance "
                     f"{check.tolerance:.3g}): ok", markup=False)
    else:
        stdout.print("not checked (--no-check)", markup=False)
    if recorded:
        stdout.print(f"listed in {local / 'config.json'} (the model card of `surgeon push`)", markup=False)
