"""Recipes: TOML files that say which sites to replace and with what.

A recipe is a name, a description, optional extra trainable-parameter globs, and a list of rules. Each rule
has a ``target`` (the site family), a ``layer`` (the registered method for it, :mod:`surgeon.methods.registry`),
module-path ``include``/``exclude`` patterns (shell globs, or regular expressions written ``re:<pattern>``) and the
method's options, checked against the method's own option table. Every field is
validated; a problem is a :class:`RecipeError` naming the field.

Recipes also arrive inside artifacts written by others, so patterns are length-capped and regular expressions run
on the ``regex`` engine with a match timeout: a pattern built to backtrack ends in one error, not a hung load.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import regex

from surgeon.errors import RecipeError
from surgeon.methods.base import SITE_TARGETS, Check
from surgeon.methods.registry import get_method, layers_for
from surgeon.ops.package_data import data_dir

MAX_PATTERN_LENGTH = 256
MAX_PATTERNS = 256
MATCH_TIMEOUT_S = 0.25  # a module path is under 200 characters: any sane pattern matches in microseconds


def _patterns(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return "expected a list of non-empty strings"
    if len(value) > MAX_PATTERNS:
        return f"expected at most {MAX_PATTERNS} patterns"
    for pattern in value:
        if len(pattern) > MAX_PATTERN_LENGTH:
            return f"pattern longer than {MAX_PATTERN_LENGTH} characters"
        if pattern.startswith("re:"):
            try:
                regex.compile(pattern[3:])
            except (regex.error, RecursionError, OverflowError) as exc:
                return f"invalid regular expression {pattern[3:]!r}: {exc}"
    return None


# fields every rule has, whatever its method: field -> (default, check)
_COMMON: dict[str, tuple[Any, Check]] = {
    "include": ([], _patterns),
    "exclude": ([], _patterns),
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
        try:
            return regex.fullmatch(pattern[3:], path, timeout=MATCH_TIMEOUT_S) is not None
        except TimeoutError:
            raise RecipeError(f"pattern {pattern[:60]!r} took over {MATCH_TIMEOUT_S} s on module path "
                              f"{path[:80]!r} (a pattern that backtracks); simplify it") from None
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
        if not isinstance(target, str) or target not in SITE_TARGETS or not layers_for(target):
            raise fail(f"{where}.target", f"expected one of {list(SITE_TARGETS)}, got {target!r}")
        layers = layers_for(target)
        layer = raw.get("layer", layers[0])
        if not isinstance(layer, str) or layer not in layers:
            raise fail(f"{where}.layer", f"expected one of {layers} for target {target!r}")
        fields = {**_COMMON, **get_method(target, layer).options}
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
