"""surgeon: convert pretrained vision models into quadratic-adapter, low-activation-memory networks.

The public API is imported on first use (PEP 562): ``import surgeon`` stays cheap, and the CLI, timm, rich and
the Hub client load only when a function that needs them is called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from surgeon.version import __version__

# public name -> module that defines it
_EXPORTS = {
    "CheckpointError": "surgeon.errors",
    "RecipeError": "surgeon.errors",
    "SurgeonError": "surgeon.errors",
    "Recipe": "surgeon.recipe",
    "load_recipe": "surgeon.recipe",
    "Method": "surgeon.methods.base",
    "register_method": "surgeon.methods.registry",
    "convert": "surgeon.api",
    "output_difference": "surgeon.graph.probe",
    "plan": "surgeon.api",
    "trainable_parameters": "surgeon.api",
    "merge": "surgeon.graph.merge",
    "adapt": "surgeon.train.adapt",
    "save_adapter": "surgeon.io.adapter_artifacts",
    "trainable_summary": "surgeon.io.adapter_artifacts",
    "from_timm": "surgeon.io.artifacts",
    "load": "surgeon.io.artifacts",
    "save": "surgeon.io.converted",
    "save_merged": "surgeon.io.merged",
    "export_model": "surgeon.io.export",
    "push_to_hub": "surgeon.io.push",
    "load_model": "surgeon.io.artifacts",
}

__all__ = [
    "CheckpointError",
    "Method",
    "Recipe",
    "RecipeError",
    "SurgeonError",
    "__version__",
    "adapt",
    "convert",
    "export_model",
    "from_timm",
    "load",
    "load_model",
    "load_recipe",
    "merge",
    "output_difference",
    "plan",
    "push_to_hub",
    "register_method",
    "save",
    "save_adapter",
    "save_merged",
    "trainable_parameters",
    "trainable_summary",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from surgeon.api import convert, plan, trainable_parameters
    from surgeon.errors import CheckpointError, RecipeError, SurgeonError
    from surgeon.graph.merge import merge
    from surgeon.graph.probe import output_difference
    from surgeon.io.adapter_artifacts import save_adapter, trainable_summary
    from surgeon.io.artifacts import from_timm, load, load_model
    from surgeon.io.converted import save
    from surgeon.io.export import export_model
    from surgeon.io.merged import save_merged
    from surgeon.io.push import push_to_hub
    from surgeon.methods.base import Method
    from surgeon.methods.registry import register_method
    from surgeon.recipe import Recipe, load_recipe
    from surgeon.train.adapt import adapt
