"""Reading weight files safely and fitting them to a model with a clear account of any mismatch."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from surgeon.errors import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_NESTED_KEYS_EMA_FIRST = ("state_dict_ema", "model_ema", "state_dict", "model")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``torch.save`` file. Pickles are read with ``weights_only=True`` only;
    EMA weights are preferred and DDP/compile prefixes stripped, as ``timm.models.load_state_dict`` does (that
    function is not used itself: it fails with a bare ``FileNotFoundError`` or ``assert`` and takes non-tensor
    entries, where this names the file and the problem in one line)."""
    path = Path(path)
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: broken symbolic link (dangling or a loop)") from exc
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a weights file")
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from exc
    if size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if path.suffix == ".safetensors":
        try:
            loaded: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from exc
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{path}: refused - the pickle holds objects other than tensors and plain "
                                  "containers (loaded with weights_only=True; convert it to safetensors)") from exc
        except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from exc
    if isinstance(loaded, dict):
        for key in _NESTED_KEYS_EMA_FIRST:
            if key.startswith(("state_dict_ema", "model_ema")) and not use_ema:
                continue
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointError(f"{path}: holds no state dict (expected a mapping of names to tensors)")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor")
    from timm.models import clean_state_dict  # DDP / torch.compile wrapper prefixes, as timm strips them

    return clean_state_dict(loaded)


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: tensor '{key}' contains NaN or Inf")


def _listing(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Load ``state`` into ``model``; every missing, unexpected or mis-shaped key is named in one line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (file {tuple(state[k].shape)} vs model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    check_finite(state, source)
    fitted = OrderedDict((k, v) for k, v in state.items() if k in expected)
    # each module's state-dict version as the model was built: a file has none, and some modules (BatchNorm,
    # torchvision's MNASNet) read their version while loading
    fitted._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(fitted, strict=False)
