"""GPU acceptance check: one command on a CUDA machine, tables on stdout, every number in a JSON file, exit code 1
if any section failed or any check did not hold (2: no usable GPU).

Sections (each isolated: an exception prints its traceback, marks the section failed, and the next one runs):

1. environment: GPU, driver, CUDA runtime, CuPy, NVRTC, cuDNN, ``ml_dtypes``, TF32 flags;
2. kernels: each kernel × dtype × layout ran on the device (its launch was counted, no fallback, no self-check
   failure) and agrees with the torch route; then each compiled kernel's registers and local memory;
3. speed: CUDA-event timings at ConvNeXt-T's four stage shapes (batch 32, 7×7 rank 1) of the specialised fused
   kernel, a plain cuDNN depthwise conv (the floor a quadratic layer is measured against), the atrous torch route
   and QuadraLib's dense route, for fp32/fp16/bf16 × NCHW/NHWC: µs, GB/s, % of the HBM roofline, and the route
   autotuning keeps;
4. training: convnext_tiny, batch 32, bf16, ``quadranet-v2-s2a`` and full fine-tuning: step time, host syncs
   (``torch.cuda.set_sync_debug_mode``), ``max_memory_allocated`` and activation growth (peak minus what was
   allocated before the forward);
5. fp16 with a GradScaler: a few ``quadranet-v2-s2a`` steps stay finite;
6. merged latency: merged model vs the original, fp16, channels-last;
7. ``torchrun`` with one rank and NCCL: ``surgeon adapt`` end to end on a synthetic image folder.

Run: python benchmarks/gpu_check.py [--quick] [--json gpu_check.json]. About 4 minutes on an H100/H200 (``--quick``
about 2: fewer shapes, repetitions and steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))  # ConvNeXt-T: channels, feature map side
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L40": 0.86e12}  # by name, when not reported
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------ the section runner
@dataclass
class Section:
    """One section's checks (name, passed) and numbers, printed as it goes."""

    name: str
    checks: list[tuple[str, bool]] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def check(self, what: str, passed: bool, detail: str = "") -> None:
        self.checks.append((what, bool(passed)))
        print(f"  [{'ok' if passed else 'FAIL'}] {what}{': ' + detail if detail else ''}", flush=True)

    def record(self, key: str, value: Any) -> None:
        self.numbers[key] = value

    @property
    def passed(self) -> bool:
        return self.error is None and all(ok for _, ok in self.checks)


def run_sections(sections: list[tuple[str, Callable[[Section], None]]], json_path: Path | None) -> int:
    """Run every section whatever the others did; write the JSON; 0 only if every section passed."""
    results = []
    for name, body in sections:
        section = Section(name)
        print(f"\n## {name}", flush=True)
        started = time.perf_counter()
        try:
            body(section)
        except Exception:  # isolated: report, carry on
            section.error = traceback.format_exc()
            print(section.error, file=sys.stderr, flush=True)
        section.record("seconds", round(time.perf_counter() - started, 1))
        results.append(section)
    failed = [s.name for s in results if not s.passed]
    print("\nall sections passed" if not failed else f"\nFAILED: {', '.join(failed)}", flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps([{"section": s.name, "passed": s.passed, "checks": s.checks,
                                          "numbers": s.numbers, "error": s.error} for s in results], indent=1,
                                        default=str))
        print(f"numbers written to {json_path}")
    return 1 if failed else 0


def cuda_ms(run: Callable[[], object], repetitions: int, warmup: int = 3) -> float:
    """Median milliseconds of ``run`` measured with CUDA events (autotuning's own timer)."""
    from surgeon.ops.kernels.autotune import cuda_event_time

    return cuda_event_time(run, repetitions, warmup)


# ------------------------------------------------------------------------------------------ sections
def environment(section: Section) -> None:
    import cupy

    from surgeon.ops.kernels import cuda as cuda_kernels

    properties = torch.cuda.get_device_properties(0)
    try:
        import ml_dtypes

        ml = ml_dtypes.__version__
    except ImportError:
        ml = "not installed"
    facts = {
        "gpu": properties.name, "capability": f"sm_{properties.major}{properties.minor}",
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "driver": cupy.cuda.runtime.driverGetVersion(), "cuda_runtime_torch": torch.version.cuda,
        "cuda_runtime_cupy": cupy.cuda.runtime.runtimeGetVersion(), "cupy": cupy.__version__,
        "nvrtc": ".".join(map(str, cupy.cuda.nvrtc.getVersion())), "cudnn": torch.backends.cudnn.version(),
        "ml_dtypes": ml, "torch": torch.__version__,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    for key, value in facts.items():
        section.record(key, value)
        print(f"  {key}: {value}")
    section.check("CuPy sees the device", cuda_kernels.available())


def hbm_bytes_per_s() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in name), 3.35e12)


