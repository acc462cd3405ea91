"""Training memory and step time: full fine-tuning vs quadratic adapters (with and without memory variants) vs
quadratic adapters with gradient checkpointing.

For each model and configuration a fresh process builds the model (weights do not change memory or time), runs a
warm-up step (so the optimizer state exists, as in every later step), then measures on random images:

* **peak**: the most tensor bytes alive at once during one whole training step (forward, backward, optimizer
  step), weights, gradients, optimizer state and the batch included (``surgeon.train.memory.peak_memory``: the
  profiler's allocation events on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA), and the op running at
  that moment;
* **kept**: bytes saved for backward by the forward pass (parameters and buffers excluded);
* **step**: median wall time of ``--steps`` steps, and the minor page faults per step (each one is a page the
  allocator got fresh from the system: large temporaries allocated and returned on every op). Every worker keeps
  freed CPU memory for reuse as ``surgeon adapt`` does (``surgeon.train.cpu_memory``), unless ``--release-cpu-memory``;
* **budget batch**: the largest batch whose peak fits ``--budget-gib``, from peaks measured at two batch sizes
  (peak is affine in the batch).

Models without depthwise convs (ViT, Swin) have no quadratic adapter sites: there the adapter configurations
train the model's biases (``*.bias``) with the same memory variants, marked "+bias".

Run: python benchmarks/memory.py [--batch 32] [--models ...] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time

CONFIGS = ("full fine-tuning", "quadranet-v2", "quadranet-v2-s2a", "quadranet-v2 + checkpointing")
MODELS = ("convnext_tiny", "tf_efficientnet_lite0", "efficientnet_b0", "vit_small_patch16_224",
          "swin_tiny_patch4_window7_224")


def build(model_name: str, config: str, device: str):
    """The model in training mode with its trainable parameters, as ``surgeon adapt`` would train it."""
    import timm
    import torch

    import surgeon

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    example = torch.randn(1, 3, 224, 224)
    marker = ""
    if config != "full fine-tuning":
        recipe = surgeon.load_recipe(config.split(" + ")[0]).to_dict()
        if not any(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1
                   for m in model.modules()):
            recipe = {**recipe, "trainable": ["*.bias"]}
            marker = " +bias"
        model = surgeon.convert(model, recipe, example_input=example, inplace=True)
    if config.endswith("checkpointing"):
        model.set_grad_checkpointing(True)
    model = model.train().to(device=device, memory_format=torch.channels_last)
    return model, [p for p in model.parameters() if p.requires_grad], marker


def worker(model_name: str, config: str, batch: int, steps: int, device: str, retain: bool) -> dict[str, object]:
    import torch

    from surgeon.train.cpu_memory import retain_freed_memory
    from surgeon.train.memory import peak_memory, saved_for_backward

    if retain:  # every configuration alike, as ``surgeon adapt`` does on the CPU
        retain_freed_memory()
    model, params, marker = build(model_name, config, device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def batch_of(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, 1000, (size,), device=device)

    def step(x: torch.Tensor, targets: torch.Tensor) -> None:
        torch.nn.functional.cross_entropy(model(x), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def state() -> list[torch.Tensor]:
        tensors = list(model.parameters()) + list(model.buffers())
        for per_param in optimizer.state.values():
            tensors += [t for t in per_param.values() if isinstance(t, torch.Tensor)]
        return tensors

    x, targets = batch_of(batch)
    kept = saved_for_backward(model, x, lambda logits: torch.nn.functional.cross_entropy(logits, targets))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    peaks = {}
    for size in (batch // 2, batch):
        xs, ts = batch_of(size)
        peaks[size] = peak_memory(functools.partial(step, xs, ts), [*state(), xs, ts], device)
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        start = time.perf_counter()
        step(x, targets)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    full = peaks[batch]
    return {"marker": marker, "kept": kept.bytes, "peak": full.peak, "peak_half": peaks[batch // 2].peak,
            "state": full.start, "peak_op": full.peak_op, "trainable": sum(p.numel() for p in params),
            "step_seconds": sorted(times)[len(times) // 2], "faults_per_step": faults / steps}


def budget_batch(row: dict, batch: int, budget: int) -> int:
    """Largest batch whose (affine) peak fits ``budget`` bytes."""
    slope = (row["peak"] - row["peak_half"]) / (batch - batch // 2)
    intercept = row["peak"] - slope * batch
    return max(0, math.floor((budget - intercept) / slope)) if slope > 0 else 0


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--release-cpu-memory", action="store_true",
                        help="let glibc return freed blocks to the system after every op (surgeon adapt's "
                             "--release-cpu-memory); by default every configuration keeps them, as adapt does")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.batch, args.steps, args.device,
                                not args.release_cpu_memory)))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from timing import machine

    budget = int(args.budget_gib * 2**30)
    kept = "returned to the system after every op" if args.release_cpu_memory else "kept for reuse (surgeon adapt)"
    print(f"machine: {machine()}; device {args.device}; batch {args.batch} at 224², AdamW, one process per row; "
          f"freed CPU memory {kept}\n")
    print(f"| model | configuration | peak in a step (MiB) | peak vs full FT | kept for backward (MiB) "
          f"| kept vs full FT | op at the peak | step (s) | step vs full FT | minor faults / step "
          f"| batch in {args.budget_gib:g} GiB | trainable params |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        rows = {}
        for config in args.configs:
            output = subprocess.run([sys.executable, __file__, "--worker", model_name, config, "--batch",
                                     str(args.batch), "--steps", str(args.steps), "--device", args.device,
                                     *(["--release-cpu-memory"] if args.release_cpu_memory else [])],
                                    capture_output=True, text=True)
            if output.returncode != 0:
                print(f"| {model_name} | {config} | failed: {output.stderr.strip().splitlines()[-1]} |", flush=True)
                continue
            rows[config] = row = json.loads(output.stdout.strip().splitlines()[-1])
            full = rows.get("full fine-tuning", row)
            print(f"| {model_name} | {config}{row['marker']} | {mib(row['peak'])} | "
                  f"{full['peak'] / row['peak']:.2f}x less | {mib(row['kept'])} | "
                  f"{full['kept'] / max(row['kept'], 1):.1f}x less | {row['peak_op']} | "
                  f"{row['step_seconds']:.2f} | {row['step_seconds'] / full['step_seconds']:.2f}x | "
                  f"{row['faults_per_step']:,.0f} | {budget_batch(row, args.batch, budget)} | {row['trainable']:,} |",
                  flush=True)


if __name__ == "__main__":
    main()
