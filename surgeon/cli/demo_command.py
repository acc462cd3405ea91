"""The ``demo`` command: the whole pipeline offline on real weights and photos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surgeon.cli.common import friendly_errors, stdout


@friendly_errors
def demo(out: Annotated[Path, typer.Option("--out", "-o", help="Where to put every artifact.")] = Path("surgeon-demo"),
         epochs: Annotated[int, typer.Option(help="Adaptation epochs.")] = 3,
         crops_per_photo: Annotated[int, typer.Option("--crops-per-photo", help="Dataset size knob.")] = 40,
         batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
         export: Annotated[bool, typer.Option("--export/--no-export", help="End with an ONNX export checked "
                                              "by onnxruntime.")] = True) -> None:
    """Run the whole pipeline offline (plan, convert, adapt, merge, reload, export) on real weights and photos."""
    from surgeon.cli.demo import run_demo

    report = run_demo(out, say=lambda line: stdout.print(line, markup=False, highlight=False), epochs=epochs,
                      crops_per_photo=crops_per_photo, batch_size=batch_size, export=export)
    stdout.print("\nartifacts:", markup=False)
    for what, where in report.artifacts.items():
        stdout.print(f"  {what}: {where}", markup=False)
