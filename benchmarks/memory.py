"""Activation memory of one training step: full fine-tuning vs quadratic adapters vs adapters + memory variants.

For each model and configuration, a fresh process builds the model (weights do not change memory), runs
training steps on random images, and reports: bytes saved for backward (unique storages seen by
``saved_tensors_hooks``, parameters and buffers excluded), the process's peak resident memory during one
training step (Linux VmHWM, reset just before the step; glibc is told to return large blocks to the system
at once, so RSS follows live tensor memory) and its growth over the resident memory before the step,
trainable parameters, and the median step time.

Run: python benchmarks/memory.py [--batch 16] [--models convnext_tiny tf_efficientnet_lite0]
Saved bytes scale linearly with the batch; the table also shows them scaled to batch 64.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("full fine-tuning", "quadranet-v2", "quadranet-v2-s2a")
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _settle() -> int:
    """Free what can be freed, reset the peak-RSS mark, return the current RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def worker(model_name: str, config: str, batch: int, steps: int) -> dict[str, float]:
    import timm
    import torch

    import surgeon
    from surgeon.memory import saved_for_backward

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False)
    x = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (batch,))
    if config != "full fine-tuning":
        model = surgeon.convert(model.eval(), config, example_input=x[:1], inplace=True)
    model = model.train().to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, targets)

    def step() -> None:
        loss(model(x)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    saved = saved_for_backward(model, x, loss)
    optimizer.step()  # optimizer state exists from here on, as in any later step
    optimizer.zero_grad(set_to_none=True)
    rss_before = _settle()
    step()
    peak = _status("VmHWM")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"saved_bytes": saved.bytes, "peak_rss": peak, "rss_growth": peak - rss_before,
            "trainable": sum(p.numel() for p in params), "step_seconds": sorted(times)[len(times) // 2]}


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["convnext_tiny", "tf_efficientnet_lite0"])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.batch, args.steps)))
        return
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from timing import machine

    print(f"machine: {machine()}; batch {args.batch} at 224², one process per row\n")
    print("| model | configuration | saved for backward (MiB) | scaled to batch 64 (MiB) | vs full FT | "
          "vs quadranet-v2 | peak RSS in a step (MiB) | step's RSS growth (MiB) | trainable params | step (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        rows = {}
        for config in CONFIGS:
            output = subprocess.run([sys.executable, __file__, "--worker", model_name, config, "--batch",
                                     str(args.batch), "--steps", str(args.steps)], capture_output=True, text=True,
                                    check=True, env={**os.environ, **WORKER_ENV})
            rows[config] = json.loads(output.stdout.strip().splitlines()[-1])
        full = rows["full fine-tuning"]["saved_bytes"]
        quadratic = rows["quadranet-v2"]["saved_bytes"]
        for config, row in rows.items():
            print(f"| {model_name} | {config} | {mib(row['saved_bytes'])} | "
                  f"{mib(row['saved_bytes'] * 64 / args.batch)} | {full / row['saved_bytes']:.1f}x less | "
                  f"{quadratic / row['saved_bytes']:.1f}x less | {mib(row['peak_rss'])} | "
                  f"{mib(row['rss_growth'])} | {row['trainable']:,} | {row['step_seconds']:.2f} |")


if __name__ == "__main__":
    main()
