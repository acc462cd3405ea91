"""Adapter training: only trainable parameters (adapters, requested biases/heads) are optimised.

Defaults follow the QuadraNet V2 paper's fine-tuning recipe: AdamW, weight decay 0.05, gradient clipping at
5, cosine schedule, channels-last. Works on one process or under ``torchrun`` (DDP: gloo on CPU, nccl on GPU)
without code changes. Each epoch can be checkpointed atomically as a normal artifact (``surgeon.load`` reads
it) plus ``training_state.pt`` (optimizer, scheduler, epoch, every rank's RNG streams) for an exact ``resume``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.ops.model_outputs import logits as logits_of
from surgeon.train.compiling import check_backend, compiled_graph_counts
from surgeon.train.cpu_memory import retain_freed_memory
from surgeon.train.devices import amp_dtype, resolve_device
from surgeon.train.distributed import all_reduce, distributed_setup, gathered_rng_states, restore_rng_states
from surgeon.train.training_state import STATE_NAME, load_training_state


@dataclass
class AdaptOptions:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    clip_grad: float | None = 5.0
    warmup_epochs: float = 0.0
    min_lr: float = 1e-6
    channels_last: bool = True
    label_smoothing: float = 0.0
    update_bn_stats: bool = False  # frozen trunk: BatchNorm keeps its running statistics while adapters train
    seed: int = 0
    out: str | Path | None = None
    resume: bool = False
    force: bool = False  # replace an existing ``out`` (only an empty directory or a surgeon artifact)
    stop_after: int | None = None  # train at most this many epochs in this run; the schedule still spans epochs
    device: str | None = None  # auto | cpu | cuda | cuda:N; None: wherever the model already is
    amp: str = "none"  # none | bf16 | fp16 (autocast; fp16 adds a gradient scaler)
    compile: str | None = None  # a torch.compile backend (inductor, aot_eager, ...) for the training forward
    retain_cpu_memory: bool = True  # on the CPU, keep freed blocks for the next step (see surgeon.train.cpu_memory)
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal
    log: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        checks = {"epochs": self.epochs >= 1, "lr": self.lr > 0, "weight_decay": self.weight_decay >= 0,
                  "warmup_epochs": self.warmup_epochs >= 0, "min_lr": self.min_lr >= 0,
                  "clip_grad": self.clip_grad is None or self.clip_grad > 0,
                  "stop_after": self.stop_after is None or self.stop_after >= 1}
        for name, ok in checks.items():
            if not ok:
                raise SurgeonError(f"adapt option {name}={getattr(self, name)!r} is out of range")
        amp_dtype(self.amp)
        if self.compile is not None:
            check_backend(self.compile)
        if self.out is not None and not self.resume:
            from surgeon.io.atomic import output_directory
            from surgeon.io.ownership import require_replaceable

            require_replaceable(output_directory(self.out), self.force)  # before any training, not at epoch 1


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    lr: float
    images_per_second: float
    val_top1: float | None = None
    val_top5: float | None = None
    val_images: int | None = None  # every validation image counted once, over all ranks


class Accuracy(NamedTuple):
    top1: float
    top5: float
    images: int


@dataclass
class AdaptReport:
    history: list[EpochResult] = field(default_factory=list)
    trainable_parameters: int = 0
    out: str | None = None
    compiled_graphs: int | None = None  # with compile: graphs and graph breaks dynamo produced (first epoch)
    graph_breaks: int | None = None

    @property
    def final(self) -> EpochResult | None:
        return self.history[-1] if self.history else None


# ------------------------------------------------------------------------------------------ schedule
def cosine_factor(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = min_lr / base_lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(model: nn.Module, loader: Iterable[Any], channels_last: bool = True, amp: str = "none") -> Accuracy:
    """Top-1 / top-5 accuracy in percent and the number of images (summed over every rank under DDP)."""
    model.eval()
    device = next(model.parameters()).device
    dtype = amp_dtype(amp)
    # counts stay on the device until the end: no host sync per batch
    correct = torch.zeros(2, dtype=torch.int64, device=device)
    seen = 0
    with torch.no_grad():
        for images, targets in loader:
            images, targets = _to_device(images, targets, device, channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = logits_of(model(images))
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct[0] += (top[:, 0] == targets).sum()
            correct[1] += (top == targets[:, None]).any(dim=-1).sum()
            seen += targets.numel()
    correct1, correct5 = correct.tolist()
    correct1, correct5, seen = all_reduce([correct1, correct5, seen], device)
    if not seen:
        return Accuracy(0.0, 0.0, 0)
    return Accuracy(100.0 * correct1 / seen, 100.0 * correct5 / seen, int(seen))


def _to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the training device (asynchronously from pinned memory on CUDA), in the model's layout."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def _set_epoch(loader: Any, epoch: int, seed: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed + epoch)


# ------------------------------------------------------------------------------------------ training
def require_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to optimise; refuses a model with none (a conversion where no adapter was added)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SurgeonError("the model has no trainable parameters: its conversion added no adapter (no depthwise "
                           "conv matched); use a recipe that lists parameters in 'trainable'")
    return params


@dataclass
class _Run:
    """What one training run steps with."""

    opts: AdaptOptions
    model: nn.Module
    module: nn.Module  # what is called: the model, or its DDP / compiled wrapper
    params: list[nn.Parameter]
    device: torch.device
    dtype: torch.dtype | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    rank: int
    world: int


def adapt(model: nn.Module, train_loader: Iterable[Any], val_loader: Iterable[Any] | None = None,
          **options: Any) -> AdaptReport:
    """Train ``model``'s trainable parameters on ``train_loader`` (batches of ``(images, targets)``)."""
    opts = AdaptOptions(**options)
    say = opts.log or (lambda line: print(line, file=sys.stderr))
    run = _prepare(model, opts, steps_per_epoch=len(train_loader))  # type: ignore[arg-type]
    report = AdaptReport(trainable_parameters=sum(p.numel() for p in run.params),
                         out=str(opts.out) if opts.out is not None else None)
    start_epoch = _resume(run, report, say) if opts.resume else 0
    counts_before = compiled_graph_counts()
    show_bar = opts.progress if opts.progress is not None else (sys.stderr.isatty() and run.rank == 0)
    for epoch in range(start_epoch, opts.epochs):
        result = _train_epoch(run, train_loader, epoch, show_bar)
        if val_loader is not None:
            result.val_top1, result.val_top5, result.val_images = evaluate(model, val_loader, opts.channels_last,
                                                                           opts.amp)
        report.history.append(result)
        if opts.compile is not None and report.graph_breaks is None:
            graphs, breaks = compiled_graph_counts()
            report.compiled_graphs, report.graph_breaks = graphs - counts_before[0], breaks - counts_before[1]
            if run.rank == 0:
                say(f"torch.compile ({opts.compile}): {report.compiled_graphs} graph(s), {report.graph_breaks} "
                    "graph break(s) so far")
        if opts.out is not None:
            rng_states = gathered_rng_states(run.world)
            if run.rank == 0:
                _checkpoint(model, opts.out, epoch, run.optimizer, run.scheduler, report, rng_states, run.scaler)
        if run.rank == 0:
            say(_epoch_line(result, opts.epochs))
        if run.world > 1:
            dist.barrier()
        if opts.stop_after is not None and epoch + 1 - start_epoch >= opts.stop_after and epoch + 1 < opts.epochs:
            if run.rank == 0:
                say(f"stopping after {opts.stop_after} epoch(s) of this run; continue with resume")
            break
    model.eval()
    return report


