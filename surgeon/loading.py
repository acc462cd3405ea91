"""Resolving a MODEL argument into a pretrained ``nn.Module``.

MODEL may be a timm architecture name (weights from ``weights=`` or, online, timm's pretrained source),
``hf-hub:org/name``, ``local-dir:PATH`` or a directory with ``config.json`` + weights, or a weights file
together with ``arch=``. Directories and Hub repos written by surgeon are rebuilt through :func:`surgeon.load`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from surgeon.checkpoint import WEIGHT_SUFFIXES, fit_state_dict, read_state_dict
from surgeon.errors import CheckpointError, SurgeonError

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")


@dataclass
class LoadedModel:
    """A model plus what is needed to rebuild it: timm architecture, constructor arguments, source."""

    model: nn.Module
    architecture: str | None
    source: str
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "source": self.source, "model_args": self.model_args,
                "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}"}


def _create(architecture: str, pretrained: bool, **model_args: Any) -> nn.Module:
    if not timm.is_model(architecture):
        raise SurgeonError(f"unknown architecture {architecture!r}: not a timm model name "
                           "(see `timm.list_models()`)")
    try:
        return timm.create_model(architecture, pretrained=pretrained, **model_args)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise CheckpointError(
                f"could not get pretrained weights for {architecture} ({str(exc).splitlines()[0][:160]}); "
                "pass --weights FILE, or check the network / HF_HUB_OFFLINE / HF_TOKEN") from exc
        raise SurgeonError(f"cannot build {architecture}: {str(exc).splitlines()[0]}") from exc


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
                      model_args: dict[str, Any] | None = None) -> LoadedModel:
    state = read_state_dict(path)
    args = dict(model_args or {})
    if "num_classes" not in args:
        classes = _classifier_outputs(architecture, state)
        if classes is not None:
            args["num_classes"] = classes
    model = _create(architecture, pretrained=False, **args)
    fit_state_dict(model, state, str(path), strict=strict)
    return LoadedModel(model.eval(), architecture, str(path), args)


def read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} (expected a model directory)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    return config


def find_weights(directory: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: no weights file ({', '.join(WEIGHT_NAMES)})")


def from_directory(directory: str | Path, strict: bool = True) -> LoadedModel:
    directory = Path(directory)
    config = read_config(directory)
    if "surgeon" in config:
        from surgeon.artifacts import load

        model = load(directory)
        return LoadedModel(model, config.get("architecture"), str(directory), config.get("model_args", {}))
    architecture = config.get("architecture")
    if not isinstance(architecture, str):
        raise CheckpointError(f"{directory / CONFIG_NAME}: no 'architecture' field")
    args = dict(config.get("model_args") or {})
    if "num_classes" in config:
        args.setdefault("num_classes", config["num_classes"])
    return from_weights_file(find_weights(directory), architecture, strict=strict, model_args=args)


def from_hub(repo_id: str, revision: str | None = None, token: str | None = None) -> LoadedModel:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    from surgeon.hub import download_error, hub_cache, hub_endpoint, offline

    try:
        config_file = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token, endpoint=hub_endpoint(),
                                      cache_dir=hub_cache(), local_files_only=offline())
    except EntryNotFoundError as exc:
        raise CheckpointError(f"hf-hub:{repo_id}: repository has no {CONFIG_NAME}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise download_error(exc, f"hf-hub:{repo_id}") from exc
    config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    if "surgeon" in config:
        from surgeon.artifacts import load

        model = load(f"hf-hub:{repo_id}", revision=revision, token=token)
        return LoadedModel(model, config.get("architecture"), f"hf-hub:{repo_id}", config.get("model_args", {}))
    model = _create(f"hf-hub:{repo_id}", pretrained=True)
    return LoadedModel(model.eval(), config.get("architecture"), f"hf-hub:{repo_id}", {})


def load_model(spec: str, weights: str | None = None, arch: str | None = None, pretrained: bool = True,
               strict: bool = True, model_args: dict[str, Any] | None = None) -> LoadedModel:
    """Resolve a MODEL argument (see module docstring)."""
    if spec.startswith("hf-hub:"):
        return from_hub(spec[len("hf-hub:"):], token=os.environ.get("HF_TOKEN") or None)
    if spec.startswith("local-dir:"):
        return from_directory(spec[len("local-dir:"):], strict=strict)
    path = Path(spec)
    if path.is_dir():
        return from_directory(path, strict=strict)
    if path.suffix in WEIGHT_SUFFIXES or os.sep in spec:
        if not path.exists() and not path.is_symlink():
            raise CheckpointError(f"{spec}: no such file or directory")
        if arch is None:
            raise SurgeonError(f"{spec} is a weights file: say which architecture it is for with --arch NAME")
        return from_weights_file(path, arch, strict=strict, model_args=model_args)
    if weights is not None:
        return from_weights_file(weights, spec, strict=strict, model_args=model_args)
    model = _create(spec, pretrained=pretrained, **(model_args or {}))
    return LoadedModel(model.eval(), spec, spec if not pretrained else f"timm:{spec}", dict(model_args or {}))
