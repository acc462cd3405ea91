"""CLI contract: outputs, files written, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from surgeon.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_plan_json_is_valid():
    result = invoke("plan", "mobilenetv2_100", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["schema"] == "surgeon.plan/1"
    assert plan["summary"]["swapped_by_target"] == {"depthwise_conv": 17, "activation": 35, "conv": 35, "norm": 52}
    assert plan["summary"]["swapped_by_op"]["relu6"] == 35
    assert {"path", "access", "op", "action", "added_params", "saved_bytes_before"} <= set(plan["sites"][0])


def test_plan_table():
    result = invoke("plan", "resnet18", "--recipe", "s2a")
    assert result.exit_code == 0
    assert "layer1.0.act1" in result.stdout and "57 sites (57 swap)" in result.stdout


def test_convert_writes_and_dry_run_does_not(tmp_path, lite0_weights):
    out = tmp_path / "lite0"
    dry = invoke("convert", "tf_efficientnet_lite0", "--weights", str(lite0_weights), "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["dry_run"] is True and list(tmp_path.iterdir()) == []
    result = invoke("convert", "tf_efficientnet_lite0", "--weights", str(lite0_weights), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "16 depthwise_conv" in result.stdout and "33 relu6" in result.stdout
    assert "max |Δ logit| = 0" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = invoke("convert", "tf_efficientnet_lite0", "--weights", str(lite0_weights), "--out", str(out))
    assert again.exit_code == 2 and "already exists" in again.output
    # the saved directory is itself a MODEL argument
    replan = invoke("plan", str(out), "--json")
    assert replan.exit_code == 0 and json.loads(replan.stdout)["summary"]["actions"] == {}


def test_weights_file_with_arch(tmp_path):
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(tmp_path / "r18.safetensors"))
    result = invoke("convert", str(tmp_path / "r18.safetensors"), "--arch", "resnet18", "--recipe", "s2a",
                    "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    missing_arch = invoke("convert", str(tmp_path / "r18.safetensors"), "--out", str(tmp_path / "p"))
    assert missing_arch.exit_code == 2 and "--arch" in missing_arch.output


@pytest.mark.parametrize("args,message", [
    (["plan", "not_a_model"], "unknown architecture"),
    (["plan", "resnet18", "--recipe", "nope"], "neither a shipped recipe"),
    (["convert", "resnet18", "--random-init"], "--out DIR is required"),
    (["plan", "/nonexistent/w.pth", "--arch", "resnet18"], "no such file"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_truncated_checkpoint_real_subprocess(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    process = subprocess.run([sys.executable, "-m", "surgeon", "plan", str(bad), "--arch", "resnet18"],
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 2
    assert process.stderr.strip().startswith("error:") and "bad.safetensors" in process.stderr
    assert "Traceback" not in process.stderr and process.stdout == ""


def test_a_conversion_with_nothing_to_train_says_so_and_adapt_refuses_it(tmp_path):
    from PIL import Image

    plan = invoke("plan", "resnet18")  # plain convs only: no depthwise conv to adapt
    assert plan.exit_code == 0
    assert "warning: nothing will be trainable: no depthwise conv matched" in plan.stderr
    out = tmp_path / "resnet"
    converted = invoke("convert", "resnet18", "--random-init", "--out", str(out))
    assert converted.exit_code == 0, converted.output
    warning_lines = [line for line in converted.stderr.splitlines() if "nothing will be trainable" in line]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("warning: ")
    for split in ("train", "val"):
        for label in ("0", "1"):  # class-index folders: the pretrained head is kept, so nothing else trains
            (tmp_path / "data" / split / label).mkdir(parents=True)
            Image.new("RGB", (16, 16), (int(label) * 200, 0, 0)).save(tmp_path / "data" / split / label / "a.png")
    adapt = invoke("adapt", str(out), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "adapted"))
    assert adapt.exit_code == 2
    errors = [line for line in adapt.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no trainable parameters" in errors[0] and "Traceback" not in adapt.output
    assert not (tmp_path / "adapted").exists()
