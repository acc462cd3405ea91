"""Adapter-only artifacts: the trainable tensors alone, applied to the pretrained base, give the full artifact's
model exactly; the CLI writes one after training; bad input is one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.errors import CheckpointError
from tests.test_adapt import write_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A converted model whose base came from a weights file, with trained-looking adapters, saved both ways."""
    root = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    original = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(root / "base.safetensors"))
    loaded = surgeon.load_model(str(root / "base.safetensors"), arch="mobilenetv3_small_050")
    converted = surgeon.convert(loaded.model, base=loaded.base)
    with torch.no_grad():
        for name, param in surgeon.trainable_parameters(converted).items():
            if name.endswith("weight_a"):
                param.normal_(0, 0.1)
    surgeon.save(converted, root / "full")
    surgeon.save_adapter(converted, root / "adapter")
    return root, converted


def test_adapter_over_its_base_is_the_full_artifact(trained):
    root, converted = trained
    full_size = (root / "full" / "model.safetensors").stat().st_size
    adapter_size = (root / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_size * 20 < full_size  # measured: 69 KB against 6.5 MB
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    # a local weights file is recorded as the base's kind, never as a path a config could make surgeon read
    assert config["surgeon"]["base_model"] is None and config["surgeon"]["base_weights"] == "file"
    assert config["architecture"] == "mobilenetv3_small_050" and config["surgeon"]["recipe"]["name"]
    with pytest.raises(CheckpointError, match="base was a local weights file; pass the base yourself"):
        surgeon.load(root / "adapter")
    full = surgeon.load(root / "full")
    from_recorded_base = surgeon.load(root / "adapter", model=surgeon.load_model(
        str(root / "base.safetensors"), arch="mobilenetv3_small_050").model)
    torch.manual_seed(3)
    given_base = surgeon.load(root / "adapter", model=timm.create_model("mobilenetv3_small_050").eval())
    with torch.no_grad():  # a random base: its frozen weights differ, so only the adapters may agree
        assert not torch.equal(given_base(torch.ones(1, 3, 224, 224)), full(torch.ones(1, 3, 224, 224)))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(from_recorded_base(x), full(x))  # same weights, same layout: equal by construction
    assert set(surgeon.trainable_parameters(from_recorded_base)) == set(surgeon.trainable_parameters(full))
    for name, param in surgeon.trainable_parameters(given_base).items():
        assert torch.equal(param, converted.get_parameter(name))


def test_adapter_errors_are_one_line(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root / "adapter", tmp_path / "tampered")
    data = bytearray((tmp_path / "tampered" / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "tampered" / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"SHA-256 does not match adapter_config\.json"):
        surgeon.load(tmp_path / "tampered")
    with pytest.raises(CheckpointError, match="does not fit the converted base"):
        surgeon.load(root / "adapter", model=timm.create_model("mobilenetv3_small_100").eval())
    with pytest.warns(surgeon.errors.SurgeonWarning, match="nothing will be trainable"):
        idle = surgeon.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3)), "s2a",
                               example_input=torch.randn(1, 3, 8, 8))
    with pytest.raises(surgeon.SurgeonError, match="no trainable parameters"):
        surgeon.save_adapter(idle, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_trainable_summary_counts_shared_parameters_once(trained):
    _, converted = trained
    trainable = sum(p.numel() for p in surgeon.trainable_parameters(converted).values())
    total = sum(p.numel() for p in converted.parameters())
    assert surgeon.trainable_summary(converted) == (f"trainable params: {trainable:,} || all params: {total:,} || "
                                                    f"trainable%: {100 * trainable / total:.4f}")


def test_cli_adapt_writes_an_adapter_with_its_reset_head(trained, tmp_path):
    root, _ = trained
    write_images(tmp_path / "data", {"cat": 4, "dog": 4})
    result = CliRunner().invoke(app, ["adapt", str(root / "full"), "--data", str(tmp_path / "data"), "--out",
                                      str(tmp_path / "out"), "--adapter-out", str(tmp_path / "adapter"),
                                      "--epochs", "1", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert f"adapter-only artifact in {tmp_path / 'adapter'} (trainable params:" in result.stdout
    base = surgeon.load_model(str(root / "base.safetensors"), arch="mobilenetv3_small_050").model
    full, adapter = surgeon.load(tmp_path / "out"), surgeon.load(tmp_path / "adapter", model=base)
    assert adapter.num_classes == 2 and "classifier.weight" in surgeon.trainable_parameters(adapter)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(adapter(x), full(x))
