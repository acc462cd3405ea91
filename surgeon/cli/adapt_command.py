"""The ``adapt`` command: train a converted model's adapters on an image folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from surgeon.cli.common import JsonOpt, fail, friendly_errors, progress, stderr, stdout


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

    from surgeon.io.adapter_artifacts import save_adapter, trainable_summary
    from surgeon.io.artifacts import load as load_artifact
    from surgeon.train.adapt import adapt as run_adapt
    from surgeon.train.adapt import evaluate, require_trainable
    from surgeon.train.data import image_folder_data
    from surgeon.train.devices import amp_dtype, resolve_device
    from surgeon.train.distributed import distributed_setup, trainable_digest

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
    if adapter_out is not None:
        _check_adapter_out(out, adapter_out, force)
    with progress(f"loading {out if resume else directory}"):
        model = load_artifact(str(out) if resume else directory, verify=not no_verify)
    folders, head_classes = image_folder_data(data, model, batch_size, workers, distributed=world > 1, seed=seed,
                                              pin_memory=target.type == "cuda")
    if folders.skipped:
        stderr.print(f"warning: skipped {folders.skipped} unreadable image(s)", markup=False)
    _fit_head(model, head_classes, folders.classes, folders.class_map is not None, say)
    require_trainable(model)
    model.to(target)
    before = None
    if folders.val is not None and not resume:
        before = evaluate(model, folders.val, channels_last, amp)
        say(f"before adaptation: val top-1 {before[0]:.2f}%, top-5 {before[1]:.2f}%")
    report = run_adapt(model, folders.train, folders.val, epochs=epochs, lr=lr, weight_decay=weight_decay,
                       clip_grad=clip_grad or None, warmup_epochs=warmup_epochs, channels_last=channels_last,
                       seed=seed, out=out, resume=resume, force=force, log=say, update_bn_stats=update_bn_stats,
                       stop_after=stop_after, device=str(target), amp=amp, compile=compile_backend,
                       retain_cpu_memory=retain_cpu_memory)
    if adapter_out is not None and rank == 0:
        save_adapter(model, adapter_out, force=force)
        say(f"adapter-only artifact in {adapter_out} ({trainable_summary(model)})")
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


def _check_adapter_out(out: Path, adapter_out: Path, force: bool) -> None:
    """The adapter artifact goes to its own directory: never OUT itself, inside it, or around it."""
    from surgeon.io.atomic import output_directory
    from surgeon.io.ownership import require_replaceable

    first, second = out.resolve(), adapter_out.resolve()
    if first == second or first.is_relative_to(second) or second.is_relative_to(first):
        raise fail(f"--adapter-out {adapter_out} must be a directory of its own, not --out {out} or inside or "
                   "around it")
    require_replaceable(output_directory(adapter_out), force)


def _fit_head(model: Any, classes: int, names: list[str], indices: bool, say: Callable[[str], None]) -> None:
    """A new trainable classifier head when the data has another number of classes than the model."""
    if classes != getattr(model, "num_classes", classes):
        if (getattr(model, "surgeon_info", None) is not None
                and model.surgeon_info.base.get("transformers_config") is not None):
            from surgeon.io.transformers_source import reset_head

            reset_head(model, names)
            say(f"classifier head reset to {classes} classes ({', '.join(names[:5])}"
                f"{', …' if classes > 5 else ''}); the new head is trainable")
            return
        if not hasattr(model, "reset_classifier"):
            raise fail(f"the data has {classes} classes but the model has {model.num_classes} and no "
                       "reset_classifier(); rebuild its head first")
        model.reset_classifier(classes)
        model.get_classifier().requires_grad_(True)
        model.surgeon_info.base.setdefault("model_args", {})["num_classes"] = classes
        say(f"classifier head reset to {classes} classes ({', '.join(names[:5])}"
            f"{', …' if classes > 5 else ''}); the new head is trainable")
    elif indices:
        say("class folders are class indices of the pretrained head: head kept")
