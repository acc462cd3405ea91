"""The method table: (site family, layer name) -> method. Built-in methods are registered here; a user's method
registers the same way (:func:`register_method`), after which recipes can name it like any shipped one."""

from __future__ import annotations

from torch import nn

from surgeon.errors import RecipeError
from surgeon.methods.base import SITE_TARGETS, Method
from surgeon.methods.linear_delta.method import LinearDeltaMethod
from surgeon.methods.quadratic.method import QuadraticMethod
from surgeon.methods.s2a.method import (
    FrozenNormMethod,
    InputFreeConvMethod,
    QuantizedActivationMethod,
    QuantizedGateMethod,
    QuantizedMatmulMethod,
)

_METHODS: dict[tuple[str, str], Method] = {}


def register_method(method: Method | type[Method], replace: bool = False) -> Method:
    """Add a method (an instance, or a class built without arguments) to the table. The first method registered
    for a target is that target's default layer. Registering a taken (target, layer) needs ``replace=True``."""
    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, Method):
        raise TypeError(f"{instance!r} is not a surgeon.Method")
    target, layer = getattr(instance, "target", None), getattr(instance, "layer", None)
    if target not in SITE_TARGETS:
        raise ValueError(f"method target must be one of {list(SITE_TARGETS)}, got {target!r}")
    if not isinstance(layer, str) or not layer:
        raise ValueError("a method needs a non-empty 'layer' name")
    if (target, layer) in _METHODS and not replace:
        raise ValueError(f"a method {target}/{layer} is already registered (pass replace=True to override it)")
    _METHODS[(target, layer)] = instance
    return instance


def unregister_method(target: str, layer: str) -> None:
    _METHODS.pop((target, layer), None)


def layers_for(target: str) -> list[str]:
    """Layer names registered for a site family, the default first."""
    return [layer for (t, layer) in _METHODS if t == target]


def get_method(target: str, layer: str) -> Method:
    try:
        return _METHODS[(target, layer)]
    except KeyError:
        raise RecipeError(f"no method {target}/{layer} is registered (known for {target}: "
                          f"{layers_for(target)})") from None


def all_methods() -> list[Method]:
    return list(_METHODS.values())


def built_types() -> tuple[type, ...]:
    """Module classes that methods build or merge into: never sites, always fx leaves."""
    return tuple(t for method in _METHODS.values() for t in (*method.layer_types, *method.inference_types))


def method_of(module: nn.Module) -> Method | None:
    """The method whose ``build`` made this module, if any."""
    return next((m for m in _METHODS.values() if m.layer_types and isinstance(module, m.layer_types)), None)


for _builtin in (QuadraticMethod, LinearDeltaMethod, QuantizedActivationMethod, InputFreeConvMethod, FrozenNormMethod,
                 QuantizedGateMethod, QuantizedMatmulMethod):
    register_method(_builtin)
