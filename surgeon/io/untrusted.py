"""Checks on what a config asks for before anything acts on it: constructor arguments, the base model an adapter
names, and sizes against the weights file's own header.

:mod:`surgeon.io.schema` bounds each field; these checks relate fields to each other and to the architecture:
``model_args`` may only be constructor arguments of the recorded timm architecture (never timm's download
options), an adapter's base resolves only to a timm name or an ``hf-hub:`` id, and the model a config describes
is built on the ``meta`` device (no memory) and compared with the safetensors header before it is built for real.
"""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.errors import CheckpointError

# timm's create_model options that fetch, read or redirect weights, and anything naming a file or URL
DENIED_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "file",
               "url", "hf_hub_id", "hf_hub_filename", "state_dict", "features_only", "feature_cfg", "scriptable",
               "exportable", "no_jit", "device", "dtype")
_SCALARS = (bool, int, float, str, type(None))
_MAX_ELEMENT_GROWTH = 2  # a converted/merged model holds at least its base's weights; folded BatchNorms are small


def _model_class(architecture: str) -> type | None:
    """The class timm's entrypoint for ``architecture`` builds (its return annotation)."""
    import timm

    entrypoint = timm.models.model_entrypoint(architecture)
    try:
        hints = typing.get_type_hints(entrypoint, sys.modules[entrypoint.__module__].__dict__)
    except Exception:  # an annotation that does not resolve: no class, only the common arguments pass
        return None
    result = hints.get("return")
    return result if isinstance(result, type) and issubclass(result, nn.Module) else None


_COMMON_ARGS = ("num_classes", "in_chans", "drop_rate", "drop_path_rate", "global_pool", "img_size")


def _plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, str):
        return len(value) <= 64 and not any(mark in value for mark in ("/", "\\", ":", ".."))
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, list) and depth < 2 and len(value) <= 64:
        return all(_plain(item, depth + 1) for item in value)
    return False


