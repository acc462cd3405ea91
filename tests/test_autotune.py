"""First-use autotuning of the merged quadratic conv, with the real wrappers on the fake CuPy: the decision from
injected timings (never the slower route, a tie keeps the torch route), remembering it, forcing a route, the
routes file (atomic, keyed by environment, hostile content ignored) and fallbacks that are not written down."""

from __future__ import annotations

import json

import pytest
import torch

from surgeon.ops.kernels import autotune
from surgeon.ops.kernels import cuda as cuda_kernels
from surgeon.ops.kernels import library as kernel_ops
from tests.test_kernels import merged_layer


def timings(*values: float):
    """A timer that runs what it is given once and reports the next value (fused is timed first)."""
    queue = list(values)
    calls = []

    def timer(run) -> float:
        calls.append(run)
        run()
        return queue.pop(0)

    timer.calls = calls  # type: ignore[attr-defined]
    return timer


def no_timing(run) -> float:
    raise AssertionError("a remembered or forced choice must not be timed again")


@pytest.fixture()
def conv_call():
    torch.manual_seed(0)
    layer = merged_layer(7, 1, 3, 1, 1, False, channels=8)
    x = torch.randn(2, 8, 12, 12)
    w3, b3, w1, w2 = cuda_kernels.layer_weights(layer, x.dtype, x.device)

    def call(inputs: torch.Tensor = x) -> torch.Tensor:
        with torch.no_grad():
            return kernel_ops.quadratic_dwconv(inputs, w3, b3, w1, w2, list(layer.stride), list(layer.pads(inputs)),
                                               list(layer.dilation), layer.rank)

    return call, layer.forward_dense(x).detach(), x


def use_tuner(monkeypatch, timer, path=None) -> autotune.RouteTuner:
    tuner = autotune.RouteTuner(timer=timer, cache_path=path)
    monkeypatch.setattr(autotune, "TUNER", tuner)
    monkeypatch.delenv(autotune.ROUTE_VARIABLE, raising=False)
    return tuner


def fused_launches(state) -> int:
    return sum(launch.name.startswith("quadconv_fwd") for launch in state.launches)


@pytest.mark.parametrize("fused_ms,torch_ms,expected", [(1.0, 2.0, "fused"), (2.0, 1.0, "torch"),
                                                        (1.5, 1.5, "torch")])
def test_the_faster_route_is_chosen_and_a_tie_keeps_the_torch_route(gpu, monkeypatch, conv_call, fused_ms,
                                                                     torch_ms, expected):
    call, want, _ = conv_call
    tuner = use_tuner(monkeypatch, timings(fused_ms, torch_ms))
    torch.testing.assert_close(call(), want, atol=1e-5, rtol=1e-5)
    (choices,) = tuner.choices.values()
    assert list(choices.values()) == [expected]
    assert len(tuner.timer.calls) == 2  # type: ignore[attr-defined]
    before = fused_launches(gpu)
    tuner.timer = no_timing  # remembered: the next call runs the choice without timing
    torch.testing.assert_close(call(), want, atol=1e-5, rtol=1e-5)
    assert fused_launches(gpu) - before == (1 if expected == "fused" else 0)


def test_each_shape_is_tuned_on_its_own(gpu, monkeypatch, conv_call):
    call, _, _ = conv_call
    tuner = use_tuner(monkeypatch, timings(1.0, 2.0, 3.0, 1.0))
    call()
    call(torch.randn(4, 8, 9, 9))
    (choices,) = tuner.choices.values()
    assert sorted(choices.values()) == ["fused", "torch"]


@pytest.mark.parametrize("forced,launches", [("torch", 0), ("fused", 1)])
def test_the_route_variable_forces_a_route(gpu, monkeypatch, conv_call, forced, launches):
    call, want, _ = conv_call
    use_tuner(monkeypatch, no_timing)
    monkeypatch.setenv(autotune.ROUTE_VARIABLE, forced)
    torch.testing.assert_close(call(), want, atol=1e-5, rtol=1e-5)
    assert fused_launches(gpu) == launches


