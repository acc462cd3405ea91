"""surgeon: convert pretrained vision models into quadratic-adapter, low-activation-memory networks."""

from surgeon import kernel_ops as _kernel_ops  # noqa: F401  (registers torch.ops.surgeon.*)
from surgeon.adapt import adapt
from surgeon.adapter_artifacts import save_adapter, trainable_summary
from surgeon.api import convert, output_difference, plan, trainable_parameters
from surgeon.artifacts import from_timm, load, save
from surgeon.errors import CheckpointError, RecipeError, SurgeonError
from surgeon.export import export_model
from surgeon.hub import push_to_hub
from surgeon.loading import load_model
from surgeon.merge import merge, save_merged
from surgeon.recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
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
    "save",
    "save_adapter",
    "save_merged",
    "trainable_parameters",
    "trainable_summary",
]
