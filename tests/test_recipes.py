"""Recipes: shipped ones are valid; every bad field is a one-line error naming it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgeon
from surgeon.errors import RecipeError
from surgeon.recipe import builtin_recipes, load_recipe, parse_recipe


def test_shipped_recipes():
    shipped = builtin_recipes()
    assert {"quadranet-v2", "s2a", "quadranet-v2-s2a"} <= set(shipped)
    for name in shipped:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.rules
    assert [r.target for r in load_recipe("quadranet-v2-s2a").rules] == ["depthwise_conv", "activation", "conv", "norm",
                                                                         "gate", "matmul"]


@pytest.mark.parametrize("data,field", [
    ({"name": "x", "rules": [{"target": "depthwise_conv", "rnk": 2}]}, "rules[0].rnk"),
    ({"name": "x", "rules": [{"target": "depthwise_conv", "rank": -1}]}, "rules[0].rank"),
    ({"name": "x", "rules": [{"target": "depthwise_conv", "rank": True}]}, "rules[0].rank"),
    ({"name": "x", "rules": [{"target": "activation", "bits": 3}]}, "rules[0].bits"),
    ({"name": "x", "rules": [{"target": "activation", "ops": ["swish"]}]}, "rules[0].ops"),
    ({"name": "x", "rules": [{"target": "activation", "ops": []}]}, "rules[0].ops"),
    ({"name": "x", "rules": [{"target": "convolution"}]}, "rules[0].target"),
    ({"name": "x", "rules": [{"target": "norm", "layernorm_bits": 16}]}, "rules[0].layernorm_bits"),
    ({"name": "x", "rules": [{"target": "depthwise_conv", "saved_input_bits": 4}]}, "rules[0].saved_input_bits"),
    ({"name": "x", "rules": [{"target": "activation", "layer": "quadratic"}]}, "rules[0].layer"),
    ({"name": "x", "rules": [{"target": "activation", "include": ["re:("]}]}, "rules[0].include"),
    ({"name": "x", "rules": []}, "rules"),
    ({"rules": [{"target": "activation"}]}, "name"),
    ({"name": "x", "colour": 1, "rules": [{"target": "activation"}]}, "colour"),
    ({"name": "x", "trainable": "head", "rules": [{"target": "activation"}]}, "trainable"),
])
def test_bad_fields_are_named(data, field):
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, "test.toml")
    message = str(info.value)
    assert f"'{field}'" in message and "\n" not in message


def test_recipe_file_and_toml_errors(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('name = "mine"\n[[rules]]\ntarget = "depthwise_conv"\nrank = 2\n')
    assert load_recipe(good).rules[0].option("rank") == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="neither a shipped recipe"):
        load_recipe(tmp_path / "missing.toml")


def test_span_larger_than_kernel_names_the_field():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4))
    recipe = {"name": "x", "rules": [{"target": "depthwise_conv", "a_kernel": 3, "a_dilation": 2}]}
    with pytest.raises(RecipeError, match="a_dilation"):
        surgeon.plan(model, recipe, example_input=torch.randn(1, 4, 8, 8))


def test_custom_branch_options_convert_exactly():
    model = nn.Sequential(nn.Conv2d(4, 4, 7, padding=3, groups=4)).eval()
    recipe = {"name": "x", "trainable": ["0.bias"], "rules": [
        {"target": "depthwise_conv", "rank": 2, "a_kernel": 3, "a_dilation": 3, "b_kernel": 3, "b_dilation": 2,
         "keep_branches": True}]}
    converted = surgeon.convert(model, recipe, example_input=torch.randn(1, 4, 9, 9))
    layer = converted[0]
    assert layer.branch_a.kernel == (3, 3) and layer.branch_a.dilation == (3, 3)
    assert layer.branch_b.kernel == (3, 3) and layer.branch_b.dilation == (2, 2)
    assert layer.bias.requires_grad
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
