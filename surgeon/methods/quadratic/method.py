"""QuadraNet V2 as a method: every depthwise conv becomes a quadratic neuron, merged into a dense QuadraConvDW."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import nn

from surgeon.methods.base import Method, Options, Site, decline_small_kernel
from surgeon.methods.quadratic.config import OPTIONS, quadratic_branches
from surgeon.methods.quadratic.inference import QuadraConvDW
from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d


class QuadraticMethod(Method):
    target = "depthwise_conv"
    layer = "quadratic"
    description = "frozen W_c plus a zero-initialised low-rank atrous quadratic term"
    options = OPTIONS
    layer_types = (QuadraticDepthwiseConv2d,)
    inference_types = (QuadraConvDW,)
    adds_parameters = True

    def matches(self, site: Site, options: Options, module: nn.Module | None) -> bool | str:
        return decline_small_kernel(options, module)

    def estimate(self, site: Site, options: Options, module: Any) -> None:
        a, b = quadratic_branches(options, module)
        rank = options["rank"]
        taps = math.prod(a.kernel) + math.prod(b.kernel)
        site.added_params = module.in_channels * rank * taps
        out = math.prod(site.output_shape) if site.output_shape else 0
        site.added_macs = out * rank * (taps + 1)
        element = module.weight.element_size()
        site.saved_bytes_before = site.numel * element
        kept_input = site.saved_bytes_before if options["saved_input_bits"] == 32 else site.numel
        site.saved_bytes_after = kept_input + (2 * rank * out * element if options["keep_branches"] else 0)

    def build(self, site: Site, options: Options, module: Any) -> nn.Module:
        branch_a, branch_b = quadratic_branches(options, module)
        return QuadraticDepthwiseConv2d.from_conv(
            module, same_dynamic=site.op == "conv2d_same", rank=options["rank"], branch_a=branch_a,
            branch_b=branch_b, keep_branches=options["keep_branches"], b_init_std=options["b_init_std"],
            train_bias=options["train_bias"], saved_input_bits=options["saved_input_bits"])

    def trainable(self, module: nn.Module) -> Iterable[nn.Parameter]:
        assert isinstance(module, QuadraticDepthwiseConv2d)
        yield module.weight_a
        yield module.weight_b
        if module.bias is not None and module.train_bias:
            yield module.bias

    def merge(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, QuadraticDepthwiseConv2d)
        return QuadraConvDW.from_adapter(module)
