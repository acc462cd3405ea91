"""The training state beside each epoch's artifact (``training_state.pt``: optimizer, scheduler, epoch, history,
every rank's RNG streams), written atomically with it and read back for ``resume``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surgeon.errors import SurgeonError
from surgeon.io.names import TRAINING_STATE_NAME

STATE_NAME = TRAINING_STATE_NAME


def load_training_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        raise SurgeonError(f"cannot resume: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SurgeonError(f"cannot resume: {path} is not readable ({str(exc).splitlines()[0]})") from exc
