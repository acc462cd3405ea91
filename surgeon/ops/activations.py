"""Registry of the nonlinearities surgeon can replace, and how each one's backward is kept cheaply.

Every op belongs to one of three families:

* ``mask``: the derivative is piecewise constant with two values (ReLU, ReLU6, LeakyReLU, Hardtanh,
  Hardsigmoid) - a 1-bit mask gives the exact gradient.
* ``derivative``: a smooth function of the input (GELU, SiLU, Hardswish, Mish) - the input is stored as the
  index of a least-squares derivative interval (see ``derivative_codebook``).
* ``output``: the derivative is a function of the output (Sigmoid, Tanh, Softmax) - the output is stored
  quantized with a per-row/per-group scale.

The tables map torch modules, ``torch``/``F`` functions and tensor method names onto op names, so the rewrite
engine can recognise a site in whatever form the model's author wrote it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MASK_OPS = ("relu", "relu6", "leaky_relu", "hardtanh", "hardsigmoid")
DERIVATIVE_OPS = ("gelu", "silu", "hardswish", "mish")
OUTPUT_OPS = ("sigmoid", "tanh", "softmax")
ATTENTION_OPS = ("scaled_dot_product_attention",)
ALL_OPS = MASK_OPS + DERIVATIVE_OPS + OUTPUT_OPS + ATTENTION_OPS

# recipe-facing names: "gelu" covers both the erf and the tanh form, "softmax" covers fused attention too.
OP_FAMILY = {**{o: "mask" for o in MASK_OPS}, **{o: "derivative" for o in DERIVATIVE_OPS},
             **{o: "output" for o in OUTPUT_OPS}, **{o: "attention" for o in ATTENTION_OPS}}


@dataclass(frozen=True)
class ActivationSpec:
    """What one site computes: the op and the parameters its backward needs."""

    op: str
    params: tuple[tuple[str, Any], ...] = field(default=())

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    @property
    def family(self) -> str:
        return OP_FAMILY[self.op]

    @property
    def recipe_op(self) -> str:
        """Name used in recipes' ``ops`` lists (fused attention is selected as ``softmax``)."""
        return "softmax" if self.op in ATTENTION_OPS else self.op


# ---------------------------------------------------------------------------------------------- functions
FUNCTIONS: dict[Callable[..., Any], str] = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu",
    F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh",
    F.hardsigmoid: "hardsigmoid",
    F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish", F.mish: "mish",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh", torch.tanh_: "tanh",
    F.softmax: "softmax", torch.softmax: "softmax",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
}

METHODS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "tanh": "tanh", "tanh_": "tanh", "softmax": "softmax",
}

# fx codegen needs importable names, so rewritten nodes refer to functions by these keys.
FUNCTION_KEYS: dict[str, Callable[..., Any]] = {
    f"{getattr(fn, '__module__', None) or 'torch'}.{fn.__name__}": fn for fn in FUNCTIONS
}
FUNCTION_KEY_OF = {fn: key for key, fn in FUNCTION_KEYS.items()}

_SIGNATURES: dict[str, inspect.Signature] = {
    "leaky_relu": inspect.Signature([inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                     inspect.Parameter("negative_slope", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       default=0.01),
                                     inspect.Parameter("inplace", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       default=False)]),
    "hardtanh": inspect.Signature([inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                   inspect.Parameter("min_val", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     default=-1.0),
                                   inspect.Parameter("max_val", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     default=1.0),
                                   inspect.Parameter("inplace", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     default=False)]),
    "softmax": inspect.Signature([inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                  inspect.Parameter("dim", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
                                  inspect.Parameter("_stacklevel", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                    default=3),
                                  inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, default=None)]),
    "gelu": inspect.Signature([inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                               inspect.Parameter("approximate", inspect.Parameter.KEYWORD_ONLY, default="none")]),
}


class UnsupportedCall(ValueError):
    """A recognised op called in a way surgeon cannot reproduce (e.g. softmax without a dim)."""