def _prepare(model: nn.Module, opts: AdaptOptions, steps_per_epoch: int) -> _Run:
    """Device, process group, layout, optimizer, schedule and wrappers for a run."""
    params = require_trainable(model)
    device = resolve_device(opts.device) if opts.device is not None else params[0].device
    if device.type == "cpu" and opts.retain_cpu_memory:
        retain_freed_memory()
    rank, world = distributed_setup(device)
    model.to(device)
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(opts.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # bf16 needs no loss scaling
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    total = max(1, steps_per_epoch * opts.epochs)
    warmup = int(opts.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total, warmup, opts.lr, opts.min_lr))
    module: nn.Module = model
    if world > 1:
        module = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None)
    if opts.compile is not None:
        module = torch.compile(module, backend=opts.compile)
    return _Run(opts, model, module, params, device, dtype, optimizer, scheduler, scaler, rank, world)


def _resume(run: _Run, report: AdaptReport, say: Callable[[str], None]) -> int:
    """Load the saved training state into the run; returns the epoch to continue from."""
    if run.opts.out is None:
        raise SurgeonError("resume needs the output directory of the earlier run")
    state = load_training_state(run.opts.out)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    start_epoch = int(state["epoch"]) + 1
    report.history = [EpochResult(**entry) for entry in state.get("history", [])]
    restore_rng_states(state["rng"], run.rank, run.world)
    if start_epoch >= run.opts.epochs:
        say(f"already trained for {start_epoch} epoch(s); nothing to do")
    return start_epoch


