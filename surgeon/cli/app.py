"""The ``surgeon`` command line: a thin layer over the Python API.

Errors are one line on stderr with exit code 2 (``SURGEON_DEBUG=1`` re-raises for a traceback); progress is
shown only when stderr is a terminal; ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from surgeon.errors import SurgeonError, SurgeonWarning

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert pretrained vision models into quadratic-adapter, low-activation-memory networks.")
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    stderr.print(f"error: {message}", markup=False, highlight=False)
    return typer.Exit(2)


def friendly_errors(command: F) -> F:
    """One-line errors and exit code 2 instead of tracebacks."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except SurgeonError as exc:
            if os.environ.get("SURGEON_DEBUG"):
                raise
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted") from None
        except Exception as exc:
            if os.environ.get("SURGEON_DEBUG"):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise fail(f"{type(exc).__name__}: {first} (set SURGEON_DEBUG=1 for the traceback)") from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress(message: str) -> Iterator[None]:
    if sys.stderr.isatty():
        with stderr.status(message):
            yield
    else:
        yield


ModelArg = Annotated[str, typer.Argument(help="timm name, hf-hub:org/name, local-dir:PATH, a directory, or a "
                                              "weights file (with --arch).")]
RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Shipped recipe name or a TOML file.")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", help="Weights file for a timm architecture.")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="timm architecture of a weights file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
NonStrictOpt = Annotated[bool, typer.Option("--non-strict", help="Allow missing/unexpected checkpoint keys.")]


def _load(model: str, weights: Path | None, arch: str | None, pretrained: bool, non_strict: bool) -> Any:
    from surgeon.io.artifacts import load_model

    with progress(f"loading {model}"):
        return load_model(model, weights=str(weights) if weights else None, arch=arch, pretrained=pretrained,
                          strict=not non_strict)


@app.command()
@friendly_errors
def plan(model: ModelArg, recipe: RecipeOpt = "quadranet-v2-s2a", weights: WeightsOpt = None, arch: ArchOpt = None,
         json_output: JsonOpt = False, non_strict: NonStrictOpt = False) -> None:
    """Show every site of MODEL and what RECIPE would do there (nothing is written)."""
    import surgeon

    loaded = _load(model, weights, arch, pretrained=False, non_strict=non_strict)
    with progress("analysing"):
        result = surgeon.plan(loaded.model, recipe)
    if json_output:
        print(result.to_json())
        return
    stdout.print(result.table())
    stdout.print(result.summary_line(), markup=False)
    for warning in result.warnings:
        stderr.print(f"warning: {warning}", markup=False)


@app.command()
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
    import surgeon
    from surgeon.graph.probe import default_input, output_difference

    if out is None and not dry_run:
        raise fail("--out DIR is required (or use --dry-run)")
    if out is not None and out.exists() and not force and not dry_run:
        raise fail(f"{out} already exists (use --force to replace it)")
    loaded = _load(model, weights, arch, pretrained=not random_init, non_strict=non_strict)
    with progress("converting"), warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)  # printed below as one line, with the other warnings
        converted = surgeon.convert(loaded.model, recipe, base=loaded.base)
        check = output_difference(loaded.model, converted, default_input(loaded.model, batch=2))
    info = converted.surgeon_info
    swapped = [s for s in info.sites if s.action == "swap"]
    unreachable = [s for s in info.sites if s.action == "unreachable"]
    trainable = sum(p.numel() for p in surgeon.trainable_parameters(converted).values())
    if out is not None and not dry_run:
        with progress(f"writing {out}"):
            surgeon.save(converted, out, force=force)
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


