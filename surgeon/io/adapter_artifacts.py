"""Adapter-only artifacts: just the tensors that training changed, applied to a pretrained base when loaded.

The directory holds ``adapter_config.json`` (a ``surgeon`` section naming the base model, its architecture and
constructor arguments, the resolved recipe and the trainable tensor names, as PEFT's ``adapter_config.json`` names
its base) and ``adapter_model.safetensors`` (those tensors). A few hundred KB instead of the whole model: the base
comes from its own checkpoint, converted again with the same recipe, and the adapters are loaded over it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from surgeon.errors import CheckpointError, SurgeonError
from surgeon.io.atomic import staged_directory
from surgeon.io.checkpoint import read_state_dict, sha256_file
from surgeon.io.converted import finish_loaded, reconvert
from surgeon.io.layout import (
    FORMAT_ADAPTER,
    base_record,
    json_safe,
    read_artifact_config,
    verified_weights,
)
from surgeon.io.names import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from surgeon.io.untrusted import base_spec, check_base_fits, check_model_args, header_shapes, meta_model, shape_table
from surgeon.ops.memory_format import model_memory_format
from surgeon.version import __version__

BaseLoader = Callable[..., nn.Module]  # (MODEL argument, arch=, model_args=) -> the pretrained base

def save_adapter(model: nn.Module, directory: str | Path, force: bool = False) -> Path:
    """Write only ``model``'s trainable tensors (adapters, and a reset head if it trains) with what rebuilds the
    rest from the base checkpoint."""
    info = getattr(model, "surgeon_info", None)
    if info is None:
        raise SurgeonError("model was not produced by surgeon.convert (no surgeon_info); convert it first")
    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise SurgeonError("the model has no trainable parameters: an adapter artifact would be empty")
    base = info.base
    section = {
        "format": FORMAT_ADAPTER, "version": __version__, "recipe": info.recipe.to_dict(),
        **base_record(base),
        "example_input_shape": list(base.get("example_input_shape") or []), "trainable": sorted(tensors),
        "memory_format": model_memory_format(model), "weights_file": ADAPTER_WEIGHTS_NAME,
    }
    metrics = getattr(model, "surgeon_metrics", None)
    if metrics:
        section["metrics"] = metrics
    config = {"architecture": base.get("architecture"), "model_args": json_safe(base.get("model_args") or {}),
              "surgeon": section}
    directory = Path(directory)
    with staged_directory(directory, force=force) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        section["weights_sha256"] = sha256_file(staging / ADAPTER_WEIGHTS_NAME)
        (staging / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


def adapter_config(directory: Path) -> dict:
    """``adapter_config.json``, validated against :mod:`surgeon.io.schema`."""
    config = read_artifact_config(directory, ADAPTER_CONFIG_NAME)
    if config["surgeon"]["format"] != FORMAT_ADAPTER:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG_NAME}: not a surgeon adapter artifact")
    return config


_BASE_DEPTH: ContextVar[int] = ContextVar("surgeon_adapter_base_depth", default=0)
MAX_BASE_DEPTH = 2  # an adapter over a Hub artifact over a Hub base; a cycle of repos ends here


def _base_model(config: dict, directory: Path, load_base: BaseLoader) -> nn.Module:
    """The pretrained base the adapters were trained on: the recorded timm architecture (its pretrained weights)
    or ``hf-hub:`` repo, loaded as a user-named one is. A config never makes this read a path or a URL."""
    section, architecture = config["surgeon"], config.get("architecture")
    where = str(directory / ADAPTER_CONFIG_NAME)
    args = dict(config.get("model_args") or {})
    args.pop("num_classes", None)  # the base checkpoint's own head; a head reset for training is set below
    if args:  # constructor arguments may change details, never grow the model beyond its default size
        check_base_fits(architecture, args, shape_table(meta_model(architecture, {}, where)), where)
    spec = base_spec(section.get("base_model"), section.get("base_weights"), architecture, where)
    depth = _BASE_DEPTH.get()
    if depth >= MAX_BASE_DEPTH:
        raise CheckpointError(f"{where}: the base model {spec!r} is itself an adapter more than {MAX_BASE_DEPTH} "
                              "levels deep; pass the base: surgeon.load(dir, model=...)")
    token = _BASE_DEPTH.set(depth + 1)
    try:
        with torch.random.fork_rng(devices=[]):
            return load_base(spec, arch=architecture, model_args=args or None)
    except SurgeonError as exc:
        raise CheckpointError(f"{directory}: cannot load the base model {spec!r} ({exc}); pass the pretrained "
                              "base: surgeon.load(dir, model=...)") from exc
    finally:
        _BASE_DEPTH.reset(token)


def _check_config(config: dict, directory: Path, weights: Path) -> None:
    """``model_args`` are constructor arguments of the recorded architecture, and a head size they ask for is the
    one the adapter's own classifier tensor has: checked before any base is fetched or head rebuilt."""
    architecture, where = config.get("architecture"), str(directory / ADAPTER_CONFIG_NAME)
    args = dict(config.get("model_args") or {})
    if architecture is None:
        if args:
            raise CheckpointError(f"{where}: field 'model_args' is set but no architecture is recorded")
        return
    check_model_args(architecture, args, where)
    if "num_classes" in args:
        check_base_fits(architecture, {"num_classes": args["num_classes"]}, header_shapes(weights), where, model=False)


