"""Where a training step spends its time and memory: ``torch.profiler`` over one step of a configuration.

Prints the step's time split by the surgeon layer (custom autograd function) each op ran in, then the ops with the
most self CPU time (or CUDA time) and the most memory allocated, for one model and one configuration of
``benchmarks/memory.py``, after a warm-up step. Freed CPU memory is kept for reuse, as ``surgeon adapt`` does.

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

from surgeon.train.cpu_memory import retain_freed_memory


def by_layer(events: list) -> dict[str, float]:
    """Self CPU milliseconds grouped by the innermost surgeon autograd function (forward or backward) an op ran in;
    everything else under "other ops"."""
    totals: dict[str, float] = {}
    for event in events:
        owner, parent = None, event
        while parent is not None and owner is None:
            name = parent.name
            if not name.startswith("autograd::") and ((name.startswith("_") and "Fn" in name)
                                                      or name.endswith("FnBackward")):
                owner = name.lstrip("_")
            parent = parent.cpu_parent
        key = owner or "other ops"
        totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total / 1e3
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("config", choices=CONFIGS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    retain_freed_memory()
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
    split = by_layer(prof.events())
    total = sum(split.values())
    print(f"self CPU time by surgeon layer (total {total:,.0f} ms):")
    for name, ms in split.items():
        print(f"  {ms:9,.1f} ms  {ms / total:6.1%}  {name}")
    print(table.table(sort_by=time_key, row_limit=args.rows, max_name_column_width=48))
    print(table.table(sort_by="self_cpu_memory_usage", row_limit=args.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
