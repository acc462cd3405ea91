"""Peak memory of training: the measurement itself, and a bound per layer family on what its backward allocates.

Each family's backward may allocate its input gradient plus a stated number of input-sized temporaries, and no
more: a change that materialises one more full-size tensor (a decoded copy, an fp32 upcast, a product that is
not freed) exceeds the bound. Inputs are a few million elements, larger than the chunks the coded backward walks.
"""

from __future__ import annotations

import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d
from surgeon.methods.s2a.activation import QuantizedActivation
from surgeon.methods.s2a.attention import quantized_scaled_dot_product_attention
from surgeon.methods.s2a.gate import gated_multiply
from surgeon.methods.s2a.matmul import quantized_matmul
from surgeon.methods.s2a.variants import FrozenBatchNorm, InputFreeConv, QuantizedLayerNorm
from surgeon.methods.variant import make_variant
from surgeon.ops.activations import ActivationSpec
from surgeon.ops.kernels import cuda as cuda_kernels
from surgeon.train.memory import KeptForBackward, live_bytes, peak_memory

IMAGE = (4, 64, 192, 192)  # 9.4 M elements, 38 MB in fp32


def test_peak_memory_replays_allocations():
    """Peak of a known allocation pattern: 4000 + 8000 bytes alive together, then 2000 after the first is freed."""
    held = torch.zeros(250)  # alive before: counted in start, not allocated inside

    def pattern() -> None:
        a = torch.empty(1000)
        b = torch.empty(2000)
        del a
        c = torch.empty(500)
        del b, c

    result = peak_memory(pattern, [held])
    assert result.start == 1000
    assert result.peak == 1000 + 12000
    assert result.end == 1000
    assert result.rise == 12000


def test_peak_memory_sees_backward_temporaries():
    """The rise of a backward includes temporaries freed before it returns, not only what it returns."""
    x = torch.randn(1000, 1000, requires_grad=True)
    y = (x * 2).exp()  # exp keeps its output; its backward allocates grad * output before the mul's backward
    grad = torch.ones_like(y)
    result = peak_memory(lambda: torch.autograd.backward(y, grad), [x, y, grad])
    assert result.rise >= 2 * x.numel() * 4  # the exp gradient and x.grad are alive together


def _backward_rise(forward, inputs: list[torch.Tensor], params: list[torch.Tensor]) -> tuple[int, int]:
    """(bytes the backward allocates at its peak, bytes of the input gradients it returns); whatever forward keeps
    for backward is held alive throughout, so only the backward's own allocations count."""
    with KeptForBackward() as kept:
        out = forward(*inputs)
    grad = torch.randn_like(out)
    result = peak_memory(lambda: torch.autograd.backward(out, grad), [*inputs, *params, *kept.tensors, out, grad])
    returned = live_bytes([t.grad for t in inputs if t.grad is not None])
    return result.rise, returned


def _image(channels_last: bool = True) -> torch.Tensor:
    x = torch.randn(*IMAGE)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_(True)


def _check(forward, inputs, params=(), extra_temporaries: float = 0.0, scratch: int = 8 * 2**20) -> None:
    """Backward allocates its input gradients plus at most ``extra_temporaries`` input-sized tensors (and
    ``scratch`` bytes of per-chunk or per-channel scratch, by default a fifth of an image input)."""
    rise, returned = _backward_rise(forward, list(inputs), list(params))
    size = max(t.numel() * t.element_size() for t in inputs)
    bound = returned + extra_temporaries * size + scratch
    assert rise <= bound, f"backward allocated {rise / size:.2f} input sizes; bound {bound / size:.2f}"


def _activation(op: str, module: nn.Module, bits: int = 4) -> nn.Module:
    spec = ActivationSpec(op, (("dim", -1),)) if op == "softmax" else ActivationSpec(op)
    return QuantizedActivation(module, spec, bits=bits)