def _check_head(base: nn.Module, classes: int | None, weights: Path, where: str) -> None:
    """A head size the adapter asks for must be the one its own classifier tensor has (checked before the head
    is rebuilt, so a config cannot make it allocate)."""
    if classes is None or getattr(base, "num_classes", classes) == classes:
        return
    head = base.get_classifier() if hasattr(base, "get_classifier") else None
    prefix = next((name for name, module in base.named_modules() if module is head), None)
    shape = header_shapes(weights).get(f"{prefix}.weight") if prefix else None
    if shape is None or shape[0] != classes:
        raise CheckpointError(f"{where}: field 'model_args.num_classes' is {classes} but the adapter's head "
                              f"weights have {shape[0] if shape else 'no'} rows")


def load_adapter(directory: Path, model: nn.Module | None, verify: bool, load_base: BaseLoader) -> nn.Module:
    """The base (``model``, else the recorded base checkpoint, through ``load_base``) converted with the recorded
    recipe, with the saved adapter tensors loaded over it."""
    config = adapter_config(directory)
    section = config["surgeon"]
    weights = verified_weights(directory, section, verify, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
    _check_config(config, directory, weights)
    base = model if model is not None else _base_model(config, directory, load_base)
    classes = (config.get("model_args") or {}).get("num_classes")
    _check_head(base, classes, weights, str(directory / ADAPTER_CONFIG_NAME))
    if classes is not None and getattr(base, "num_classes", classes) != classes and hasattr(base, "reset_classifier"):
        with torch.random.fork_rng(devices=[]):
            base.reset_classifier(classes)  # the head adapt reset; its trained weights are in the adapter
    converted = reconvert(base, config, directory)
    tensors = read_state_dict(weights)
    params = dict(converted.named_parameters())
    missing = [name for name in section.get("trainable", []) if name not in tensors]
    unknown = [name for name in tensors if name not in params]
    mismatched = [name for name in tensors if name in params and params[name].shape != tensors[name].shape]
    if missing or unknown or mismatched:
        problems = [f"{label}: {', '.join(names[:4])}" for label, names in
                    (("missing", missing), ("not in the converted base", unknown), ("shape mismatch", mismatched))
                    if names]
        raise CheckpointError(f"{weights} does not fit the converted base ({'; '.join(problems)})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return finish_loaded(converted, section)


def trainable_summary(model: nn.Module) -> str:
    """``trainable params: 103,360 || all params: 4,755,000 || trainable%: 2.17`` (PEFT's
    ``print_trainable_parameters`` line)."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"
