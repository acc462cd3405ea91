"""The names of the files surgeon writes into an artifact directory (and nothing else it writes there)."""

from __future__ import annotations

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
TRAINING_STATE_NAME = "training_state.pt"
ARTIFACT_FILES = frozenset({WEIGHTS_NAME, CONFIG_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME,
                            TRAINING_STATE_NAME})
