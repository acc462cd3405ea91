"""A method written outside the package: a zero-initialised per-channel 1x1 side branch on every depthwise conv.

It registers through the public API only and goes through the whole pipeline - recipe validation, plan, exact
conversion, training, merging (folded into the conv's centre tap), saving and loading - with no change to
surgeon's code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import surgeon
from surgeon.methods.base import Method, Options, Site, positive_int
from surgeon.methods.registry import unregister_method


class SideBranchConv(nn.Module):
    """``conv(x) + side(x)``: the frozen depthwise conv plus a per-channel 1x1 conv with the same stride."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.side = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, groups=conv.groups,
                              bias=False)
        nn.init.zeros_(self.side.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.side(x)


class SideBranchMethod(Method):
    target = "depthwise_conv"
    layer = "side_branch"
    options: ClassVar[dict[str, Any]] = {"min_channels": (1, positive_int)}
    layer_types = (SideBranchConv,)
    adds_parameters = True

    def matches(self, site: Site, options: Options, module: nn.Module | None) -> bool | str:
        if module is None:
            return True
        centred = all(k % 2 == 1 and p == d * (k - 1) // 2
                      for k, p, d in zip(module.kernel_size, module.padding, module.dilation))
        if not centred:
            return "the 1x1 branch only lines up with the centre tap of an odd, symmetrically padded kernel"
        if module.in_channels < options["min_channels"]:
            return f"fewer than {options['min_channels']} channels"
        return True

    def estimate(self, site: Site, options: Options, module: Any) -> None:
        site.added_params = module.in_channels
        site.added_macs = site.numel // max(module.stride[0] * module.stride[1], 1)

    def build(self, site: Site, options: Options, module: nn.Module) -> nn.Module:
        return SideBranchConv(module)

    def trainable(self, module: nn.Module) -> Iterable[nn.Parameter]:
        yield module.side.weight

    def merge(self, module: nn.Module) -> nn.Module:
        conv = module.conv
        centre = tuple((k - 1) // 2 for k in conv.kernel_size)
        with torch.no_grad():
            conv.weight[:, :, centre[0], centre[1]] += module.side.weight[:, :, 0, 0]
        return conv


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw_strided = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8)
        self.dw_even = nn.Conv2d(8, 8, 4, padding="same", groups=8)  # declined: no centre tap
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.act(self.dw(x))
        x = self.act(self.dw_even(self.dw_strided(x)))
        return self.head(x.mean((2, 3)))


RECIPE = {"name": "side-branch", "rules": [{"target": "depthwise_conv", "layer": "side_branch"},
                                           {"target": "activation", "layer": "quantized"}]}


@pytest.fixture
def side_branch() -> Iterator[None]:
    surgeon.register_method(SideBranchMethod)
    yield
    unregister_method("depthwise_conv", "side_branch")


def test_registration_refuses_a_taken_name_and_unknown_targets(side_branch):
    with pytest.raises(ValueError, match="already registered"):
        surgeon.register_method(SideBranchMethod)

    class Nowhere(SideBranchMethod):
        target = "pooling"

    with pytest.raises(ValueError, match="target must be one of"):
        surgeon.register_method(Nowhere)


def test_recipes_validate_a_registered_methods_options(side_branch):
    rule = {"target": "depthwise_conv", "layer": "side_branch", "min_channels": 0}
    with pytest.raises(surgeon.RecipeError, match=r"rules\[0\].min_channels"):
        surgeon.load_recipe({"name": "x", "rules": [rule]})
    resolved = surgeon.load_recipe(RECIPE)
    assert resolved.rules[0].options == {"min_channels": 1}


def test_an_unregistered_method_is_a_recipe_error():
    with pytest.raises(surgeon.RecipeError, match=r"expected one of .*quadratic"):
        surgeon.load_recipe(RECIPE)


def test_custom_method_plans_converts_trains_and_merges(side_branch, tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 3, 16, 16)

    plan = surgeon.plan(model, RECIPE, example_input=x[:1])
    by_path = {site.path: site for site in plan.sites}
    assert by_path["dw"].action == by_path["dw_strided"].action == "swap"
    assert by_path["dw"].added_params == 8
    assert by_path["dw_even"].action == "skip" and "centre tap" in by_path["dw_even"].reason
    assert by_path["act"].action == "swap"  # built-in methods still apply beside the custom one

    converted = surgeon.convert(model, RECIPE, example_input=x[:1])
    assert isinstance(converted.dw, SideBranchConv) and isinstance(converted.dw_strided, SideBranchConv)
    assert type(converted.dw_even) is nn.Conv2d
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))  # zero-initialised branch: exact
    trainable = surgeon.trainable_parameters(converted)
    assert sorted(trainable) == ["dw.side.weight", "dw_strided.side.weight"]

    converted.train()
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    target = torch.tensor([0, 1, 2, 0])
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(converted(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert converted.dw.side.weight.abs().sum() > 0
    assert torch.equal(converted.dw.conv.weight, model.dw.weight)  # the frozen kernel did not move

    merged = surgeon.merge(converted.eval(), example_input=x)
    assert not any(isinstance(m, SideBranchConv) for m in merged.modules())
    assert type(merged) is Net and type(merged.dw) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(merged(x), converted(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(x), model(x))  # the adaptation survived the merge

    surgeon.save_merged(merged, tmp_path / "merged")
    reloaded = surgeon.load(tmp_path / "merged", model=Net())
    with torch.no_grad():
        assert torch.equal(reloaded(x), merged(x))
