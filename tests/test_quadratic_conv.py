"""QuadraticDepthwiseConv2d: exact at init for every padding style, gradients equal to autograd's."""

from __future__ import annotations

import pytest
import torch
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from surgeon.methods.quadratic.layer import AtrousKernel, QuadraticDepthwiseConv2d, default_branches
from surgeon.ops.device_route import cuda_route
from surgeon.train.memory import KeptForBackward

CASES = [
    # kernel, stride, padding, dilation, same_dynamic
    (3, 1, 1, 1, False),
    (5, 2, 2, 1, False),
    (7, 1, 3, 1, False),
    (4, 1, "same", 1, False),
    (3, 1, 2, 2, False),
    (7, 1, 0, 1, False),
    (5, 2, 0, 1, True),
    (3, 2, 0, 1, True),
    (4, 2, 0, 1, True),
]


@pytest.fixture(params=["cpu", "cuda"])
def torch_route(request):
    """The CPU's own torch route (dense branch gradients, C++ kernels where they apply) and CUDA's (dilated
    convs on views of the input), both run here."""
    if request.param == "cpu":
        yield request.param
        return
    with cuda_route():
        yield request.param


def make_conv(kernel: int, stride: int, padding, dilation: int, same: bool, channels: int = 6) -> nn.Conv2d:
    if same:
        return Conv2dSame(channels, channels, kernel, stride, groups=channels, dilation=dilation)
    return nn.Conv2d(channels, channels, kernel, stride, padding, dilation, groups=channels)


@pytest.mark.parametrize("kernel,stride,padding,dilation,same", CASES)
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_exact_at_init(kernel, stride, padding, dilation, same, rank, channels_last, torch_route, seeded):
    conv = make_conv(kernel, stride, padding, dilation, same)
    layer = QuadraticDepthwiseConv2d.from_conv(conv, same_dynamic=same, rank=rank)
    for size in [(13, 11), (16, 16)]:
        x = torch.randn(2, 6, *size)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            assert torch.equal(layer(x), conv(x))
        # the training path (custom autograd function) is exact too
        assert torch.equal(layer(x.clone().requires_grad_()).detach(), conv(x).detach())


@pytest.mark.parametrize("kernel,stride,padding,dilation,same", CASES)
@pytest.mark.parametrize("keep", [False, True])
def test_gradients_match_naive_formula(kernel, stride, padding, dilation, same, keep, torch_route, seeded):
    conv = make_conv(kernel, stride, padding, dilation, same, channels=3).double()
    layer = QuadraticDepthwiseConv2d.from_conv(conv, same_dynamic=same, rank=2, keep_branches=keep,
                                               train_bias=True).double()
    nn.init.normal_(layer.weight_a)
    layer.weight.requires_grad_(True)
    x = torch.randn(2, 3, 9, 8, dtype=torch.double, requires_grad=True)

    def custom(x, w, b, wa, wb):
        return layer.__class__.forward(_with(layer, w, b, wa, wb), x)

    assert torch.autograd.gradcheck(custom, (x, layer.weight, layer.bias, layer.weight_a, layer.weight_b))
    out = layer(x)
    reference = layer.forward_reference(x)
    grad = torch.randn_like(out)
    params = [x, layer.weight, layer.bias, layer.weight_a, layer.weight_b]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(reference, params, grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _with(layer, w, b, wa, wb):
    clone = QuadraticDepthwiseConv2d.__new__(QuadraticDepthwiseConv2d)
    clone.__dict__.update(layer.__dict__)
    clone._parameters = {"weight": w, "bias": b, "weight_a": wa, "weight_b": wb}
    return clone


def test_backward_does_not_keep_the_product(seeded):
    conv = nn.Conv2d(8, 8, 5, padding=2, groups=8)
    layer = QuadraticDepthwiseConv2d.from_conv(conv)
    x = torch.randn(4, 8, 20, 20)
    with KeptForBackward() as kept:
        layer(x)
    saved = kept.tensors
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert x.untyped_storage().data_ptr() in storages
    activation_sized = [t for t in saved if t.shape == (4, 8, 20, 20) and t.data_ptr() != x.data_ptr()]
    assert activation_sized == []  # neither the product nor the branch outputs are kept by default


def test_default_pattern_matches_paper():
    a, b = default_branches((5, 5), (1, 1))
    assert a == AtrousKernel((3, 3), (2, 2)) and b == AtrousKernel((2, 2), (4, 4))
    layer = QuadraticDepthwiseConv2d.from_conv(nn.Conv2d(10, 10, 5, padding=2, groups=10))
    assert layer.added_parameters() == 10 * (9 + 4)
    assert torch.count_nonzero(layer.weight_a) == 0 and layer.weight_b.std() > 0
    assert not layer.weight.requires_grad and layer.weight_a.requires_grad


def test_branch_larger_than_kernel_is_refused():
    with pytest.raises(ValueError, match="spans"):
        QuadraticDepthwiseConv2d(4, (3, 3), padding=1, branch_a=AtrousKernel((3, 3), (2, 2)))


def test_adapter_changes_output_after_training_step(seeded):
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    layer = QuadraticDepthwiseConv2d.from_conv(conv)
    x = torch.randn(2, 4, 8, 8)
    loss = (layer(x) - torch.randn(2, 4, 8, 8)).pow(2).mean()
    loss.backward()
    assert layer.weight_a.grad is not None and layer.weight_a.grad.abs().sum() > 0
    with torch.no_grad():
        layer.weight_a -= 0.1 * layer.weight_a.grad
        assert not torch.equal(layer(x), conv(x))
