"""Saving and loading converted models.

An artifact is a directory with ``config.json`` (timm's fields - ``architecture``, ``num_classes``,
``pretrained_cfg``, ``model_args`` - plus a ``surgeon`` section) and ``model.safetensors``. No module object
is pickled: loading rebuilds the base architecture, re-runs the recorded recipe, then loads the weights, whose
SHA-256 is checked against the config.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from surgeon.atomic import staged_directory
from surgeon.checkpoint import fit_state_dict, read_state_dict, sha256_file
from surgeon.errors import CheckpointError, SurgeonError, SurgeonWarning
from surgeon.memory_format import apply_memory_format, model_memory_format
from surgeon.recipe import parse_recipe

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
FORMAT_CONVERTED = "converted"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tensors that share storage written once (safetensors refuses aliases)."""
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and identity in seen:
            continue
        seen[identity] = key
        state[key] = tensor.detach().contiguous().cpu()
    return state


def restore_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill keys that :func:`unique_state_dict` dropped because they alias a written tensor."""
    expected = model.state_dict()
    first: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    restored = dict(state)
    for key, tensor in expected.items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity in first and key not in restored and first[identity] in restored:
            restored[key] = restored[first[identity]]
        first.setdefault(identity, key)
    return restored


def timm_config(model: nn.Module, architecture: str | None, model_args: dict[str, Any]) -> dict[str, Any]:
    """The fields timm writes for a Hub checkpoint, so timm users recognise the directory."""
    config: dict[str, Any] = {"architecture": architecture}
    for name in ("num_classes", "num_features", "global_pool"):
        if hasattr(model, name):
            config[name] = _json_safe(getattr(model, name))
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        config["pretrained_cfg"] = _json_safe({k: v for k, v in dict(cfg).items() if k not in ("file", "state_dict")})
    config["model_args"] = _json_safe(model_args)
    return config


def write_artifact(model: nn.Module, directory: str | Path, config: dict[str, Any], force: bool = False,
                   extra_files: dict[str, str] | None = None,
                   extra_writer: Callable[[Path], None] | None = None) -> Path:
    """Write weights + config (+ extra text files, + whatever ``extra_writer`` puts in the staging directory)
    atomically; records the weights' SHA-256."""
    directory = Path(directory)
    with staged_directory(directory, force=force) as staging:
        weights = staging / WEIGHTS_NAME
        save_file(unique_state_dict(model), str(weights), metadata={"format": "pt"})
        config["surgeon"]["weights_file"] = WEIGHTS_NAME
        config["surgeon"]["memory_format"] = model_memory_format(model)
        config["surgeon"]["weights_sha256"] = sha256_file(weights)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        if extra_writer is not None:
            extra_writer(staging)
    return directory


def save(model: nn.Module, directory: str | Path, force: bool = False, extra_files: dict[str, str] | None = None,
         extra_writer: Callable[[Path], None] | None = None) -> Path:
    """Save a model returned by :func:`surgeon.convert` (possibly trained) as a directory artifact."""
    from surgeon import __version__

    info = getattr(model, "surgeon_info", None)
    if info is None:
        raise SurgeonError("model was not produced by surgeon.convert (no surgeon_info); convert it first")
    config = timm_config(model, info.base.get("architecture"), info.base.get("model_args") or {})
    config["surgeon"] = {
        "format": FORMAT_CONVERTED,
        "version": __version__,
        "recipe": info.recipe.to_dict(),
        "base_model": info.base.get("source"),
        "base_class": info.base.get("class"),
        "example_input_shape": list(info.base.get("example_input_shape") or []),
        "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
        "sites": [s.to_dict() for s in info.sites if s.action != "keep"],
    }
    metrics = getattr(model, "surgeon_metrics", None)
    if metrics:
        config["surgeon"]["metrics"] = metrics
    return write_artifact(model, directory, config, force=force, extra_files=extra_files, extra_writer=extra_writer)


