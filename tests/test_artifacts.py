"""Save → load round trips, custom models, verification of the recorded SHA-256, and safe loading."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import surgeon
from surgeon.errors import CheckpointError, SurgeonError


def trained(model: nn.Module) -> nn.Module:
    """Give the adapters non-zero weights, as training would."""
    with torch.no_grad():
        for name, param in surgeon.trainable_parameters(model).items():
            if name.endswith("weight_a"):
                param.normal_(0, 0.1)
    return model


def test_timm_round_trip(tmp_path):
    torch.manual_seed(0)
    base = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=7).eval()
    converted = trained(surgeon.convert(base, "quadranet-v2-s2a", base={"architecture": "mobilenetv3_small_100",
                                                                         "model_args": {"num_classes": 7}}))
    surgeon.save(converted, tmp_path / "art")
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert config["architecture"] == "mobilenetv3_small_100" and config["num_classes"] == 7
    assert config["surgeon"]["recipe"]["name"] == "quadranet-v2-s2a"
    assert len(config["surgeon"]["weights_sha256"]) == 64
    loaded = surgeon.load(tmp_path / "art")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = converted.eval()(x)
        assert torch.equal(loaded(x), want)
        assert not torch.equal(base(x), want)  # the adapters matter
    assert set(surgeon.trainable_parameters(loaded)) == set(surgeon.trainable_parameters(converted))
    with pytest.raises(SurgeonError, match="already exists"):
        surgeon.save(converted, tmp_path / "art")
    surgeon.save(converted, tmp_path / "art", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no staging leftovers


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.shared = nn.Linear(4, 4)
        self.alias = self.shared  # the same module under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.dw(x)).mean((2, 3))
        return self.alias(self.shared(x))


def test_custom_model_round_trip(tmp_path):
    torch.manual_seed(0)
    converted = trained(surgeon.convert(Tiny().eval(), "quadranet-v2-s2a", example_input=torch.randn(1, 4, 8, 8)))
    surgeon.save(converted, tmp_path / "tiny")
    with pytest.raises(SurgeonError, match="model=MyModel"):
        surgeon.load(tmp_path / "tiny")
    loaded = surgeon.load(tmp_path / "tiny", model=Tiny())
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))


def test_tampered_weights_are_refused(tmp_path):
    converted = surgeon.convert(Tiny().eval(), "quadranet-v2", example_input=torch.randn(1, 4, 8, 8))
    surgeon.save(converted, tmp_path / "tiny")
    weights = tmp_path / "tiny" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        surgeon.load(tmp_path / "tiny", model=Tiny())
    surgeon.load(tmp_path / "tiny", model=Tiny(), verify=False)


def test_weights_files_and_key_errors(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # DDP prefix is stripped
    torch.save({"state_dict": state}, tmp_path / "ddp.pth")
    loaded = surgeon.load_model(str(tmp_path / "ddp.pth"), arch="resnet18")
    assert loaded.model.fc.out_features == 5  # class count read from the checkpoint
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema}, tmp_path / "ema.pth")
    got = surgeon.load_model(str(tmp_path / "ema.pth"), arch="resnet18").model
    assert torch.equal(got.fc.weight, ema["fc.weight"])  # EMA preferred
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): layer4"):
        surgeon.load_model(str(tmp_path / "partial.pth"), arch="resnet18")

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        surgeon.load_model(str(tmp_path / "evil.pth"), arch="resnet18")


def stem_model() -> nn.Module:
    """A model whose first 4-D weight tells NHWC from NCHW (a depthwise [C, 1, k, k] kernel is both)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.GELU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_reloaded_model_keeps_the_memory_format_it_was_saved_in(tmp_path, layout):
    torch.manual_seed(0)
    converted = trained(surgeon.convert(stem_model().eval(), "quadranet-v2-s2a",
                                        example_input=torch.randn(1, 3, 6, 6)))
    converted.to(memory_format=layout)  # what adapt leaves behind with channels_last=True
    surgeon.save(converted, tmp_path / "art")
    loaded = surgeon.load(tmp_path / "art", model=stem_model())
    merged = surgeon.merge(converted, example_input=torch.randn(2, 3, 6, 6))
    surgeon.save_merged(merged, tmp_path / "merged")
    merged_loaded = surgeon.load(tmp_path / "merged", model=stem_model())
    for model in (loaded, merged_loaded):
        assert model[0].weight.is_contiguous(memory_format=layout)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():  # same weights, same layout, same input: the same kernels run, so equal by construction
        assert torch.equal(loaded(x), converted.eval()(x))
        assert torch.equal(merged_loaded(x), merged(x))


def test_loading_leaves_the_callers_random_stream_alone(tmp_path):
    torch.manual_seed(0)
    surgeon.save(surgeon.convert(stem_model().eval(), example_input=torch.randn(1, 3, 6, 6)), tmp_path / "art")
    base = stem_model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    surgeon.load(tmp_path / "art", model=base)
    assert torch.equal(torch.get_rng_state(), state)
