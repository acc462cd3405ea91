"""Converted-model artifacts: the whole converted (possibly trained) model, rebuilt on load by re-running the
recorded recipe on the base architecture and loading the weights over it (no module object is pickled)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.api import convert
from surgeon.errors import SurgeonError, SurgeonWarning
from surgeon.io.checkpoint import fit_state_dict, read_state_dict
from surgeon.io.layout import (
    FORMAT_CONVERTED,
    base_record,
    build_base,
    recorded_transformers_base,
    restore_aliases,
    timm_config,
    write_artifact,
)
from surgeon.io.untrusted import recorded_source
from surgeon.ops.memory_format import apply_memory_format
from surgeon.recipe import parse_recipe
from surgeon.version import __version__


def save(model: nn.Module, directory: str | Path, force: bool = False, extra_files: dict[str, str] | None = None,
         extra_writer: Callable[[Path], None] | None = None) -> Path:
    """Save a model returned by :func:`surgeon.convert` (possibly trained) as a directory artifact."""
    if getattr(model, "surgeon_merge", None) is not None:  # saved as converted, it could never be loaded back
        raise SurgeonError("this is a merged model: save it with surgeon.save_merged")
    info = getattr(model, "surgeon_info", None)
    if info is None:
        raise SurgeonError("model was not produced by surgeon.convert (no surgeon_info); convert it first")
    config = timm_config(model, info.base.get("architecture"), info.base.get("model_args") or {})
    config["surgeon"] = {
        "format": FORMAT_CONVERTED,
        "version": __version__,
        "recipe": info.recipe.to_dict(),
        **base_record(info.base),
        "example_input_shape": list(info.base.get("example_input_shape") or []),
        "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
        "sites": [s.to_dict() for s in info.sites if s.action != "keep"],
    }
    metrics = getattr(model, "surgeon_metrics", None)
    if metrics:
        config["surgeon"]["metrics"] = metrics
    return write_artifact(model, directory, config, force=force, extra_files=extra_files, extra_writer=extra_writer)


def reconvert(base: nn.Module, config: dict[str, Any], directory: Path) -> nn.Module:
    """Re-run the recorded recipe on the base model (its weights are replaced by the saved ones afterwards)."""
    section = config["surgeon"]
    recipe = parse_recipe(section["recipe"], source=f"{directory} recipe")
    shape = section.get("example_input_shape") or None
    # rebuilding draws random initial weights that the saved ones then replace: the caller's RNG stream must not
    # move because a model was loaded
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)  # said when it was converted; adapt says it again
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) if shape else None
        return convert(base.eval(), recipe, example_input=example, inplace=True, check_complete=False, base={
            "architecture": config.get("architecture"), "source": recorded_source(section),
            "class": section.get("base_class"), "model_args": config.get("model_args") or {},
            "example_input_shape": shape, **recorded_transformers_base(section)})


def finish_loaded(converted: nn.Module, section: dict[str, Any]) -> nn.Module:
    """Recorded metrics, which parameters train, and the memory format the weights were saved in."""
    if section.get("metrics"):
        converted.surgeon_metrics = section["metrics"]
    trainable = set(section.get("trainable") or [])
    if trainable:
        for name, param in converted.named_parameters():
            param.requires_grad_(name in trainable)
    return apply_memory_format(converted, section.get("memory_format")).eval()


def load_converted(directory: Path, config: dict[str, Any], weights: Path, model: nn.Module | None) -> nn.Module:
    """The base (``model``, else built from the recorded timm architecture) converted again, weights loaded."""
    with torch.random.fork_rng(devices=[]):  # a fresh base draws random weights: not from the caller's stream
        base = model if model is not None else build_base(config, directory, weights)
    converted = reconvert(base, config, directory)
    state = restore_aliases(converted, read_state_dict(weights))
    fit_state_dict(converted, state, str(weights), strict=True)
    return finish_loaded(converted, config["surgeon"])
