"""Image-folder data for ``surgeon adapt``: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``.

Datasets and transforms come from timm (``ImageDataset``, ``create_transform`` with the model's
``pretrained_cfg``). Unreadable images are found up front and skipped with a count, so a corrupt file costs
a warning, not a crash. Class folders named by integer class index keep the pretrained classifier head.
Training samples and their augmentation depend only on (seed, epoch, index) (see :mod:`surgeon.train.sampling`), and
validation shards count every image once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from surgeon.errors import SurgeonError
from surgeon.train.sampling import EpochPermutationSampler, EpochSeededDataset, ShardSampler

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}


@dataclass
class FolderData:
    train: DataLoader
    val: DataLoader | None
    classes: list[str]
    class_map: dict[str, int] | None  # folder name -> model class index (None: sorted order)
    skipped: int


def _class_folders(split: Path) -> list[str]:
    if not split.is_dir():
        raise SurgeonError(f"{split}: missing (expected ROOT/train/<class>/ and ROOT/val/<class>/ folders)")
    classes = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SurgeonError(f"{split}: no class folders")
    return classes


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


def _dataset(split: Path, class_map: dict[str, int] | None, transform: Any) -> tuple[Any, int]:
    from timm.data import ImageDataset

    try:
        dataset = ImageDataset(str(split), class_map=class_map or "", transform=transform)
    except RuntimeError as exc:  # timm's folder reader raises when it finds no image at all
        raise SurgeonError(f"{split}: no images ({str(exc).splitlines()[0]})") from exc
    samples = dataset.reader.samples
    if not samples:
        raise SurgeonError(f"{split}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    keep = [i for i, (path, _) in enumerate(samples) if _readable(path)]
    if not keep:
        raise SurgeonError(f"{split}: none of the {len(samples)} images could be read")
    skipped = len(samples) - len(keep)
    return (Subset(dataset, keep) if skipped else dataset), skipped


def choose_class_map(classes: list[str], num_classes: int) -> dict[str, int] | None:
    """Integer folder names within the head's range map onto those indices (the head is kept)."""
    if all(name.isdigit() and int(name) < num_classes for name in classes):
        return {name: int(name) for name in classes}
    return None


def image_folder_data(root: str | Path, model: nn.Module, batch_size: int, workers: int = 0,
                      distributed: bool = False, seed: int = 0, pin_memory: bool = False) -> tuple[FolderData, int]:
    """Loaders for ROOT's train/val splits, and the number of classes the model's head must have."""
    from timm.data import create_transform, resolve_data_config

    root = Path(root)
    if not root.is_dir():
        raise SurgeonError(f"{root}: data directory does not exist")
    classes = _class_folders(root / "train")
    val_dir = root / "val"
    if val_dir.exists():
        val_classes = _class_folders(val_dir)
        if val_classes != classes:
            raise SurgeonError(f"class mismatch: {root / 'train'} has {len(classes)} classes, {val_dir} has "
                               f"{len(val_classes)} (the class folder names must be the same)")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    class_map = choose_class_map(classes, num_classes)
    head_classes = num_classes if class_map is not None else len(classes)
    config = resolve_data_config({}, model=model)
    train_set, skipped = _dataset(root / "train", class_map, create_transform(**config, is_training=True))
    val_set, val_skipped = (_dataset(val_dir, class_map, create_transform(**config, is_training=False))
                            if val_dir.exists() else (None, 0))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed and dist.is_initialized() else (0, 1)
    train_sampler = EpochPermutationSampler(len(train_set), seed=seed, rank=rank, world=world)
    train = DataLoader(EpochSeededDataset(train_set, seed), batch_size=batch_size, sampler=train_sampler,
                       num_workers=workers, drop_last=len(train_sampler) > batch_size, persistent_workers=workers > 0,
                       pin_memory=pin_memory)
    val = None
    if val_set is not None:
        val = DataLoader(val_set, batch_size=batch_size, sampler=ShardSampler(len(val_set), rank, world),
                         num_workers=workers, pin_memory=pin_memory)
    return FolderData(train, val, classes, class_map, skipped + val_skipped), head_classes
