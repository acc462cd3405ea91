"""Recipe options of the S2A memory methods (activations, frozen convs and norms, gates, attention matmuls)."""

from __future__ import annotations

from typing import Any

from surgeon.methods.base import Check, at_least, bits, boolean, one_of
from surgeon.ops.activations import DERIVATIVE_OPS, MASK_OPS, OUTPUT_OPS

RECIPE_OPS = MASK_OPS + DERIVATIVE_OPS + OUTPUT_OPS


def recipe_ops(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of ops from {list(RECIPE_OPS)}"
    unknown = [v for v in value if v not in RECIPE_OPS]
    return f"unknown op(s) {unknown}; known: {list(RECIPE_OPS)}" if unknown else None


ACTIVATION_OPTIONS: dict[str, tuple[Any, Check]] = {
    "ops": (list(RECIPE_OPS), recipe_ops),
    "bits": (4, bits),
    "output_bits": (4, bits),
    "group_size": (128, at_least(8)),
    "attention": (True, boolean),
    "attention_input_bits": (32, one_of(8, 32)),
}
NORM_OPTIONS: dict[str, tuple[Any, Check]] = {
    "batchnorm": (True, boolean),
    "layernorm": (True, boolean),
    "layernorm_bits": (8, bits),
}
GATE_OPTIONS: dict[str, tuple[Any, Check]] = {
    "bits": (8, bits),
}
MATMUL_OPTIONS: dict[str, tuple[Any, Check]] = {
    "bits": (8, bits),
    "probability_bits": (4, bits),
}
