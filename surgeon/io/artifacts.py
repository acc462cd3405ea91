"""Loading any surgeon artifact (converted, adapter-only or merged) and resolving a MODEL argument.

This is the one place that knows every artifact format: it reads the directory's config and hands it to the
format's loader. An adapter artifact names its base model by a MODEL argument, which may itself be an artifact,
so its base is resolved through :func:`load_model` here.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from surgeon.errors import CheckpointError, SurgeonError
from surgeon.io.adapter_artifacts import load_adapter
from surgeon.io.converted import load_converted
from surgeon.io.layout import (
    ADAPTER_CONFIG_NAME,
    CONFIG_NAME,
    FORMAT_CONVERTED,
    FORMAT_MERGED,
    read_artifact_config,
    read_config,
    resolve_directory,
    verified_weights,
)
from surgeon.io.loading import LoadedModel, from_directory, from_hub, from_name_or_file
from surgeon.io.merged import load_merged


def load(location: str | Path, model: nn.Module | None = None, verify: bool = True, revision: str | None = None,
         token: str | None = None) -> nn.Module:
    """Rebuild a saved artifact. ``model`` is the *unconverted* base model for non-timm architectures (and, for an
    adapter-only artifact, the pretrained base its adapters apply to)."""
    directory = resolve_directory(location, revision=revision, token=token)
    if not (directory / CONFIG_NAME).is_file() and (directory / ADAPTER_CONFIG_NAME).is_file():
        return load_adapter(directory, model, verify, load_base=lambda spec, **kw: load_model(spec, **kw).model)
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"{location}: no {CONFIG_NAME} or {ADAPTER_CONFIG_NAME} (not a surgeon artifact)")
    config = read_artifact_config(directory)
    section = config["surgeon"]
    weights = verified_weights(directory, section, verify)
    if section.get("format") == FORMAT_MERGED:
        return load_merged(directory, config, weights, model)
    if section.get("format") != FORMAT_CONVERTED:
        raise CheckpointError(f"{directory}: unknown artifact format {section.get('format')!r}")
    return load_converted(directory, config, weights, model)


def from_timm(model: nn.Module, verify: bool = True, token: str | None = None) -> nn.Module:
    """Apply a surgeon artifact to the model timm built from it: ``timm.create_model("hf-hub:ORG/NAME")`` (or
    ``"local-dir:PATH"``, both with ``pretrained=False``: timm cannot load quadratic weights into the base
    architecture) reads the artifact's ``config.json``; this call swaps in surgeon's layers and loads the weights."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("source") == "hf-hub" and cfg.get("hf_hub_id"):
        location, revision = f"hf-hub:{cfg['hf_hub_id']}", None
        if "@" in location:
            location, revision = location.split("@", 1)
    elif cfg.get("source") == "local-dir" and cfg.get("file"):
        location, revision = str(cfg["file"]), None
    else:
        raise SurgeonError("the model was not created from an artifact: build it with "
                           "timm.create_model('hf-hub:ORG/NAME', pretrained=False) or 'local-dir:PATH'")
    return load(location, model=model, verify=verify, revision=revision, token=token)


def load_model(spec: str, weights: str | None = None, arch: str | None = None, pretrained: bool = True,
               strict: bool = True, model_args: dict | None = None) -> LoadedModel:
    """Resolve a MODEL argument: a timm architecture name (weights from ``weights`` or timm's pretrained source),
    ``hf-hub:org/name``, ``local-dir:PATH`` or a model directory, or a weights file with ``arch``. Directories and
    Hub repos written by surgeon are rebuilt through :func:`load`."""
    if spec.startswith("transformers:"):
        from surgeon.io.transformers_source import load_transformers

        model, base = load_transformers(spec.removeprefix("transformers:"), pretrained=pretrained)
        return LoadedModel(model, None, base["source"], {}, transformers_base=base)
    if spec.startswith("hf-hub:"):
        repo_id, token = spec[len("hf-hub:"):], os.environ.get("HF_TOKEN") or None
        directory = resolve_directory(spec, token=token)
        config = _directory_config(directory)
        if "surgeon" in config:
            return LoadedModel(load(directory, token=token), config.get("architecture"), spec,
                               config.get("model_args", {}))
        return from_hub(repo_id, config)
    directory = Path(spec.removeprefix("local-dir:"))
    if spec.startswith("local-dir:") or directory.is_dir():
        config = _directory_config(directory)
        if "surgeon" in config:
            return LoadedModel(load(directory), config.get("architecture"), str(directory),
                               config.get("model_args", {}))
        return from_directory(directory, config, strict=strict)
    return from_name_or_file(spec, weights, arch, pretrained, strict, model_args)


def _directory_config(directory: Path) -> dict:
    """The config of a model directory: ``config.json``, or an adapter artifact's ``adapter_config.json``."""
    if not (directory / CONFIG_NAME).is_file() and (directory / ADAPTER_CONFIG_NAME).is_file():
        return read_artifact_config(directory, ADAPTER_CONFIG_NAME)
    return read_config(directory)
