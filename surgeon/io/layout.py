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
from surgeon.io.names import ADAPTER_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME
from surgeon.io.schema import bare_name, parse_artifact_config, read_json
from surgeon.io.untrusted import base_provenance, check_base_fits, check_model_args, header_shapes
from surgeon.ops.memory_format import model_memory_format

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


def base_record(base: dict[str, Any]) -> dict[str, Any]:
    """The base fields a saved artifact records: ``base_model`` only where the weights came from that remote
    source (a random-init or local-file base names none), and ``base_weights`` saying where they came from."""
    base_model, base_weights = base_provenance(base.get("source"))
    record = {"base_model": base_model, "base_weights": base_weights, "base_class": base.get("class")}
    if base.get("transformers_config") is not None:
        record["transformers_config"] = json_safe(base["transformers_config"])
        record["transformers_preprocessing"] = json_safe(base.get("preprocessing") or {})
    return record


def recorded_transformers_base(section: dict[str, Any]) -> dict[str, Any]:
    """A transformers base's config and preprocessing as a loaded artifact carries them on (none for timm)."""
    if section.get("transformers_config") is None:
        return {}
    return {"transformers_config": section["transformers_config"],
            "preprocessing": section.get("transformers_preprocessing") or {}}


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


def _hub_snapshot(repo_id: str, patterns: list[str], revision: str | None, token: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, endpoint=hub_endpoint(),
                                      cache_dir=hub_cache(), local_files_only=offline(), allow_patterns=patterns))
    except (HfHubHTTPError, OSError, ValueError) as exc:  # LocalEntryNotFoundError is an OSError too
        raise download_error(exc, f"hf-hub:{repo_id}") from exc


def resolve_directory(location: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local directory for an artifact given as a path, ``local-dir:PATH`` or ``hf-hub:org/name``.

    From the Hub only the files an artifact consists of are fetched: first its config, then the weights, README
    and exports that config lists (bare names, checked by the schema), never anything else in the repository."""
    text = str(location)
    if text.startswith("hf-hub:"):
        repo_id = text[len("hf-hub:"):]
        configs = [CONFIG_NAME, ADAPTER_CONFIG_NAME]
        directory = _hub_snapshot(repo_id, configs, revision, token)
        name = CONFIG_NAME if (directory / CONFIG_NAME).is_file() else ADAPTER_CONFIG_NAME
        if not (directory / name).is_file():
            raise CheckpointError(f"{text}: the repository has no {CONFIG_NAME} or {ADAPTER_CONFIG_NAME}")
        raw = read_json(directory / name)
        if not isinstance(raw, dict) or "surgeon" not in raw:
            return directory  # not a surgeon artifact: the caller says so
        section = parse_artifact_config(raw, directory / name).surgeon
        files = [*configs, section.weights_file, "README.md", *(entry.file for entry in section.exports)]
        return _hub_snapshot(repo_id, files, revision, token)
    if text.startswith("local-dir:"):
        text = text[len("local-dir:"):]
    path = Path(text)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    return path


def read_artifact_config(directory: Path, name: str = CONFIG_NAME) -> dict[str, Any]:
    """A surgeon artifact's config, validated against :mod:`surgeon.io.schema` (known keys, types, bounds)."""
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {name} (expected a model directory)")
    return parse_artifact_config(read_json(path), path).model_dump()


def verified_weights(directory: Path, section: dict[str, Any], verify: bool, config_name: str = CONFIG_NAME,
                     weights_name: str = WEIGHTS_NAME) -> Path:
    """The weights file a validated ``surgeon`` section names (a bare name inside ``directory``), checked against
    the SHA-256 that ``config_name`` records."""
    weights = directory / bare_name(str(section.get("weights_file") or weights_name))
    if not weights.is_file():
        raise CheckpointError(f"{directory}: weights file {weights.name} is missing")
    if verify and sha256_file(weights) != section["weights_sha256"]:
        raise CheckpointError(f"{weights}: SHA-256 does not match {config_name} (file changed or corrupt); "
                              "use --no-verify / verify=False to load it anyway")
    return weights


def build_base(config: dict[str, Any], directory: Path, weights: Path) -> nn.Module:
    """The base architecture a validated config records, built only after its constructor arguments and sizes
    are checked against the weights file's header."""
    import timm

    section = config.get("surgeon") or {}
    if section.get("transformers_config") is not None:
        from surgeon.io.transformers_source import build_from_config

        return build_from_config(section["transformers_config"], section.get("transformers_preprocessing") or {},
                                 header_shapes(weights), str(directory / CONFIG_NAME))
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise SurgeonError(f"{directory}: base architecture {architecture!r} is not a timm model; pass the base "
                           "model object: surgeon.load(dir, model=MyModel())")
    where = str(directory / CONFIG_NAME)
    args = check_model_args(architecture, dict(config.get("model_args") or {}), where)
    num_classes = config.get("num_classes")
    if num_classes is not None:
        args.setdefault("num_classes", num_classes)
    check_base_fits(architecture, args, header_shapes(weights), where)
    return timm.create_model(architecture, pretrained=False, **args)


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a model directory, parsed (bounded size); surgeon artifacts are validated in full."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} (expected a model directory)")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    if "surgeon" in config:
        return parse_artifact_config(config, config_path).model_dump()
    return config
