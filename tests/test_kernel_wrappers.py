"""The real CUDA kernel wrappers (``surgeon.ops.kernels.cuda``) run against a fake CuPy that launches the same ``.cu``
sources on the CPU: argument order and types, streams and the device guard, autograd routing, dtype guard,
compile-failure fall-back and the first-use self-check. The harness itself is shown to catch wrong argument
types and out-of-bounds accesses."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d
from surgeon.methods.s2a.activation import pack_codes, pack_mask
from surgeon.ops import bitpack
from surgeon.ops.activations import ActivationSpec
from surgeon.ops.derivative_codebook import codebook
from surgeon.ops.device_route import cuda_route
from surgeon.ops.kernels import cuda as cuda_kernels
from surgeon.ops.kernels import library as kernel_ops
from surgeon.ops.row_quantizer import quantize_rows
from tests import fake_cupy
from tests.test_kernels import SWEEP, merged_layer

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def generic(layer):
    """The layer without its recorded branch patterns: the generic (dense-window) kernel's case."""
    layer.branch_a = layer.branch_b = None
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("grad", ["none", "input", "weights"])
def test_quadconv_wrapper_matches_the_torch_route(gpu, dtype, channels_last, grad):
    torch.manual_seed(0)
    layer = generic(merged_layer(5, 2, 2, 1, 2, False)).to(dtype)
    x = torch.randn(2, 5, 11, 9).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = layer.double().forward_dense(x.double())
    layer.to(dtype)
    if grad == "input":
        x.requires_grad_(True)
    elif grad == "weights":
        layer.P.conv1.weight.requires_grad_(True)
    y = layer(x)
    launched = [launch.name for launch in gpu.launches]
    if grad == "none":  # the fused kernel ran, under the device guard and on its stream
        suffix = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
        assert launched == [f"quadconv_fwd_{suffix}_{'nhwc' if channels_last else 'nchw'}"]
        assert gpu.launches[0].stream == gpu.launches[0].guard_stream == 0xC0FFEE
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    else:  # a gradient is needed: the torch route, which autograd can differentiate
        assert launched == []
        y.float().sum().backward()
        assert (x.grad if grad == "input" else layer.P.conv1.weight.grad) is not None
    assert y.dtype == dtype
    scale = max(1.0, want.abs().max().item())
    assert (y.detach().double() - want).abs().max().item() <= TOLERANCE[dtype] * scale


