"""The rewrite engine on hand-written models: every form of site, shared and inplace modules, leaves,
untraceable blocks, patterns, and state_dict keys that do not change."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

import surgeon
from surgeon.errors import RecipeError
from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d
from surgeon.methods.s2a.activation import QuantizedActivation


class Attention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


@register_notrace_module
class DataDependent(nn.Module):
    """fx cannot trace this (Python branch on a tensor value), so it is registered as a leaf the way timm does
    for its own such blocks; its activation is still found at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 100:
            return x
        return torch.tanh(x) * self.scale


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.ReLU(inplace=True)  # shared: called twice
        self.dw = nn.Conv2d(16, 16, 5, padding=2, groups=16)
        self.dw_stride = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.pw = nn.Conv2d(16, 16, 1)
        self.dw_1x1 = nn.Conv2d(16, 16, 1, groups=16)
        self.odd = DataDependent()
        self.attn = Attention()
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = F.gelu(self.dw(x), approximate="tanh")
        x = self.act(self.pw(x))
        x = x * self.dw_stride(x).sigmoid().mean() + F.silu(self.dw_1x1(x))
        x = self.odd(x)
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(tokens)
        logits = self.head(F.hardswish(tokens).mean(1))
        return F.softmax(logits, dim=-1) + logits.relu()


@pytest.fixture()
def custom() -> Custom:
    torch.manual_seed(0)
    return Custom().eval()


def test_every_site_is_listed(custom):
    plan = surgeon.plan(custom, "quadranet-v2-s2a", example_input=torch.randn(1, 3, 16, 16))
    by_path = {s.path: s for s in plan.sites}
    assert by_path["act"].access == "call_module" and by_path["act"].calls == 2
    assert by_path["dw"].action == "swap" and by_path["dw_stride"].action == "swap"
    # a 1x1 depthwise conv is not made quadratic; the memory rule for frozen convs takes it instead
    assert by_path["dw_1x1"].action == "swap" and plan.recipe.rules[by_path["dw_1x1"].rule].target == "conv"
    only_quadratic = surgeon.plan(custom, "quadranet-v2", example_input=torch.randn(1, 3, 16, 16))
    dw_1x1 = next(s for s in only_quadratic.sites if s.path == "dw_1x1")
    assert dw_1x1.action == "skip" and "min_kernel" in dw_1x1.reason
    assert by_path["::gelu#0"].access == "call_function"
    assert by_path["::sigmoid#0"].access == "call_method"
    assert by_path["::relu#0"].access == "call_method"
    assert by_path["::softmax#0"].spec.param("dim") == -1
    assert by_path["attn::scaled_dot_product_attention#0"].action == "swap"
    assert by_path["odd::tanh#0"].access == "hidden_function"
    assert by_path["odd::tanh#0"].action == "unreachable" and "could not be traced" in by_path["odd::tanh#0"].reason
    assert plan.warnings == []
    assert "unreachable" in str(plan) and plan.to_dict()["summary"]["actions"]["unreachable"] == 1


def test_convert_exact_and_structure(custom):
    x = torch.randn(2, 3, 16, 16)
    keys_before = set(custom.state_dict())
    converted = surgeon.convert(custom, "quadranet-v2-s2a", example_input=x[:1])
    assert isinstance(converted.dw, QuadraticDepthwiseConv2d)
    assert isinstance(converted.act, QuantizedActivation)
    assert isinstance(converted.attn, torch.fx.GraphModule)  # only the owner of the functional call
    assert isinstance(converted.odd, DataDependent)
    # the root had functional calls, so it is the only other GraphModule
    assert isinstance(converted, torch.fx.GraphModule)
    assert not isinstance(converted.stem, torch.fx.GraphModule)
    new_keys = set(converted.state_dict())
    assert keys_before <= new_keys
    assert new_keys - keys_before == {"dw.weight_a", "dw.weight_b", "dw_stride.weight_a", "dw_stride.weight_b"}
    with torch.no_grad():
        assert torch.equal(converted(x), custom(x))
    assert custom.act.__class__ is nn.ReLU  # the original is untouched
    trainable = surgeon.trainable_parameters(converted)
    assert set(trainable) == {"dw.weight_a", "dw.weight_b", "dw_stride.weight_a", "dw_stride.weight_b"}


def test_training_step_reaches_adapters(custom):
    converted = surgeon.convert(custom, "quadranet-v2-s2a", example_input=torch.randn(1, 3, 16, 16)).train()
    converted.stem.weight.requires_grad_(True)  # make the whole network backward through every S2A layer
    loss = converted(torch.randn(4, 3, 16, 16)).logsumexp(-1).mean()
    loss.backward()
    for name, param in surgeon.trainable_parameters(converted).items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert converted.dw.weight_a.grad.abs().sum() > 0
    assert converted.stem.weight.grad.abs().sum() > 0


