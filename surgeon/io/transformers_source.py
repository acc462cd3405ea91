"""Hugging Face transformers image classifiers as a model source: ``transformers:<hub id or local directory>``.

The model is built by ``AutoModelForImageClassification`` (never with remote code), with the preprocessing of its
image processor config (``preprocessor_config.json``) as timm's ``pretrained_cfg`` fields, so ``plan``, ``adapt``
and ``export`` see the input size, mean and std the model was trained with, and its class count as
``num_classes``. Saved artifacts record the model's transformers config, and ``load`` rebuilds the base from it:
built first on the meta device, so a config whose sizes do not match the weights file is refused before any
memory is allocated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.errors import CheckpointError, SurgeonError, first_line
from surgeon.io.schema import read_json

PREFIX = "transformers:"
PREPROCESSOR_NAME = "preprocessor_config.json"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise SurgeonError("Hugging Face transformers models need the transformers package: "
                           "pip install 'surgeon[transformers]'") from exc
    return transformers


def preprocessing(processor: dict[str, Any]) -> dict[str, Any]:
    """timm ``pretrained_cfg`` fields from an image processor config (size, crop, mean, std, resampling)."""
    cfg: dict[str, Any] = {}
    size = processor.get("crop_size") or processor.get("size")
    side = None
    if isinstance(size, dict):
        side = size.get("height") or size.get("shortest_edge") or size.get("width")
    elif isinstance(size, int):
        side = size
    if isinstance(side, int) and 16 <= side <= 4096:
        cfg["input_size"] = (3, side, side)
    for key in ("image_mean", "image_std"):
        values = processor.get(key)
        if isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values):
            cfg[key.removeprefix("image_")] = tuple(float(v) for v in values)
    crop = processor.get("crop_pct")
    if isinstance(crop, (int, float)) and 0.1 <= crop <= 1.0:
        cfg["crop_pct"] = float(crop)
    cfg["interpolation"] = {2: "bilinear", 3: "bicubic"}.get(processor.get("resample"), "bicubic")
    return cfg


def _describe(model: nn.Module, config: Any, processor: dict[str, Any], source: str) -> None:
    """timm's attributes on a transformers model, read by plan, adapt and export."""
    cfg = {"architecture": type(model).__name__, "num_classes": int(config.num_labels), "source": source,
           **preprocessing(processor)}
    model.pretrained_cfg = cfg  # type: ignore[assignment]
    model.num_classes = int(config.num_labels)  # type: ignore[assignment]


def _processor(directory: Path | None) -> dict[str, Any]:
    if directory is None or not (directory / PREPROCESSOR_NAME).is_file():
        return {}
    data = read_json(directory / PREPROCESSOR_NAME)  # bounded size, one-line error
    return data if isinstance(data, dict) else {}


def load_transformers(location: str, pretrained: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The model at ``location`` (a local directory or a Hub id) and its base record."""
    transformers = _transformers()
    directory = Path(location) if Path(location).is_dir() else None
    try:
        config = transformers.AutoConfig.from_pretrained(location, trust_remote_code=False)
        if pretrained:
            model = transformers.AutoModelForImageClassification.from_pretrained(location, trust_remote_code=False)
        else:
            model = transformers.AutoModelForImageClassification.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{location}: not a transformers image classifier ({first_line(exc)})") from exc
    processor = _processor(directory)
    if directory is None:
        try:
            from huggingface_hub import hf_hub_download

            processor = _processor(Path(hf_hub_download(location, PREPROCESSOR_NAME)).parent)
        except Exception:  # no image processor config on the Hub: timm's defaults
            processor = {}
    source = f"{PREFIX}{location}" if directory is None else "file"
    _describe(model, model.config, processor, source)
    base = {"architecture": None, "source": source,
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "transformers_config": model.config.to_dict(), "preprocessing": processor}
    return model.eval(), base


def reset_head(model: nn.Module, names: list[str]) -> None:
    """A new trainable ``classifier`` for ``len(names)`` classes on a converted transformers model, labelled with
    ``names`` in the config the artifact records, so that loading it rebuilds a head of that size."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise SurgeonError(f"the transformers model's classifier is {type(head).__name__}, not a Linear layer: "
                           "rebuild its head first")
    classes = len(names)
    fresh = nn.Linear(head.in_features, classes, bias=head.bias is not None)
    model.classifier = fresh.to(device=head.weight.device, dtype=head.weight.dtype)  # trainable: requires grad
    model.num_classes = classes  # type: ignore[assignment]
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg["num_classes"] = classes
    record = model.surgeon_info.base["transformers_config"]  # type: ignore[union-attr]
    record["id2label"] = {str(i): name for i, name in enumerate(names)}
    record["label2id"] = {name: i for i, name in enumerate(names)}
    record.pop("num_labels", None)


def build_from_config(record: dict[str, Any], preprocessing_record: dict[str, Any], header: dict[str, tuple],
                      where: str) -> nn.Module:
    """The base a saved artifact's transformers config describes, with random weights (the file has them).
    Built on the meta device first: every tensor's shape must match the weights file before memory is used."""
    transformers = _transformers()
    model_type = record.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{where}: transformers_config has no model_type")
    try:
        config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in record.items()
                                                                   if k != "model_type"})
        with torch.device("meta"):
            probe = transformers.AutoModelForImageClassification.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: transformers_config does not describe an image classifier "
                              f"({first_line(exc)})") from exc
    for name, tensor in probe.state_dict().items():
        if name in header and tuple(header[name]) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: transformers_config gives {name} shape {tuple(tensor.shape)}, the "
                                  f"weights file {tuple(header[name])}")
    model = transformers.AutoModelForImageClassification.from_config(config, trust_remote_code=False)
    _describe(model, config, preprocessing_record, "file")
    return model.eval()
