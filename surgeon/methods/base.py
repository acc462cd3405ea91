"""What a method is: the small protocol every adapter or memory method implements, and the site it works on.

A *site* is one replaceable place in a model, found by :mod:`surgeon.graph` (a module, or a call inside a
module's own forward). A *method* is registered for one site family (``target``) under a name (``layer``, what a
recipe rule says) and answers four questions about a site:

* ``matches`` - does this method apply here (and if not, why not)?
* ``estimate`` - what does it add (parameters, MACs) and what does it save (bytes kept for backward)?
* ``build`` / ``call`` - the replacement: a module for a module site, a function call for a graph node;
* ``merge`` - the inference form of a built module once training is done.

Methods never import :mod:`surgeon.graph`: the graph layer finds sites and asks the registered methods, so a
method written outside the package plugs in with :func:`surgeon.register_method` and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from surgeon.ops.activations import ActivationSpec
from surgeon.ops.bitpack import SUPPORTED_BITS

# Site families the graph layer discovers; a method targets one of them.
SITE_TARGETS = ("depthwise_conv", "activation", "conv", "norm", "gate", "matmul")

Options = dict[str, Any]
Check = Callable[[Any], "str | None"]  # None when the value is valid, else what was expected


@dataclass
class Site:
    """One replaceable place in the model."""

    path: str
    target: str  # one of SITE_TARGETS
    op: str
    access: str  # call_module | module_tree | call_function | call_method | hidden_function
    module_type: str
    action: str = "keep"
    reason: str = ""
    rule: int | None = None
    aliases: list[str] = field(default_factory=list)
    calls: int = 0
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    added_params: int = 0
    added_macs: int = 0
    saved_bytes_before: int = 0
    saved_bytes_after: int = 0
    # for functional sites: owner module path and occurrence of this op in the owner's forward
    owner: str | None = None
    occurrence: int = 0
    spec: ActivationSpec | None = None
    blocker: str = ""  # why this site cannot be replaced, should a rule want it
    detail: Any = None  # what the graph layer found about a functional site (e.g. which operand is a gate)
    # the site's input is a new tensor nothing else reads (an activation may compute into it)
    input_reusable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "target": self.target, "op": self.op, "access": self.access,
            "module_type": self.module_type, "action": self.action, "reason": self.reason, "rule": self.rule,
            "aliases": self.aliases, "calls": self.calls,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "output_shape": list(self.output_shape) if self.output_shape else None,
            "added_params": self.added_params, "added_macs": self.added_macs,
            "saved_bytes_before": self.saved_bytes_before, "saved_bytes_after": self.saved_bytes_after,
        }

    @property
    def numel(self) -> int:
        """Elements of the site's input at the probe shape (0 when unknown)."""
        return math.prod(self.input_shape) if self.input_shape else 0


class Method:
    """Base class of a method. Subclasses set ``target``, ``layer`` and ``options`` and override what applies.

    ``options`` maps each recipe option to ``(default, check)``; ``include``/``exclude`` are common to all rules
    and handled by the recipe. ``layer_types`` are the module classes ``build`` returns: the graph layer never
    treats them as sites again, traces them as leaves, and ``merge`` is asked for them. ``inference_types`` are
    what ``merge`` returns when that is a new class (also never sites)."""

    target: ClassVar[str]
    layer: ClassVar[str]
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, tuple[Any, Check]]] = {}
    layer_types: ClassVar[tuple[type, ...]] = ()
    inference_types: ClassVar[tuple[type, ...]] = ()
    leaf_functions: ClassVar[tuple[Callable[..., Any], ...]] = ()  # functions ``call`` inserts (fx leaves)
    adds_parameters: ClassVar[bool] = False  # whether a swapped site gives the model something to train

    def matches(self, site: Site, options: Options, module: nn.Module | None) -> bool | str:
        """True: the method takes the site. False: not this method's kind of site (the next rule is tried, the
        site stays ``keep``). A string: the method declines for that reason (the site is ``skip``ped with it unless
        a later rule takes it). ``module`` is None for functional sites."""
        return True

    def estimate(self, site: Site, options: Options, module: nn.Module | None) -> None:
        """Fill ``site.added_params``, ``added_macs``, ``saved_bytes_before`` and ``saved_bytes_after``."""

    def build(self, site: Site, options: Options, module: nn.Module) -> nn.Module:
        """The module that replaces ``module`` (may be ``module`` itself, changed in place)."""
        raise NotImplementedError(f"method {self.target}/{self.layer} does not replace modules")

    def call(self, site: Site, options: Options, node: torch.fx.Node
             ) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        """``(function, args, kwargs)`` that replaces a graph node (functional sites)."""
        raise NotImplementedError(f"method {self.target}/{self.layer} does not replace function calls")

    def trainable(self, module: nn.Module) -> Iterable[nn.Parameter]:
        """Parameters of a built module that train (everything else stays frozen)."""
        return ()

    def merge(self, module: nn.Module) -> nn.Module:
        """The inference form of a built module (adapters folded, memory tricks undone)."""
        return module


def decline_small_kernel(options: Options, module: nn.Module | None) -> bool | str:
    """``matches`` for depthwise adapters with a ``min_kernel`` option: smaller kernels are declined, with why."""
    if module is None or max(module.kernel_size) >= options["min_kernel"]:  # type: ignore[arg-type]
        return True
    return f"kernel {tuple(module.kernel_size)} is below min_kernel={options['min_kernel']}"  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ option checks
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any) -> str | None:
    return None if is_int(value) and value >= 1 else "expected an integer >= 1"


def optional_positive_int(value: Any) -> str | None:
    return None if value is None else positive_int(value)


def bits(value: Any) -> str | None:
    return None if is_int(value) and value in SUPPORTED_BITS else f"expected one of {list(SUPPORTED_BITS)}"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "expected true or false"


def positive_float(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return None if ok else "expected a number > 0"


def optional_positive_float(value: Any) -> str | None:
    return None if value is None else positive_float(value)


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if is_int(value) and value in choices else f"expected {' or '.join(map(str, choices))}"
    return check


def at_least(minimum: int) -> Check:
    def check(value: Any) -> str | None:
        return None if is_int(value) and value >= minimum else f"expected an integer >= {minimum}"
    return check
