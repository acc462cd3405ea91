"""Where a training step spends its time and memory: ``torch.profiler`` over one step of a configuration.

Prints the ops with the most self CPU time (or CUDA time) and the most memory allocated, for one model and one
configuration of ``benchmarks/memory.py``, after a warm-up step.

Run: python benchmarks/profile_step.py convnext_tiny quadranet-v2-s2a [--batch 32] [--rows 15]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import CONFIGS, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("config", choices=CONFIGS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model, params, marker = build(args.model, args.config, args.device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (args.batch,), device=args.device)

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    time_key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages()
    print(f"{args.model} / {args.config}{marker}, batch {args.batch}")
    print(table.table(sort_by=time_key, row_limit=args.rows, max_name_column_width=48))
    print(table.table(sort_by="self_cpu_memory_usage", row_limit=args.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
