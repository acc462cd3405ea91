"""GPU acceptance check, for any machine with a CUDA device: one command, one table, exit code 1 on any mismatch.

1. every kernel against the torch route over a sweep (fp32/fp16/bf16, NCHW/NHWC, kernel sizes, strides, ranks),
   with no kernel disabled by the first-use self-check;
2. 20 training steps of convnext_tiny through ``surgeon adapt --device cuda --amp bf16`` on a synthetic image
   folder: the loss must fall; then merge and compare merged vs adapted outputs;
3. ``torch.cuda.max_memory_allocated`` of one training step, full fine-tuning vs ``quadranet-v2-s2a``;
4. the fused quadratic kernel vs the atrous cuDNN route vs QuadraLib's three dense convs: outputs and time, with
   achieved GB/s.

Run: python benchmarks/gpu_check.py [--steps 20]. Without a CUDA device it says so and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from benchmarks.timing import compare, machine
except ImportError:  # run as a script from the repository root
    from timing import compare, machine  # type: ignore[no-redef]

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SWEEP = [(3, 1, 1, 1), (5, 2, 2, 2), (7, 1, 3, 1), (7, 2, 3, 2), (9, 1, 4, 8)]  # kernel, stride, padding, rank


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool]] = []

    def add(self, check: str, result: str, ok: bool) -> None:
        self.rows.append((check, result, ok))
        print(f"| {check} | {result} | {'ok' if ok else 'MISMATCH'} |", flush=True)

    @property
    def ok(self) -> bool:
        return all(ok for _, _, ok in self.rows)


def merged_layer(kernel: int, stride: int, padding: int, rank: int, channels: int = 32):
    from surgeon.methods.quadratic.inference import QuadraConvDW
    from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d

    conv = torch.nn.Conv2d(channels, channels, kernel, stride, padding, groups=channels)
    adapter = QuadraticDepthwiseConv2d.from_conv(conv, rank=rank)
    torch.nn.init.normal_(adapter.weight_a, 0, 0.1)
    return QuadraConvDW.from_adapter(adapter).cuda().eval()


def kernel_sweep(report: Report) -> None:
    from surgeon.methods.s2a.activation import pack_codes, pack_mask
    from surgeon.ops import bitpack
    from surgeon.ops.activations import ActivationSpec
    from surgeon.ops.derivative_codebook import codebook, encode
    from surgeon.ops.kernels import cuda as cuda_kernels
    from surgeon.ops.row_quantizer import quantize_rows

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        worst, launched = 0.0, 0
        for kernel, stride, padding, rank in SWEEP:
            for channels_last in (False, True):
                layer = merged_layer(kernel, stride, padding, rank).to(dtype)
                x = torch.randn(4, 32, 29, 31, device="cuda", dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    got = layer(x)
                    want = layer.double().forward_dense(x.double())
                layer.to(dtype)
                worst = max(worst, ((got.double() - want).abs().max() / want.abs().max().clamp_min(1)).item())
                launched += 1
        report.add(f"quadconv {str(dtype)[6:]} x {launched} shapes", f"max rel |Δ| {worst:.2e}",
                   worst <= TOLERANCE[dtype])
        x = torch.randn(1 << 20, device="cuda", dtype=dtype) * 4
        rows = torch.randn(4096, 197, device="cuda", dtype=dtype)
        checks = {
            "mask_pack": torch.equal(pack_mask(x, ActivationSpec("relu6", ())),
                                     bitpack.pack((x > 0) & (x < 6), 1)),
            "codebook_pack": torch.equal(pack_codes(x, codebook("gelu", 4), 4),
                                         bitpack.pack(encode(x, codebook("gelu", 4)), 4)),
            "rows_pack": _rows_match(quantize_rows(rows, 4), rows),
        }
        for name, same in checks.items():
            report.add(f"{name} {str(dtype)[6:]}", "bit-exact" if same else "codes differ", same)
    disabled = dict(cuda_kernels.REGISTRY.disabled)
    report.add("self-check", f"{len(cuda_kernels.REGISTRY.checked)} kernels passed, {len(disabled)} disabled "
               f"{disabled or ''}", not disabled and not cuda_kernels.REGISTRY.compile_errors)


def _rows_match(q, rows: torch.Tensor) -> bool:
    from surgeon.ops import bitpack
    from surgeon.ops.kernels import cuda as cuda_kernels

    levels = 2**q.bits - 1
    codes = torch.round((rows.float() - q.offset) / q.step).clamp_(0, levels).to(torch.uint8)
    return cuda_kernels.available() and torch.equal(q.packed, bitpack.pack(codes, q.bits))


def training(report: Report, steps: int) -> None:
    import numpy as np
    import timm
    from PIL import Image
    from typer.testing import CliRunner

    import surgeon
    from surgeon.cli.app import app
    from surgeon.train.training_state import load_training_state

    root = Path(tempfile.mkdtemp(prefix="surgeon-gpu-check-"))
    rng = np.random.default_rng(0)
    batch, images_per_class = 16, 8 * steps // 2
    for split, count in (("train", images_per_class), ("val", 16)):
        for label in (0, 1):  # two classes told apart by colour
            folder = root / "data" / split / str(label)
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (96, 96, 3)) + np.array([150 * label, 60, 150 * (1 - label)])
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    base = timm.create_model("convnext_tiny", pretrained=False).eval()
    surgeon.save(surgeon.convert(base, "quadranet-v2-s2a", base={"architecture": "convnext_tiny", "model_args": {}}),
                 root / "converted")
    result = CliRunner().invoke(app, ["adapt", str(root / "converted"), "--data", str(root / "data"), "--out",
                                      str(root / "adapted"), "--epochs", "2", "--batch-size", str(batch),
                                      "--lr", "2e-3", "--device", "cuda", "--amp", "bf16", "--json"])
    if result.exit_code != 0:
        report.add("adapt --device cuda --amp bf16", result.output.strip().splitlines()[-1], False)
        return
    history = load_training_state(root / "adapted")["history"]
    losses = [h["train_loss"] for h in history]
    report.add(f"adapt {2 * images_per_class // batch * 2} steps, bf16", " → ".join(f"{v:.3f}" for v in losses),
               losses[-1] < losses[0])
    adapted = surgeon.load(root / "adapted").cuda().eval()
    merged = surgeon.merge(adapted, example_input=torch.randn(2, 3, 224, 224, device="cuda")).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        want, got = adapted(x), merged(x)
    relative = ((got - want).abs().max() / want.abs().max()).item()
    report.add("merge vs adapted (fp32, GPU)", f"max rel |Δ| {relative:.2e}", relative <= 1e-4)


def peak_memory(report: Report, batch: int = 32) -> None:
    import timm

    import surgeon

    def step_peak(model: torch.nn.Module) -> float:
        model.cuda().train().to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (batch,), device="cuda")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        for _ in range(2):  # the second step has optimizer state, like every later one
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        model.cpu()
        torch.cuda.empty_cache()
        return peak

    torch.manual_seed(0)
    full = step_peak(timm.create_model("convnext_tiny", pretrained=False))
    converted = surgeon.convert(timm.create_model("convnext_tiny", pretrained=False).eval(), "quadranet-v2-s2a")
    adapters = step_peak(converted)
    report.add(f"peak memory, convnext_tiny, batch {batch}, bf16", f"full FT {full:,.0f} MiB, quadranet-v2-s2a "
               f"{adapters:,.0f} MiB ({full / adapters:.1f}x less)", adapters < full)


def kernel_speed(report: Report, rounds: int) -> None:
    for channels, size in [(96, 56), (192, 28), (384, 14), (768, 7)]:
        _speed_row(report, channels, size, rounds)


def _speed_row(report: Report, channels: int, size: int, rounds: int) -> None:
    from surgeon.ops.kernels import cuda as cuda_kernels

    layer = merged_layer(7, 1, 3, 1, channels)
    x = torch.randn(32, channels, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    weights = cuda_kernels.layer_weights(layer, x.dtype, x.device)
    routes = {"fused": lambda: cuda_kernels.fused_quadratic(x, *weights, layer.stride, layer.pads(x),
                                                             layer.dilation, layer.rank,
                                                             lambda: layer.forward_dense(x)),
              "atrous": lambda: layer.forward_atrous(x), "dense": lambda: layer.forward_dense(x)}
    with torch.no_grad():
        outputs = {name: fn() for name, fn in routes.items()}
        times = compare(routes, rounds=rounds)
    same = all(out is not None and torch.allclose(out, outputs["dense"], rtol=1e-4, atol=1e-4)
               for out in outputs.values())
    moved = 2 * x.numel() * x.element_size()
    report.add(f"speed {channels}x{size}², batch 32 fp32",
               f"fused {times['fused']:.3f} ms ({moved / times['fused'] / 1e6:.0f} GB/s), atrous "
               f"{times['atrous']:.3f} ms, dense {times['dense']:.3f} ms", same)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="training steps for the adapt check")
    parser.add_argument("--rounds", type=int, default=50, help="timing rounds per route")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device is visible (torch.cuda.is_available() is False); run this on a GPU machine",
              file=sys.stderr)
        return 2
    from surgeon.ops.kernels import cuda as cuda_kernels

    if not cuda_kernels.available():
        print("error: CuPy with a CUDA device is needed for the fused kernels: pip install '.[cuda13]' "
              "(or cuda12)", file=sys.stderr)
        return 2
    print(f"machine: {machine()}\n\n| check | result | verdict |\n|---|---|---|", flush=True)
    report = Report()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cuda_kernels.KernelWarning)
        kernel_sweep(report)
        training(report, args.steps)
        peak_memory(report)
        kernel_speed(report, args.rounds)
    for warning in caught:
        if issubclass(warning.category, cuda_kernels.KernelWarning):
            report.add("kernel warning", str(warning.message), False)
    print("\nall checks passed" if report.ok else "\nMISMATCH: see the rows marked above")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
