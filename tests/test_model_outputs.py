"""Models whose forward returns a structure, not a tensor (a tuple, a dict, a Hugging Face ``ModelOutput``-like
ordered dict with a ``logits`` field): conversion checks, training, merge verification and export all work on
the tensor leaves, and the logits are ``.logits`` where there is one, else the first tensor."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import surgeon
from surgeon.cli.app import app
from surgeon.ops.model_outputs import logits, max_difference, tensor_leaves
from surgeon.version import __version__


class ClassifierOutput(OrderedDict):
    """Shaped like transformers' ``ImageClassifierOutputWithNoAttention``: an ordered dict with attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class StructuredNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor):
        features = torch.relu(self.dw(torch.relu(self.stem(x))))
        pooled = features.mean((2, 3))
        scores = self.head(pooled)
        if self.kind == "tuple":
            return scores, pooled
        if self.kind == "dict":
            return {"pooled": pooled, "logits": scores}
        return ClassifierOutput(logits=scores, hidden=pooled)


def test_leaves_and_logits_of_every_structure():
    a, b = torch.randn(2, 5), torch.randn(2, 3)
    assert logits(a) is a
    assert logits((a, b)) is a
    assert logits({"pooled": b, "logits": a}) is a  # the field, not the first tensor
    assert logits(ClassifierOutput(logits=a, hidden=b)) is a
    assert [t is x for t, x in zip(tensor_leaves({"x": (a, [b]), "n": None}), (a, b))] == [True, True]
    with pytest.raises(TypeError, match="no tensor"):
        logits({"n": None})
    peak = max(a.abs().max().item(), b.abs().max().item())  # over every leaf of the reference
    assert max_difference((a, b), (a + 1, b)) == (pytest.approx(1.0), pytest.approx(peak))
    with pytest.raises(ValueError, match="structure"):
        max_difference((a, b), (a,))


@pytest.mark.parametrize("kind", ["tuple", "dict", "model_output"])
def test_a_structured_model_converts_trains_and_merges(kind, seeded):
    model = StructuredNet(kind).eval()
    x = torch.randn(2, 3, 16, 16)
    converted = surgeon.convert(model, "quadranet-v2", example_input=x)
    assert surgeon.output_difference(model, converted, x)["max_abs_diff"] == 0.0
    optimizer = torch.optim.SGD([p for p in converted.parameters() if p.requires_grad], lr=0.5)
    converted.train()
    nn.functional.cross_entropy(logits(converted(x)), torch.tensor([1, 3])).backward()
    optimizer.step()
    converted.eval()
    merged = surgeon.merge(converted, example_input=x)
    check = surgeon.output_difference(converted, merged, x)
    assert check["relative"] <= 1e-5
    assert surgeon.output_difference(model, merged, x)["max_abs_diff"] > 0  # the trained adapter shows


def test_version_option():
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"surgeon {__version__}"
