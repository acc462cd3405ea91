"""Host syncs and kernel-launching ops in one training forward + backward, side by side with full fine-tuning.

Counted on the CPU with a ``TorchDispatchMode`` (``surgeon.train.step_ops``): a host sync is an
``aten._local_scalar_dense`` (on CUDA each one stalls the CPU until the GPU catches up); a launching op is any op
that is not a view, an allocation or a metadata query, and each of surgeon's own ops counts as the kernels its CUDA
route launches. Dispatch is the same on every device, so these are the counts a CUDA step makes on the torch
route (``surgeon.ops.device_route.cuda_route``: surgeon's CPU C++ kernels and CPU-only workarounds are off, as a
GPU has none of them).

Models without depthwise convs (ViT, Swin) get no quadratic adapters: there the recipe trains the biases
("+bias"), as in ``benchmarks/memory.py``.

Run: python benchmarks/launches.py [--models ...] [--recipe quadranet-v2-s2a] [--batch 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import warnings

MODELS = ("convnext_atto", "tf_efficientnet_lite0", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224")


def has_depthwise_conv(model) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1
               for m in model.modules())


def build(model_name: str, recipe: str | None):
    """The timm model (random weights, 10 classes) in training mode: fully trainable (``recipe`` None) or
    converted by ``recipe`` (its biases trained where it adds no adapter). Returns (model, marker)."""
    import timm
    import torch

    import surgeon

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=10).eval()
    marker = ""
    if recipe is not None:
        spec = surgeon.load_recipe(recipe).to_dict()
        if not has_depthwise_conv(model):
            spec, marker = {**spec, "trainable": ["*.bias"]}, " +bias"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = surgeon.convert(model, spec, example_input=torch.randn(1, 3, 224, 224), inplace=True)
    return model.train(), marker


def count(model_name: str, recipe: str | None, batch: int):
    """Syncs and launches of one step (after a warm-up step, gradients cleared)."""
    import torch

    from surgeon.ops.device_route import cuda_route
    from surgeon.train.step_ops import count_step_ops, forward_backward

    model, marker = build(model_name, recipe)
    step = forward_backward(model, torch.randn(batch, 3, 224, 224))
    with cuda_route():  # the route a CUDA device takes: no CPU kernels, no CPU-only workarounds
        step()
        return count_step_ops(step), marker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--recipe", default="quadranet-v2-s2a")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()
    rows = []
    print(f"{'model':34} {'config':24} {'syncs':>6} {'launches':>9} {'× full FT':>10}")
    for name in args.models:
        full, _ = count(name, None, args.batch)
        adapted, marker = count(name, args.recipe, args.batch)
        ratio = adapted.launches / full.launches
        for config, ops, shown in (("full fine-tuning", full, "1.00"), (args.recipe + marker, adapted, f"{ratio:.2f}")):
            print(f"{name:34} {config:24} {ops.syncs:>6} {ops.launches:>9} {shown:>10}")
        rows.append({"model": name, "recipe": args.recipe + marker, "full_syncs": full.syncs,
                     "full_launches": full.launches, "syncs": adapted.syncs, "launches": adapted.launches,
                     "ratio": ratio, "top_ops": adapted.by_op.most_common(12)})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
