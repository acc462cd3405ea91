"""Mixed precision: a bf16-autocast training step runs through every custom autograd function of surgeon and gives
the gradients of the fp32 step within bf16 precision, each in its parameter's dtype."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon.methods.quadratic.layer import _QuadraticDepthwiseFn
from surgeon.methods.s2a.activation import _QuantizedActivationFn
from surgeon.methods.s2a.attention import _QuantizedAttentionFn
from surgeon.methods.s2a.gate import _GatedMultiplyFn
from surgeon.methods.s2a.matmul import _QuantizedMatmulFn
from surgeon.methods.s2a.variants import _FrozenBatchNormFn, _InputFreeConvFn, _QuantizedLayerNormFn

CUSTOM_FUNCTIONS = (_QuadraticDepthwiseFn, _InputFreeConvFn, _FrozenBatchNormFn, _QuantizedLayerNormFn,
                    _QuantizedActivationFn, _QuantizedAttentionFn, _GatedMultiplyFn, _QuantizedMatmulFn)


class EveryLayer(nn.Module):
    """Frozen conv + BatchNorm, depthwise conv, ReLU, GELU, a squeeze-excitation gate, LayerNorm, fused attention
    and explicit attention (``q @ k.T``, softmax, ``attn @ v``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 5, padding=2, groups=16)
        self.se = nn.Conv2d(16, 16, 1)
        self.gate = nn.Sigmoid()
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 96)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.gelu(self.dw(x))
        x = x * self.gate(self.se(x.mean((2, 3), keepdim=True)))
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        q, k, v = self.qkv(tokens).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v)
        explicit = (q * 0.25 @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.head((attended + explicit).transpose(1, 2).flatten(2).mean(1))


def converted_model() -> nn.Module:
    torch.manual_seed(0)
    model = EveryLayer().eval()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    converted = surgeon.convert(model, {"name": "everything", "trainable": ["head.*", "norm.*"], "rules": [
        {"target": "depthwise_conv", "layer": "quadratic", "saved_input_bits": 8},
        {"target": "activation", "layer": "quantized", "attention_input_bits": 8},
        {"target": "conv", "layer": "input_free"}, {"target": "norm", "layer": "frozen"},
        {"target": "gate", "layer": "quantized"}, {"target": "matmul", "layer": "quantized"}]},
        example_input=torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        converted.dw.weight_a.normal_(0, 0.1)
    return converted.train()


def gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: torch.dtype | None
              ) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)  # an input that needs its gradient: every frozen layer passes one back
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = F.cross_entropy(model(x), target)
    loss.backward()
    return {"input": x.grad, **{name: p.grad for name, p in model.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_step_through_every_custom_function(dtype):
    model = converted_model()
    x, target = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    applied: list[type] = []
    originals = {fn: fn.apply for fn in CUSTOM_FUNCTIONS}

    def spy(fn: type):
        def apply(*args, **kwargs):
            applied.append(fn)
            return originals[fn](*args, **kwargs)
        return apply

    for fn in CUSTOM_FUNCTIONS:
        fn.apply = spy(fn)
    try:
        want = gradients(model, x, target, None)
        applied.clear()
        got = gradients(model, x, target, dtype)
    finally:
        for fn, apply in originals.items():
            fn.apply = apply
    assert set(applied) == set(CUSTOM_FUNCTIONS)  # the low-precision step went through every one of them
    assert set(got) == set(want) and len(got) == 7
    for name, grad in got.items():
        assert grad.dtype == (x if name == "input" else model.get_parameter(name)).dtype, name
        assert torch.isfinite(grad).all(), name
        error = (grad - want[name]).norm() / want[name].norm()
        assert error <= 0.05, (name, error.item())  # bf16 keeps 8 bits of mantissa; fp16 10


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_adapt_trains_under_amp_on_the_cpu(tmp_path, amp):
    from surgeon.train.training_state import load_training_state

    model = converted_model()
    torch.manual_seed(0)
    images = torch.randn(32, 3, 8, 8)
    targets = (images[:, 0].mean((1, 2)) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=8)
    report = surgeon.adapt(model, loader, loader, epochs=3, lr=0.01, device="cpu", amp=amp, out=tmp_path / "run",
                           log=lambda _: None)
    losses = [h.train_loss for h in report.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    state = load_training_state(tmp_path / "run")
    assert (state["scaler"] is not None) == (amp == "fp16")  # fp16 scales the loss, and resume restores it


def test_devices_resolve_or_fail_in_one_line(monkeypatch):
    from surgeon.errors import SurgeonError
    from surgeon.train.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("CPU") == torch.device("cpu")
    for spec, message in (("cuda", "no CUDA device is available"), ("cuda:1", "no CUDA device is available"),
                          ("tpu", "expected auto, cpu, cuda or cuda:N")):
        with pytest.raises(SurgeonError, match=message):
            resolve_device(spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)  # under torchrun: this rank's GPU
    with pytest.raises(SurgeonError, match="cuda:2 does not exist"):
        resolve_device("cuda:2")


def test_cli_adapt_device_and_amp(tmp_path, monkeypatch):
    from PIL import Image
    from typer.testing import CliRunner

    from surgeon.cli.app import app

    torch.manual_seed(0)
    base = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    surgeon.save(surgeon.convert(base, base={"architecture": "mobilenetv3_small_050", "model_args": {}}),
                 tmp_path / "art")
    for split in ("train", "val"):
        for label in ("0", "1"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (int(label) * 200, i * 40, 0)).save(tmp_path / "data" / split / label /
                                                                             f"{i}.png")
    arguments = ["adapt", str(tmp_path / "art"), "--data", str(tmp_path / "data"), "--epochs", "1",
                 "--batch-size", "4", "--json"]
    result = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "bf16"), "--device", "cpu",
                                      "--amp", "bf16"])
    assert result.exit_code == 0, result.output
    assert torch.isfinite(torch.tensor(json.loads(result.stdout)["history"][0]["train_loss"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "gpu"), "--device", "cuda"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: --device cuda: no CUDA device is available")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "gpu").exists()
    result = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "x"), "--amp", "fp8"])
    assert result.exit_code == 2 and "--amp 'fp8'" in result.output
