"""Deployment: export of merged models (ONNX through onnxruntime, torch.export), torch.compile, timm conventions."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from PIL import Image
from timm.utils import reparameterize_model
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.errors import SurgeonWarning
from surgeon.io import export as export_module
from surgeon.io.export import ExportError
from surgeon.methods.quadratic.inference import QuadraConvDW
from surgeon.train.compiling import graph_breaks

ARCH = "test_efficientnet"  # timm's tiny EfficientNet: depthwise convs, SiLU, SE gates, BatchNormAct2d


def converted_model(arch: str = ARCH, trained: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)  # test_vit has no depthwise conv: nothing trainable
        converted = surgeon.convert(base, "quadranet-v2-s2a", base={"architecture": arch, "model_args": {}})
    if trained:  # stands in for adaptation: a non-zero quadratic term
        with torch.no_grad():
            for name, param in surgeon.trainable_parameters(converted).items():
                if name.endswith("weight_a"):
                    param.normal_(0, 0.1)
    return converted


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    surgeon.save_merged(surgeon.merge(converted_model(), fold_bn=True), root / "merged")
    return root / "merged"


def photo_folder(root: Path) -> Path:
    import skimage.data

    folder = root / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(folder / f"{name}.png")
    return folder


def test_torch_export_has_one_node_per_quadratic_layer_and_a_dynamic_batch(merged_dir, tmp_path):
    model = surgeon.load(merged_dir)
    layers = sum(isinstance(m, QuadraConvDW) for m in model.modules())
    result = surgeon.export_model(model, tmp_path / "m.pt2", format="torch-export")
    assert result.quadratic_ops == layers > 0
    assert result.check is not None and result.check.passed and result.check.batch_sizes == [3, 1]
    program = torch.export.load(str(tmp_path / "m.pt2"))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("surgeon.quadratic_dwconv" in t for t in targets) == layers
    x = torch.randn(5, *result.input_shape)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-6)  # batch 5: never traced
    # a fresh process needs only `import surgeon.ops.kernels` (the custom op) to run the program
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "want.npy", want.numpy())
    paths = {"program": tmp_path / "m.pt2", "x": tmp_path / "x.npy", "want": tmp_path / "want.npy"}
    script = (
        f"import numpy as np, torch, surgeon.ops.kernels; p = torch.export.load(r'{paths['program']}'); "
        f"x = torch.from_numpy(np.load(r'{paths['x']}')); want = torch.from_numpy(np.load(r'{paths['want']}')); "
        "torch.testing.assert_close(p.module()(x), want, rtol=1e-5, atol=1e-6); print('ok')")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_onnx_export_runs_in_onnxruntime_on_real_images(merged_dir, tmp_path):
    import onnxruntime

    model = surgeon.load(merged_dir)
    inputs, described = export_module.image_inputs(model, photo_folder(tmp_path))
    assert inputs.shape[0] == 3 and "3 images" in described
    result = surgeon.export_model(model, tmp_path / "m.onnx", inputs=inputs, inputs_description=described)
    check = result.check
    assert check is not None and check.passed and check.runtime.startswith("onnxruntime")
    assert check.relative <= 1e-5 and check.max_abs_diff <= 1e-5 * check.max_abs_output
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # symbolic batch dimension
    assert {n.op_type for n in graph.node} >= {"Conv", "Mul"}  # quadratic layers as standard ONNX ops
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, *result.input_shape)
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert np.abs(got - want.numpy()).max() <= 1e-5 * want.abs().max().item()


def test_a_failed_check_writes_nothing(merged_dir, tmp_path, monkeypatch):
    model = surgeon.load(merged_dir)
    real = export_module._load_torch_export
    monkeypatch.setattr(export_module, "_load_torch_export", lambda path: lambda x: real(path)(x) * 1.01)
    with pytest.raises(ExportError, match=r"differs from PyTorch.*nothing written"):
        surgeon.export_model(model, tmp_path / "m.pt2", format="torch-export")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_cli_export_records_the_check_for_the_model_card(merged_dir, tmp_path):
    import shutil

    from surgeon.io.push import _card

    artifact = tmp_path / "merged"
    shutil.copytree(merged_dir, artifact)
    result = CliRunner().invoke(app, ["export", str(artifact), "--format", "torch-export"])
    assert result.exit_code == 0, result.output
    assert (artifact / "model.pt2").is_file()
    assert "check with torch.export program" in result.stdout and ": ok" in result.stdout
    config = json.loads((artifact / "config.json").read_text())
    (entry,) = config["surgeon"]["exports"]
    assert entry["file"] == "model.pt2" and entry["check"]["passed"] and entry["dynamic_batch"]
    card = _card(config, "org/merged")
    assert "## Exported files" in card and "`model.pt2`" in card and "torch.export.load" in card
    assert surgeon.load(artifact) is not None  # the weights' checksum still holds
    again = CliRunner().invoke(app, ["export", str(artifact), "--format", "torch-export"])
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize("argv, message", [
    (["--format", "tflite"], "--format must be one of onnx, torch-export"),
    (["--images", "/no/such/folder"], "not a directory of images"),
])
def test_cli_export_bad_input_is_one_line(merged_dir, tmp_path, argv, message):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(merged_dir), "--out", str(out), *argv])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_cli_export_from_the_hub_needs_out():
    result = CliRunner().invoke(app, ["export", "hf-hub:org/merged"])  # fails before any download
    assert result.exit_code == 2 and "--out FILE is required" in result.output


def test_cli_export_refuses_an_unmerged_artifact(tmp_path):
    surgeon.save(converted_model(), tmp_path / "converted")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "converted"), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "not a merged model" in result.output and "surgeon merge" in result.output


# ------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("arch", ["test_efficientnet", "test_convnext", "test_vit"])
def test_converted_models_compile_for_training_without_graph_breaks(arch):
    model = converted_model(arch).train()
    model.get_classifier().requires_grad_(True)
    report = graph_breaks(model, torch.randn(2, 3, 64, 64))
    assert report.breaks == 0 and report.graphs == 1, report.reasons


def test_compiled_training_step_matches_eager():
    model = converted_model().train()
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().mean().backward()
    eager(x).square().mean().backward()
    want = dict(eager.named_parameters())
    grads = [(name, p.grad, want[name].grad) for name, p in model.named_parameters() if p.requires_grad]
    assert grads
    for name, got, expected in grads:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7, msg=name)


def test_merged_model_compiles_with_fullgraph(merged_dir):
    import torch._inductor.config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    model = surgeon.load(merged_dir)
    x = torch.randn(2, 3, 64, 64)
    # without a vector ISA (a CPU without AVX2, or ATEN_CPU_CAPABILITY=default) inductor 2.14's channels-last weight
    # conversion still emits vectorised transposes that do not compile: turn that layout pass off there only
    vectorised = bool(pick_vec_isa())
    with inductor_config.patch(layout_optimization=vectorised):
        compiled = torch.compile(model, fullgraph=True)  # inductor, C++ code generation on the CPU
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ timm conventions
def test_reparameterize_model_round_trip(merged_dir, tmp_path):
    model = surgeon.load(merged_dir)
    x = torch.randn(2, 3, 64, 64)
    fused = reparameterize_model(model)
    assert not any(m.linear_only for m in fused.modules() if isinstance(m, QuadraConvDW))  # trained: kept
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))
    untrained = surgeon.merge(converted_model(trained=False))
    fused = reparameterize_model(untrained)
    layers = [m for m in fused.modules() if isinstance(m, QuadraConvDW)]
    assert layers and all(m.linear_only for m in layers)  # W_a = 0: the primary conv alone, exactly
    with torch.no_grad():
        torch.testing.assert_close(fused(x), untrained(x), rtol=0, atol=0)
    surgeon.save_merged(fused, tmp_path / "fused")  # the state dict is unchanged: it saves and loads
    with torch.no_grad():
        assert torch.equal(surgeon.load(tmp_path / "fused")(x), untrained(x))


def test_timm_create_model_plus_from_timm(merged_dir):
    model = timm.create_model(f"local-dir:{merged_dir}", pretrained=False)
    assert not any(isinstance(m, QuadraConvDW) for m in model.modules())
    model = surgeon.from_timm(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), surgeon.load(merged_dir)(x))
    with pytest.raises(surgeon.SurgeonError, match="not created from an artifact"):
        surgeon.from_timm(timm.create_model(ARCH, pretrained=False))
