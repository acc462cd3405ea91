"""Recipes: TOML files that say which sites to replace and with what.

A recipe is a name, a description, optional extra trainable-parameter globs, and a list of rules. Each rule
has a ``target`` (the site family), a ``layer`` (the replacement family), module-path ``include``/``exclude``
patterns (shell globs, or regular expressions written ``re:<pattern>``) and the layer's options. Every field is
validated; a problem is a :class:`RecipeError` naming the field.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgeon.errors import RecipeError
from surgeon.ops.activations import DERIVATIVE_OPS, MASK_OPS, OUTPUT_OPS
from surgeon.ops.bitpack import SUPPORTED_BITS
from surgeon.ops.package_data import data_dir

RECIPE_OPS = MASK_OPS + DERIVATIVE_OPS + OUTPUT_OPS
TARGET_LAYERS = {"depthwise_conv": ("quadratic", "linear"), "activation": ("quantized",), "conv": ("input_free",),
                 "norm": ("frozen",), "gate": ("quantized",), "matmul": ("quantized",)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> str | None:
    return None if _is_int(value) and value >= 1 else "expected an integer >= 1"


def _optional_positive_int(value: Any) -> str | None:
    return None if value is None else _positive_int(value)


def _bits(value: Any) -> str | None:
    return None if _is_int(value) and value in SUPPORTED_BITS else f"expected one of {list(SUPPORTED_BITS)}"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "expected true or false"


def _positive_float(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return None if ok else "expected a number > 0"


def _optional_positive_float(value: Any) -> str | None:
    return None if value is None else _positive_float(value)


def _patterns(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return "expected a list of non-empty strings"
    for pattern in value:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                return f"invalid regular expression {pattern[3:]!r}: {exc}"
    return None


def _ops(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of ops from {list(RECIPE_OPS)}"
    unknown = [v for v in value if v not in RECIPE_OPS]
    return f"unknown op(s) {unknown}; known: {list(RECIPE_OPS)}" if unknown else None


def _saved_bits(value: Any) -> str | None:
    return None if _is_int(value) and value in (8, 32) else "expected 8 or 32"


def _group_size(value: Any) -> str | None:
    return None if _is_int(value) and value >= 8 else "expected an integer >= 8"


Check = Callable[[Any], "str | None"]

# field -> (default, check). A default of ... means required.
_COMMON: dict[str, tuple[Any, Check]] = {
    "include": ([], _patterns),
    "exclude": ([], _patterns),
}
_LAYER_FIELDS: dict[tuple[str, str], dict[str, tuple[Any, Check]]] = {
    ("depthwise_conv", "quadratic"): {
        "rank": (1, _positive_int),
        "a_kernel": (None, _optional_positive_int),
        "a_dilation": (None, _optional_positive_int),
        "b_kernel": (None, _optional_positive_int),
        "b_dilation": (None, _optional_positive_int),
        "b_init_std": (None, _optional_positive_float),
        "train_bias": (False, _bool),
        "keep_branches": (False, _bool),
        "min_kernel": (2, _positive_int),
        "saved_input_bits": (32, _saved_bits),
    },
    ("depthwise_conv", "linear"): {
        "min_kernel": (2, _positive_int),
    },
    ("conv", "input_free"): {},
    ("gate", "quantized"): {
        "bits": (8, _bits),
    },
    ("matmul", "quantized"): {
        "bits": (8, _bits),
        "probability_bits": (4, _bits),
    },
    ("norm", "frozen"): {
        "batchnorm": (True, _bool),
        "layernorm": (True, _bool),
        "layernorm_bits": (8, _bits),
    },
    ("activation", "quantized"): {
        "ops": (list(RECIPE_OPS), _ops),
        "bits": (4, _bits),
        "output_bits": (4, _bits),
        "group_size": (128, _group_size),
        "attention": (True, _bool),
        "attention_input_bits": (32, _saved_bits),
    },
}


@dataclass(frozen=True)
class Rule:
    """One rule: which sites (target + patterns) get which layer, with which options."""

    target: str
    layer: str
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str) -> Any:
        return self.options[name]

    def selects(self, path: str) -> bool:
        """Whether a module path passes this rule's include/exclude patterns."""
        if self.include and not any(match_pattern(p, path) for p in self.include):
            return False
        return not any(match_pattern(p, path) for p in self.exclude)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    trainable: list[str] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Fully resolved form (every default filled in); stored in saved artifacts."""
        data = asdict(self)
        data["rules"] = [{"target": r.target, "layer": r.layer, "include": r.include, "exclude": r.exclude,
                          **r.options} for r in self.rules]
        return data


def match_pattern(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; raise :class:`RecipeError` naming the first bad field."""

    def fail(name: str, problem: str) -> RecipeError:
        return RecipeError(f"{source}: field '{name}': {problem}")

    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a table at the top level")
    known = {"name", "description", "trainable", "rules"}
    for key in data:
        if key not in known:
            raise fail(key, f"unknown field (known: {sorted(known)})")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise fail("name", "expected a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "expected a string")
    trainable = data.get("trainable", [])
    if (problem := _patterns(trainable)) is not None:
        raise fail("trainable", problem)
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list) or not (raw_rules or trainable):
        raise fail("rules", "expected at least one [[rules]] table (or a 'trainable' list)")
    rules = []
    for index, raw in enumerate(raw_rules):
        where = f"rules[{index}]"
        if not isinstance(raw, dict):
            raise fail(where, "expected a table")
        target = raw.get("target")
        if not isinstance(target, str) or target not in TARGET_LAYERS:
            raise fail(f"{where}.target", f"expected one of {list(TARGET_LAYERS)}, got {target!r}")
        layer = raw.get("layer", TARGET_LAYERS[target][0])
        if not isinstance(layer, str) or layer not in TARGET_LAYERS[target]:
            raise fail(f"{where}.layer", f"expected one of {list(TARGET_LAYERS[target])} for target {target!r}")
        fields = {**_COMMON, **_LAYER_FIELDS[(target, layer)]}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key in ("target", "layer"):
                continue
            if key not in fields:
                raise fail(f"{where}.{key}", f"unknown field for {target}/{layer} (known: {sorted(fields)})")
            if (problem := fields[key][1](value)) is not None:
                raise fail(f"{where}.{key}", f"{problem}, got {value!r}")
            values[key] = value
        for key, (default, _) in fields.items():
            values.setdefault(key, list(default) if isinstance(default, list) else default)
        include, exclude = values.pop("include"), values.pop("exclude")
        rules.append(Rule(target=target, layer=layer, include=include, exclude=exclude, options=values))
    return Recipe(name=name, description=description, trainable=list(trainable), rules=rules)


def builtin_recipes() -> dict[str, str]:
    """Names of the recipes shipped with the package, mapped to their TOML text."""
    folder = data_dir("recipes")
    return {entry.name[: -len(".toml")]: entry.read_text(encoding="utf-8")
            for entry in folder.iterdir() if entry.name.endswith(".toml")}


def load_recipe(recipe: str | Path | Recipe | dict[str, Any]) -> Recipe:
    """A recipe from a shipped name, a TOML file path, a mapping, or a :class:`Recipe` (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    text: str
    source = str(recipe)
    shipped = builtin_recipes()
    if isinstance(recipe, str) and recipe in shipped:
        text = shipped[recipe]
        source = f"recipe '{recipe}'"
    else:
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe {source!r} is neither a shipped recipe ({', '.join(sorted(shipped))}) "
                              "nor a readable file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"recipe file {source}: cannot read: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{source}: invalid TOML: {exc}") from exc
    return parse_recipe(data, source)
