"""Pretrained models that are not surgeon artifacts: a timm architecture name (weights from ``weights=`` or,
online, timm's pretrained source), a timm-style Hub repo or directory (``config.json`` + weights), or a weights file
together with ``arch=``. :func:`surgeon.io.artifacts.load_model` sends surgeon artifacts elsewhere first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from surgeon.errors import CheckpointError, SurgeonError, first_line
from surgeon.io.checkpoint import WEIGHT_SUFFIXES, fit_state_dict, read_state_dict
from surgeon.io.layout import CONFIG_NAME
from surgeon.io.schema import MAX_CLASSES
from surgeon.io.untrusted import check_base_fits, check_model_args

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")


@dataclass
class LoadedModel:
    """A model plus what is needed to rebuild it: timm architecture, constructor arguments, source."""

    model: nn.Module
    architecture: str | None
    source: str
    model_args: dict[str, Any] = field(default_factory=dict)

    transformers_base: dict[str, Any] | None = None  # a transformers model: its config and preprocessing

    @property
    def base(self) -> dict[str, Any]:
        if self.transformers_base is not None:
            return dict(self.transformers_base)
        return {"architecture": self.architecture, "source": self.source, "model_args": self.model_args,
                "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}"}


def _create(architecture: str, pretrained: bool, **model_args: Any) -> nn.Module:
    if not timm.is_model(architecture):
        raise SurgeonError(f"unknown architecture {architecture!r}: not a timm model name" + close_names(architecture))
    try:
        return timm.create_model(architecture, pretrained=pretrained, **model_args)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise CheckpointError(
                f"could not get pretrained weights for {architecture} ({first_line(exc)}); "
                "pass --weights FILE, or check the network / HF_HUB_OFFLINE / HF_TOKEN") from exc
        raise SurgeonError(f"cannot build {architecture}: {first_line(exc)}") from exc


def close_names(architecture: str) -> str:
    """'; did you mean …?' with the closest timm model names, or the pointer to the list when none is close."""
    import difflib

    close = difflib.get_close_matches(architecture.lower(), timm.list_models(), n=3, cutoff=0.8)
    return f"; did you mean {' or '.join(close)}?" if close else " (see `timm.list_models()`)"


def _classifier_outputs(architecture: str, state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes a checkpoint was trained for, read from its classifier weight."""
    cfg = timm.get_pretrained_cfg(architecture)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []
    for name in names:
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.dim() >= 1:
            return int(weight.shape[0])
    return None


def from_weights_file(path: str | Path, architecture: str, strict: bool = True,
                      model_args: dict[str, Any] | None = None, where: str | None = None) -> LoadedModel:
    """``architecture`` built with the weights in ``path``. ``where`` names the config that ``model_args`` came
    from: its sizes are then checked against the weights before the model is built."""
    state = read_state_dict(path)
    args = dict(model_args or {})
    if "num_classes" not in args:
        classes = _classifier_outputs(architecture, state)
        if classes is not None:
            args["num_classes"] = classes
    if where is not None:
        if not timm.is_model(architecture):
            raise CheckpointError(f"{where}: architecture {architecture!r} is not a timm model")
        check_base_fits(architecture, args, {key: tuple(value.shape) for key, value in state.items()}, where)
    model = _create(architecture, pretrained=False, **args)
    fit_state_dict(model, state, str(path), strict=strict)
    return LoadedModel(model.eval(), architecture, str(path), args)


def find_weights(directory: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: no weights file ({', '.join(WEIGHT_NAMES)})")


def from_directory(directory: Path, config: dict[str, Any], strict: bool = True) -> LoadedModel:
    """A timm-style model directory: ``config.json`` naming the architecture, plus a weights file."""
    architecture = config.get("architecture")
    if not isinstance(architecture, str):
        raise CheckpointError(f"{directory / CONFIG_NAME}: no 'architecture' field")
    where = str(directory / CONFIG_NAME)
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{where}: field 'model_args': expected a JSON object")
    args = check_model_args(architecture, dict(model_args), where)
    if "num_classes" in config:
        classes = config["num_classes"]
        if not isinstance(classes, int) or isinstance(classes, bool) or not 0 <= classes <= MAX_CLASSES:
            raise CheckpointError(f"{where}: field 'num_classes': expected an integer from 0 to {MAX_CLASSES:,}")
        args.setdefault("num_classes", classes)
    return from_weights_file(find_weights(directory), architecture, strict=strict, model_args=args, where=where)


def from_hub(repo_id: str, config: dict[str, Any]) -> LoadedModel:
    """A timm model published on the Hub, built by timm with its weights."""
    model = _create(f"hf-hub:{repo_id}", pretrained=True)
    return LoadedModel(model.eval(), config.get("architecture"), f"hf-hub:{repo_id}", {})


def from_name_or_file(spec: str, weights: str | None = None, arch: str | None = None, pretrained: bool = True,
                      strict: bool = True, model_args: dict[str, Any] | None = None) -> LoadedModel:
    """A weights file (with ``arch``) or a timm architecture name (with ``weights``, or timm's pretrained ones)."""
    path = Path(spec)
    if path.suffix in WEIGHT_SUFFIXES or os.sep in spec:
        if not path.exists() and not path.is_symlink():
            raise CheckpointError(f"{spec}: no such file or directory")
        if arch is None:
            raise SurgeonError(f"{spec} is a weights file: say which architecture it is for with --arch NAME")
        return from_weights_file(path, arch, strict=strict, model_args=model_args)
    if weights is not None:
        return from_weights_file(weights, spec, strict=strict, model_args=model_args)
    model = _create(spec, pretrained=pretrained, **(model_args or {}))
    source = f"timm:{spec}" if pretrained else f"random-init:{spec}"
    return LoadedModel(model.eval(), spec, source, dict(model_args or {}))
