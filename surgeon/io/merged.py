"""Merged (inference) artifacts: the original architecture with dense quadratic layers in place.

A merged checkpoint records each quadratic layer's geometry (and which BatchNorms were folded), so loading
rebuilds it from the base architecture without tracing anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.errors import CheckpointError, SurgeonError
from surgeon.graph.merge import DTYPES, MergeInfo, apply_folds
from surgeon.graph.rewrite import set_submodule
from surgeon.io.checkpoint import fit_state_dict, read_state_dict
from surgeon.io.layout import (
    FORMAT_MERGED,
    base_record,
    build_base,
    recorded_transformers_base,
    restore_aliases,
    timm_config,
    write_artifact,
)
from surgeon.io.schema import LayerEntry
from surgeon.io.untrusted import check_layers_fit, header_shapes, recorded_source
from surgeon.methods.quadratic.inference import QuadraConvDW
from surgeon.ops.memory_format import apply_memory_format
from surgeon.version import __version__


def save_merged(model: nn.Module, directory: str | Path, force: bool = False,
                extra_files: dict[str, str] | None = None) -> Path:
    info: MergeInfo | None = getattr(model, "surgeon_merge", None)
    if info is None:
        raise SurgeonError("not a merged model (use surgeon.merge first)")
    config = timm_config(model, info.base.get("architecture"), info.base.get("model_args") or {})
    config["surgeon"] = {
        "format": FORMAT_MERGED, "version": __version__, "recipe": info.recipe,
        **base_record(info.base), "dtype": info.dtype,
        "layers": list(info.layers.values()), "folded_batchnorm": info.folded,
        "unfolded_batchnorm": info.unfolded,
        "merge_verification": info.verification,
    }
    return write_artifact(model, directory, config, force=force, extra_files=extra_files)


def load_merged(directory: Path, config: dict[str, Any], weights: Path, model: nn.Module | None) -> nn.Module:
    section = config["surgeon"]
    check_layers_fit([LayerEntry.model_validate(e) for e in section.get("layers", [])], header_shapes(weights),
                     str(directory / "config.json"))
    base = model if model is not None else build_base(config, directory, weights)
    base.eval()
    for entry in section.get("layers", []):
        layer = QuadraConvDW.from_geometry(entry)
        for alias in entry.get("aliases") or [entry["path"]]:
            try:
                base.get_submodule(alias)
            except AttributeError as exc:
                raise CheckpointError(f"{directory}: layer path {alias!r} does not exist in "
                                      f"{type(base).__name__}") from exc
            set_submodule(base, alias, layer)
    folded = section.get("folded_batchnorm") or {}
    for bn_path in folded:
        try:
            base.get_submodule(bn_path)
        except AttributeError as exc:
            raise CheckpointError(f"{directory}: folded BatchNorm path {bn_path!r} does not exist in "
                                  f"{type(base).__name__}") from exc
    apply_folds(base, folded)
    dtype = DTYPES.get(section.get("dtype", "fp32"), torch.float32)
    base = base.to(dtype)
    state = restore_aliases(base, read_state_dict(weights))
    fit_state_dict(base, state, str(weights), strict=True)
    for module in base.modules():
        if isinstance(module, QuadraConvDW):
            module.check_patterns()
    base.requires_grad_(False)
    apply_memory_format(base, section.get("memory_format"))
    base.surgeon_merge = MergeInfo(base={"architecture": config.get("architecture"),
                                         "source": recorded_source(section), "class": section.get("base_class"),
                                         "model_args": config.get("model_args") or {},
                                         **recorded_transformers_base(section)},
                                   recipe=section.get("recipe") or {}, layers={e["path"]: e for e in
                                                                               section.get("layers", [])},
                                   folded=dict(folded), unfolded=dict(section.get("unfolded_batchnorm") or {}),
                                   verification=section.get("merge_verification") or {},
                                   dtype=section.get("dtype", "fp32"))
    return base.eval()
