"""A training step queues its work without reading anything back to the host: zero ``_local_scalar_dense`` calls
(each one a device sync on CUDA) in one forward + backward for every family of layers the shipped recipes make,
counted on the route a CUDA device takes. Kernel-launching ops are counted too and bounded against full
fine-tuning."""

from __future__ import annotations

import pytest
import torch

from benchmarks.launches import count
from surgeon.ops.device_route import cuda_route
from surgeon.ops.kernels import library as kernel_ops
from surgeon.train.step_ops import count_step_ops


@pytest.fixture(autouse=True)
def on_cuda_route():
    with cuda_route():  # the GPU trains through the torch route
        yield


def test_the_counter_sees_a_sync_a_launch_and_syncs_inside_surgeons_ops():
    x = torch.randn(8, 16)
    ops = count_step_ops(lambda: (x * 2).sum().item())
    assert (ops.syncs, ops.launches) == (1, 2)  # mul, sum; .item() is the sync
    assert ops.by_op["aten.mul"] == 1 and ops.sync_sites[""] == 1
    ops = count_step_ops(lambda: kernel_ops.rows_range(x, 4, False))
    assert ops.syncs == 0 and ops.launches == 2 and ops.by_op == {"surgeon.rows_range": 2}


def test_a_sync_inside_one_of_surgeons_ops_is_found(monkeypatch):
    from surgeon.ops.kernels import library

    def syncing_route(rows, bits, nonnegative):
        bool(torch.isfinite(rows).all())  # what the range's torch route once did
        return rows.new_zeros(rows.shape[0], 1), rows.new_ones(rows.shape[0], 1)

    monkeypatch.setattr(library, "finite_row_range", syncing_route)
    ops = count_step_ops(lambda: kernel_ops.rows_range(torch.randn(4, 5), 4, False))
    assert ops.syncs == 1 and ops.sync_sites == {"surgeon.rows_range": 1}


@pytest.mark.parametrize("model", ["convnext_atto", "tf_efficientnet_lite0", "vit_tiny_patch16_224",
                                   "swin_tiny_patch4_window7_224"])
def test_a_training_step_makes_no_host_sync(model):
    full, _ = count(model, None, batch=2)
    adapted, marker = count(model, "quadranet-v2-s2a", batch=2)
    assert marker == ("" if model in ("convnext_atto", "tf_efficientnet_lite0") else " +bias")
    assert full.syncs == 0
    assert adapted.syncs == 0, dict(adapted.sync_sites)
    # fused range, pack and unpack ops: no chain of small ops per quantized tensor; where quadratic layers train,
    # their term in one kernel each way: at most 1.5x the launches of full fine-tuning
    bound = 1.5 if model in ("convnext_atto", "tf_efficientnet_lite0") else 3
    assert adapted.launches <= bound * full.launches, adapted.by_op.most_common(10)
