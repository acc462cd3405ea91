"""Merge: exact folding of trained adapters, BN folding, reverting training-only layers, save → load."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.fx
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.errors import SurgeonError
from surgeon.methods.quadratic.inference import QuadraConvDW
from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d
from surgeon.methods.s2a.activation import QuantizedActivation


def train_adapters(model: nn.Module, std: float = 0.1) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in surgeon.trainable_parameters(model).items():
            if name.endswith("weight_a"):
                param.normal_(0, std)
    return model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def lite0(lite0_weights):
    loaded = surgeon.load_model("tf_efficientnet_lite0", weights=str(lite0_weights))
    converted = train_adapters(surgeon.convert(loaded.model, "quadranet-v2-s2a", base=loaded.base))
    return loaded.model, converted


@pytest.mark.parametrize("fold_bn", [False, True])
def test_merge_is_exact_and_keeps_the_adaptation(lite0, fold_bn):
    original, converted = lite0
    merged = surgeon.merge(converted, fold_bn=fold_bn)
    assert type(merged) is type(original)
    assert not any(isinstance(m, (QuantizedActivation, QuadraticDepthwiseConv2d, torch.fx.GraphModule))
                   for m in merged.modules())
    assert sum(isinstance(m, QuadraConvDW) for m in merged.modules()) == 16
    assert len(merged.surgeon_merge.folded) == (16 if fold_bn else 0)
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        want = converted.eval()(x)
        got = merged(x)
        base = original(x)
    assert relative(got, want) <= 1e-5
    assert merged.surgeon_merge.verification["relative"] <= 1e-5
    assert relative(base, want) > 1e-3  # the adapters changed the output ...
    assert relative(got, base) > 1e-3  # ... and still do after the merge


def test_merged_keys_follow_quadralib(lite0, tmp_path):
    _, converted = lite0
    merged = surgeon.merge(converted)
    surgeon.save_merged(merged, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        conv1 = handle.get_tensor("blocks.1.0.conv_dw.P.conv1.weight")
        conv3 = handle.get_tensor("blocks.1.0.conv_dw.P.conv3.weight")
    assert {"blocks.1.0.conv_dw.P.conv1.weight", "blocks.1.0.conv_dw.P.conv2.weight",
            "blocks.1.0.conv_dw.P.conv3.weight"} <= keys
    assert conv1.shape == conv3.shape  # rank 1, dense over the 3x3 receptive field
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["surgeon"]["format"] == "merged" and len(config["surgeon"]["layers"]) == 16
    loaded = surgeon.load(tmp_path / "m")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))


def test_dtype_and_routes(lite0, tmp_path):
    _, converted = lite0
    merged = surgeon.merge(converted, dtype="bf16")
    assert next(merged.parameters()).dtype == torch.bfloat16
    surgeon.save_merged(merged, tmp_path / "bf16")
    assert next(surgeon.load(tmp_path / "bf16").parameters()).dtype == torch.bfloat16
    layer = next(m for m in surgeon.merge(converted).modules() if isinstance(m, QuadraConvDW))
    x = torch.randn(2, layer.channels, 17, 15)
    with torch.no_grad():
        torch.testing.assert_close(layer.forward_atrous(x), layer.forward_dense(x), rtol=1e-5, atol=1e-6)
        layer.P.conv1.weight[0, 0, 0, 1] = 0.5  # no longer the atrous pattern
    layer.check_patterns()
    assert layer.branch_a is None  # so the forward now takes the dense route


def test_nan_refuses_merge_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4)).eval()
    converted = surgeon.convert(model, example_input=torch.randn(1, 3, 10, 10))
    with torch.no_grad():
        converted[2].weight_a[0, 0, 0, 0] = float("nan")
    with pytest.raises(SurgeonError, match="layer '2'"):
        surgeon.merge(converted)


def test_custom_model_with_rewritten_owner_reverts_to_its_class(tmp_path):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.silu(self.bn(self.dw(x))) + x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block()).eval()
    model[1].bn.running_var.uniform_(0.5, 2.0)
    model[1].bn.running_mean.normal_()
    converted = train_adapters(surgeon.convert(model, example_input=torch.randn(1, 3, 12, 12)))
    assert isinstance(converted[1], torch.fx.GraphModule)
    merged = surgeon.merge(converted, fold_bn=True, example_input=torch.randn(2, 3, 12, 12))
    assert type(merged[1]) is Block and isinstance(merged[1].dw, QuadraConvDW)
    assert isinstance(merged[1].bn, nn.Identity)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert relative(merged(x), converted(x)) <= 1e-5
    surgeon.save_merged(merged, tmp_path / "m")
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block())
    loaded = surgeon.load(tmp_path / "m", model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))


def test_cli_merge(tmp_path):
    torch.manual_seed(0)
    base = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=3).eval()
    converted = train_adapters(surgeon.convert(base, base={"architecture": "mobilenetv2_100",
                                                           "model_args": {"num_classes": 3}}))
    surgeon.save(converted, tmp_path / "conv")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "conv"), "--out", str(tmp_path / "m"), "--fold-bn",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quadratic_layers"] == 17 and len(report["folded_batchnorm"]) == 17
    assert report["verification"]["relative"] <= 1e-5
    again = CliRunner().invoke(app, ["merge", str(tmp_path / "conv"), "--out", str(tmp_path / "m")])
    assert again.exit_code == 2 and "already exists" in again.output


def test_dw_linear_recipe_trains_and_merges_to_plain_convs(lite0):
    original, _ = lite0
    converted = surgeon.convert(original, "dw-linear", base={"architecture": "tf_efficientnet_lite0",
                                                             "model_args": {}})
    trainable = surgeon.trainable_parameters(converted)
    assert len(trainable) == 16 and all(name.endswith("weight_delta") for name in trainable)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), original(x))
        for param in trainable.values():
            param.normal_(0, 0.02)
    merged = surgeon.merge(converted)
    assert not any(isinstance(m, QuadraConvDW) for m in merged.modules())
    assert all(type(m) in (nn.Conv2d, type(original.conv_stem)) for m in merged.modules()
               if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        assert relative(merged(x), converted(x)) <= 1e-5
        assert relative(merged(x), original(x)) > 1e-3


class TwoBranches(nn.Module):
    """One depthwise conv feeds a BatchNorm (foldable), the other a GELU (nothing to fold)."""

    def __init__(self, branch_on_values: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw1 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.dw2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.branch_on_values = branch_on_values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.dw1(self.stem(x)))
        if self.branch_on_values and x.mean() > 100:  # a Python branch on data: fx cannot trace this model
            x = x * 2
        return F.gelu(self.dw2(x)).mean((2, 3))


@pytest.mark.parametrize("branch_on_values", [False, True])
def test_fold_bn_reports_every_candidate_it_did_not_fold(tmp_path, branch_on_values):
    torch.manual_seed(0)
    model = TwoBranches(branch_on_values).eval()
    converted = train_adapters(surgeon.convert(model, example_input=torch.randn(1, 3, 8, 8)))
    merged = surgeon.merge(converted, fold_bn=True, example_input=torch.randn(2, 3, 8, 8))
    info = merged.surgeon_merge
    assert len(info.folded) + len(info.unfolded) == 2  # every quadratic layer is a candidate, folded or explained
    if branch_on_values:
        assert info.folded == {} and set(info.unfolded) == {"dw1", "dw2"}
        assert all("could not be traced" in reason for reason in info.unfolded.values())
    else:
        assert info.folded == {"bn": "batchnorm"}
        assert set(info.unfolded) == {"dw2"} and "not a BatchNorm" in info.unfolded["dw2"]
    surgeon.save_merged(merged, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["surgeon"]["unfolded_batchnorm"] == info.unfolded


def test_cli_merge_says_how_many_batchnorms_were_folded(tmp_path):
    torch.manual_seed(0)
    base = timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()
    surgeon.save(surgeon.convert(base, base={"architecture": "convnext_atto", "model_args": {"num_classes": 3}}),
                 tmp_path / "conv")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "conv"), "--out", str(tmp_path / "m"), "--fold-bn"])
    assert result.exit_code == 0, result.output
    assert "folded 0 of 12 BatchNorm candidates" in result.output  # ConvNeXt normalises with LayerNorm
    assert "not folded after stages.0.blocks.0.conv_dw: its output goes to call_method permute" in result.output
