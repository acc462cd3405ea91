"""torch.compile on surgeon models: merged inference eager vs compiled, and a converted model's training step.

    python benchmarks/compile.py [--arch tf_efficientnet_lite0] [--batch 8] [--train]

Merged inference: the merged model (adapters given non-zero weights, BatchNorms folded) eager vs
``torch.compile(fullgraph=True)`` (inductor), timed side by side. ``--train`` adds one training step of the
converted ``quadranet-v2-s2a`` model eager vs compiled (inductor), with dynamo's graph and graph-break counts.
Compile time is reported apart from the steady-state step.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import timm
import torch

import surgeon
from surgeon.train.compiling import graph_breaks

try:
    from benchmarks.timing import compare, machine
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from timing import compare, machine  # type: ignore[no-redef]


def converted_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False).eval()
    converted = surgeon.convert(base, "quadranet-v2-s2a", base={"architecture": arch, "model_args": {}})
    with torch.no_grad():
        for name, param in surgeon.trainable_parameters(converted).items():
            if name.endswith("weight_a"):
                param.normal_(0, 0.05)
    return converted


def timed_first_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--train", action="store_true", help="also time a compiled training step")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"machine: {machine()}")
    converted = converted_model(args.arch)
    merged = surgeon.merge(converted, fold_bn=True).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    compiled = torch.compile(merged, fullgraph=True)
    with torch.no_grad():
        first = timed_first_call(lambda: compiled(x))
        diff = (compiled(x) - merged(x)).abs().max().item()
        times = compare({"eager": lambda: merged(x), "compiled": lambda: compiled(x)}, rounds=args.rounds)
    print(f"merged {args.arch} inference, batch {args.batch} at {args.size}²: eager {times['eager']:.1f} ms, "
          f"compiled {times['compiled']:.1f} ms ({times['eager'] / times['compiled']:.2f}× faster); "
          f"compile {first:.0f} s; max |Δ| {diff:.2g}")
    if not args.train:
        return
    converted.train()
    xs = torch.randn(args.batch, 3, args.size, args.size)
    breaks = graph_breaks(converted, xs)
    eager_model = converted
    compiled_model = torch.compile(copy.deepcopy(converted))

    def step(model: torch.nn.Module) -> None:
        model(xs).square().mean().backward()
        for param in model.parameters():
            param.grad = None

    first = timed_first_call(lambda: step(compiled_model))
    times = compare({"eager": lambda: step(eager_model), "compiled": lambda: step(compiled_model)},
                    rounds=max(3, args.rounds // 2), warmup=1)
    print(f"converted {args.arch} (quadranet-v2-s2a) training step, batch {args.batch}: {breaks.summary()}; "
          f"eager {times['eager']:.0f} ms, compiled {times['compiled']:.0f} ms "
          f"({times['eager'] / times['compiled']:.2f}×); compile {first:.0f} s")


if __name__ == "__main__":
    main()
