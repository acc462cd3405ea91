"""The CPU training kernels of the quadratic depthwise conv (``kernels/quadratic_dwconv_cpu.cpp``) against the torch
route and the plain-autograd formula, and the cases that must keep the torch route."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from torch import nn

from surgeon.methods.quadratic.layer import AtrousKernel, QuadraticDepthwiseConv2d
from surgeon.ops.kernels import cpu as cpu_kernels
from tests.test_quadratic_conv import CASES, make_conv


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the kernel entries called and their layout flag (the route taken), with the real kernels
    underneath."""
    module = cpu_kernels.module()
    assert module is not None, "the CPU kernels did not build on this machine"
    calls: list[tuple[str, bool]] = []

    class Counting:
        def __getattr__(self, name):
            function = getattr(module, name)

            def call(*args):
                calls.append((name, args[-1]))  # the last argument: channels-last tiles or channel planes
                return function(*args)

            return call

    monkeypatch.setattr(cpu_kernels, "module", lambda: Counting())
    return calls


def _layer(kernel, stride, padding, dilation, same, rank=2, bits=32, channels=5):
    conv = make_conv(kernel, stride, padding, dilation, same, channels=channels)
    layer = QuadraticDepthwiseConv2d.from_conv(conv, same_dynamic=same, rank=rank, saved_input_bits=bits)
    with torch.no_grad():
        layer.weight_a.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


def _input(size=(13, 11), channels=5, channels_last=False, batch=3):
    x = torch.randn(batch, channels, *size)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_(True)


def _close(got, want, tolerance=1e-5):
    """Equal up to fp32 summation order: relative to the largest value (weight gradients sum many terms)."""
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * max(b.abs().max().item(), 1.0))


def _grads(layer, x, grad=None, reference=False):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    out = layer.forward_reference(x) if reference else layer(x)
    grad = torch.randn_like(out) if grad is None else grad
    out.backward(grad)
    return out.detach(), x.grad, layer.weight_a.grad.clone(), layer.weight_b.grad.clone(), grad


