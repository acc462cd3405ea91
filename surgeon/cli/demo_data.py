"""An offline adaptation task built from real photos that ship with scikit-image.

Random crops of the photos are labelled by the *pretrained* model on the clean crop (its ImageNet top-1), then
written to disk under a nonlinear colour shift (per-channel gamma, a channel rotation and an S-shaped contrast
curve). The task - predict the clean label from the shifted image - is what domain adaptation looks like:
the unadapted model loses accuracy under the shift, adaptation wins it back. Class folders are named by ImageNet
class index, so the pretrained head is kept.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.io.atomic import staged_directory

# photos bundled inside the scikit-image wheel (others are fetched from the network on first use)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "cat", "colorwheel")


@dataclass
class ShiftedPhotos:
    root: Path
    classes: dict[int, int]  # class index -> training images
    train: int
    val: int


def load_photos() -> list[np.ndarray]:
    try:
        import skimage.data
    except ImportError as exc:
        raise SurgeonError("building the demo data needs scikit-image (pip install 'surgeon[demo]')") from exc
    images = []
    for name in PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        image = np.asarray(loader())
        if image.ndim == 3 and image.shape[2] >= 3:
            images.append(image[..., :3].astype(np.uint8))
    return images


def colour_shift(image: np.ndarray) -> np.ndarray:
    """Nonlinear, fixed colour distortion of an RGB uint8 image."""
    x = image.astype(np.float32) / 255.0
    x = np.stack([x[..., 0] ** 0.45, x[..., 1] ** 1.0, x[..., 2] ** 2.2], axis=-1)
    x = x[..., [2, 0, 1]]  # channel rotation
    x = 1.0 / (1.0 + np.exp(-6.0 * (x - 0.5)))  # S-curve contrast
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    return (x * 255.0 + 0.5).astype(np.uint8)


def _random_crop(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    from PIL import Image

    height, width = image.shape[:2]
    side = int(min(height, width) * rng.uniform(0.35, 1.0))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = image[top:top + side, left:left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC))


def _labels(model: nn.Module, crops: list[np.ndarray]) -> list[int]:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    labels = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(crops), 32):
            batch = torch.stack([transform(Image.fromarray(c)) for c in crops[start:start + 32]])
            labels.extend(model(batch).argmax(-1).tolist())
    return labels


def foreign_demo_data_entry(directory: Path) -> str | None:
    """What in ``directory`` is not a data set this module wrote (``train|val/<class index>/<crop>.png``)."""
    for entry in sorted(directory.rglob("*")):
        parts = entry.relative_to(directory).parts
        folder = len(parts) < 3
        ours = (parts[0] in ("train", "val") and len(parts) <= 3 and (len(parts) < 2 or parts[1].isdigit())
                and (folder or re.fullmatch(r"\d+\.png", parts[2]) is not None))
        if entry.is_symlink() or not ours or folder != entry.is_dir():
            return f"{entry.relative_to(directory)} is not a file the demo wrote"
    return None


def build_shifted_photos(root: str | Path, model: nn.Module, crops_per_photo: int = 40, val_fraction: float = 0.3,
                         size: int = 160, min_per_class: int = 6, seed: int = 0) -> ShiftedPhotos:
    """Write ROOT/train/<class index>/*.png and ROOT/val/<class index>/*.png; returns what was written."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    crops = [_random_crop(photo, rng, size) for photo in load_photos() for _ in range(crops_per_photo)]
    labels = _labels(model, crops)
    counts = Counter(labels)
    kept = {label for label, count in counts.items() if count >= min_per_class}
    if len(kept) < 2:
        raise SurgeonError("the photos gave fewer than 2 classes with enough crops; raise crops_per_photo")
    with staged_directory(root, force=True, owned=foreign_demo_data_entry) as staging:
        order = rng.permutation(len(crops))
        seen: Counter[int] = Counter()
        written = {"train": 0, "val": 0}
        train_counts: Counter[int] = Counter()
        for index in order:
            label = labels[index]
            if label not in kept:
                continue
            split = "val" if seen[label] < max(1, round(counts[label] * val_fraction)) else "train"
            seen[label] += 1
            folder = staging / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(colour_shift(crops[index])).save(folder / f"{index:05d}.png")
            written[split] += 1
            if split == "train":
                train_counts[label] += 1
    return ShiftedPhotos(root=root, classes=dict(train_counts), train=written["train"], val=written["val"])
