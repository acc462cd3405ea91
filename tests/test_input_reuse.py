"""Activations computed into their input: only where the graph shows nothing else reads it, with the same values
and gradients as the out-of-place call, and one output-sized tensor less at the forward's peak."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon.methods.s2a.activation import QuantizedActivation, quantized_call
from surgeon.ops.activations import MODULES, inplace_forward, spec_from_module
from surgeon.train.memory import peak_memory

RECIPE = {"name": "activations", "trainable": ["*"], "rules": [{"target": "activation", "layer": "quantized"}]}


class ModuleMlp(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 64), act, nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FunctionalMlp(ModuleMlp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class ReadTwice(ModuleMlp):
    """The pre-activation is read again after the activation: overwriting it would change the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.act(h) + h)


class ViewInput(ModuleMlp):
    """The activation's input is a view of a tensor that is read again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.act(h.view(-1, 64)).view_as(h) * h)


class SharedActivation(ModuleMlp):
    """One activation module called twice: once on a fresh tensor, once on the model's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.act(x))))


def _reuse_by_path(model: nn.Module) -> dict[str, bool]:
    plan = surgeon.plan(model, RECIPE, example_input=torch.randn(2, 16))
    return {site.path: site.input_reusable for site in plan.sites if site.target == "activation"}


def test_graph_decides_where_an_input_may_be_overwritten():
    assert _reuse_by_path(ModuleMlp(nn.GELU())) == {"act": True}
    assert list(_reuse_by_path(FunctionalMlp(nn.GELU())).items())[-1][1] is True  # the F.silu call
    assert _reuse_by_path(ReadTwice(nn.GELU())) == {"act": False}
    assert _reuse_by_path(ViewInput(nn.GELU())) == {"act": False}
    assert _reuse_by_path(SharedActivation(nn.GELU())) == {"act": False}


@pytest.mark.parametrize("module", [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2), nn.Hardtanh(-2.0, 3.0),
                                    nn.Hardsigmoid(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(),
                                    nn.Hardswish(), nn.Mish(), nn.Sigmoid(), nn.Tanh()],
                         ids=lambda m: repr(m))
def test_inplace_forms_compute_the_module_values(seeded, module):
    x = torch.randn(64, 3000) * 4
    into = inplace_forward(spec_from_module(module))
    assert into is not None
    target = x.clone()
    out = into(target)
    assert out.data_ptr() == target.data_ptr()
    assert torch.equal(out, module(x))


def test_softmax_has_no_inplace_form():
    assert inplace_forward(spec_from_module(nn.Softmax(dim=-1))) is None


@pytest.mark.parametrize("model_class", [ModuleMlp, FunctionalMlp])
def test_converted_model_same_outputs_and_gradients(seeded, model_class):
    act = nn.GELU if model_class is ModuleMlp else nn.Identity  # FunctionalMlp calls F.silu itself
    original = model_class(act()).train()
    converted = surgeon.convert(model_class(act()), RECIPE, example_input=torch.randn(2, 16))
    converted.load_state_dict(original.state_dict())
    if model_class is ModuleMlp:
        assert converted.act.reuse_input
    else:
        calls = [n for n in converted.graph.nodes if n.target is quantized_call]
        assert len(calls) == 1 and calls[0].args[6] is True  # quantized_call's reuse_input
    x = torch.randn(32, 16)
    want = original(x)
    got = converted(x)
    assert torch.equal(got, want)
    got.sum().backward()
    # gradients: the same as the same conversion computing out of place
    reference = surgeon.convert(model_class(act()), RECIPE, example_input=torch.randn(2, 16))
    reference.load_state_dict(original.state_dict())
    if model_class is ModuleMlp:
        reference.act.reuse_input = False
    else:
        (call,) = [n for n in reference.graph.nodes if n.target is quantized_call]
        call.args = (*call.args[:6], False, *call.args[7:])
        reference.recompile()
    reference(x).sum().backward()
    for (name, a), (_, b) in zip(converted.named_parameters(), reference.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_only_registered_classes_compute_in_place():
    class ScaledGELU(nn.GELU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    assert ScaledGELU not in MODULES
    converted = surgeon.convert(ModuleMlp(ScaledGELU()), RECIPE, example_input=torch.randn(2, 16))
    assert not converted.act.reuse_input
    h = converted.fc1(torch.randn(4, 16))
    assert torch.equal(converted.act(h), 2 * F.gelu(h))  # the subclass's own forward ran


def test_reuse_saves_one_output_at_the_forward_peak(seeded):
    """GELU on a 4096 x 2048 pre-activation: computing into it allocates no second tensor of that size."""
    fc = nn.Linear(256, 2048)
    fc.weight.requires_grad_(False)
    x = torch.randn(4096, 256)
    act_bytes = 4096 * 2048 * 4
    peaks = {}
    for reuse in (False, True):
        layer = QuantizedActivation(nn.GELU(), spec_from_module(nn.GELU()), bits=4, reuse_input=reuse)
        peaks[reuse] = peak_memory(lambda layer=layer: layer(fc(x)), [x, *fc.parameters()]).rise
    assert peaks[False] >= 2 * act_bytes  # pre-activation and output
    # one pre-activation, its 4-bit codes and the packer's chunk-sized temporaries (a few MB)
    assert peaks[True] <= 1.4 * act_bytes
