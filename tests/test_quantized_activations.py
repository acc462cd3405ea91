"""S2A layers: forward bit-identical, gradients exact (masks) or close (4-bit), and really fewer bytes saved."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from surgeon.methods.s2a.activation import QuantizedActivation, quantized_call
from surgeon.methods.s2a.attention import quantized_scaled_dot_product_attention
from surgeon.ops import bitpack
from surgeon.ops.activations import FUNCTION_KEY_OF, spec_from_module
from surgeon.train.memory import KeptForBackward

MASK_MODULES = [nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6(), nn.ReLU6(inplace=True), nn.LeakyReLU(0.2),
                nn.Hardtanh(-2.0, 3.0), nn.Hardsigmoid()]
SMOOTH_MODULES = [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish(), nn.Mish(),
                  timm.layers.activations.GELU(), timm.layers.activations.Swish()]
OUTPUT_MODULES = [nn.Sigmoid(), nn.Tanh(), nn.Softmax(dim=1), nn.Softmax(dim=-1), timm.layers.activations.Sigmoid(),
                  timm.layers.activations.Tanh()]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.clone().requires_grad_(True)
    y = module(leaf * 1.0)  # non-leaf input, so inplace variants are legal
    y.backward(grad)
    return y.detach(), leaf.grad


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bitpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = bitpack.pack(codes, bits)
    assert packed.numel() == bitpack.packed_numel(1001, bits)
    assert torch.equal(bitpack.unpack(packed, bits, 1001), codes)


@pytest.mark.parametrize("module", MASK_MODULES, ids=repr)
def test_mask_family_exact(module, seeded):
    x = torch.randn(3, 17, 9, 7) * 4
    x[0, 0, 0, :3] = torch.tensor([0.0, 6.0, -2.0])  # boundaries
    grad = torch.randn_like(x)
    want_y, want_g = run(module, x, grad)
    got_y, got_g = run(QuantizedActivation(module, spec_from_module(module)), x, grad)
    assert torch.equal(got_y, want_y)
    assert torch.equal(got_g, want_g)


def realistic_preactivations() -> torch.Tensor:
    """Inputs of the GELUs of a ConvNeXt on a real photo, mixed with wider Gaussians."""
    import skimage.data

    model = timm.create_model("convnext_atto", pretrained=False).eval()
    image = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1).float().div(255)[None]
    image = F.interpolate(image, size=(160, 160), mode="bilinear")
    captured = []
    for block in model.modules():
        if isinstance(block, nn.GELU):
            block.register_forward_hook(lambda m, a, o: captured.append(a[0].flatten()[:20000]))
    with torch.no_grad():
        model((image - 0.45) / 0.25)
    torch.manual_seed(0)
    return torch.cat([*captured, torch.randn(20000) * 0.5, torch.randn(20000) * 2.5])


@pytest.mark.parametrize("module", SMOOTH_MODULES, ids=repr)
def test_derivative_family_4bit(module, seeded):
    x = realistic_preactivations()
    grad = torch.randn_like(x)
    want_y, want_g = run(module, x, grad)
    got_y, got_g = run(QuantizedActivation(module, spec_from_module(module), bits=4), x, grad)
    assert torch.equal(got_y, want_y)
    assert cosine(got_g, want_g) >= 0.99


@pytest.mark.parametrize("module", OUTPUT_MODULES, ids=repr)
def test_output_family_4bit(module, seeded):
    x = torch.randn(4, 64, 12, 12) * 2
    grad = torch.randn_like(x)
    want_y, want_g = run(module, x, grad)
    got_y, got_g = run(QuantizedActivation(module, spec_from_module(module), bits=4), x, grad)
    assert torch.equal(got_y, want_y)
    assert cosine(got_g, want_g) >= 0.99


def test_more_bits_means_closer_gradients(seeded):
    x = realistic_preactivations()
    grad = torch.randn_like(x)
    _, want = run(nn.GELU(), x, grad)
    errors = [(run(QuantizedActivation(nn.GELU(), spec_from_module(nn.GELU()), bits=b), x, grad)[1] - want).norm()
              for b in (1, 2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > errors[3]


def saved_bytes(fn, x: torch.Tensor) -> int:
    with KeptForBackward() as kept:
        fn(x)
    return kept.bytes


@pytest.mark.parametrize("module,bits,ratio", [(nn.ReLU(), 4, 32), (nn.GELU(), 4, 8), (nn.GELU(), 2, 16),
                                               (nn.SiLU(), 8, 4), (nn.Sigmoid(), 4, 6), (nn.Softmax(dim=-1), 4, 6)])
def test_saved_memory_is_low_bit(module, bits, ratio):
    x = torch.randn(8, 64, 32, 32, requires_grad=True)
    full = saved_bytes(lambda t: module(t * 1.0), x)
    layer = QuantizedActivation(module, spec_from_module(module), bits=bits)
    low = saved_bytes(lambda t: layer(t * 1.0), x)
    assert full >= x.numel() * 4
    assert low * ratio <= full


def test_functional_and_method_forms(seeded):
    x = torch.randn(2, 5, 7, requires_grad=True)
    for target, op, params, args, reference in [
        (FUNCTION_KEY_OF[F.gelu], "gelu", (("approximate", "tanh"),), (), lambda t: F.gelu(t, approximate="tanh")),
        ("method:softmax", "softmax", (("dim", 1),), (1,), lambda t: t.softmax(1)),
        ("method:sigmoid", "sigmoid", (), (), lambda t: t.sigmoid()),
    ]:
        kwargs = {"approximate": "tanh"} if op == "gelu" else {}
        grad = torch.randn(2, 5, 7)
        want = reference(x)
        (want_grad,) = torch.autograd.grad(want, x, grad)
        grads = []
        for reuse_input in (False, True):  # computed into a fresh input where the op has an in-place form
            fresh = x * 1.0
            got = quantized_call(fresh, target, op, params, 4, 128, reuse_input, *args, **kwargs)
            assert torch.equal(got, want)
            assert (got.data_ptr() == fresh.data_ptr()) == (reuse_input and op != "softmax"), op
            (got_grad,) = torch.autograd.grad(got, x, grad)
            assert cosine(got_grad, want_grad) >= 0.98, op
            assert not torch.equal(got_grad, want_grad), op  # the quantized backward ran, not torch's own
            grads.append(got_grad)
        assert torch.equal(grads[0], grads[1]), op


@pytest.mark.parametrize("input_bits", [32, 8])
def test_attention_equivalent(seeded, input_bits):
    q, k, v = (torch.randn(2, 3, 40, 16, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, 40, 16)
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": torch.rand(40, 40) > 0.2}):
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
        want_grads = torch.autograd.grad(want, (q, k, v), grad)
        got = quantized_scaled_dot_product_attention(q, k, v, **kwargs, input_bits=input_bits)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        got_grads = torch.autograd.grad(got, (q, k, v), grad)
        for a, b in zip(got_grads, want_grads, strict=True):
            assert cosine(a, b) >= 0.99
        with torch.no_grad():
            assert torch.equal(quantized_scaled_dot_product_attention(q, k, v, **kwargs),
                               F.scaled_dot_product_attention(q, k, v, **kwargs))


def test_attention_8bit_inputs_keep_less(seeded):
    q, k, v = (torch.randn(2, 3, 64, 32, requires_grad=True) for _ in range(3))

    def kept(input_bits: int) -> int:
        return saved_bytes(lambda _: quantized_scaled_dot_product_attention(q * 1.0, k * 1.0, v * 1.0,
                                                                            input_bits=input_bits), q)

    assert kept(8) * 2.5 <= kept(32)


def _attention_pair(q, k, v, grad, **kwargs):
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    got = quantized_scaled_dot_product_attention(q, k, v, **kwargs)
    return (want, *torch.autograd.grad(want, (q, k, v), grad)), (got, *torch.autograd.grad(got, (q, k, v), grad))


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_attention_fully_masked_rows_match_the_fused_op(seeded, mask_kind):
    q, k, v = (torch.randn(2, 3, 10, 16, requires_grad=True) for _ in range(3))
    keep = torch.rand(10, 10) > 0.3
    keep[4] = False  # query 4 may attend to nothing
    mask = keep if mask_kind == "bool" else torch.zeros(10, 10).masked_fill(~keep, -math.inf)
    want, got = _attention_pair(q, k, v, torch.randn(2, 3, 10, 16), attn_mask=mask)
    assert all(torch.isfinite(t).all() for t in got)
    assert torch.equal(got[0][..., 4, :], torch.zeros_like(got[0][..., 4, :]))
    assert torch.equal(got[1][..., 4, :], want[1][..., 4, :])  # no gradient reaches the dead query
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)


def test_attention_fp16_scores_that_overflow_unscaled_match_the_fused_op(seeded):
    # q·k is ~1e5 here, beyond fp16's 65504; scaled by 1/sqrt(64) it fits
    q, k = ((torch.randn(1, 2, 6, 64) * 2 + 40).half().requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, 6, 64).half().requires_grad_()
    want, got = _attention_pair(q, k, v, torch.randn(1, 2, 6, 64).half())
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[1:])
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=2e-2, rtol=2e-2)
    assert cosine(want[3].float(), got[3].float()) >= 0.99  # value gradient (q, k ones are ~1e-6 here)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low, high", [(0.0, 6.0), (0.0, math.inf), (-3.0, 3.0)])
@pytest.mark.parametrize("chunk", [bitpack.CHUNK_ELEMENTS, 64])
def test_numpy_mask_packing_matches_the_torch_packing(seeded, monkeypatch, dtype, low, high, chunk):
    """The CPU's numpy route for 1-bit masks gives the bits of the torch route, edges and non-finite values
    included, whatever the chunking and a length that is not a multiple of 8."""
    monkeypatch.setattr(bitpack, "CHUNK_ELEMENTS", chunk)
    x = (torch.randn(1001) * 5).to(dtype)
    x[:8] = torch.tensor([low, high if math.isfinite(high) else 1e30, math.nan, math.inf, -math.inf, -0.0, 0.0,
                          6.0], dtype=dtype)
    got = bitpack.pack_interval_mask(x, low, high)
    assert got is not None and got.dtype == torch.uint8
    inside = x > low if high == math.inf else (x > low) & (x < high)
    assert torch.equal(got, bitpack.pack(inside, 1))
    assert torch.equal(bitpack.unpack(got, 1, x.numel()).bool(), inside)


def test_numpy_mask_packing_declines_what_it_does_not_handle():
    assert bitpack.pack_interval_mask(torch.randn(64).half(), 0.0, 6.0) is None
    assert bitpack.pack_interval_mask(torch.randn(8, 8), 0.0, 6.0) is None