def test_a_bad_route_variable_is_named(gpu, monkeypatch, conv_call):
    call, _, _ = conv_call
    use_tuner(monkeypatch, no_timing)
    monkeypatch.setenv(autotune.ROUTE_VARIABLE, "fastest")
    with pytest.raises(ValueError, match="SURGEON_QUADCONV_ROUTE must be one of auto, fused, torch"):
        call()


def test_a_call_that_needs_gradients_is_not_tuned(gpu, monkeypatch, conv_call):
    _, _, x = conv_call
    tuner = use_tuner(monkeypatch, no_timing)
    layer = merged_layer(7, 1, 3, 1, 1, False, channels=8)
    leaf = x.clone().requires_grad_(True)
    out = layer(leaf)
    out.sum().backward()  # the torch route: the kernel is forward-only
    torch.testing.assert_close(out, layer.forward_dense(x))
    assert leaf.grad is not None
    assert not tuner.choices and fused_launches(gpu) == 0


def test_choices_are_kept_on_disk_per_environment(gpu, monkeypatch, conv_call, tmp_path):
    call, _, _ = conv_call
    path = tmp_path / "routes" / "quadconv-routes.json"
    use_tuner(monkeypatch, timings(1.0, 2.0), path)
    call()
    saved = json.loads(path.read_text())
    assert saved["format"] == autotune.CACHE_FORMAT
    (env, choices), = saved["choices"].items()
    assert "surgeon" in env and list(choices.values()) == ["fused"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written by rename: no temporary left
    fresh = use_tuner(monkeypatch, no_timing, path)  # a new process: read, not timed
    call()
    assert fresh.choices[env] == choices
    monkeypatch.setattr(autotune.importlib.metadata, "version", lambda name: "99.0")  # an upgrade tunes again
    again = use_tuner(monkeypatch, timings(2.0, 1.0), path)
    call()
    assert len(again.timer.calls) == 2  # type: ignore[attr-defined]
    assert len(json.loads(path.read_text())["choices"]) == 2  # both environments kept


@pytest.mark.parametrize("content", ["not json", json.dumps([1, 2]), json.dumps({"format": 1, "choices": []}),
                                     json.dumps({"format": 1, "choices": {"env": {"k": "rm -rf /"}}}),
                                     json.dumps({"format": 7, "choices": {}}), "x" * (autotune.MAX_CACHE_BYTES + 1)])
def test_a_hostile_routes_file_is_ignored_and_replaced(gpu, monkeypatch, conv_call, tmp_path, content):
    call, want, _ = conv_call
    path = tmp_path / "quadconv-routes.json"
    path.write_text(content)
    tuner = use_tuner(monkeypatch, timings(1.0, 2.0), path)
    torch.testing.assert_close(call(), want, atol=1e-5, rtol=1e-5)
    assert len(tuner.timer.calls) == 2  # type: ignore[attr-defined]
    for choices in autotune.read_cache(path).values():
        assert set(choices.values()) <= {"fused", "torch"}
    assert json.loads(path.read_text())["format"] == autotune.CACHE_FORMAT


def test_a_kernel_that_cannot_run_chooses_torch_without_timing_or_writing(gpu, monkeypatch, conv_call, tmp_path):
    call, want, _ = conv_call
    path = tmp_path / "quadconv-routes.json"
    tuner = use_tuner(monkeypatch, no_timing, path)
    monkeypatch.setattr(cuda_kernels, "_module", lambda name, name_expressions=(): None)  # a compile failure
    torch.testing.assert_close(call(), want, atol=1e-5, rtol=1e-5)
    assert [list(c.values()) for c in tuner.choices.values()] == [["torch"]]
    assert not path.exists()  # a fallback is not a measurement: the next process tries again


def test_the_event_timer_needs_a_gpu_and_times_on_one():
    if torch.cuda.is_available():
        x = torch.randn(1 << 20, device="cuda")
        assert autotune.cuda_event_time(lambda: x.mul(2)) > 0
    else:
        with pytest.raises((RuntimeError, AssertionError)):
            autotune.cuda_event_time(lambda: None)