def test_patterns_and_ops_select_sites(custom):
    recipe = {"name": "t", "rules": [
        {"target": "depthwise_conv", "include": ["dw*"], "exclude": ["re:dw_s.*"]},
        {"target": "activation", "ops": ["relu"], "include": ["act"]},
    ]}
    plan = surgeon.plan(custom, recipe, example_input=torch.randn(1, 3, 16, 16))
    actions = {s.path: s.action for s in plan.sites}
    assert actions["dw"] == "swap" and actions["dw_stride"] == "skip"
    assert actions["act"] == "swap" and actions["::relu#0"] == "skip" and actions["::gelu#0"] == "keep"


def test_include_pattern_matching_nothing_is_an_error(custom):
    recipe = {"name": "t", "rules": [{"target": "depthwise_conv", "include": ["blocks.*"]}]}
    with pytest.raises(RecipeError, match=r"rules\[0\]\.include"):
        surgeon.plan(custom, recipe, example_input=torch.randn(1, 3, 16, 16))


def test_shared_module_registered_under_two_paths():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), relu, nn.Conv2d(4, 4, 3, groups=4), relu)
    converted = surgeon.convert(model, "s2a", example_input=torch.randn(1, 3, 12, 12))
    assert converted[1] is converted[3] and isinstance(converted[1], QuantizedActivation)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_model_without_trace_falls_back_to_module_tree():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.act = nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.act(self.dw(x))
            return self.act(self.dw(-x))

    model = Untraceable().eval()
    x = torch.randn(2, 4, 8, 8)
    plan = surgeon.plan(model, "quadranet-v2-s2a", example_input=x)
    assert any("falling back" in w for w in plan.warnings)
    assert {s.path: s.access for s in plan.sites} == {"dw": "module_tree", "act": "module_tree"}
    converted = surgeon.convert(model, "quadranet-v2-s2a", example_input=x)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_conv_subclass_is_reported_not_swapped():
    class WeightStandardized(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    model = nn.Sequential(WeightStandardized(4, 4, 3, padding=1, groups=4))
    plan = surgeon.plan(model, "quadranet-v2", example_input=torch.randn(1, 4, 8, 8))
    assert plan.sites[0].action == "unreachable" and "own forward" in plan.sites[0].reason


def test_inplace_activation_keeps_aliasing():
    class AliasUser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 1.0
            self.act(y)
            return y  # relies on the in-place update

    model = AliasUser()
    converted = surgeon.convert(model, "s2a", example_input=torch.randn(1, 3, 4, 4))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = converted(x)
    assert torch.equal(out, x.relu())
    out.sum().backward()
    assert torch.equal(x.grad, (x > 0).float())


class TrainingBranches(nn.Module):
    """Python branches on ``self.training`` inside a rewritten owner, as timm's attention has."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.dw(self.stem(x)))
        x = F.dropout(x, 0.5, self.training)
        tokens = x.flatten(2).transpose(1, 2).reshape(x.shape[0], 1, -1, 8)
        tokens = F.scaled_dot_product_attention(tokens, tokens, tokens, dropout_p=0.5 if self.training else 0.0)
        return self.head(tokens.mean((1, 2)))


@pytest.mark.parametrize("converted_in", ["eval", "train"])
def test_training_branches_follow_the_mode_after_conversion_and_reload(tmp_path, converted_in):
    torch.manual_seed(0)
    base = TrainingBranches().train(converted_in == "train")
    converted = surgeon.convert(base, "quadranet-v2-s2a", example_input=torch.randn(1, 3, 6, 6))
    surgeon.save(converted, tmp_path / "art")
    reloaded = surgeon.load(tmp_path / "art", model=TrainingBranches())
    x = torch.randn(2, 3, 6, 6)
    base.eval()
    with torch.no_grad():
        for model in (converted, reloaded):  # eval: exact, no dropout
            assert torch.equal(model.eval()(x), base(x))
    outputs = {}
    for name, model in (("converted", converted), ("reloaded", reloaded)):
        model.train()
        torch.manual_seed(7)
        outputs[name] = model(x)
    assert torch.equal(outputs["converted"], outputs["reloaded"])  # the reloaded model trains as the saved one
    with torch.no_grad():
        assert not torch.allclose(outputs["converted"], converted.eval()(x))  # dropout is live in training
    with torch.no_grad():  # without autograd the converted model calls the very same ops as the original
        torch.manual_seed(7)
        want = base.train()(x)
        torch.manual_seed(7)
        assert torch.equal(converted.train()(x), want)
