"""The verification list: every model converts exactly at init and takes one training step."""

from __future__ import annotations

import pytest
import timm
import torch

import surgeon
from surgeon.layers.quadratic_conv import QuadraticDepthwiseConv2d

MODELS = [
    "convnext_atto", "convnextv2_atto", "efficientnet_b0", "tf_efficientnet_lite0", "mobilenetv2_100",
    "mobilenetv3_small_100", "mobilenetv4_conv_small", "ghostnet_100", "efficientformerv2_s0", "edgenext_xx_small",
    "fastvit_t8", "repvit_m0_9", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "resnet18",
]


@pytest.mark.parametrize("name", MODELS)
def test_exact_at_init_and_one_training_step(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"]
    converted = surgeon.convert(model, "quadranet-v2-s2a")
    swapped = [s for s in converted.surgeon_info.sites if s.action == "swap"]
    assert swapped, "nothing was converted"
    x = torch.randn(2, *size)
    check = surgeon.output_difference(model, converted, x)
    assert check["max_abs_diff"] <= 1e-6 * check["max_abs_output"], check

    # one training step: adapters plus the stem, so the backward runs through every converted layer
    converted.train()
    first = next(p for p in converted.parameters())
    first.requires_grad_(True)
    trainable = list(surgeon.trainable_parameters(converted).values())
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    before = {id(p): p.detach().clone() for p in trainable}
    loss = torch.nn.functional.cross_entropy(converted(x), torch.tensor([1, 2]))
    loss.backward()
    for param in trainable:
        assert param.grad is not None and torch.isfinite(param.grad).all()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[id(p)], p) for p in trainable)
    quadratic = [m for m in converted.modules() if isinstance(m, QuadraticDepthwiseConv2d)]
    if quadratic:
        assert any(m.weight_a.grad.abs().sum() > 0 for m in quadratic)