@app.command()
@friendly_errors
def adapt(directory: Annotated[str, typer.Argument(help="Converted model: directory or hf-hub:org/name.")],
          data: Annotated[Path, typer.Option("--data", help="ROOT with train/<class>/ and val/<class>/ images.")],
          out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory (rewritten each epoch).")],
          epochs: Annotated[int, typer.Option(help="Epochs.")] = 10,
          batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size per process.")] = 32,
          lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
          weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.05,
          clip_grad: Annotated[float, typer.Option("--clip-grad", help="Gradient-norm clip (0: off).")] = 5.0,
          warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up.")] = 0.0,
          workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 0,
          seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
          channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last")] = True,
          update_bn_stats: Annotated[bool, typer.Option("--update-bn-stats", help="Let BatchNorm use and update "
                                                        "batch statistics (default: frozen trunk).")] = False,
          resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in OUT exactly.")] = False,
          stop_after: Annotated[int | None, typer.Option("--stop-after", help="Train at most N epochs in this run "
                                                         "(the schedule still spans --epochs); continue later "
                                                         "with --resume.")] = None,
          force: Annotated[bool, typer.Option("--force", help="Start over even if OUT exists.")] = False,
          no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the SHA-256 check of DIR.")] = False,
          adapter_out: Annotated[Path | None, typer.Option("--adapter-out", help="Also write an adapter-only "
                                                           "artifact (trainable tensors + adapter_config.json) "
                                                           "here; load it over its base.")] = None,
          device: Annotated[str, typer.Option("--device", help="auto (a GPU when one is visible; under torchrun "
                                              "this rank's), cpu, cuda or cuda:N.")] = "auto",
          amp: Annotated[str, typer.Option("--amp", help="Mixed precision: none, bf16 or fp16 (with loss "
                                           "scaling).")] = "none",
          compile_backend: Annotated[str | None, typer.Option("--compile", help="Train the forward under "
                                                              "torch.compile with this backend (inductor, "
                                                              "aot_eager, ...).")] = None,
          retain_cpu_memory: Annotated[bool, typer.Option(
              "--retain-cpu-memory/--release-cpu-memory", help="On the CPU, keep freed memory in the process for "
              "the next step's tensors instead of returning it to the system after every op (faster; the "
              "resident size stays at the step's peak).")] = True,
          json_output: JsonOpt = False) -> None:
    """Train the adapters of a converted model on an image-folder dataset (torchrun for several processes)."""
    import random

    import numpy
    import torch

    import surgeon
    from surgeon.train.adapt import adapt as run_adapt
    from surgeon.train.adapt import distributed_setup, evaluate, require_trainable, trainable_digest
    from surgeon.train.data import image_folder_data
    from surgeon.train.devices import amp_dtype, resolve_device

    target = resolve_device(device)
    amp_dtype(amp)
    if compile_backend is not None:
        from surgeon.train.compiling import check_backend

        check_backend(compile_backend)
    rank, world = distributed_setup(target)
    torch.manual_seed(seed)  # same on every rank: a reset head starts identical everywhere
    random.seed(seed)
    numpy.random.seed(seed)

    log_console = stderr if json_output else stdout  # with --json, stdout carries only the JSON document

    def say(line: str) -> None:
        if rank == 0:
            log_console.print(line, markup=False, highlight=False)

    if out.exists() and not (resume or force):
        raise fail(f"{out} already exists (use --resume to continue it or --force to start over)")
    if adapter_out is not None and adapter_out.exists() and not force:
        raise fail(f"{adapter_out} already exists (use --force to replace it)")
    with progress(f"loading {out if resume else directory}"):
        model = surgeon.load(str(out) if resume else directory, verify=not no_verify)
    folders, head_classes = image_folder_data(data, model, batch_size, workers, distributed=world > 1, seed=seed,
                                              pin_memory=target.type == "cuda")
    if folders.skipped:
        stderr.print(f"warning: skipped {folders.skipped} unreadable image(s)", markup=False)
    if head_classes != getattr(model, "num_classes", head_classes):
        if not hasattr(model, "reset_classifier"):
            raise fail(f"the data has {head_classes} classes but the model has {model.num_classes} and no "
                       "reset_classifier(); rebuild its head first")
        model.reset_classifier(head_classes)
        model.get_classifier().requires_grad_(True)
        model.surgeon_info.base.setdefault("model_args", {})["num_classes"] = head_classes
        say(f"classifier head reset to {head_classes} classes ({', '.join(folders.classes[:5])}"
            f"{', …' if head_classes > 5 else ''}); the new head is trainable")
    elif folders.class_map is not None:
        say("class folders are class indices of the pretrained head: head kept")
    require_trainable(model)
    model.to(target)
    before = None
    if folders.val is not None and not resume:
        before = evaluate(model, folders.val, channels_last, amp)
        say(f"before adaptation: val top-1 {before[0]:.2f}%, top-5 {before[1]:.2f}%")
    report = run_adapt(model, folders.train, folders.val, epochs=epochs, lr=lr, weight_decay=weight_decay,
                       clip_grad=clip_grad or None, warmup_epochs=warmup_epochs, channels_last=channels_last,
                       seed=seed, out=out, resume=resume, log=say, update_bn_stats=update_bn_stats,
                       stop_after=stop_after, device=str(target), amp=amp, compile=compile_backend,
                       retain_cpu_memory=retain_cpu_memory)
    if adapter_out is not None and rank == 0:
        surgeon.save_adapter(model, adapter_out, force=True)
        say(f"adapter-only artifact in {adapter_out} ({surgeon.trainable_summary(model)})")
    digest = trainable_digest(model)
    if world > 1:
        print(f"rank {rank}: trainable sha256 {digest}", flush=True)
    final = report.final
    if json_output and rank == 0:
        print(json.dumps({"schema": "surgeon.adapt/1", "out": str(out), "epochs": epochs,
                          "trainable_parameters": report.trainable_parameters, "world_size": world,
                          "before": {"val_top1": before[0], "val_top5": before[1]} if before else None,
                          "history": [vars(h) for h in report.history], "trainable_sha256": digest,
                          "compile": {"backend": compile_backend, "graphs": report.compiled_graphs,
                                      "graph_breaks": report.graph_breaks} if compile_backend else None},
                         indent=2))
    elif final is not None:
        say(f"trained {report.trainable_parameters:,} parameters; checkpoint in {out}")


