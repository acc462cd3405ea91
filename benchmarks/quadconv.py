"""Merged quadratic depthwise conv speed: fused/atrous routes vs QuadraLib's three dense convs + mul + add,
on ConvNeXt-T stage shapes (channels-last), and whole merged ConvNeXt-T latency vs the original.

Run: python benchmarks/quadconv.py [--rounds 20]. On a CUDA machine with CuPy it also times the fused kernel
against the unfused cuDNN route and prints achieved GB/s (bytes of x read + y written, once each).
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch import nn

import surgeon
from surgeon.methods.quadratic.inference import QuadraConvDW
from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d

try:
    from benchmarks.timing import compare, machine
except ImportError:  # run as a script from the repository root
    from timing import compare, machine  # type: ignore[no-redef]

STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]  # ConvNeXt-T: channels, resolution at 224²


def merged_layer(channels: int, device: str) -> QuadraConvDW:
    adapter = QuadraticDepthwiseConv2d.from_conv(nn.Conv2d(channels, channels, 7, padding=3, groups=channels))
    nn.init.normal_(adapter.weight_a, 0, 0.05)
    return QuadraConvDW.from_adapter(adapter).to(device).eval()


def layer_table(rounds: int, device: str) -> None:
    print(f"\n## Quadratic depthwise 7x7 forward, batch 8, channels-last, {device}")
    print("| stage shape | one plain dwconv (ms) | three convs + mul + add (ms) | atrous route (ms) | speed-up |"
          + (" fused kernel (ms) | speed-up | GB/s |" if device == "cuda" else ""))
    print("|---|---|---|---|---|" + ("---|---|---|" if device == "cuda" else ""))
    for channels, size in STAGES:
        print(_layer_row(channels, size, device, rounds))


def _layer_row(channels: int, size: int, device: str, rounds: int) -> str:
    from surgeon.ops.kernels import cuda as cuda_kernels

    layer = merged_layer(channels, device)
    x = torch.randn(8, channels, size, size, device=device).to(memory_format=torch.channels_last)
    plain = layer.P.conv3
    candidates = {
        "plain": lambda: torch.nn.functional.conv2d(x, plain.weight, plain.bias, 1, 3, 1, channels),
        "dense": lambda: layer.forward_dense(x),
        "atrous": lambda: layer.forward_atrous(x),
    }
    if device == "cuda" and cuda_kernels.available():
        w3, b3, w1, w2 = cuda_kernels.layer_weights(layer, x.dtype, x.device)
        candidates["fused"] = lambda: cuda_kernels.fused_quadratic(
            x, w3, b3, w1, w2, layer.stride, layer.pads(x), layer.dilation, layer.rank, lambda: layer.forward_dense(x))
    with torch.no_grad():
        times = compare(candidates, rounds=rounds)
    row = (f"| {channels}x{size}x{size} | {times['plain']:.2f} | {times['dense']:.2f} | {times['atrous']:.2f} | "
           f"{times['dense'] / times['atrous']:.2f}x |")
    if "fused" in times:
        moved = 2 * x.numel() * x.element_size()
        row += (f" {times['fused']:.3f} | {times['dense'] / times['fused']:.2f}x | "
                f"{moved / times['fused'] / 1e6:.0f} |")
    return row


def model_table(rounds: int, device: str, architecture: str) -> None:
    torch.manual_seed(0)
    original = timm.create_model(architecture, pretrained=False).eval().to(device)
    converted = surgeon.convert(original, "quadranet-v2", base={"architecture": architecture, "model_args": {}})
    with torch.no_grad():
        for name, param in surgeon.trainable_parameters(converted).items():
            if name.endswith("weight_a"):
                param.normal_(0, 0.05)
    merged = surgeon.merge(converted).to(device).eval()
    original = original.to(memory_format=torch.channels_last)
    merged = merged.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    with torch.no_grad():
        times = compare({"original": lambda: original(x), "merged": lambda: merged(x)}, rounds=rounds)
    print(f"\n## Whole model, {architecture}, batch 8, 224², channels-last, {device}")
    print("| model | latency (ms) | ratio |\n|---|---|---|")
    print(f"| original | {times['original']:.1f} | 1.00 |")
    print(f"| merged (quadratic dwconv) | {times['merged']:.1f} | {times['merged'] / times['original']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--model", default="convnext_tiny")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}")
    layer_table(args.rounds, device)
    model_table(max(5, args.rounds // 2), device, args.model)


if __name__ == "__main__":
    main()
