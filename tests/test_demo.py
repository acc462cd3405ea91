"""The README's main job, end to end at small size: its claims are checked, not just its exit code."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.cli.demo import run_demo


def test_demo_pipeline(tmp_path):
    lines: list[str] = []
    report = run_demo(tmp_path / "demo", say=lines.append, epochs=2, crops_per_photo=8, batch_size=16)
    text = "\n".join(lines)
    assert "$ surgeon convert tf_efficientnet_lite0" in text and "$ surgeon merge" in text
    assert report.init_max_abs_diff == 0.0  # exact at conversion
    assert report.merged_max_abs_diff is not None and report.merged_max_abs_diff < 1e-3
    assert report.merged_top1_agreement == 100.0
    assert report.after_top1 is not None and report.before_top1 is not None
    assert report.after_top1 > report.before_top1  # adaptation helped on the shifted photos
    for path in report.artifacts.values():
        assert (tmp_path / "demo").exists() and path.startswith(str(tmp_path))
    merged_config = json.loads((tmp_path / "demo" / "merged" / "config.json").read_text())
    assert merged_config["surgeon"]["format"] == "merged" and len(merged_config["surgeon"]["layers"]) == 16
    assert surgeon.load(tmp_path / "demo" / "merged").num_classes == 1000
    # deployment: the ONNX file ran in onnxruntime on real val images within the fp32 tolerance
    check = report.export_check
    assert check is not None and check["runtime"].startswith("onnxruntime") and "images from" in check["inputs"]
    assert check["passed"] and check["relative"] <= 1e-5 and check["batch_sizes"][-1] == 1
    assert (tmp_path / "demo" / "merged" / "model.onnx").stat().st_size > 1e6
    assert "$ surgeon export" in text


def test_demo_command_prints_artifacts(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--epochs", "1", "--crops-per-photo",
                                      "8", "--batch-size", "16", "--no-export"])
    assert result.exit_code == 0, result.output
    assert "artifacts:" in result.stdout and "merged model:" in result.stdout
