"""What a new user meets first: close-name suggestions, a bad recipe named before any download, whole inner
messages, a Conv2d subclass that is a Conv2d, and models whose modules read their state-dict version on load."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.errors import SurgeonWarning, first_line


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_a_misspelt_architecture_gets_the_close_names():
    result = invoke("plan", "convnext_atoo")
    assert result.exit_code == 2
    assert "did you mean convnext_atto" in result.output and "Traceback" not in result.output


def test_a_bad_recipe_is_named_before_any_download(monkeypatch):
    import timm

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be built or downloaded before the recipe is checked")

    monkeypatch.setattr(timm, "create_model", no_download)
    result = invoke("convert", "convnext_atto", "--recipe", "nope", "--dry-run")
    assert result.exit_code == 2 and "nope" in result.output and "recipe" in result.output


def test_inner_messages_are_whole_or_cut_at_a_word():
    assert first_line("could not connect; check your connection and try again\nsecond line") == \
        "could not connect; check your connection and try again"
    cut = first_line("word " * 100, limit=50)
    assert cut.endswith(" …") and len(cut) <= 52 and cut[:-2].split(" ")[-1] == "word"
    assert first_line("") == ""


class ArgumentOnlyConv(nn.Conv2d):
    """Sets arguments only, as transformers' EfficientNetDepthwiseConv2d does."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)


class OwnForwardConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Net(nn.Module):
    def __init__(self, conv: type[nn.Conv2d]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = ArgumentOnlyConv(8, 3) if conv is ArgumentOnlyConv else conv(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.dw(torch.relu(self.stem(x)))).mean((2, 3)))


def test_a_conv2d_subclass_that_keeps_its_computation_gets_an_adapter(seeded):
    model = Net(ArgumentOnlyConv).eval()
    x = torch.randn(2, 3, 12, 12)
    converted = surgeon.convert(model, "quadranet-v2", example_input=x)
    swapped = [s for s in converted.surgeon_info.sites if s.action == "swap" and s.target == "depthwise_conv"]
    assert [s.path for s in swapped] == ["dw"]
    assert surgeon.output_difference(model, converted, x)["max_abs_diff"] == 0.0


def test_a_conv2d_subclass_with_its_own_forward_stays_with_its_reason(seeded):
    model = Net(OwnForwardConv).eval()
    with pytest.warns(SurgeonWarning):
        converted = surgeon.convert(model, "quadranet-v2", example_input=torch.randn(2, 3, 12, 12))
    (site,) = [s for s in converted.surgeon_info.sites if s.path == "dw"]
    assert site.action != "swap" and "own forward" in site.reason


class Versioned(nn.Module):
    """Reads its version while loading, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Linear(4, 2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(x).mean((2, 3)))


def test_a_module_that_reads_its_version_reloads(tmp_path, seeded):
    from surgeon.io.checkpoint import fit_state_dict

    model = Versioned()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # what a safetensors file gives: no metadata
    fresh = Versioned()
    fit_state_dict(fresh, state, "model.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_saving_a_merged_model_as_converted_is_refused(tmp_path, seeded):
    from surgeon.errors import SurgeonError

    model = Net(ArgumentOnlyConv).eval()
    merged = surgeon.merge(surgeon.convert(model, "quadranet-v2", example_input=torch.randn(1, 3, 12, 12)))
    with pytest.raises(SurgeonError, match=r"save it with surgeon\.save_merged"):
        surgeon.save(merged, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_attention_falls_back_to_the_math_backend_where_a_fused_cpu_kernel_refuses(monkeypatch):
    """As torch's bf16 CPU flash attention does at ATEN_CPU_CAPABILITY=default on an AVX-512 machine."""
    import torch.nn.functional as F

    from surgeon.methods.s2a import attention

    real = F.scaled_dot_product_attention
    calls = []

    def refusing(*args, **kwargs):
        calls.append(torch.backends.cuda.flash_sdp_enabled())
        if torch.backends.cuda.flash_sdp_enabled():
            raise RuntimeError("pack_vnni2 is only supported when avx512 is supported")
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", refusing)
    q, k, v = (torch.randn(2, 3, 10, 8).bfloat16() for _ in range(3))
    got = attention.fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                    enable_gqa=False)
    assert calls == [True, False]  # refused, then the math backend
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(got, real(q, k, v), rtol=0, atol=0)
    assert torch.backends.cuda.flash_sdp_enabled()  # the backend choice is restored
    with pytest.raises(RuntimeError):  # a real error is not swallowed
        attention.fused_attention(q, k[..., :5], v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                  enable_gqa=False)