def resolve_directory(location: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local directory for an artifact given as a path, ``local-dir:PATH`` or ``hf-hub:org/name``."""
    text = str(location)
    if text.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

        from surgeon.hub import download_error, hub_cache, hub_endpoint, offline

        repo_id = text[len("hf-hub:"):]
        try:
            return Path(snapshot_download(repo_id, revision=revision, token=token, endpoint=hub_endpoint(),
                                          cache_dir=hub_cache(), local_files_only=offline()))
        except (HfHubHTTPError, OSError, ValueError) as exc:  # LocalEntryNotFoundError is an OSError too
            raise download_error(exc, text) from exc
    if text.startswith("local-dir:"):
        text = text[len("local-dir:"):]
    path = Path(text)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    return path


def read_artifact_config(directory: Path) -> dict[str, Any]:
    from surgeon.loading import read_config

    config = read_config(directory)
    section = config.get("surgeon")
    if not isinstance(section, dict):
        raise CheckpointError(f"{directory / CONFIG_NAME}: no 'surgeon' section (not a surgeon artifact)")
    return config


def verified_weights(directory: Path, section: dict[str, Any], verify: bool) -> Path:
    weights = directory / str(section.get("weights_file", WEIGHTS_NAME))
    if not weights.is_file():
        raise CheckpointError(f"{directory}: weights file {weights.name} is missing")
    expected = section.get("weights_sha256")
    if verify and expected and sha256_file(weights) != expected:
        raise CheckpointError(f"{weights}: SHA-256 does not match config.json (file changed or corrupt); "
                              "use --no-verify / verify=False to load it anyway")
    return weights


def build_base(config: dict[str, Any], directory: Path) -> nn.Module:
    import timm

    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise SurgeonError(f"{directory}: base architecture {architecture!r} is not a timm model; pass the base "
                           "model object: surgeon.load(dir, model=MyModel())")
    args = dict(config.get("model_args") or {})
    if "num_classes" in config:
        args.setdefault("num_classes", config["num_classes"])
    return timm.create_model(architecture, pretrained=False, **args)


def load(location: str | Path, model: nn.Module | None = None, verify: bool = True, revision: str | None = None,
         token: str | None = None) -> nn.Module:
    """Rebuild a saved artifact. ``model`` is the *unconverted* base model for non-timm architectures (and, for an
    adapter-only artifact, the pretrained base its adapters apply to)."""
    directory = resolve_directory(location, revision=revision, token=token)
    if not (directory / CONFIG_NAME).is_file() and (directory / ADAPTER_CONFIG_NAME).is_file():
        from surgeon.adapter_artifacts import load_adapter

        return load_adapter(directory, model, verify)
    config = read_artifact_config(directory)
    section = config["surgeon"]
    weights = verified_weights(directory, section, verify)
    if section.get("format") == "merged":
        from surgeon.merge import load_merged

        return load_merged(directory, config, weights, model)
    if section.get("format") != FORMAT_CONVERTED:
        raise CheckpointError(f"{directory}: unknown artifact format {section.get('format')!r}")
    with torch.random.fork_rng(devices=[]):  # a fresh base draws random weights: not from the caller's stream
        base = model if model is not None else build_base(config, directory)
    converted = reconvert(base, config, directory)
    state = restore_aliases(converted, read_state_dict(weights))
    fit_state_dict(converted, state, str(weights), strict=True)
    return finish_loaded(converted, section)


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


def reconvert(base: nn.Module, config: dict[str, Any], directory: Path) -> nn.Module:
    """Re-run the recorded recipe on the base model (its weights are replaced by the saved ones afterwards)."""
    from surgeon.api import convert

    section = config["surgeon"]
    recipe = parse_recipe(section["recipe"], source=f"{directory} recipe")
    shape = section.get("example_input_shape") or None
    # rebuilding draws random initial weights that the saved ones then replace: the caller's RNG stream must not
    # move because a model was loaded
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)  # said when it was converted; adapt says it again
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) if shape else None
        return convert(base.eval(), recipe, example_input=example, inplace=True, check_complete=False, base={
            "architecture": config.get("architecture"), "source": section.get("base_model"),
            "class": section.get("base_class"), "model_args": config.get("model_args") or {},
            "example_input_shape": shape})


def finish_loaded(converted: nn.Module, section: dict[str, Any]) -> nn.Module:
    """Recorded metrics, which parameters train, and the memory format the weights were saved in."""
    if section.get("metrics"):
        converted.surgeon_metrics = section["metrics"]
    trainable = set(section.get("trainable") or [])
    if trainable:
        for name, param in converted.named_parameters():
            param.requires_grad_(name in trainable)
    return apply_memory_format(converted, section.get("memory_format")).eval()