def check_model_args(architecture: str, args: dict[str, Any], where: str) -> dict[str, Any]:
    """``args`` unchanged if each is a plain-valued constructor argument of ``architecture``'s class and none is
    one of timm's download options; otherwise one line naming the argument."""
    import timm

    if not timm.is_model(architecture):
        raise CheckpointError(f"{where}: architecture {architecture!r} is not a timm model")
    cls = _model_class(architecture)
    if cls is not None:
        parameters = inspect.signature(cls.__init__).parameters
        allowed = {name for name, p in parameters.items()
                   if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    else:
        allowed = set(_COMMON_ARGS)
    for name, value in args.items():
        if name.startswith(DENIED_ARGS) or name not in allowed:
            raise CheckpointError(f"{where}: field 'model_args.{name}': not a constructor argument of "
                                  f"{architecture} that an artifact may set")
        if not _plain(value):
            raise CheckpointError(f"{where}: field 'model_args.{name}': expected a number, a short name or a "
                                  "short list of them")
    return dict(args)


def meta_model(architecture: str, args: dict[str, Any], where: str) -> nn.Module:
    """``architecture`` built with ``args`` on the meta device: shapes only, no memory, nothing fetched."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False, **args)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{where}: model_args do not build {architecture} ({first})") from None


def header_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (nothing is loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None


def _elements(shapes: typing.Iterable[tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes:
        count = 1
        for size in shape:
            count *= size
        total += count
    return total


def check_base_fits(architecture: str, args: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str,
                    model: bool = True) -> None:
    """Refuse a config whose ``num_classes`` (in ``args``) disagrees with the classifier weights the file holds,
    or (``model``) whose base would be larger than the file holds (a size bomb in ``model_args``)."""
    import timm

    num_classes = args.get("num_classes")
    cfg = timm.get_pretrained_cfg(architecture)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    for name in classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []:
        shape = shapes.get(f"{name}.weight")
        if num_classes and shape and shape[0] != num_classes:
            raise CheckpointError(f"{where}: field 'num_classes' is {num_classes} but the weights' {name}.weight "
                                  f"has {shape[0]} rows")
        default = getattr(cfg, "num_classes", None)
        if num_classes and shape is None and not model and num_classes != default:  # a reset head is in the file
            raise CheckpointError(f"{where}: field 'num_classes' is {num_classes} but the weights hold no "
                                  f"{name}.weight for such a head")
    if not model:
        return
    built = meta_model(architecture, args, where)
    wanted = _elements(tuple(t.shape) for t in built.state_dict().values())
    held = _elements(shapes.values())
    if wanted > _MAX_ELEMENT_GROWTH * held + (1 << 20):
        raise CheckpointError(f"{where}: model_args describe a {architecture} with {wanted:,} weight elements, but "
                              f"the weights file holds {held:,}")


def check_layers_fit(layers: list[Any], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Each merged layer's recorded geometry against the tensors the file holds for it (before any is built)."""
    from surgeon.methods.quadratic.inference import QuadraConvDW

    for entry in layers:
        try:
            with torch.device("meta"):
                layer = QuadraConvDW.from_geometry(entry.model_dump())
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: layer {entry.path!r}: impossible geometry ({exc})") from None
        for name, tensor in layer.state_dict().items():
            held = shapes.get(f"{entry.path}.{name}")
            if held != tuple(tensor.shape):
                raise CheckpointError(f"{where}: layer {entry.path!r}: geometry asks for {name} of shape "
                                      f"{tuple(tensor.shape)}, the weights file holds {held}")


def base_spec(base_model: str | None, base_weights: str | None, architecture: str | None, where: str) -> str:
    """The MODEL argument an adapter's base resolves to: a timm architecture (its pretrained weights) or an
    ``hf-hub:`` repo. Never a path, URL or anything else a config could point at."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hint = "; pass the base yourself: surgeon.load(dir, model=...)"
    if base_weights in ("random-init", "file", "unknown") or not base_model:
        described = {"random-init": "a randomly initialised model", "file": "a local weights file"}.get(
            base_weights or "", "no pretrained source")
        raise CheckpointError(f"{where}: the adapter's base was {described}{hint}")
    if base_model.startswith("timm:"):
        name = base_model.removeprefix("timm:")
        import timm

        if not timm.is_model(name) or (architecture is not None and name != architecture):
            raise CheckpointError(f"{where}: field 'surgeon.base_model': {name!r} is not the recorded timm "
                                  f"architecture{hint}")
        return name
    if base_model.startswith("hf-hub:"):
        try:
            validate_repo_id(base_model.removeprefix("hf-hub:"))
        except HFValidationError:
            raise CheckpointError(f"{where}: field 'surgeon.base_model': {base_model!r} is not a Hub repo id"
                                  f"{hint}") from None
        return base_model
    raise CheckpointError(f"{where}: field 'surgeon.base_model': {base_model[:80]!r} is neither timm:NAME nor "
                          f"hf-hub:ORG/NAME (an artifact cannot name files or URLs){hint}")


def base_provenance(source: str | None) -> tuple[str | None, str]:
    """What a saved artifact records of its base: ``base_model`` (only a remote source the weights came from) and
    ``base_weights`` (where they came from)."""
    if source is None:
        return None, "unknown"
    if source.startswith("timm:"):
        return source, "timm"
    if source.startswith("hf-hub:") or source.startswith("transformers:"):
        return source, "hf-hub"
    if source.startswith("random-init:"):
        return None, "random-init"
    return None, "file"


def recorded_source(section: dict[str, Any]) -> str | None:
    """The base ``source`` a loaded artifact carries on, so saving it again records the same provenance."""
    if section.get("base_model"):
        return section["base_model"]
    return {"random-init": "random-init:", "file": "file:"}.get(section.get("base_weights") or "")


def shape_table(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """A model's state-dict shapes, in the form :func:`header_shapes` gives a file's."""
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
