"""The files of an artifact directory: their names, the timm-style ``config.json``, and writing them atomically.

An artifact is a directory with ``config.json`` (timm's fields - ``architecture``, ``num_classes``,
``pretrained_cfg``, ``model_args`` - plus a ``surgeon`` section) and ``model.safetensors``; an adapter artifact has
``adapter_config.json`` and ``adapter_model.safetensors`` instead. No module object is ever pickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from surgeon.errors import CheckpointError, SurgeonError
from surgeon.io.atomic import staged_directory
from surgeon.io.checkpoint import sha256_file
from surgeon.io.hub import download_error, hub_cache, hub_endpoint, offline
from surgeon.ops.memory_format import model_memory_format

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_CONVERTED = "converted"
FORMAT_MERGED = "merged"
FORMAT_ADAPTER = "adapter"


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def restore_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill the keys ``safetensors.torch.save_model`` left out because they alias a written tensor (shared
    modules), from whichever alias it kept."""
    groups: dict[tuple[int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for key, tensor in model.state_dict().items():
        if tensor.numel():
            groups.setdefault((tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())), []).append(key)
    restored = dict(state)
    for keys in groups.values():
        kept = next((key for key in keys if key in state), None)
        if kept is not None:
            for key in keys:
                restored.setdefault(key, state[kept])
    return restored


def timm_config(model: nn.Module, architecture: str | None, model_args: dict[str, Any]) -> dict[str, Any]:
    """The fields timm writes for a Hub checkpoint, so timm users recognise the directory."""
    config: dict[str, Any] = {"architecture": architecture}
    for name in ("num_classes", "num_features", "global_pool"):
        if hasattr(model, name):
            config[name] = json_safe(getattr(model, name))
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        config["pretrained_cfg"] = json_safe({k: v for k, v in dict(cfg).items() if k not in ("file", "state_dict")})
    config["model_args"] = json_safe(model_args)
    return config


def write_artifact(model: nn.Module, directory: str | Path, config: dict[str, Any], force: bool = False,
                   extra_files: dict[str, str] | None = None,
                   extra_writer: Callable[[Path], None] | None = None) -> Path:
    """Write weights + config (+ extra text files, + whatever ``extra_writer`` puts in the staging directory)
    atomically; records the weights' SHA-256."""
    directory = Path(directory)
    with staged_directory(directory, force=force) as staging:
        weights = staging / WEIGHTS_NAME
        save_model(model, str(weights), metadata={"format": "pt"})  # shared tensors written once
        config["surgeon"]["weights_file"] = WEIGHTS_NAME
        config["surgeon"]["memory_format"] = model_memory_format(model)
        config["surgeon"]["weights_sha256"] = sha256_file(weights)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        if extra_writer is not None:
            extra_writer(staging)
    return directory


def resolve_directory(location: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local directory for an artifact given as a path, ``local-dir:PATH`` or ``hf-hub:org/name``."""
    text = str(location)
    if text.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

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
    config = read_config(directory)
    section = config.get("surgeon")
    if not isinstance(section, dict):
        raise CheckpointError(f"{directory / CONFIG_NAME}: no 'surgeon' section (not a surgeon artifact)")
    return config


def verified_weights(directory: Path, section: dict[str, Any], verify: bool, config_name: str = CONFIG_NAME,
                     weights_name: str = WEIGHTS_NAME) -> Path:
    """The weights file a config's ``surgeon`` section names (``weights_name`` if it names none), checked against
    the SHA-256 that ``config_name`` records."""
    weights = directory / str(section.get("weights_file", weights_name))
    if not weights.is_file():
        raise CheckpointError(f"{directory}: weights file {weights.name} is missing")
    expected = section.get("weights_sha256")
    if verify and expected and sha256_file(weights) != expected:
        raise CheckpointError(f"{weights}: SHA-256 does not match {config_name} (file changed or corrupt); "
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
