"""Recipe options of the quadratic method, and the atrous branches they ask for at one conv."""

from __future__ import annotations

from typing import Any

from torch import nn

from surgeon.errors import RecipeError
from surgeon.methods.base import (
    Check,
    Options,
    boolean,
    one_of,
    optional_positive_float,
    optional_positive_int,
    positive_int,
)
from surgeon.methods.quadratic.layer import AtrousKernel, conv_span, default_branches

MAX_RANK = 8  # the fused CUDA kernels' compile-time bound (``SURGEON_MAX_RANK``); more is no adapter anyway


def _rank(value: Any) -> str | None:
    return None if positive_int(value) is None and value <= MAX_RANK else f"expected an integer from 1 to {MAX_RANK}"


OPTIONS: dict[str, tuple[Any, Check]] = {
    "rank": (1, _rank),
    "a_kernel": (None, optional_positive_int),
    "a_dilation": (None, optional_positive_int),
    "b_kernel": (None, optional_positive_int),
    "b_dilation": (None, optional_positive_int),
    "b_init_std": (None, optional_positive_float),
    "train_bias": (False, boolean),
    "keep_branches": (False, boolean),
    "min_kernel": (2, positive_int),
    "saved_input_bits": (32, one_of(8, 32)),
}


def quadratic_branches(options: Options, conv: nn.Conv2d) -> tuple[AtrousKernel, AtrousKernel]:
    """The atrous kernels the options ask for at one conv; a span beyond the kernel's is a RecipeError."""
    kernel, dilation = tuple(conv.kernel_size), tuple(conv.dilation)
    span = conv_span(kernel, dilation)
    default_a, default_b = default_branches(kernel, dilation)
    result = []
    for name, default in (("a", default_a), ("b", default_b)):
        k_opt, d_opt = options[f"{name}_kernel"], options[f"{name}_dilation"]
        taps = tuple(min(k_opt, k) if k_opt is not None else dk for k, dk in zip(kernel, default.kernel))
        dil = tuple(d_opt if d_opt is not None and t > 1 else (dd if t == dk else max(1, (s - 1) // max(t - 1, 1)))
                    for t, dk, dd, s in zip(taps, default.kernel, default.dilation, span))
        branch = AtrousKernel(taps, dil)  # type: ignore[arg-type]
        if any(b > s for b, s in zip(branch.span(), span)):
            field_name = f"{name}_dilation" if d_opt is not None else f"{name}_kernel"
            raise RecipeError(f"recipe field '{field_name}': branch {name} spans {branch.span()}, more than the "
                              f"kernel's receptive field {span} (kernel {kernel}, dilation {dilation})")
        result.append(branch)
    return result[0], result[1]
