"""The linear depthwise adapter as a method: ``W + ΔW`` with ``ΔW = 0`` at init, merged by ``W += ΔW``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from surgeon.methods.base import Options, Site, decline_small_kernel
from surgeon.methods.linear_delta.config import OPTIONS
from surgeon.methods.linear_delta.layer import LinearDeltaConv, add_linear_delta, fold_linear_delta
from surgeon.methods.variant import VariantMethod


class LinearDeltaMethod(VariantMethod):
    target = "depthwise_conv"
    layer = "linear"
    description = "a zero-initialised trainable kernel delta"
    options = OPTIONS
    layer_types = (LinearDeltaConv,)
    adds_parameters = True

    def matches(self, site: Site, options: Options, module: nn.Module | None) -> bool | str:
        return decline_small_kernel(options, module)

    def estimate(self, site: Site, options: Options, module: Any) -> None:
        site.added_params = module.weight.numel()
        site.saved_bytes_before = site.saved_bytes_after = site.numel * module.weight.element_size()

    def build(self, site: Site, options: Options, module: Any) -> nn.Module:
        return add_linear_delta(module, same_dynamic=site.op == "conv2d_same")

    def trainable(self, module: nn.Module) -> Iterable[nn.Parameter]:
        yield module.weight_delta

    def merge(self, module: nn.Module) -> nn.Module:
        return fold_linear_delta(module)