def test_coded_activations_allocate_only_their_gradient():
    for op, module in (("relu", nn.ReLU()), ("relu6", nn.ReLU6()), ("gelu", nn.GELU()), ("silu", nn.SiLU()),
                       ("hardswish", nn.Hardswish())):
        layer = _activation(op, module)
        _check(layer, [_image()], extra_temporaries=0.0)
        _check(layer, [_image(channels_last=False)], extra_temporaries=0.0)


def test_output_coded_activations():
    """Sigmoid/Tanh/Softmax rebuild their output from codes: one fp32 output beside the gradient."""
    for op, module in (("sigmoid", nn.Sigmoid()), ("tanh", nn.Tanh()), ("softmax", nn.Softmax(dim=-1))):
        _check(_activation(op, module), [_image(channels_last=False)], extra_temporaries=2.0)


def _quadratic_layers():
    for kernel, stride, same in ((7, 1, False), (3, 2, True), (5, 1, True)):
        conv = nn.Conv2d(IMAGE[1], IMAGE[1], kernel, stride, kernel // 2, groups=IMAGE[1])
        layer = QuadraticDepthwiseConv2d.from_conv(conv, same_dynamic=same, saved_input_bits=8)
        with torch.no_grad():
            layer.weight_a.normal_()
        yield layer, [layer.weight_a, layer.weight_b]


def test_quadratic_conv_kernel_backward_allocates_only_the_input_gradient():
    """The CPU kernel reads the 8-bit codes in place and forms every branch per channel plane in cache."""
    for channels_last in (True, False):
        for layer, params in _quadratic_layers():
            _check(layer, [_image(channels_last)], params, extra_temporaries=0.0)


def test_quadratic_conv_torch_backward_holds_at_most_four_full_size_tensors(monkeypatch):
    """The torch route: dequantized input, one recomputed branch turned into its gradient and one gradient w.r.t.
    the input, beside the accumulated input gradient."""
    monkeypatch.setenv("SURGEON_DISABLE_CPU_KERNELS", "1")
    for layer, params in _quadratic_layers():
        # with "same" padding the dequantized input and the gradients w.r.t. it are padded: slightly larger
        _check(layer, [_image()], params, extra_temporaries=3.05)


def test_frozen_layers():
    conv = make_variant(nn.Conv2d(IMAGE[1], IMAGE[1], 1).requires_grad_(False), InputFreeConv)
    _check(conv, [_image()], extra_temporaries=0.0)
    norm = make_variant(nn.BatchNorm2d(IMAGE[1]).eval().requires_grad_(False), FrozenBatchNorm)
    _check(norm, [_image()], extra_temporaries=0.0)


def test_quantized_layer_norm():
    """Dequantized normalised rows (fp32) beside the gradient; the affine gradient is per channel."""
    for norm, dim, x in ((nn.LayerNorm(IMAGE[1]), -1, torch.randn(4, 192 * 192, IMAGE[1])),
                         (timm.layers.LayerNorm2d(IMAGE[1]), 1, _image().detach())):
        norm.requires_grad_(False)
        variant = make_variant(norm, QuantizedLayerNorm)
        variant._surgeon_channel_dim = dim
        _check(variant, [x.requires_grad_(True)], extra_temporaries=1.0)


def test_gated_multiply():
    gate = torch.rand(IMAGE[0], IMAGE[1], 1, 1, requires_grad=True)
    _check(lambda x, g: gated_multiply(x, g, False, 8), [_image(), gate], extra_temporaries=2.0)


def test_quantized_matmul():
    """q @ k.T: each operand's gradient needs the other one dequantized, one at a time."""
    q = torch.randn(64, 4, 196, 32, requires_grad=True)
    k = torch.randn(64, 4, 196, 32, requires_grad=True)
    _check(lambda a, b: quantized_matmul(a, b.transpose(-2, -1)), [q, k], extra_temporaries=1.0)


def test_quantized_attention():
    """Probabilities and their gradient are ``N x N`` per head: the dequantized probabilities and one gradient
    buffer, worked in place (plus the dequantized q, k, v)."""
    q, k, v = (torch.randn(16, 6, 197, 64, requires_grad=True) for _ in range(3))
    rise, returned = _backward_rise(
        lambda a, b, c: quantized_scaled_dot_product_attention(a, b, c, bits=4, input_bits=8), [q, k, v], [])
    scores = 16 * 6 * 197 * 197 * 4
    assert rise <= returned + 3 * q.numel() * 4 + 2.2 * scores, (rise - returned) / scores


def test_long_sequences_use_the_fused_attention():
    """Where N x N low-bit probabilities outweigh fused attention's O(N) state, the fused op runs: it keeps less."""
    q, k, v = (torch.randn(1, 1, 4096, 32, requires_grad=True) for _ in range(3))
    with KeptForBackward() as kept:
        out = quantized_scaled_dot_product_attention(q, k, v, bits=4, input_bits=8)
    assert kept.bytes < 4096 * 4096 * 4 / 8  # less than the 4-bit probabilities alone
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_retained_cpu_memory_stops_refaulting_large_tensors():
    """With freed memory kept, a step's large tensors reuse pages instead of faulting fresh ones in every time."""
    script = """
import resource, torch
from surgeon.train.cpu_memory import retain_freed_memory
if {retain}:
    assert retain_freed_memory()
def touch():
    for _ in range(3):
        torch.ones(16 * 2**20).add_(1)  # 64 MiB, allocated, written and freed
touch()
touch()  # the heap settles into the blocks the pattern needs (alignment may take a second round)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    import subprocess
    import sys

    faults = {retain: int(subprocess.run([sys.executable, "-c", script.format(retain=retain)], capture_output=True,
                                         text=True, check=True).stdout.split()[-1]) for retain in (False, True)}
    assert faults[True] * 10 < faults[False], faults


def test_quadratic_conv_cuda_route_backward_holds_at_most_four_full_size_tensors(gpu):
    """The route a CUDA device takes, through the term kernel: the dequantized input, both branch factors (formed
    in one pass), one gradient w.r.t. the input, beside the accumulated input gradient."""
    from surgeon.ops.device_route import cuda_route

    for layer, params in _quadratic_layers():
        if not layer.atrous_geometry().supported():
            continue
        gpu.launches.clear()
        with cuda_route():
            layer(_image()).sum().backward()  # each kernel's first-use self-check runs its torch route once
            _check(layer, [_image()], params, extra_temporaries=4.05)
        assert any(launch.name.startswith("quadratic_term<") for launch in gpu.launches)


def test_quantized_layer_norm_on_the_cuda_route_allocates_only_its_gradient(gpu):
    """Through the backward kernel, which reads the codes and the output gradient in place: no dequantized rows.
    Inputs of 1 M elements (the emulated kernel runs every block's threads as fibers), so the scratch allowed is an
    eighth of an input. (timm's LayerNorm2d on an NCHW input would gather its strided gradient rows first: one more.)"""
    from surgeon.ops.device_route import cuda_route

    channels_last = torch.randn(1, 256, 64, 64).contiguous(memory_format=torch.channels_last)
    for norm, dim, x in ((nn.LayerNorm(1024), -1, torch.randn(1024, 1024)),
                         (timm.layers.LayerNorm2d(256), 1, channels_last)):
        norm.requires_grad_(False)
        variant = make_variant(norm, QuantizedLayerNorm)
        variant._surgeon_channel_dim = dim
        gpu.launches.clear()
        with cuda_route():
            # the first-use self-check runs the torch route; under a sum's gradient the input gradient is rounding
            # noise (every row's terms cancel), which the kernel must still be trusted with
            variant(x.clone().requires_grad_(True)).sum().backward()
            _check(variant, [x.requires_grad_(True)], extra_temporaries=0.0, scratch=2**19)
        assert any(launch.name.startswith("layer_norm_backward") for launch in gpu.launches)
        assert not cuda_kernels.REGISTRY.disabled
