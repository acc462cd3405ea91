"""Decisions: what a recipe does at each site. Rules are tried in order and the first whose method takes the site
wins; each site ends up ``swap``, ``skip`` (a rule or its method declines it, reason given), ``keep`` (no rule
targets it) or ``unreachable`` (a rule wants it but it cannot be replaced, reason given)."""

from __future__ import annotations

from torch import nn

from surgeon.errors import RecipeError
from surgeon.graph.discovery import Analysis
from surgeon.methods.base import Site
from surgeon.methods.registry import get_method
from surgeon.recipe import Recipe, Rule, match_pattern


def rule_targets(rule: Rule, site: Site) -> bool:
    """A ``conv`` rule also covers depthwise convs that no depthwise rule took."""
    return rule.target == site.target or (rule.target == "conv" and site.target == "depthwise_conv")


def _alias_selected(rule: Rule, site: Site) -> bool:
    return any(rule.selects(alias) for alias in site.aliases if alias != site.path)


def decide(analysis: Analysis, model: nn.Module, recipe: Recipe) -> None:
    """Apply the recipe's rules to every site (first matching rule wins) and estimate each swap's cost."""
    modules_by_path = dict(model.named_modules(remove_duplicate=False))
    for index, rule in enumerate(recipe.rules):
        names = [name for site in analysis.sites if site.target == rule.target for name in (site.path, *site.aliases)]
        for pattern in rule.include:
            if not any(match_pattern(pattern, name) for name in names):
                raise RecipeError(f"recipe field 'rules[{index}].include': pattern {pattern!r} matches no "
                                  f"{rule.target} site")
    for site in analysis.sites:
        module = modules_by_path.get(site.path) if site.owner is None else None
        skipped = ""
        for index, rule in enumerate(recipe.rules):
            if not rule_targets(rule, site):
                continue
            method = get_method(rule.target, rule.layer)
            verdict = method.matches(site, rule.options, module)
            if verdict is False:
                continue
            if not (rule.selects(site.path) or _alias_selected(rule, site)):
                skipped = skipped or f"excluded by rules[{index}] patterns"
                continue
            if isinstance(verdict, str):
                skipped = verdict
                continue
            site.rule = index
            if site.blocker:
                site.action, site.reason = "unreachable", site.blocker
                break
            site.action, site.reason = "swap", ""
            method.estimate(site, rule.options, module)
            break
        if site.rule is None and skipped:
            site.action, site.reason = "skip", skipped