def _train_epoch(run: _Run, train_loader: Iterable[Any], epoch: int, show_bar: bool) -> EpochResult:
    """One pass over the training data; loss and throughput summed over every rank."""
    opts = run.opts
    _set_epoch(train_loader, epoch, opts.seed)
    run.module.train()
    if not opts.update_bn_stats:
        for norm in run.model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.eval()
    started, images_seen, batches = time.perf_counter(), 0, 0
    # the loss is summed on the device and read every BAR_INTERVAL steps and at the end: a read per step would be a
    # host sync per step, and the CPU could not queue the next step's work while the device runs this one
    loss_total = torch.zeros((), dtype=torch.float32, device=run.device)
    bar = _Bar(len(train_loader), epoch, opts.epochs) if show_bar else None  # type: ignore[arg-type]
    for images, targets in train_loader:
        images, targets = _to_device(images, targets, run.device, opts.channels_last)
        with torch.autocast(run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
            loss = F.cross_entropy(logits_of(run.module(images)), targets, label_smoothing=opts.label_smoothing)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if opts.clip_grad is not None:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.params, opts.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        loss_total += loss.detach()
        batches += 1
        images_seen += images.shape[0]
        if bar is not None:
            bar.advance()
            if batches % BAR_INTERVAL == 0:
                bar.show(loss_total.item() / batches, images_seen / (time.perf_counter() - started))
    if bar is not None:
        bar.close()
    loss_sum, batches, images_seen = all_reduce([loss_total.item(), batches, images_seen], run.device)
    elapsed = time.perf_counter() - started
    return EpochResult(epoch=epoch, train_loss=loss_sum / max(batches, 1), lr=run.optimizer.param_groups[0]["lr"],
                       images_per_second=images_seen / elapsed if elapsed else 0.0)


def _epoch_line(result: EpochResult, epochs: int) -> str:
    line = (f"epoch {result.epoch + 1}/{epochs}: loss {result.train_loss:.4f}, lr {result.lr:.2e}, "
            f"{result.images_per_second:.1f} img/s")
    if result.val_top1 is not None:
        line += f", val top-1 {result.val_top1:.2f}%, top-5 {result.val_top5:.2f}%"
    return line


def _checkpoint(model: nn.Module, out: str | Path, epoch: int, optimizer: torch.optim.Optimizer,
                scheduler: Any, report: AdaptReport, rng_states: list[dict[str, Any]],
                scaler: torch.amp.GradScaler) -> None:
    from surgeon.io.converted import save

    final = report.history[-1]
    model.surgeon_metrics = {"epochs_trained": epoch + 1, "train_loss": final.train_loss,
                             "val_top1": final.val_top1, "val_top5": final.val_top5}
    state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_states, "history": [asdict(h) for h in report.history],
             "scaler": scaler.state_dict() if scaler.is_enabled() else None}
    save(model, out, force=True, extra_writer=lambda staging: torch.save(state, staging / STATE_NAME))


BAR_INTERVAL = 20  # steps between the progress bar's loss readings (each one is a host sync)


class _Bar:
    def __init__(self, total: int, epoch: int, epochs: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=True)
        self.task = self.progress.add_task("train", total=total, status="")
        self.progress.start()

    def advance(self) -> None:
        self.progress.update(self.task, advance=1)

    def show(self, mean_loss: float, throughput: float) -> None:
        self.progress.update(self.task, status=f"loss {mean_loss:.4f} · {throughput:.1f} img/s")

    def close(self) -> None:
        self.progress.stop()
