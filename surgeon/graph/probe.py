"""Running a model on a probe input: the input a model expects, and how far two models' outputs differ."""

from __future__ import annotations

import torch
from torch import nn

from surgeon.ops.model_outputs import max_difference


def default_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """An input of the model's pretrained resolution (timm's ``pretrained_cfg``), else 3×224×224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else "cpu"
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *size, generator=generator, dtype=dtype).to(device)


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def output_difference(original: nn.Module, converted: nn.Module, example_input: torch.Tensor) -> dict[str, float]:
    """Max |Δ| between two models' eval outputs, absolute and relative to the original's max |output|."""
    modes = original.training, converted.training
    original.eval()
    converted.eval()
    try:
        with torch.no_grad():
            reference = original(example_input)
            result = converted(example_input)
    finally:
        original.train(modes[0])
        converted.train(modes[1])
    diff, scale = max_difference(reference, result)  # a tensor, tuple, dict or ModelOutput: every tensor leaf
    return {"max_abs_diff": diff, "max_abs_output": scale, "relative": diff / scale if scale else diff}
