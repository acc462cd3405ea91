"""Accuracy of adaptation methods on an offline domain-shift task, with their cost.

Task: crops of scikit-image photos under a nonlinear colour shift, labelled by the pretrained
EfficientNet-Lite0 on the clean crop (``surgeon.cli.demo_data``). Methods, all on the same pretrained weights with
BatchNorm statistics frozen: no adaptation, bias-only (BitFit), linear depthwise adapter (``dw-linear``),
quadratic adapters (``quadranet-v2``), quadratic adapters with the memory variants (``quadranet-v2-s2a``), and
full fine-tuning. Several seeds; mean and spread of validation top-1, trainable parameters, bytes saved for
backward in one step, and training throughput.

Each (method, seed) trains in a fresh process, as in ``memory.py``: no run inherits another's heap (training keeps
freed CPU memory for reuse, so one long process running every method in turn grew past this machine's 24 GiB).

Run: python benchmarks/adaptation.py [--epochs 4] [--seeds 0 1 2] [--size 192]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import surgeon
from surgeon.cli.demo_data import build_shifted_photos
from surgeon.io.bundled_weights import ARCHITECTURE, export_efficientnet_lite0
from surgeon.train.adapt import evaluate
from surgeon.train.memory import saved_for_backward

METHODS = {
    # name: (recipe or None for full fine-tuning, learning rate)
    "bias-only": ({"name": "bias-only", "trainable": ["*.bias"]}, 2e-3),
    "dw-linear": ("dw-linear", 1e-3),
    "quadranet-v2": ("quadranet-v2", 1e-3),
    "quadranet-v2-s2a": ("quadranet-v2-s2a", 1e-3),
    "full fine-tuning": (None, 1e-4),
}


def loaders(root: Path, model: torch.nn.Module, size: int, batch: int) -> tuple[DataLoader, DataLoader]:
    from timm.data import ImageDataset, create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, size, size)}, model=model)
    class_map = {p.name: int(p.name) for p in (root / "train").iterdir()}
    train = ImageDataset(str(root / "train"), class_map=class_map, transform=create_transform(**config,
                                                                                                is_training=True))
    val = ImageDataset(str(root / "val"), class_map=class_map, transform=create_transform(**config))
    return (DataLoader(train, batch_size=batch, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=64))


def run(method: str, weights: Path, root: Path, args: argparse.Namespace, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    loaded = surgeon.load_model(ARCHITECTURE, weights=str(weights))
    model = loaded.model
    recipe, lr = METHODS.get(method, (None, 0.0))
    if method == "full fine-tuning":
        model.requires_grad_(True)
    elif method != "none":
        model = surgeon.convert(model, recipe, base=loaded.base)
    train, val = loaders(root, model, args.size, args.batch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if method != "none" else 0
    result: dict[str, float] = {"trainable": trainable}
    if method != "none":
        images = next(iter(train))[0].to(memory_format=torch.channels_last)
        model.train()
        result["saved_mib"] = saved_for_backward(model, images, run_backward=False).bytes / 2**20
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        report = surgeon.adapt(model, train, None, epochs=args.epochs, lr=lr, seed=seed, log=lambda _: None)
        result["images_per_second"] = statistics.median(h.images_per_second for h in report.history)
    result["top1"], result["top5"], _ = evaluate(model, val)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--crops-per-photo", type=int, default=40)
    parser.add_argument("--methods", nargs="+", default=["none", *METHODS])
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "SEED", "DATA", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, seed, root, weights = args.worker
        print(json.dumps(run(method, Path(weights), Path(root), args, int(seed))))
        return

    def in_process(method: str, seed: int) -> dict[str, float]:
        command = [sys.executable, __file__, "--worker", method, str(seed), str(data.root), str(weights),
                   "--epochs", str(args.epochs), "--size", str(args.size), "--batch", str(args.batch)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    sys.path.insert(0, str(Path(__file__).parent))
    from timing import machine

    with tempfile.TemporaryDirectory() as scratch:
        weights = export_efficientnet_lite0(Path(scratch) / "lite0.safetensors")
        labeller = surgeon.load_model(ARCHITECTURE, weights=str(weights)).model
        data = build_shifted_photos(Path(scratch) / "data", labeller, crops_per_photo=args.crops_per_photo)
        print(f"machine: {machine()}")
        print(f"task: {data.train} train / {data.val} val shifted photo crops, {len(data.classes)} ImageNet "
              f"classes; {args.size}², batch {args.batch}, {args.epochs} epochs, seeds {args.seeds}\n")
        print("| method | val top-1 (%) mean ± std | trainable params | saved for backward, batch "
              f"{args.batch} (MiB) | train img/s |")
        print("|---|---|---|---|---|")
        for method in args.methods:
            runs = [in_process(method, seed) for seed in (args.seeds if method != "none" else args.seeds[:1])]
            top1 = [r["top1"] for r in runs]
            spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
            saved = f"{runs[0]['saved_mib']:.1f}" if "saved_mib" in runs[0] else "-"
            speed = f"{statistics.mean(r['images_per_second'] for r in runs):.1f}" if "images_per_second" in \
                runs[0] else "-"
            print(f"| {method} | {statistics.mean(top1):.2f} ± {spread:.2f} | {int(runs[0]['trainable']):,} | "
                  f"{saved} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
