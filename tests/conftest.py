"""Shared fixtures: small deterministic inputs and the offline EfficientNet-Lite0 weights file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from surgeon.bundled_weights import export_efficientnet_lite0

    return export_efficientnet_lite0(tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors")


@pytest.fixture()
def seeded() -> None:
    torch.manual_seed(0)