def merged_layer(kernel: int, stride: int, padding: int, rank: int, channels: int):
    from surgeon.methods.quadratic.inference import QuadraConvDW
    from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, kernel, stride, padding, groups=channels)
    adapter = QuadraticDepthwiseConv2d.from_conv(conv, rank=rank)
    torch.nn.init.normal_(adapter.weight_a, 0, 0.1)
    return QuadraConvDW.from_adapter(adapter).cuda().eval()


class LaunchCounter:
    """Counts the wrappers' launches per kernel, so a row can show that the kernel ran (not a fallback)."""

    def __init__(self) -> None:
        from surgeon.ops.kernels import cuda as cuda_kernels

        self.module, self.counts = cuda_kernels, {}
        self.original = cuda_kernels._launch

    def __enter__(self) -> LaunchCounter:
        def counted(module_name, entry, *args, **kwargs):
            launched = self.original(module_name, entry, *args, **kwargs)
            if launched:
                self.counts[entry] = self.counts.get(entry, 0) + 1
            return launched

        self.module._launch = counted
        return self

    def __exit__(self, *exc: object) -> None:
        self.module._launch = self.original


def kernels(section: Section, quick: bool) -> None:
    from surgeon.methods.s2a.activation import pack_codes, pack_mask
    from surgeon.ops import bitpack
    from surgeon.ops.activations import ActivationSpec
    from surgeon.ops.derivative_codebook import codebook, encode
    from surgeon.ops.kernels import cuda as cuda_kernels
    from surgeon.ops.kernels.cuda import exact_fp32
    from surgeon.ops.row_quantizer import dequantize_rows, quantize_rows

    os.environ["SURGEON_QUADCONV_ROUTE"] = "fused"  # this section checks the kernels themselves
    geometries = [(7, 1, 3, 1), (3, 2, 1, 1), (5, 1, 2, 2)] if quick else \
        [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 2), (5, 2, 2, 1), (7, 1, 3, 1), (7, 2, 3, 2), (9, 1, 4, 8)]
    try:
        for dtype in DTYPES:
            for channels_last in (False, True):
                for specialised in (True, False):
                    worst, ran = 0.0, True
                    for kernel, stride, padding, rank in geometries:
                        layer = merged_layer(kernel, stride, padding, rank, 32)
                        if not specialised:
                            layer.branch_a = layer.branch_b = None
                        x = torch.randn(4, 32, 29, 31, device="cuda").to(dtype)
                        if channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        with torch.no_grad(), exact_fp32(), LaunchCounter() as counter:
                            want = layer.double().forward_dense(x.double())
                            got = layer.to(dtype)(x)
                        expects_kernel = not specialised or layer.atrous_geometry().supported()
                        if expects_kernel and not counter.counts:
                            ran = False
                        worst = max(worst, ((got.double() - want).abs().max() / want.abs().max().clamp_min(1)).item())
                    name = (f"quadconv {'specialised' if specialised else 'generic'} {str(dtype)[6:]} "
                            f"{'NHWC' if channels_last else 'NCHW'}")
                    section.record(name, {"max_rel_diff": worst, "ran_on_device": ran})
                    section.check(name, ran and worst <= TOLERANCE[dtype],
                                  f"max rel |Δ| {worst:.2e}, {'ran on the device' if ran else 'FELL BACK'}")
            x = torch.randn(1 << 20, device="cuda").to(dtype) * 4
            rows = torch.randn(4096, 197, device="cuda").to(dtype)
            rows[3, 5], rows[7] = float("inf"), float("nan")
            with LaunchCounter() as counter:
                relu = pack_mask(x, ActivationSpec("relu6", ()))
                codes = pack_codes(x, codebook("gelu", 4), 4)
                q = quantize_rows(rows, 4)
                back = dequantize_rows(*q.tensors(), q.rows, q.width, 4, dtype)
            finite = torch.isfinite(rows)
            checks = {
                "mask_pack": torch.equal(relu, bitpack.pack((x > 0) & (x < 6), 1)),
                "codebook_pack": torch.equal(codes, bitpack.pack(encode(x, codebook("gelu", 4)), 4)),
                # 4-bit rows of 197 share bytes: one rows_quantize block packs two of them
                "rows_quantize + rows_unpack 4-bit": bool(torch.isfinite(back).all()) and bool(
                    ((back.float() - rows.float()).abs()[finite] <= q.step.expand_as(rows)[finite] * 0.51
                     + 1e-2 * rows.float().abs()[finite]).all()),
            }
            checks.update(_training_kernels(dtype, counter))
            for name, same in checks.items():
                kinds = [part.split()[0] for part in name.split(" + ")]  # the kernels a row needs
                ran = all(any(entry.startswith(kind) for entry in counter.counts) for kind in kinds)
                section.check(f"{name} {str(dtype)[6:]}", same and ran, "on the device" if ran else "FELL BACK")
        disabled = dict(cuda_kernels.REGISTRY.disabled)
        section.check("first-use self-checks", not disabled and not cuda_kernels.REGISTRY.compile_errors,
                      f"{len(cuda_kernels.REGISTRY.checked)} passed, disabled {disabled}, compile errors "
                      f"{cuda_kernels.REGISTRY.compile_errors}")
        for (_, entry), function in cuda_kernels.REGISTRY.functions.items():
            resources = {"registers": getattr(function, "num_regs", None),
                         "local_bytes": getattr(function, "local_size_bytes", None)}
            section.record(f"resources {entry}", resources)
            print(f"  {entry}: {resources['registers']} registers, {resources['local_bytes']} bytes local memory")
    finally:
        os.environ.pop("SURGEON_QUADCONV_ROUTE", None)


