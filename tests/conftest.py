"""Shared fixtures: small deterministic inputs and the offline EfficientNet-Lite0 weights file."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from surgeon.ops import derivative_codebook
from surgeon.ops.kernels import cuda as cuda_kernels
from tests import fake_cupy

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from surgeon.io.bundled_weights import export_efficientnet_lite0

    return export_efficientnet_lite0(tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors")


@pytest.fixture()
def seeded() -> None:
    torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Core tests may not skip: a skip (for instance one raised by a library that detects pytest) fails."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and call.excinfo is not None and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"test was skipped ({call.excinfo.value}); core tests may not skip"


@pytest.fixture(scope="module")
def fake_cupy_harness_directory(tmp_path_factory):
    return tmp_path_factory.mktemp("fake-cupy")


@pytest.fixture(scope="module")
def fake_cupy_harness(fake_cupy_harness_directory):
    """The kernels built with g++ behind the fake CuPy's generic launch entry."""
    return fake_cupy.build_harness(fake_cupy_harness_directory)


@pytest.fixture()
def gpu(fake_cupy_harness, fake_cupy_harness_directory, monkeypatch):
    """CPU tensors stand for device tensors; CuPy is the fake; the device guard records what it guards."""
    state = fake_cupy.State(*fake_cupy_harness)
    state.build_directory = fake_cupy_harness_directory
    # the wrappers' tests run the kernel itself; tests/test_autotune.py drives the choice between routes
    monkeypatch.setenv("SURGEON_QUADCONV_ROUTE", "fused")
    monkeypatch.setenv("SURGEON_AUTOTUNE_CACHE", "off")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy.install(state))
    monkeypatch.setattr(cuda_kernels, "usable", lambda tensor: True)

    @contextmanager
    def guard(device):
        state.device, state.guard_stream = device, 0xC0FFEE
        try:
            yield state.guard_stream
        finally:
            state.device = state.guard_stream = None

    monkeypatch.setattr(cuda_kernels, "device_guard", guard)
    cuda_kernels.REGISTRY.clear()
    clear_device_copies()
    yield state
    cuda_kernels.REGISTRY.clear()
    clear_device_copies()


def clear_device_copies() -> None:
    """Codebooks keep per-device copies; a test's fake device must not see another test's copies."""
    for book in derivative_codebook._READY.values():
        book.on_device.clear()
