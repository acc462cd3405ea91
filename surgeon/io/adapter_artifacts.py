"""Adapter-only artifacts: just the tensors that training changed, applied to a pretrained base when loaded.

The directory holds ``adapter_config.json`` (a ``surgeon`` section naming the base model, its architecture and
constructor arguments, the resolved recipe and the trainable tensor names, as PEFT's ``adapter_config.json`` names
its base) and ``adapter_model.safetensors`` (those tensors). A few hundred KB instead of the whole model: the base
comes from its own checkpoint, converted again with the same recipe, and the adapters are loaded over it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from surgeon.errors import CheckpointError, SurgeonError
from surgeon.io.atomic import staged_directory
from surgeon.io.checkpoint import read_state_dict, sha256_file
from surgeon.io.converted import finish_loaded, reconvert
from surgeon.io.layout import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, FORMAT_ADAPTER, json_safe, verified_weights
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
        "base_model": base.get("source"), "base_class": base.get("class"),
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
    path = directory / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("surgeon", {}).get("format") != FORMAT_ADAPTER:
        raise CheckpointError(f"{path}: not a surgeon adapter artifact")
    return config


def _base_model(config: dict, directory: Path, load_base: BaseLoader) -> nn.Module:
    """The pretrained base the adapters were trained on, from the recorded source (a weights file, a timm name,
    an ``hf-hub:`` repo)."""
    section = config["surgeon"]
    source, architecture = section.get("base_model"), config.get("architecture")
    if not isinstance(source, str) or not source:
        raise CheckpointError(f"{directory}: the adapter names no base model; pass it: surgeon.load(dir, model=...)")
    spec = source.removeprefix("timm:")
    args = dict(config.get("model_args") or {})
    args.pop("num_classes", None)  # the base checkpoint's own head; a head reset for training is set below
    try:
        with torch.random.fork_rng(devices=[]):
            return load_base(spec, arch=architecture, model_args=args or None)
    except SurgeonError as exc:
        raise CheckpointError(f"{directory}: cannot load the base model {source!r} ({exc}); pass the pretrained "
                              "base: surgeon.load(dir, model=...)") from exc


def load_adapter(directory: Path, model: nn.Module | None, verify: bool, load_base: BaseLoader) -> nn.Module:
    """The base (``model``, else the recorded base checkpoint, through ``load_base``) converted with the recorded
    recipe, with the saved adapter tensors loaded over it."""
    config = adapter_config(directory)
    section = config["surgeon"]
    weights = verified_weights(directory, section, verify, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
    base = model if model is not None else _base_model(config, directory, load_base)
    classes = (config.get("model_args") or {}).get("num_classes")
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
