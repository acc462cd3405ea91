"""Hugging Face transformers image classifiers as a source (``transformers:<dir or hub id>``): random-init models
saved with ``save_pretrained`` convert exactly, train a step, merge, and reload in both formats bit-identical
with no base object (the artifact records the transformers config); the CLI runs end to end on a saved
ConvNext directory."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.errors import SurgeonWarning
from surgeon.ops.model_outputs import logits


def tiny(family: str):
    torch.manual_seed(0)
    if family == "convnext":
        config = transformers.ConvNextConfig(num_labels=3, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64])
    elif family == "mobilenet_v2":
        config = transformers.MobileNetV2Config(num_labels=3, depth_multiplier=0.35, image_size=64)
    elif family == "mobilevit":
        config = transformers.MobileViTConfig(num_labels=3, image_size=64, hidden_sizes=[16, 24, 32],
                                              neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64])
    elif family == "efficientnet":
        config = transformers.EfficientNetConfig(num_labels=3, image_size=64, width_coefficient=0.25,
                                                 depth_coefficient=0.25, hidden_dim=320)
    else:
        config = transformers.SwinConfig(num_labels=3, image_size=64, patch_size=4, embed_dim=16, depths=[1, 1],
                                         num_heads=[1, 2], window_size=4)
    return transformers.AutoModelForImageClassification.from_config(config).eval()


@pytest.fixture()
def saved(tmp_path):
    def save(family: str):
        directory = tmp_path / family
        tiny(family).save_pretrained(directory)
        (directory / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 64}, "crop_pct": 0.875,
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 3}))
        return directory

    return save


@pytest.mark.parametrize("family", ["convnext", "mobilenet_v2", "mobilevit", "efficientnet", "swin"])
def test_a_transformers_model_converts_trains_merges_and_reloads(family, saved, tmp_path):
    loaded = surgeon.load_model(f"transformers:{saved(family)}")
    model = loaded.model
    assert model.pretrained_cfg["input_size"] == (3, 64, 64) and model.num_classes == 3
    recipe = surgeon.load_recipe("quadranet-v2-s2a").to_dict()
    if family == "swin":
        recipe = {**recipe, "trainable": ["*.bias"]}  # no depthwise convs: train the biases
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)
        converted = surgeon.convert(model, recipe, example_input=x[:1], base=loaded.base)
    check = surgeon.output_difference(model, converted, x)
    assert check["max_abs_diff"] <= 1e-6 * check["max_abs_output"], check
    swapped = [s for s in converted.surgeon_info.sites if s.action == "swap" and s.target == "depthwise_conv"]
    assert bool(swapped) == (family != "swin")  # EfficientNet's depthwise convs are a Conv2d subclass
    trainable = surgeon.trainable_parameters(converted)
    converted.train()
    F.cross_entropy(logits(converted(x)), torch.tensor([1, 2])).backward()
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    converted.eval()
    merged = surgeon.merge(converted, example_input=x[:1])
    assert surgeon.output_difference(converted, merged, x)["relative"] <= 1e-4
    surgeon.save(converted, tmp_path / "converted")
    surgeon.save_merged(merged, tmp_path / "merged")
    for original, path in ((converted, "converted"), (merged, "merged")):
        back = surgeon.load(tmp_path / path)  # rebuilt from the recorded transformers config
        with torch.no_grad():
            assert torch.equal(logits(back(x)), logits(original(x))), path


def test_the_cli_runs_end_to_end_on_a_saved_convnext(saved, tmp_path):
    directory = saved("convnext")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label in range(3):
            folder = tmp_path / "data" / split / str(label)
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (72, 72, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result

    spec = f"transformers:{directory}"
    assert "depthwise_conv" in run("plan", spec, "--json").output
    run("convert", spec, "--out", str(tmp_path / "converted"))
    run("adapt", str(tmp_path / "converted"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "adapted"),
        "--epochs", "1", "--batch-size", "6", "--device", "cpu", "--workers", "0")
    run("merge", str(tmp_path / "adapted"), "--out", str(tmp_path / "merged"))
    run("export", str(tmp_path / "merged"), "--format", "onnx", "--out", str(tmp_path / "model.onnx"))
    import onnx

    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert next(output.name for output in graph.output) == "logits"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["surgeon"]["transformers_config"]["model_type"] == "convnext"


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(model_type="not_a_model"), "does not describe an image classifier"),
    (lambda c: c.update(hidden_sizes=[8, 16, 32, 4096]), "shape"),  # sizes the weights file does not have
    (lambda c: c.pop("model_type"), "no model_type"),
])
def test_a_hostile_transformers_config_is_refused_before_anything_is_built(saved, tmp_path, change, message):
    from surgeon.errors import CheckpointError

    loaded = surgeon.load_model(f"transformers:{saved('convnext')}")
    converted = surgeon.convert(loaded.model, "quadranet-v2-s2a", example_input=torch.randn(1, 3, 64, 64),
                                base=loaded.base)
    surgeon.save(converted, tmp_path / "artifact")
    path = tmp_path / "artifact" / "config.json"
    config = json.loads(path.read_text())
    change(config["surgeon"]["transformers_config"])
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        surgeon.load(tmp_path / "artifact")


def test_the_card_of_a_transformers_artifact_names_its_base_and_library(saved, tmp_path):
    from surgeon.io.push import _card, card_base_model

    loaded = surgeon.load_model(f"transformers:{saved('convnext')}")
    converted = surgeon.convert(loaded.model, "quadranet-v2-s2a", example_input=torch.randn(1, 3, 64, 64),
                                base=loaded.base)
    surgeon.save(converted, tmp_path / "artifact")
    config = json.loads((tmp_path / "artifact" / "config.json").read_text())
    card = _card(config, "org/converted")
    assert "library_name: surgeon" in card
    assert card_base_model(config) is None  # a local directory: no Hub base to name
    config["surgeon"].update(base_model="transformers:facebook/convnext-tiny-224", base_weights="hf-hub")
    assert card_base_model(config) == "facebook/convnext-tiny-224"
    assert "base_model: facebook/convnext-tiny-224" in _card(config, "org/converted")


def test_adapt_gives_a_transformers_model_a_head_for_the_data_classes(saved, tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):  # two named classes; the model has three
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (72, 72, 3)).astype(np.uint8)).save(folder / f"{i}.png")
    runner = CliRunner()
    for args in (["convert", f"transformers:{saved('convnext')}", "--out", str(tmp_path / "converted")],
                 ["adapt", str(tmp_path / "converted"), "--data", str(tmp_path / "data"), "--out",
                  str(tmp_path / "adapted"), "--epochs", "1", "--batch-size", "4", "--device", "cpu"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    assert "classifier head reset to 2 classes (cat, dog)" in result.output
    adapted = surgeon.load(tmp_path / "adapted")
    with torch.no_grad():
        assert logits(adapted(torch.randn(1, 3, 64, 64))).shape == (1, 2)
    recorded = json.loads((tmp_path / "adapted" / "config.json").read_text())["surgeon"]["transformers_config"]
    assert recorded["id2label"] == {"0": "cat", "1": "dog"}