def test_quadconv_weights_are_cast_once_and_recast_when_they_change(gpu):
    torch.manual_seed(0)
    layer = generic(merged_layer(3, 1, 1, 1, 1, False))
    x = torch.randn(1, 5, 8, 8)
    first = layer(x)
    cached = layer._kernel_weights
    layer(x)
    assert layer._kernel_weights is cached and len(cached) == 1
    with torch.no_grad():
        layer.P.conv1.weight.mul_(2)  # an in-place change bumps the version: the cache must follow
    changed = layer(x)
    assert not torch.equal(first, changed)
    torch.testing.assert_close(changed, layer.forward_dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_wrappers_match_the_torch_packers(gpu, dtype, monkeypatch):
    from surgeon.ops.row_quantizer import dequantize_rows

    torch.manual_seed(0)
    x = (torch.randn(3, 7, 5, 11) * 4).to(dtype).requires_grad_(True)  # as inside an autograd forward
    rows = torch.randn(13, 150).to(dtype)
    rows[2, 7], rows[5, 0], rows[6] = float("inf"), float("nan"), float("-inf")  # finite-only ranges, an empty row
    odd = rows[:5, :151 - 2 * 13]  # 125 wide: 4-bit rows that share bytes take range + pack, two kernels
    shift = torch.randn(13, 1)
    relu, book = ActivationSpec("relu6", ()), codebook("gelu", 4)

    def results():
        q, probs = quantize_rows(rows, 4), quantize_rows(rows.abs(), 4, nonnegative=True)
        centred, q_odd = quantize_rows(rows, 8, shift=shift), quantize_rows(odd.contiguous(), 4)
        return (pack_mask(x, relu), pack_codes(x, book, 4), *q.tensors(), *probs.tensors(), *centred.tensors(),
                *q_odd.tensors(), dequantize_rows(*q.tensors(), 13, 150, 4, dtype),
                dequantize_rows(*probs.tensors(), 13, 150, 4, dtype))

    got = results()
    suffix = fake_cupy_suffix(dtype)
    assert {launch.name for launch in gpu.launches} == {
        *(f"{kind}_{suffix}" for kind in ("mask_pack", "codebook_pack", "rows_quantize", "rows_pack",
                                         "rows_range_partial", "rows_unpack")), "rows_range_finish"}
    # the 125-wide 4-bit rows share bytes: packed two rows a block, in a block of 32 threads (about 4 values each)
    assert [(launch.grid, launch.block) for launch in gpu.launches if launch.name.startswith("rows_quantize")] == [
        ((13,), (64,))] * 3 + [((3,), (32,))]
    assert not cuda_kernels.REGISTRY.disabled  # every first-use self-check agreed
    monkeypatch.setattr(cuda_kernels, "usable", lambda tensor: False)
    for a, b in zip(got, results(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_rows_that_share_bytes_are_quantized_in_one_kernel(gpu, bits, monkeypatch):
    """Any width in one launch: a block packs the fewest rows that end on a byte (up to 8 rows of odd width at 1
    bit), and the codes, offsets and steps equal the two-op torch route bit for bit, a partial last group too."""
    torch.manual_seed(0)
    for width in (7, 125, 150):
        rows = torch.randn(13, width) * 3
        rows[4, 2] = float("nan")
        shift = torch.randn(13, 1)
        gpu.launches.clear()
        got = kernel_ops.rows_quantize(rows, bits, False, shift)
        group = cuda_kernels.rows_group(width, bits)
        assert (group * width * bits) % 8 == 0 and all((fewer * width * bits) % 8 for fewer in range(1, group))
        assert [launch.grid for launch in gpu.launches if launch.name.startswith("rows_quantize")] == [
            (-(-13 // group),)]
        assert not cuda_kernels.REGISTRY.disabled
        with monkeypatch.context() as patched:
            patched.setattr(cuda_kernels, "usable", lambda tensor: False)
            want = kernel_ops.rows_quantize(rows, bits, False, shift)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_coded_product_kernel_matches_the_torch_route_bit_for_bit(gpu, dtype, channels_last, monkeypatch):
    """A coded activation's backward (ReLU6's 1-bit mask, GELU's 4-bit derivative codes) in one kernel, codes
    and gradient in the activation's storage order."""
    from surgeon.ops.coded_gradient import storage_order

    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, 11) * 4
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    grad = torch.randn_like(x).to(dtype)
    order = storage_order(x)
    book = codebook("gelu", 4)
    cases = [(pack_mask(x, ActivationSpec("relu6", ()), order), 1, (0.0, 1.0)),
             (pack_codes(x, book, 4, order), 4, book.value_floats)]
    got = [kernel_ops.coded_product(grad, packed, bits, list(values), list(order)) for packed, bits, values in cases]
    assert [launch.name for launch in gpu.launches if launch.name.startswith("coded")] == [
        f"coded_product_{fake_cupy_suffix(dtype)}"] * 2
    assert not cuda_kernels.REGISTRY.disabled
    monkeypatch.setattr(cuda_kernels, "usable", lambda tensor: False)
    for product, (packed, bits, values) in zip(got, cases, strict=True):
        want = kernel_ops.coded_product(grad, packed, bits, list(values), list(order))
        assert product.dtype == dtype and product.stride() == want.stride()
        assert torch.equal(product, want)
        assert not torch.equal(product, grad)  # the factors did something


def fake_cupy_suffix(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


@pytest.mark.parametrize("grad_dtype,dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("bits,width", [(8, 96), (4, 75)])
def test_the_layer_norm_backward_kernel_matches_the_torch_route(gpu, grad_dtype, dtype, scaled, bits, width,
                                                                monkeypatch):
    """A layer norm's input gradient from the codes of its centred rows, read in the gradient's dtype and written in
    the input's (autocast: fp32 gradient, bf16 input), with and without a scale; 4-bit rows of odd width share
    bytes with their neighbours."""
    torch.manual_seed(0)
    x = torch.randn(37, width) * 3 + 1
    _, mean, rstd = torch.native_layer_norm(x, [width], None, None, 1e-6)
    q = quantize_rows(x, bits, shift=mean)
    grad = torch.randn(37, width).to(grad_dtype)
    weight = torch.randn(width) if scaled else None
    args = (grad, q.packed, q.offset, q.step, rstd.reshape(-1, 1), weight, bits, dtype)
    gpu.launches.clear()
    got = kernel_ops.layer_norm_backward(*args)  # its first-use self-check runs the torch route's unpack too
    launched = [launch for launch in gpu.launches if launch.name.startswith("layer_norm")]
    assert [launch.name for launch in launched] == [
        f"layer_norm_backward_{fake_cupy_suffix(grad_dtype)}_to_{fake_cupy_suffix(dtype)}"]
    assert launched[0].block == (cuda_kernels.rows_block(width),)
    assert not cuda_kernels.REGISTRY.disabled and got.dtype == dtype and got.shape == (37, width)
    monkeypatch.setattr(cuda_kernels, "usable", lambda tensor: False)
    want = kernel_ops.layer_norm_backward(*args)
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= TOLERANCE[dtype] * scale


def _layer_norm_gradients(norm: nn.Module, inputs: torch.Tensor, grad: torch.Tensor):
    leaf = inputs.detach().clone().requires_grad_(True)
    norm.bias.grad = None
    norm(leaf).backward(grad)
    return leaf.grad, norm.bias.grad


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_quantized_layer_norm_trains_through_the_kernel(gpu, channels_last, monkeypatch):
    """timm's LayerNorm2d over channels (NCHW rows are strided: the gradient is gathered first) and a LayerNorm over
    the last dim, frozen scale, trained bias: one kernel for the input gradient, the gradients of the torch route."""
    import timm

    from surgeon.methods.s2a.variants import QuantizedLayerNorm
    from surgeon.methods.variant import make_variant

    torch.manual_seed(0)
    x = torch.randn(2, 48, 7, 9)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    cases = ((timm.layers.LayerNorm2d(48), 1, x), (nn.LayerNorm(48), -1, x.permute(0, 2, 3, 1)))
    for norm, dim, inputs in cases:
        with torch.no_grad():
            norm.weight.normal_()
        norm.weight.requires_grad_(False)
        variant = make_variant(norm, QuantizedLayerNorm)
        variant._surgeon_channel_dim = dim
        grad = torch.randn_like(inputs)
        gpu.launches.clear()
        got = _layer_norm_gradients(variant, inputs, grad)
        assert [launch.name for launch in gpu.launches if launch.name.startswith("layer_norm")] == [
            "layer_norm_backward_f32_to_f32"]
        with monkeypatch.context() as patched:
            patched.setattr(cuda_kernels, "usable", lambda tensor: False)
            want = _layer_norm_gradients(variant, inputs, grad)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("kernel,stride,padding,dilation,rank,same,size", SWEEP)
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_specialised_atrous_kernel_matches_the_dense_route(gpu, kernel, stride, padding, dilation, rank, same,
                                                               size, channels_last):
    """Every geometry of the emulation sweep, both layouts, fp32 and bf16: the instantiation for the layer's
    geometry runs (where it covers the geometry) and equals QuadraLib's three dense convs."""
    torch.manual_seed(0)
    layer = merged_layer(kernel, stride, padding, dilation, rank, same, channels=6)
    supported = layer.atrous_geometry().supported()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 6, *size).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            want = layer.double().forward_dense(x.double())
            layer.to(dtype)
            y = layer(x)
        launched = [launch.name for launch in gpu.launches]
        if supported:
            expression = layer.atrous_geometry().name_expression(dtype, channels_last, 6)
            assert launched[-1] == expression
            assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        else:
            assert not any(name.startswith("quadconv_atrous") for name in launched)
        scale = max(1.0, want.abs().max().item())
        assert (y.double() - want).abs().max().item() <= TOLERANCE[dtype] * scale
    assert not cuda_kernels.REGISTRY.disabled  # every first-use self-check agreed


def test_the_emulated_warp_vote_follows_its_setting(tmp_path):
    """The emulation's vote is the thread's own predicate, and false everywhere with SURGEON_EMULATED_WARPS=mixed:
    the setting the next test relies on does reach the kernels."""
    program = tmp_path / "vote"
    (tmp_path / "vote.cpp").write_text(
        '#include "cpu_emulation.h"\n#include <cstdio>\nthread_local dim3 threadIdx, blockIdx, blockDim, gridDim;\n'
        'int main() { std::printf("%d %d", surgeon_warp_all(true), surgeon_warp_all(false)); }\n')
    subprocess.run(["g++", "-std=c++17", f"-I{fake_cupy.KERNELS}", "-o", str(program), str(tmp_path / "vote.cpp")],
                   check=True)
    environment = {k: v for k, v in os.environ.items() if k != "SURGEON_EMULATED_WARPS"}
    own = subprocess.run([str(program)], capture_output=True, text=True, check=True, env=environment).stdout
    mixed = subprocess.run([str(program)], capture_output=True, text=True, check=True,
                           env={**environment, "SURGEON_EMULATED_WARPS": "mixed"}).stdout
    assert (own, mixed) == ("1 0", "0 0")


# geometries with windows inside the image and windows reaching into the padding: kernel, stride, dilation, rank, size
BOTH_PATHS = [(3, 1, 1, 1, (9, 11)), (7, 1, 1, 1, (14, 20)), (3, 2, 1, 2, (10, 20)), (3, 1, 2, 1, (12, 13))]


@pytest.mark.parametrize("kernel,stride,dilation,rank,size", BOTH_PATHS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_window_inside_the_image_gives_the_same_bits_on_the_checked_path(gpu, kernel, stride, dilation, rank,
                                                                            size, channels_last, monkeypatch):
    """A warp with one window in the padding runs the checked path for all its lanes, interior windows included:
    forcing every warp onto it (SURGEON_EMULATED_WARPS=mixed) leaves the merged kernel's output and the training
    kernel's branch factors bit-identical, in fp32 and bf16."""
    from benchmarks.kernel_cost import interior_threads

    padding = kernel // 2 * dilation
    merged = merged_layer(kernel, stride, padding, dilation, rank, False, channels=6)
    training = training_layer(kernel, stride, padding, dilation, rank, False)
    geometry = merged.atrous_geometry()
    assert geometry.supported()
    interior = interior_threads(geometry, (2, 6, *size), channels_last)
    assert interior.any() and not interior.all()  # both paths have work
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(kernel + rank)
    results = {}
    for warps in ("own", "mixed"):
        monkeypatch.setenv("SURGEON_EMULATED_WARPS", warps)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 6, *size, generator=torch.Generator().manual_seed(3)).to(dtype)
            x = x.contiguous(memory_format=fmt)
            layer = copy.deepcopy(training).to(dtype)
            with torch.no_grad():
                y = copy.deepcopy(merged).to(dtype)(x)
                given = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
                given = given.contiguous(memory_format=fmt)
                arguments = ("a_and_b_times", x, layer.weight_a, layer.weight_b, given, geometry)
                factors = cuda_kernels.quadratic_term(
                    *arguments, (padding,) * 4, functools.partial(kernel_ops.quadratic_term_reference, *arguments,
                                                                  [padding] * 4))
            assert factors is not None
            results[warps, dtype] = (y, factors)
    launched = [launch.name for launch in gpu.launches]
    assert launched.count(geometry.name_expression(torch.bfloat16, channels_last, 6)) == 2
    assert launched.count(geometry.term_expression(torch.float32, channels_last, 6, 3)) == 2
    for dtype in (torch.float32, torch.bfloat16):
        for own, mixed in zip(results["own", dtype], results["mixed", dtype], strict=True):
            assert torch.equal(own, mixed)


def training_layer(kernel, stride, padding, dilation, rank, same, channels=6) -> QuadraticDepthwiseConv2d:
    """A converted (training) layer of the sweep's geometry with a non-zero quadratic term."""
    if same:
        from timm.layers.conv2d_same import Conv2dSame

        conv = Conv2dSame(channels, channels, kernel, stride, dilation=dilation, groups=channels)
    else:
        conv = nn.Conv2d(channels, channels, kernel, stride, padding, dilation, groups=channels)
    layer = QuadraticDepthwiseConv2d.from_conv(conv, same_dynamic=same, rank=rank)
    nn.init.normal_(layer.weight_a, 0, 0.3)
    return layer


@pytest.mark.parametrize("kernel,stride,padding,dilation,rank,same,size", SWEEP)
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_runs_the_quadratic_term_kernel_forward_and_backward(gpu, kernel, stride, padding, dilation, rank,
                                                                     same, size, channels_last):
    """Every geometry of the emulation sweep, both layouts, fp32 and bf16, on the route a CUDA device takes: the
    forward adds the quadratic term in one kernel and the backward forms both branch factors in one more ("add" and
    "a_and_b_times" instantiations), and output and every gradient equal the float64 reference."""
    torch.manual_seed(kernel * 10 + rank)
    layer = training_layer(kernel, stride, padding, dilation, rank, same)
    geometry = layer.atrous_geometry()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for dtype in (torch.float32, torch.bfloat16):
        x0 = torch.randn(2, 6, *size).to(dtype).contiguous(memory_format=fmt)
        reference = copy.deepcopy(layer).double()
        x_ref = x0.double().requires_grad_(True)
        want = reference.forward_reference(x_ref)
        upstream = torch.randn_like(want)
        want.backward(upstream)
        layer.to(dtype)
        x = x0.clone().requires_grad_(True)
        gpu.launches.clear()
        with cuda_route():
            y = layer(x)
            y.backward(upstream.to(dtype).contiguous(memory_format=fmt))
        launched = {launch.name for launch in gpu.launches}
        modes = {geometry.term_expression(dtype, channels_last, 6, cuda_kernels.TERM_MODES[mode])
                 for mode in ("add", "a_and_b_times")}
        if geometry.supported():
            assert modes <= launched
        else:
            assert not launched & modes
        tolerance = TOLERANCE[dtype] if dtype == torch.float32 else 4e-2
        pairs = [(y, want), (x.grad, x_ref.grad), (layer.weight_a.grad, reference.weight_a.grad),
                 (layer.weight_b.grad, reference.weight_b.grad)]
        for got, expected in pairs:
            scale = max(1.0, expected.abs().max().item())
            assert (got.double() - expected).abs().max().item() <= tolerance * scale
        layer.zero_grad()
        layer.float()
    assert not cuda_kernels.REGISTRY.disabled  # every first-use self-check agreed


@pytest.mark.parametrize("trained", ["weight_a", "weight_b"])
def test_one_trained_branch_takes_the_single_factor_kernel(gpu, trained):
    """With the input's gradient not needed and one branch trained, the backward forms only that branch's factor
    (the other branch times the gradient): the "b_times" kernel for branch a, "a_times" for branch b."""
    torch.manual_seed(1)
    layer = training_layer(7, 1, 3, 1, 2, False)
    layer.requires_grad_(False)
    getattr(layer, trained).requires_grad_(True)
    x = torch.randn(2, 6, 12, 10)
    reference = copy.deepcopy(layer).double()
    want = reference.forward_reference(x.double())
    upstream = torch.randn_like(want)
    want.backward(upstream)
    with cuda_route():
        layer(x).backward(upstream.float())
    mode = "b_times" if trained == "weight_a" else "a_times"
    launched = [launch.name for launch in gpu.launches]
    geometry = layer.atrous_geometry()
    assert geometry.term_expression(torch.float32, False, 6, cuda_kernels.TERM_MODES[mode]) in launched
    assert geometry.term_expression(torch.float32, False, 6, cuda_kernels.TERM_MODES["a_and_b_times"]) not in launched
    torch.testing.assert_close(getattr(layer, trained).grad.double(), getattr(reference, trained).grad,
                               atol=1e-4, rtol=1e-4)


def test_atrous_weights_are_laid_out_once_per_layout_and_follow_changes(gpu):
    torch.manual_seed(0)
    layer = merged_layer(7, 1, 3, 1, 2, False, channels=8)
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        first = layer(x)
        layer(x.contiguous(memory_format=torch.channels_last))
        cached = layer._atrous_kernel_weights
        assert len(cached) == 2  # channel-major for NCHW, tap-major for NHWC
        w3, _, wa, _ = cached[(torch.float32, "cpu", True)][1]
        assert w3.shape == (49, 8) and wa.shape == (2, 16, 8)
        layer.P.conv1.weight.mul_(2)
        changed = layer(x)
    assert not torch.equal(first, changed)
    torch.testing.assert_close(changed, layer.forward_dense(x), atol=1e-5, rtol=1e-5)


def test_the_merged_kernel_reads_16_bit_weights_as_fp32_copies_made_once(gpu):
    """A bf16 merged layer: its kernel takes fp32 weight pointers (the fake refuses any other pointee), the copies
    are made at the first call and kept, inference mode included (the layer's kernel weights carry version
    counters), and made again when a weight changes."""
    torch.manual_seed(0)
    layer = merged_layer(7, 1, 3, 1, 1, False, channels=8).to(torch.bfloat16)
    x = torch.randn(1, 8, 9, 9).to(torch.bfloat16)

    def copies() -> set[int]:
        return {id(kept[1]) for kept in cuda_kernels.REGISTRY.float_copies.values()}

    with torch.inference_mode():
        first = layer(x)
        made = copies()
        again = layer(x)
    assert len(made) == 4 and copies() == made  # primary, bias, both branches: converted once
    assert torch.equal(first, again)
    assert [launch.name for launch in gpu.launches].count(layer.atrous_geometry().name_expression(
        torch.bfloat16, False, 8)) == 2 and not cuda_kernels.REGISTRY.disabled
    first_copies = list(cuda_kernels.REGISTRY.float_copies.values())  # kept alive: their ids are not reused
    with torch.no_grad():
        layer.P.conv1.weight.mul_(2)
        changed = layer(x)
        want = layer.float().forward_dense(x.float())
    assert len(first_copies) == 4 and len(copies() - made) == 4  # a changed weight: every weight laid out anew
    assert not torch.equal(first, changed)
    scale = want.abs().max().item()
    assert (changed.float() - want).abs().max().item() <= TOLERANCE[torch.bfloat16] * scale


def test_float64_and_integer_inputs_take_the_torch_route(gpu):
    torch.manual_seed(0)
    layer = merged_layer(3, 1, 1, 1, 1, False).double()
    x = torch.randn(1, 5, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.forward_dense(x))
    packed = pack_mask(x, ActivationSpec("relu", ()))
    assert torch.equal(packed, bitpack.pack(x > 0, 1))
    assert gpu.launches == []


def test_a_compile_failure_is_one_warning_and_the_torch_route_runs(gpu):
    gpu.fail_compile = "nvrtc: error: identifier \"__nv_bfloat16\" is undefined"
    x = torch.randn(100)
    with pytest.warns(cuda_kernels.KernelWarning, match="did not compile .*__nv_bfloat16"):
        first = pack_mask(x, ActivationSpec("relu", ()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning, no second compile
        second = pack_mask(x, ActivationSpec("relu", ()))
    assert torch.equal(first, bitpack.pack(x > 0, 1)) and torch.equal(second, first)
    assert gpu.launches == [] and gpu.compiled == []


def test_the_self_check_disables_a_kernel_that_disagrees(gpu):
    torch.manual_seed(0)
    layer = generic(merged_layer(3, 1, 1, 1, 2, False))
    x = torch.randn(2, 5, 9, 9)
    gpu.corrupt = {"quadconv_fwd_f32_nchw"}
    with pytest.warns(cuda_kernels.KernelWarning, match="quadconv_fwd_f32_nchw disagrees with the torch route"):
        first = layer(x)
    torch.testing.assert_close(first, layer.forward_dense(x))  # the torch route's answer, not the kernel's
    launches = len(gpu.launches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(layer(x), layer.forward_dense(x))
    assert len(gpu.launches) == launches  # disabled on this device: not launched again
    gpu.corrupt = set()
    channels_last = layer(x.contiguous(memory_format=torch.channels_last))  # another kernel is unaffected
    assert gpu.launches[-1].name == "quadconv_fwd_f32_nhwc"
    torch.testing.assert_close(channels_last, layer.forward_dense(x))


# ------------------------------------------------------------------------------------------ the harness can fail
def launch_mask_pack(gpu, x, out, n, low=None, high=None):
    low = np.float32(0) if low is None else low
    high = np.float32(6) if high is None else high
    function = sys.modules["cupy"].RawModule(code="", options=()).get_function("mask_pack_f32")
    cupy = sys.modules["cupy"]
    with cuda_kernels.device_guard(torch.device("cpu")) as stream, cupy.cuda.ExternalStream(stream):
        function((1,), (32,), (cupy.from_dlpack(x), low, high, cupy.from_dlpack(out), n))


def test_the_harness_rejects_wrong_argument_types(gpu):
    x, out = torch.randn(64), torch.zeros(8, dtype=torch.uint8)
    launch_mask_pack(gpu, x, out, np.int64(64))
    assert torch.equal(out, bitpack.pack((x > 0) & (x < 6), 1))
    with pytest.raises(fake_cupy.LaunchError, match=r"argument 4 \(long long\).*expected int64, got int32"):
        launch_mask_pack(gpu, x, out, np.int32(64))
    with pytest.raises(fake_cupy.LaunchError, match=r"argument 1 \(float\).*expected float32, got float64"):
        launch_mask_pack(gpu, x, out, np.int64(64), low=np.float64(0))
    with pytest.raises(fake_cupy.LaunchError, match=r"argument 0 .*expected torch.float32, got .*float16"):
        launch_mask_pack(gpu, x.half(), out, np.int64(64))


@pytest.mark.parametrize("n", [65, 64 + 8 * 40])
def test_the_harness_catches_out_of_bounds_accesses(gpu, n):
    x, out = torch.randn(64), torch.zeros(8, dtype=torch.uint8)  # n > 64 reads past x and writes past out
    with pytest.raises(fake_cupy.LaunchError, match="SIGSEGV - a load or store past the end"):
        launch_mask_pack(gpu, x, out, np.int64(n))


def test_the_harness_requires_the_device_guard_and_its_stream(gpu):
    cupy = sys.modules["cupy"]
    function = cupy.RawModule(code="", options=()).get_function("mask_pack_f32")
    arguments = (cupy.from_dlpack(torch.randn(8)), np.float32(0), np.float32(6),
                 cupy.from_dlpack(torch.zeros(1, dtype=torch.uint8)), np.int64(8))
    with pytest.raises(fake_cupy.LaunchError, match="outside the device guard"):
        function((1,), (32,), arguments)
    with cuda_kernels.device_guard(torch.device("cpu")), cupy.cuda.ExternalStream(123):
        with pytest.raises(fake_cupy.LaunchError, match="outside the stream of the device guard"):
            function((1,), (32,), arguments)
    with pytest.raises(BufferError, match="require gradient"):
        cupy.from_dlpack(torch.randn(3, requires_grad=True))


# ------------------------------------------------------------------------------------------ torch.library ops
def test_fused_ops_are_real_torch_library_ops():
    torch.manual_seed(0)
    layer = merged_layer(5, 2, 2, 1, 2, False)
    x = torch.randn(2, 5, 11, 9)
    w3, b3, w1, w2 = cuda_kernels.layer_weights(layer, x.dtype, x.device)
    conv_args = (x, w3, b3, w1, w2, list(layer.stride), list(layer.pads(x)), list(layer.dilation), layer.rank)
    torch.testing.assert_close(kernel_ops.quadratic_dwconv(*conv_args), layer.forward_dense(x))
    book = codebook("gelu", 4)
    rows = torch.randn(6, 20)
    q = quantize_rows(rows, 4)
    cases = [(kernel_ops.quadratic_dwconv, conv_args), (kernel_ops.mask_pack, (x, 0.0, 6.0)),
             (kernel_ops.codebook_pack, (x, book.cell_codes, book.low, book.step, 4)),
             (kernel_ops.rows_pack, (rows, q.offset, q.step, 4)), (kernel_ops.rows_pack, (rows.abs(), None, q.step, 4)),
             (kernel_ops.rows_range, (rows, 4, False)), (kernel_ops.rows_range, (rows, 8, True)),
             (kernel_ops.rows_quantize, (rows, 4, False, None)), (kernel_ops.rows_quantize, (rows, 8, True, None)),
             (kernel_ops.rows_quantize, (rows, 8, False, torch.randn(6, 1))),
             (kernel_ops.rows_unpack, (q.packed, q.offset, q.step, 6, 20, 4, torch.bfloat16)),
             (kernel_ops.rows_unpack, (q.packed, None, q.step, 6, 20, 4, torch.float32)),
             (kernel_ops.coded_product, (x, pack_codes(x, book, 4), 4, list(book.value_floats), [0, 1, 2, 3])),
             (kernel_ops.layer_norm_backward, (torch.randn(6, 20), *q.tensors(), torch.rand(6, 1) + 0.5,
                                               torch.randn(20), 4, torch.bfloat16)),
             (kernel_ops.layer_norm_backward, (torch.randn(6, 20), *q.tensors(), torch.rand(6, 1) + 0.5, None, 4,
                                               torch.float32))]
    trained = training_layer(5, 2, 2, 1, 2, False, channels=5)
    geometry = trained.atrous_geometry()
    given = trained.primary_conv(x, trained.weight, trained.bias).detach()
    for mode in cuda_kernels.TERM_MODES:
        cases.append((kernel_ops.quadratic_term, (
            mode, x, trained.weight_a.detach(), trained.weight_b.detach(), given, list(geometry.kernel),
            list(geometry.dilation), list(geometry.branch_a), list(geometry.branch_b), 2, [2, 2],
            list(trained.primary_pads(x)))))
    for op, args in cases:  # schema, fake (meta) implementation, dispatch under compile/export tracing
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))

    class Merged(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return kernel_ops.quadratic_dwconv(t, w3, b3, w1, w2, [2, 2], list(layer.pads(x)), [1, 1], 2)

    exported = torch.export.export(Merged(), (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.surgeon.quadratic_dwconv.default]  # one node, not an opaque call
    compiled = torch.compile(Merged(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer.forward_dense(x))


def test_the_gpu_acceptance_check_refuses_a_machine_without_cuda():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no CUDA device is visible (torch.cuda.is_available() is False); run this on a GPU machine"]


def test_the_gpu_check_isolates_sections_and_writes_every_number(tmp_path, capsys):
    from benchmarks.gpu_check import run_sections

    def fine(section):
        section.record("us", 12.5)
        section.check("a check that holds", True)

    def raises(section):
        section.record("before", 1)
        raise RuntimeError("a kernel refused its arguments")

    def mismatch(section):
        section.check("a check that fails", False)

    ran = []
    path = tmp_path / "gpu_check.json"
    code = run_sections([("fine", fine), ("raises", raises), ("mismatch", mismatch),
                         ("after", lambda section: ran.append(True))], path)
    assert code == 1 and ran == [True]  # the sections after a failure still run
    saved = {entry["section"]: entry for entry in json.loads(path.read_text())}
    assert saved["fine"]["passed"] and saved["fine"]["numbers"]["us"] == 12.5
    assert not saved["raises"]["passed"] and "a kernel refused its arguments" in saved["raises"]["error"]
    assert saved["raises"]["numbers"]["before"] == 1
    assert not saved["mismatch"]["passed"] and saved["after"]["passed"]
    assert "FAILED: raises, mismatch" in capsys.readouterr().out
    assert run_sections([("fine", fine)], None) == 0


def test_the_gpu_checks_training_kernel_rows_run_against_the_fake(gpu):
    """The GPU check's rows for a training step's kernels, at a small size on the fake: each kernel runs (not a
    fallback) and each row holds."""
    from benchmarks.gpu_check import LaunchCounter, _layer_norm_backward_agrees, _training_kernels

    counter = LaunchCounter()
    with cuda_route():
        checks = _training_kernels(torch.float32, counter, device="cpu", images=(1, 8, 12, 11), rows_count=8)
        # a 16-bit input under autocast: the gradient stays fp32, the kernel writes bf16
        autocast_row = _layer_norm_backward_agrees(torch.randn(8, 196).to(torch.bfloat16), torch.bfloat16, counter)
    assert set(checks) == {"rows_quantize + rows_unpack 8-bit", "coded_product", "layer_norm_backward",
                           "quadratic_term"}
    assert all(checks.values()) and autocast_row, checks
    for kind in ("rows_quantize", "rows_unpack", "coded_product", "layer_norm_backward_f32_to_f32",
                 "layer_norm_backward_f32_to_bf16", "quadratic_term"):
        assert any(entry.startswith(kind) for entry in counter.counts), (kind, counter.counts)


def test_the_fake_refuses_bf16_through_dlpack_as_cupy_does(gpu):
    """CuPy 14 without ml_dtypes refuses bf16 DLPack tensors; the wrappers hand 16-bit storage as int16 views."""
    import cupy

    with pytest.raises(NotImplementedError, match="bfloat16"):
        cupy.from_dlpack(torch.zeros(4, dtype=torch.bfloat16))
    x = torch.randn(64).to(torch.bfloat16)
    assert torch.equal(pack_mask(x, ActivationSpec("relu", ())), bitpack.pack(x > 0, 1))
    assert [launch.name for launch in gpu.launches] == ["mask_pack_bf16"]


def test_a_launch_that_raises_is_one_warning_and_the_torch_route_runs(gpu, monkeypatch):
    def refuse(cupy, tensor):
        raise NotImplementedError("CuPy does not support this dtype")

    monkeypatch.setattr(cuda_kernels, "_flat", refuse)
    x = torch.randn(100)
    with pytest.warns(cuda_kernels.KernelWarning, match="could not be launched .*NotImplementedError"):
        first = pack_mask(x, ActivationSpec("relu", ()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered per (kernel, device): no second try, no second warning
        second = pack_mask(x, ActivationSpec("relu", ()))
    assert torch.equal(first, bitpack.pack(x > 0, 1)) and torch.equal(second, first)
    assert ("mask_pack_f32", "cpu") in cuda_kernels.REGISTRY.disabled


def test_codebook_codes_agree_bit_for_bit_over_20_seeds_of_a_million(gpu):
    """The kernel and the torch route multiply by the same fp32 reciprocal, unfused: identical codes, where a
    divide in one and a reciprocal multiply in the other differ on some of a million inputs."""
    from surgeon.ops import bitpack as packing
    from surgeon.ops.derivative_codebook import grid_cells

    book = codebook("gelu", 4)
    cells = book.cell_codes
    for seed in range(20):
        x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)) * 3
        reference = packing.pack(cells.index_select(0, grid_cells(x, book.low, book.step, cells.numel())), 4)
        got = cuda_kernels.codebook_pack(x, cells, book.low, book.step, 4, lambda reference=reference: reference)
        assert got is not None and torch.equal(got, reference), seed
    assert [launch.name for launch in gpu.launches] == ["codebook_pack_f32"] * 20
    assert not cuda_kernels.REGISTRY.disabled


def test_the_self_check_reference_runs_without_tf32_and_at_the_output_scale(gpu):
    torch.backends.cudnn.allow_tf32 = True
    seen = []

    def reference():
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return torch.full((8,), 1e-3)

    close = torch.full((8,), 1e-3) + 5e-8  # 5e-5 relative, within 1e-4 of its scale: agrees
    assert cuda_kernels._checked("k_small", torch.device("cpu"), close, reference, 1e-4) is close
    off = torch.full((8,), 1e-3) + 1e-6  # 1e-3 relative: beyond 1e-4 of its own scale (a floor of 1 hid it)
    with pytest.warns(cuda_kernels.KernelWarning, match="disagrees"):
        cuda_kernels._checked("k_off", torch.device("cpu"), off, reference, 1e-4)
    assert seen == [(False, False)] * 2 and torch.backends.cudnn.allow_tf32
