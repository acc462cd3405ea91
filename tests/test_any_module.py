"""Beyond timm: torchvision models and a hand-written model convert exactly, train one step and merge; what cannot
be converted is listed with its reason, and a conversion that leaves nothing to train says so."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import surgeon
from surgeon.errors import SurgeonError, SurgeonWarning


class Functional(nn.Module):
    """A functional depthwise conv, a module called at two sites, and in-place activations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.kernel = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.2)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.act(self.dw(x))  # the same ReLU object, second call site
        x = F.conv2d(x, self.kernel, padding=1, groups=8)
        x = F.silu(x, inplace=True)
        return self.head(x.mean((2, 3)))


def build(name: str) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    if name == "functional":
        return Functional().eval(), 32
    return getattr(torchvision.models, name)().eval(), 224


MODELS = ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf", "swin_t",
          "functional"]
NOTHING_TO_TRAIN = {"regnet_y_400mf", "swin_t"}  # grouped (not depthwise) convs; swin has none at all


def convert(model: nn.Module, size: int) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = surgeon.convert(model, example_input=torch.randn(1, 3, size, size))
    return converted, [str(w.message) for w in caught if issubclass(w.category, SurgeonWarning)]


@pytest.mark.parametrize("name", MODELS)
def test_exact_at_init_one_training_step_and_merge(name):
    model, size = build(name)
    converted, said = convert(model, size)
    x = torch.randn(2, 3, size, size)
    check = surgeon.output_difference(model, converted, x)
    assert check["max_abs_diff"] <= 1e-6 * check["max_abs_output"], check
    sites = converted.surgeon_info.sites
    assert all(s.reason for s in sites if s.action == "unreachable")  # nothing is dropped without a reason
    trainable = surgeon.trainable_parameters(converted)
    if name in NOTHING_TO_TRAIN:
        assert not trainable
        assert len(said) == 1 and "no depthwise conv matched" in said[0]
        with pytest.raises(SurgeonError, match="no trainable parameters"):
            surgeon.adapt(converted, [(x, torch.tensor([0, 1]))], epochs=1, log=lambda _: None)
    else:
        assert trainable and not said
        converted.train()
        optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
        loss = F.cross_entropy(converted(x), torch.tensor([1, 2]))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
        assert any(p.grad.abs().sum() > 0 for p in trainable.values())
        optimizer.step()
        converted.eval()
    merged = surgeon.merge(converted, example_input=x)
    assert merged.surgeon_merge.verification["relative"] <= 1.1e-6, merged.surgeon_merge.verification
    with torch.no_grad():
        assert (merged(x) - converted(x)).abs().max() <= 1e-5 * converted(x).abs().max()


def test_what_cannot_be_converted_is_listed_with_its_reason():
    model, size = build("functional")
    converted, _ = convert(model, size)
    by_path = {s.path: s for s in converted.surgeon_info.sites}
    functional = by_path["::conv2d#0"]
    assert functional.action == "unreachable" and "plain tensor, not an nn.Conv2d" in functional.reason
    assert by_path["act"].action == "swap" and by_path["act"].calls == 2
    swin, size = build("swin_t")
    hidden = [s for s in convert(swin, size)[0].surgeon_info.sites if s.action == "unreachable"]
    assert len(hidden) == 12 and all("softmax inside ShiftedWindowAttention" in s.reason for s in hidden)


def _base(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.removeprefix("timm:"), pretrained=False).eval()
    return getattr(torchvision.models, name)().eval()


@pytest.mark.parametrize("name", ["mnasnet1_0", "swin_v2_t", "maxvit_t", "timm:efficientvit_m0"])
def test_models_with_unusual_modules_convert_train_merge_and_reload(name, tmp_path):
    """Modules that read their state-dict version on load (MNASNet), a child's weight read inside a forward
    (Swin V2's ``qkv.weight``), constants lifted by the tracer (MaxViT) and attributes read from outside a
    forward (EfficientViT's ``attn.resolution``)."""
    model = _base(name)
    recipe = {**surgeon.load_recipe("quadranet-v2-s2a").to_dict(), "trainable": ["*.bias"]}
    x = torch.randn(2, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)
        converted = surgeon.convert(model, recipe, example_input=x[:1])
    check = surgeon.output_difference(model, converted, x)
    assert check["max_abs_diff"] <= 1e-6 * check["max_abs_output"], check
    trainable = surgeon.trainable_parameters(converted)
    converted.train()
    F.cross_entropy(converted(x), torch.tensor([1, 2])).backward()
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    converted.eval()
    merged = surgeon.merge(converted, example_input=x[:1])
    assert surgeon.output_difference(converted, merged, x)["relative"] <= 1e-4
    rebuild = None if name.startswith("timm:") else (lambda: getattr(torchvision.models, name)())
    surgeon.save(converted, tmp_path / "converted")
    surgeon.save_merged(merged, tmp_path / "merged")
    for saved, path in ((converted, "converted"), (merged, "merged")):
        back = surgeon.load(tmp_path / path, model=rebuild() if rebuild else None)
        with torch.no_grad():
            assert torch.equal(back(x), saved(x)), path