@pytest.mark.parametrize("kernel,stride,padding,dilation,same", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernel_matches_the_formula(kernel, stride, padding, dilation, same, channels_last, kernel_calls, seeded):
    layer = _layer(kernel, stride, padding, dilation, same)
    for size in [(13, 11), (16, 16)]:
        x = _input(size, channels_last=channels_last)
        got = _grads(layer, x)
        want = _grads(layer, x, grad=got[-1], reference=True)
        _close(got[:-1], want[:-1])
        if channels_last:
            assert got[1].is_contiguous(memory_format=torch.channels_last)
    assert kernel_calls == [("quadratic_forward_add", channels_last), ("quadratic_backward", channels_last)] * 2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernel_reads_quantized_inputs_as_the_torch_route_does(bits, channels_last, kernel_calls, monkeypatch,
                                                                seeded):
    """Same saved codes, same gradients (up to summation order): 8-bit codes are read in place, other widths
    dequantized first. Static padding, so both routes quantize the same unpadded tensor."""
    for kernel, stride, padding in ((3, 1, 1), (5, 2, 2), (7, 1, 3)):
        layer = _layer(kernel, stride, padding, 1, False, bits=bits)
        x = _input((20, 18), channels_last=channels_last)
        got = _grads(layer, x)
        monkeypatch.setenv("SURGEON_DISABLE_CPU_KERNELS", "1")
        want = _grads(layer, x, grad=got[-1])
        monkeypatch.delenv("SURGEON_DISABLE_CPU_KERNELS")
        _close(got[:-1], want[:-1], tolerance=1e-4)
        # and the quantization error itself is small against the exact gradients
        exact = _grads(layer, x, grad=got[-1], reference=True)
        scale = exact[1].abs().max()
        assert (got[1] - exact[1]).abs().max() < (0.02 if bits == 8 else 0.3) * scale
    assert ("quadratic_backward", channels_last) in kernel_calls


def test_kernel_is_exact_at_init(kernel_calls, seeded):
    """W_a = 0: the kernel adds exact zeros to the primary conv, which is the original call."""
    for kernel, stride, padding, dilation, same in CASES:
        conv = make_conv(kernel, stride, padding, dilation, same)
        layer = QuadraticDepthwiseConv2d.from_conv(conv, same_dynamic=same, rank=3)
        for channels_last in (False, True):
            x = _input((15, 14), channels=6, channels_last=channels_last)
            assert torch.equal(layer(x).detach(), conv(x).detach())
    assert [name for name, _ in kernel_calls] == ["quadratic_forward_add"] * 2 * len(CASES)
    assert {layout for _, layout in kernel_calls} == {False, True}


def test_custom_branches_and_the_bias_gradient(kernel_calls, seeded):
    conv = nn.Conv2d(4, 4, 7, 1, 3, groups=4)
    layer = QuadraticDepthwiseConv2d.from_conv(conv, rank=2, branch_a=AtrousKernel((3, 2), (3, 5)),
                                               branch_b=AtrousKernel((1, 3), (1, 2)), train_bias=True)
    with torch.no_grad():
        layer.weight_a.normal_()
    x = _input((17, 12), channels=4)
    got = _grads(layer, x)
    bias_grad = layer.bias.grad.clone()
    want = _grads(layer, x, grad=got[-1], reference=True)
    _close([*got[:-1], bias_grad], [*want[:-1], layer.bias.grad])
    assert ("quadratic_backward", False) in kernel_calls


def test_only_adapter_gradients(kernel_calls, seeded):
    """An input that needs no gradient: the kernel forms the branch-weight gradients alone."""
    layer = _layer(3, 1, 1, 1, False)
    x = torch.randn(2, 5, 10, 10)
    layer(x).sum().backward()
    got = layer.weight_a.grad.clone(), layer.weight_b.grad.clone()
    layer.zero_grad()
    layer.forward_reference(x).sum().backward()
    _close(got, [layer.weight_a.grad, layer.weight_b.grad])
    assert ("quadratic_backward", False) in kernel_calls


def test_cases_the_kernel_does_not_take(kernel_calls, seeded):
    """fp64, a trainable primary weight, kept branches and no-grad inference all take the torch route."""
    layer = _layer(3, 1, 1, 1, False).double()
    layer(torch.randn(2, 5, 8, 8, dtype=torch.double, requires_grad=True)).sum().backward()
    trainable = _layer(3, 1, 1, 1, False)
    trainable.weight.requires_grad_(True)
    trainable(_input()).sum().backward()
    assert trainable.weight.grad is not None
    kept = QuadraticDepthwiseConv2d.from_conv(nn.Conv2d(5, 5, 3, 1, 1, groups=5), keep_branches=True)
    kept(_input()).sum().backward()
    with torch.no_grad():
        _layer(3, 1, 1, 1, False)(torch.randn(1, 5, 8, 8))
    assert kernel_calls == []


def test_a_failed_build_warns_once_and_the_torch_route_runs(monkeypatch, seeded):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    cpu_kernels.module.cache_clear()
    try:
        layer = _layer(3, 1, 1, 1, False)
        x = _input()
        with pytest.warns(cpu_kernels.CpuKernelWarning, match="no compiler here"):
            got = _grads(layer, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _grads(layer, x)  # remembered: no second warning
        want = _grads(layer, x, grad=got[-1], reference=True)
        _close(got[:-1], want[:-1])
    finally:
        cpu_kernels.module.cache_clear()


def test_build_flags_follow_torchs_cpu_capability():
    assert "-mavx2" in cpu_kernels._flags("AVX2")
    assert not any(flag.startswith("-mavx") for flag in cpu_kernels._flags("DEFAULT"))



def test_the_ninja_package_is_put_on_path_for_the_build(monkeypatch):
    """A venv used without activating it: its ninja binary is not on PATH, the build needs it there."""
    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("ninja") is None
    with cpu_kernels._ninja_on_path():
        assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")
    assert os.environ["PATH"] == "/nonexistent"


@pytest.mark.parametrize("channels_last", [False, True])
def test_kernel_gradients_are_deterministic(channels_last, kernel_calls, seeded):
    """Weight-gradient sums are split by channel (planes) or summed per thread in a fixed order (tiles): two
    backward passes over the same input give the same bits."""
    layer = _layer(5, 1, 2, 1, False, channels=70)  # more than one channel block of the channels-last tiles
    x = _input((12, 12), channels=70, channels_last=channels_last, batch=5)
    first = _grads(layer, x)
    second = _grads(layer, x, grad=first[-1])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert len(kernel_calls) == 4
