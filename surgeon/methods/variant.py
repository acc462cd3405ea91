"""Variants: a module turned, in place, into its own class with a mixin in front.

The module keeps every attribute, parameter and ``state_dict`` key, ``super().forward`` still defines the
original output, and :func:`revert_variant` restores the original class for inference checkpoints. Memory
variants (S2A) and the linear delta adapter are built this way.
"""

from __future__ import annotations

from torch import nn

from surgeon.methods.base import Method

_VARIANTS: dict[tuple[type, type], type] = {}


def make_variant(module: nn.Module, mixin: type) -> nn.Module:
    """Turn ``module`` (in place) into ``mixin`` + its class; returns it."""
    original = type(module)
    key = (mixin, original)
    if key not in _VARIANTS:
        _VARIANTS[key] = type(f"{mixin.__name__}{original.__name__}", (mixin, original),
                              {"_surgeon_base_class": original, "__module__": mixin.__module__})
    module.__class__ = _VARIANTS[key]
    return module


def revert_variant(module: nn.Module) -> nn.Module:
    base = getattr(type(module), "_surgeon_base_class", None)
    if base is not None:
        module.__class__ = base
    return module


def is_variant(module: nn.Module) -> bool:
    return getattr(type(module), "_surgeon_base_class", None) is not None


class VariantMethod(Method):
    """A method whose layers are variants of the original module: merging restores the original class."""

    def merge(self, module: nn.Module) -> nn.Module:
        return revert_variant(module)