def _training_kernels(dtype: torch.dtype, counter: LaunchCounter, device: str = "cuda",
                      images: tuple[int, int, int, int] = (64, 96, 28, 28), rows_count: int = 4096
                      ) -> dict[str, bool]:
    """A training step's own kernels (counted by ``counter``): the one-pass row quantizer, the coded-gradient
    product, a layer norm's backward from its codes, and a converted layer's quadratic term forward and backward
    against the float64 reference."""
    from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d
    from surgeon.methods.s2a.activation import pack_codes
    from surgeon.ops import coded_gradient
    from surgeon.ops.derivative_codebook import codebook
    from surgeon.ops.kernels import library as kernel_ops
    from surgeon.ops.kernels.cuda import exact_fp32
    from surgeon.ops.row_quantizer import dequantize_rows, quantize_rows

    rows = torch.randn(rows_count, 196, device=device).to(dtype)  # byte-aligned rows: one rows_quantize launch
    x = torch.randn(*images, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    book = codebook("gelu", 4)
    grad = torch.randn_like(x)
    order = [0, 2, 3, 1]  # channels-last memory order
    with counter:
        q = quantize_rows(rows, 8)
        back = dequantize_rows(*q.tensors(), q.rows, q.width, 8, dtype)
        codes = pack_codes(x, book, 4, tuple(order))
        product = kernel_ops.coded_product(grad, codes, 4, list(book.value_floats), order)
    want_product = coded_gradient.coded_product(grad, codes, 4, tuple(book.value_floats), tuple(order))
    checks = {
        "rows_quantize + rows_unpack 8-bit": bool(((back.float() - rows.float()).abs()
                                              <= q.step * 0.51 + 1e-2 * rows.float().abs()).all()),
        "coded_product": torch.equal(product, want_product),
        "layer_norm_backward": _layer_norm_backward_agrees(rows, dtype, counter),
    }
    worst = 0.0
    for rank in (1, 2):
        channels = images[1]
        conv = torch.nn.Conv2d(channels, channels, 7, 1, 3, groups=channels)
        layer = QuadraticDepthwiseConv2d.from_conv(conv, rank=rank).to(device)
        torch.nn.init.normal_(layer.weight_a, 0, 0.1)
        reference = QuadraticDepthwiseConv2d.from_conv(conv, rank=rank).to(device).double()
        reference.load_state_dict(layer.state_dict())
        inputs = x.detach().requires_grad_(True)
        ref_inputs = x.detach().double().requires_grad_(True)
        with exact_fp32():
            want = reference.forward_reference(ref_inputs)
            want.backward(grad.double())
            with counter:
                layer.to(dtype)(inputs).backward(grad)
        pairs = [(inputs.grad, ref_inputs.grad), (layer.weight_a.grad, reference.weight_a.grad),
                 (layer.weight_b.grad, reference.weight_b.grad)]
        for got, expected in pairs:
            worst = max(worst, ((got.double() - expected).abs().max() / expected.abs().max().clamp_min(1)).item())
    checks["quadratic_term"] = worst <= 4 * TOLERANCE[dtype]
    return checks


def _layer_norm_backward_agrees(rows: torch.Tensor, dtype: torch.dtype, counter: LaunchCounter) -> bool:
    """A layer norm's input gradient from the 8-bit codes of its centred rows (fp32 gradient, as under autocast)
    against ATen's backward on the same dequantized rows in float64."""
    from surgeon.ops.kernels import library as kernel_ops
    from surgeon.ops.row_quantizer import dequantize_rows, quantize_rows

    width = rows.shape[1]
    _, mean, rstd = torch.native_layer_norm(rows.float(), [width], None, None, 1e-6)
    q = quantize_rows(rows, 8, shift=mean)
    grad, weight = torch.randn_like(rows, dtype=torch.float32), torch.randn(width, device=rows.device)
    with counter:
        got = kernel_ops.layer_norm_backward(grad, *q.tensors(), rstd.reshape(-1, 1), weight, 8, dtype)
    centred = dequantize_rows(*q.tensors(), q.rows, q.width, 8, torch.float32).double()
    want, _, _ = torch.ops.aten.native_layer_norm_backward(
        grad.double(), centred, [width], torch.zeros_like(rstd).double(), rstd.double(), weight.double(), None,
        [True, False, False])
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1)).item() <= TOLERANCE[dtype]