@app.command()
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
    import surgeon

    if out.exists() and not force:
        raise fail(f"{out} already exists (use --force to replace it)")
    with progress(f"loading {directory}"):
        model = surgeon.load(directory, verify=not no_verify)
    with progress("merging"):
        merged = surgeon.merge(model, fold_bn=fold_bn, dtype=dtype)
        surgeon.save_merged(merged, out, force=force)
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


@app.command("export")
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
    import surgeon
    from surgeon.io.export import FORMATS, image_inputs, record_export
    from surgeon.io.layout import resolve_directory

    if format not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    from_hub = str(directory).startswith("hf-hub:")
    if from_hub and out is None:
        raise fail("--out FILE is required when exporting an hf-hub: model (the download cache is not written to)")
    with progress(f"loading {directory}"):
        model = surgeon.load(directory, verify=not no_verify)
    if getattr(model, "surgeon_merge", None) is None:
        raise fail(f"{directory} is not a merged model; run `surgeon merge {directory} --out MERGED` and export "
                   "MERGED")
    local = resolve_directory(directory)
    target = out if out is not None else local / f"model{FORMATS[format]}"
    inputs, described = image_inputs(model, images) if images is not None else (None, None)
    with progress(f"exporting to {target}"):
        result = surgeon.export_model(model, target, format=format, inputs=inputs, inputs_description=described,
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


@app.command()
@friendly_errors
def push(directory: Annotated[Path, typer.Argument(help="Artifact directory (converted, adapted or merged).")],
         repo_id: Annotated[str, typer.Argument(help="Hub repository, org/name.")],
         private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
         create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of "
                                                                     "committing to the branch.")] = False,
         revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to.")] = None,
         token: Annotated[str | None, typer.Option("--token", help="Hub token (default: HF_TOKEN / login).")] = None,
         commit_message: Annotated[str | None, typer.Option("--commit-message", "-m")] = None,
         overwrite_card: Annotated[bool, typer.Option("--overwrite-card", help="Replace an existing README.md "
                                                                               "on the Hub.")] = False,
         json_output: JsonOpt = False) -> None:
    """Upload an artifact with a model card to the Hugging Face Hub (load it back with hf-hub:REPO_ID)."""
    from surgeon.io.push import push_to_hub

    if not sys.stderr.isatty():  # huggingface_hub's own progress bars would garble logs and one-line errors
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with progress(f"uploading to {repo_id}"):
        result = push_to_hub(directory, repo_id, private=private, create_pr=create_pr, revision=revision,
                             token=token, commit_message=commit_message, overwrite_card=overwrite_card)
    if json_output:
        print(json.dumps({"schema": "surgeon.push/1", "repo_url": result.repo_url, "commit_url": result.commit_url,
                          "pull_request_url": result.pull_request_url, "card_written": result.card_written},
                         indent=2))
        return
    stdout.print(f"pushed {directory} to {result.repo_url} ({result.commit_url})", markup=False)
    if not result.card_written:
        stdout.print("kept the README.md already on the Hub (use --overwrite-card to replace it)", markup=False)


@app.command()
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


def main() -> None:
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # retries and cache notes would bury the one-line error
    app()


if __name__ == "__main__":
    main()
