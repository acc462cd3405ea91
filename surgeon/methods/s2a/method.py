"""S2A as methods: exact forward, low-bit tensors kept for backward, and plain layers again after merging.

One method per site family: nonlinearities (modules and calls, attention included), frozen convs, frozen norms,
``x * gate(...)`` products and explicit attention matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from surgeon.methods.base import Method, Options, Site
from surgeon.methods.s2a.activation import QuantizedActivation, prepare, quantized_call
from surgeon.methods.s2a.attention import quantized_scaled_dot_product_attention
from surgeon.methods.s2a.config import ACTIVATION_OPTIONS, GATE_OPTIONS, MATMUL_OPTIONS, NORM_OPTIONS
from surgeon.methods.s2a.gate import gated_multiply
from surgeon.methods.s2a.matmul import quantized_matmul
from surgeon.methods.s2a.variants import FrozenBatchNorm, InputFreeConv, QuantizedLayerNorm
from surgeon.methods.variant import VariantMethod, make_variant
from surgeon.ops.activations import FUNCTION_KEY_OF, MODULES, ActivationSpec

Replacement = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def activation_bits(options: Options, spec: ActivationSpec) -> int:
    """The bit-width for what an activation keeps (its output, or its input's derivative code)."""
    return options["output_bits"] if spec.family == "output" else options["bits"]


class QuantizedActivationMethod(Method):
    target = "activation"
    layer = "quantized"
    description = "1-bit masks, 4-bit derivative codes or 4-bit outputs kept for backward"
    options = ACTIVATION_OPTIONS
    layer_types = (QuantizedActivation,)
    leaf_functions = (quantized_call, quantized_scaled_dot_product_attention)

    def matches(self, site: Site, options: Options, module: nn.Module | None) -> bool | str:
        if site.spec is not None and site.spec.recipe_op not in options["ops"]:
            return False
        return not (site.op == "scaled_dot_product_attention" and not options["attention"])

    def estimate(self, site: Site, options: Options, module: nn.Module | None) -> None:
        """Bytes kept before (the fp32 input or output) and after (packed codes plus per-row/group scales).

        Fused attention is left at 0/0: what the fused kernel keeps is not visible from the site."""
        spec = site.spec
        if spec is None or spec.family == "attention":
            return
        numel = site.numel
        site.saved_bytes_before = numel * 4
        if spec.family == "mask":
            kept_bits, overhead = 1, 0
        elif spec.family == "derivative":
            kept_bits, overhead = options["bits"], 0
        elif spec.op == "softmax":  # one step per row along the softmax dim
            width = site.input_shape[spec.param("dim")] if site.input_shape else 1
            kept_bits, overhead = options["output_bits"], 4 * (numel // max(width, 1))
        else:  # min and step per group
            kept_bits, overhead = options["output_bits"], 8 * math.ceil(numel / options["group_size"])
        site.saved_bytes_after = math.ceil(numel * kept_bits / 8) + overhead

    def build(self, site: Site, options: Options, module: nn.Module) -> nn.Module:
        assert site.spec is not None
        # the in-place form computes what the module's own forward computes only for the registered classes
        return QuantizedActivation(module, site.spec, bits=activation_bits(options, site.spec),
                                   group_size=options["group_size"],
                                   reuse_input=site.input_reusable and type(module) in MODULES)

    def call(self, site: Site, options: Options, node: torch.fx.Node) -> Replacement:
        assert site.spec is not None
        if site.op == "scaled_dot_product_attention":
            return quantized_scaled_dot_product_attention, node.args, {
                **node.kwargs, "bits": options["output_bits"], "input_bits": options["attention_input_bits"]}
        target = f"method:{node.target}" if node.op == "call_method" else FUNCTION_KEY_OF[node.target]
        kept_bits = activation_bits(options, site.spec)
        prepare(site.spec, kept_bits)
        return quantized_call, (node.args[0], target, site.op, site.spec.params, kept_bits, options["group_size"],
                                site.input_reusable, *node.args[1:]), dict(node.kwargs)

    def merge(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, QuantizedActivation)
        return module.original


class InputFreeConvMethod(VariantMethod):
    """Frozen convs keep no input: their input gradient needs only the weight."""

    target = "conv"
    layer = "input_free"
    description = "frozen convs keep nothing for backward"
    layer_types = (InputFreeConv,)

    def estimate(self, site: Site, options: Options, module: Any) -> None:
        site.saved_bytes_before = site.numel * module.weight.element_size()
        site.saved_bytes_after = 0

    def build(self, site: Site, options: Options, module: nn.Module) -> nn.Module:
        variant = make_variant(module, InputFreeConv)
        variant._surgeon_same_dynamic = site.op == "conv2d_same"
        return variant


class FrozenNormMethod(VariantMethod):
    """Frozen BatchNorm is a per-channel scale (keeps nothing); LayerNorm keeps its input at ``layernorm_bits``."""

    target = "norm"
    layer = "frozen"
    description = "frozen BatchNorm keeps nothing, LayerNorm an 8-bit input"
    options = NORM_OPTIONS
    layer_types = (FrozenBatchNorm, QuantizedLayerNorm)

    def matches(self, site: Site, options: Options, module: nn.Module | None) -> bool | str:
        return bool(options["batchnorm"] if site.op.startswith("batchnorm") else options["layernorm"])

    def estimate(self, site: Site, options: Options, module: nn.Module | None) -> None:
        numel = site.numel
        site.saved_bytes_before = numel * 4
        if site.op.startswith("layernorm"):
            width = site.input_shape[1 if site.op == "layernorm2d" else -1] if site.input_shape else 1
            rows = numel // max(width, 1)
            site.saved_bytes_after = math.ceil(numel * options["layernorm_bits"] / 8) + 12 * rows
        else:
            site.saved_bytes_after = 0

    def build(self, site: Site, options: Options, module: nn.Module) -> nn.Module:
        if site.op.startswith("batchnorm"):
            return make_variant(module, FrozenBatchNorm)
        variant = make_variant(module, QuantizedLayerNorm)
        variant._surgeon_channel_dim = 1 if site.op == "layernorm2d" else -1
        variant._surgeon_bits = options["layernorm_bits"]
        return variant


class QuantizedGateMethod(Method):
    """``x * gate(...)`` keeps both operands at ``bits`` (the gate's own output is kept by its activation)."""

    target = "gate"
    layer = "quantized"
    description = "gate products keep 8-bit operands"
    options = GATE_OPTIONS
    leaf_functions = (gated_multiply,)

    def call(self, site: Site, options: Options, node: torch.fx.Node) -> Replacement:
        gate_index = site.detail
        return gated_multiply, (node.args[1 - gate_index], node.args[gate_index], gate_index == 0,
                                options["bits"]), {}


class QuantizedMatmulMethod(Method):
    """``a @ b`` between two computed tensors keeps its operands at ``bits`` (softmax probabilities at
    ``probability_bits``)."""

    target = "matmul"
    layer = "quantized"
    description = "attention matmuls keep 8-bit operands, 4-bit probabilities"
    options = MATMUL_OPTIONS
    leaf_functions = (quantized_matmul,)

    def call(self, site: Site, options: Options, node: torch.fx.Node) -> Replacement:
        probabilities = site.detail
        a_bits, b_bits = (options["probability_bits"] if p else options["bits"] for p in probabilities)
        return quantized_matmul, (*node.args, a_bits, b_bits, *probabilities), {}