def speed(section: Section, quick: bool) -> None:
    from surgeon.ops.kernels import autotune

    repetitions = 10 if quick else 30
    print(f"  {'shape':16} {'dtype':8} {'layout':6} " + " ".join(f"{r:>16}" for r in ROUTES) + "   autotune")
    tuner = autotune.RouteTuner(cache_path=None)
    for channels, side in STAGES:
        layer = merged_layer(7, 1, 3, 1, channels)
        for dtype in (torch.float32, torch.bfloat16) if quick else DTYPES:
            for channels_last in (False, True):
                _speed_case(section, layer.to(dtype), tuner, channels, side, dtype, channels_last, repetitions)


def _speed_case(section: Section, layer: Any, tuner: Any, channels: int, side: int, dtype: torch.dtype,
                channels_last: bool, repetitions: int) -> None:
    from surgeon.ops.kernels import autotune
    from surgeon.ops.kernels import cuda as cuda_kernels

    geometry = layer.atrous_geometry()
    x = torch.randn(32, channels, side, side, device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w3, b3, wa, wb = layer.atrous_kernel_weights(dtype, x.device, channels_last)
    pads = tuple(layer.pads(x))
    label = f"{channels}×{side}² {str(dtype)[6:]} {'NHWC' if channels_last else 'NCHW'}"

    def fused() -> torch.Tensor | None:
        return cuda_kernels.fused_atrous(x, w3, b3, wa, wb, geometry, pads, lambda: layer.forward_atrous(x))

    routes = {"fused": fused, "cudnn depthwise": lambda: layer._primary(x),
              "atrous torch": lambda: layer.forward_atrous(x), "dense torch": lambda: layer.forward_dense(x)}
    with torch.no_grad():
        if fused() is None:
            section.check(f"fused kernel runs at {label}", False)
            return
        times = {name: cuda_ms(run, repetitions) for name, run in routes.items()}
        key = autotune.RouteKey((7, 7), (1, 1), (*geometry.branch_a, *geometry.branch_b), (1, 1), pads, 1,
                                tuple(x.shape), str(dtype)[6:], channels_last)
        choice = tuner.route(key, x.device, fused, routes["atrous torch"])
    moved = 2 * x.numel() * x.element_size()
    roofline = hbm_bytes_per_s()
    row = {name: {"us": ms * 1e3, "gb_s": moved / ms / 1e6, "roofline_pct": 100 * moved / (ms * 1e-3) / roofline}
           for name, ms in times.items()}
    section.record(label, {**row, "autotune": choice})
    cells = " ".join(f"{row[r]['us']:7.1f}µs {row[r]['roofline_pct']:4.0f}%" for r in ROUTES)
    print(f"  {f'{channels}×{side}²':16} {str(dtype)[6:]:8} {'NHWC' if channels_last else 'NCHW':6} {cells}   {choice}")
    # the tuner timed both itself: it may only keep the fused kernel where it is not clearly slower
    section.check(f"autotune's choice at {label}", choice == "torch" or times["fused"] <= 1.1 * times["atrous torch"])


ROUTES = ("fused", "cudnn depthwise", "atrous torch", "dense torch")


def training(section: Section, quick: bool) -> None:
    steps = 3 if quick else 6
    for config in ("full fine-tuning", "quadranet-v2-s2a"):
        numbers = _training_step(config, steps)
        section.record(config, numbers)
        section.check(f"{config}: {numbers['step_ms']:.1f} ms/step, {numbers['syncs']} syncs, peak "
                      f"{numbers['max_memory_allocated_mib']:,.0f} MiB, activations "
                      f"+{numbers['activation_growth_mib']:,.0f} MiB",
                      config == "full fine-tuning" or numbers["syncs"] == 0)
        torch.cuda.empty_cache()
    full, adapted = section.numbers["full fine-tuning"], section.numbers["quadranet-v2-s2a"]
    section.check("quadranet-v2-s2a grows activations less than full fine-tuning",
                  adapted["activation_growth_mib"] < full["activation_growth_mib"])


def _training_step(config: str, steps: int) -> dict[str, float]:
    """convnext_tiny at batch 32 in bf16: one measured step for syncs and memory, then ``steps`` timed ones."""
    import timm

    import surgeon

    torch.manual_seed(0)
    model = timm.create_model("convnext_tiny", pretrained=False).eval()
    if config != "full fine-tuning":
        model = surgeon.convert(model, config)
    model = model.cuda().train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(32, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (32,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state exists from here, as in every later step
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"step_ms": cuda_ms(step, steps, warmup=1), "syncs": sum("synchroniz" in str(w.message) for w in caught),
            "max_memory_allocated_mib": peak / 2**20, "activation_growth_mib": (peak - before) / 2**20}


def fp16_grad_scaler(section: Section, quick: bool) -> None:
    import timm

    import surgeon

    torch.manual_seed(0)
    model = surgeon.convert(timm.create_model("convnext_tiny", pretrained=False).eval(), "quadranet-v2-s2a")
    model = model.cuda().train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(16, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (16,), device="cuda")
    losses = []
    for _ in range(3 if quick else 5):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    section.record("losses", losses)
    section.check("fp16 + GradScaler steps stay finite", all(torch.isfinite(torch.tensor(losses))),
                  " → ".join(f"{v:.3f}" for v in losses))


def merged_latency(section: Section, quick: bool) -> None:
    import timm

    import surgeon

    torch.manual_seed(0)
    original = timm.create_model("convnext_tiny", pretrained=False).eval()
    converted = surgeon.convert(original, "quadranet-v2-s2a")
    with torch.no_grad():
        for name, parameter in converted.named_parameters():
            if name.endswith("weight_a"):
                parameter.normal_(0, 0.02)  # a trained adapter: the quadratic term is not zero
    merged = surgeon.merge(converted).cuda().half().eval().to(memory_format=torch.channels_last)
    original = original.cuda().half().eval().to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 224, 224, device="cuda").half().to(memory_format=torch.channels_last)
    with torch.no_grad():
        times = {name: cuda_ms(lambda m=m: m(x), 5 if quick else 20) for name, m in
                 (("original", original), ("merged", merged))}
    section.record("ms", times)
    section.check(f"merged {times['merged']:.2f} ms vs original {times['original']:.2f} ms per batch of 32 (fp16, "
                  f"channels-last): {times['merged'] / times['original']:.2f}×", True)


def torchrun_smoke(section: Section, quick: bool) -> None:
    import numpy as np
    import timm
    from PIL import Image

    import surgeon

    root = Path(tempfile.mkdtemp(prefix="surgeon-gpu-check-"))
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 8)):
        for label in (0, 1):
            folder = root / "data" / split / str(label)
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (64, 64, 3)) + np.array([150 * label, 60, 150 * (1 - label)])
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    surgeon.save(surgeon.convert(timm.create_model("convnext_atto", pretrained=False).eval(), "quadranet-v2-s2a",
                                 base={"architecture": "convnext_atto", "model_args": {}}), root / "converted")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "surgeon", "adapt",
               str(root / "converted"), "--data", str(root / "data"), "--out", str(root / "adapted"), "--epochs", "1",
               "--batch-size", "8", "--device", "cuda", "--amp", "bf16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
    section.record("exit_code", result.returncode)
    section.record("output_tail", tail)
    if result.returncode != 0:
        print("\n".join("    " + line for line in tail))
    section.check("torchrun --nproc_per_node 1 surgeon adapt (NCCL)",
                  result.returncode == 0 and (root / "adapted").is_dir(), f"exit {result.returncode}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, repetitions and steps (about 2 minutes)")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where to write every number")
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
    quick = args.quick
    sections: list[tuple[str, Callable[[Section], None]]] = [
        ("environment", environment),
        ("kernels", lambda s: kernels(s, quick)),
        ("speed", lambda s: speed(s, quick)),
        ("training step", lambda s: training(s, quick)),
        ("fp16 + GradScaler", lambda s: fp16_grad_scaler(s, quick)),
        ("merged latency", lambda s: merged_latency(s, quick)),
        ("torchrun smoke", lambda s: torchrun_smoke(s, quick)),
    ]
    return run_sections(sections, args.json)


if __name__ == "__main__":
    sys.exit(main())