def spec_from_call(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ActivationSpec:
    """Parameters of a functional/method call site, from its (constant) non-input arguments."""
    signature = _SIGNATURES.get(op)
    bound: dict[str, Any] = {}
    if signature is not None:
        try:
            bound = dict(signature.bind(*args, **kwargs).arguments)
        except TypeError as exc:
            raise UnsupportedCall(f"cannot read the arguments of {op}: {exc}") from exc
    if op == "relu6":
        return ActivationSpec("relu6")
    if op == "leaky_relu":
        return ActivationSpec(op, (("negative_slope", float(bound.get("negative_slope", 0.01))),))
    if op == "hardtanh":
        return ActivationSpec(op, (("min_val", float(bound.get("min_val", -1.0))),
                                   ("max_val", float(bound.get("max_val", 1.0)))))
    if op == "gelu":
        return ActivationSpec(op, (("approximate", str(bound.get("approximate", "none"))),))
    if op == "softmax":
        dim = bound.get("dim")
        if not isinstance(dim, int):
            raise UnsupportedCall("softmax without an explicit integer dim")
        if bound.get("dtype") is not None:
            raise UnsupportedCall("softmax with a dtype argument")
        return ActivationSpec(op, (("dim", dim),))
    return ActivationSpec(op)


# ------------------------------------------------------------------------------------------------ modules
def _timm_activation_modules() -> dict[type, str]:
    try:
        from timm.layers import activations as timm_act
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the registry importable
        return {}
    table = {"GELU": "gelu", "GELUTanh": "gelu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Swish": "silu",
             "HardSwish": "hardswish", "Mish": "mish", "HardSigmoid": "hardsigmoid"}
    return {getattr(timm_act, name): op for name, op in table.items() if hasattr(timm_act, name)}


# order matters: ReLU6 is a subclass of Hardtanh.
MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.Hardtanh: "hardtanh",
    nn.Hardsigmoid: "hardsigmoid", nn.GELU: "gelu", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Mish: "mish",
    nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Softmax: "softmax",
    **_timm_activation_modules(),
}


def module_op(module: nn.Module) -> str | None:
    """Op name of an activation module, or None. Exact type match first, then subclasses."""
    op = MODULES.get(type(module))
    if op is not None:
        return op
    for cls, name in MODULES.items():
        if isinstance(module, cls):
            return name
    return None


def spec_from_module(module: nn.Module) -> ActivationSpec:
    """Parameters of an activation module, read from its attributes."""
    op = module_op(module)
    if op is None:
        raise UnsupportedCall(f"{type(module).__name__} is not a known activation")
    if op == "leaky_relu":
        return ActivationSpec(op, (("negative_slope", float(module.negative_slope)),))
    if op == "hardtanh":
        return ActivationSpec(op, (("min_val", float(module.min_val)), ("max_val", float(module.max_val))))
    if op == "gelu":
        approximate = getattr(module, "approximate", "none")
        if type(module).__name__ == "GELUTanh":
            approximate = "tanh"
        return ActivationSpec(op, (("approximate", str(approximate)),))
    if op == "softmax":
        if not isinstance(module.dim, int):
            raise UnsupportedCall("nn.Softmax without an explicit dim")
        return ActivationSpec(op, (("dim", int(module.dim)),))
    return ActivationSpec(op)


# ------------------------------------------------------------------------------------------ in-place forms
def _gelu_into_input(approximate: str) -> Callable[[torch.Tensor], torch.Tensor]:
    # ATen has no gelu_; its out= form writes each element after reading it, so the input can be the output
    return lambda t: torch.ops.aten.gelu.out(t, approximate=approximate, out=t)


def inplace_forward(spec: ActivationSpec) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The op computed into its own input (the same ATen kernel as the out-of-place call, so the same values), or
    None where the op has none (softmax, attention): lets a training forward skip an output-sized allocation when
    nothing else reads the input."""
    op = spec.op
    if op == "relu":
        return torch.relu_
    if op == "relu6":
        return lambda t: F.relu6(t, inplace=True)
    if op == "leaky_relu":
        return lambda t: F.leaky_relu(t, spec.param("negative_slope"), inplace=True)
    if op == "hardtanh":
        return lambda t: F.hardtanh(t, spec.param("min_val"), spec.param("max_val"), inplace=True)
    if op == "gelu":
        return _gelu_into_input(spec.param("approximate", "none"))
    if op in ("silu", "hardswish", "hardsigmoid", "mish"):
        function = getattr(F, op)
        return lambda t: function(t, inplace=True)
    if op == "sigmoid":
        return torch.sigmoid_
    if op == "tanh":
        return torch.tanh_
    return None
