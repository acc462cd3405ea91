"""Hostile and broken inputs: each is one clear line naming the file/field, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.errors import RecipeError, SurgeonWarning
from surgeon.recipe import parse_recipe

# ------------------------------------------------------------------------------------------ corpus


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/surgeon-pwned",))


def build_corpus(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI arguments after `convert`, expected fragment of the error)."""
    root.mkdir(parents=True, exist_ok=True)
    good = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file(good, str(root / "good.safetensors"))
    data = (root / "good.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "garbage.safetensors").write_bytes(os.urandom(4096))
    (root / "empty.safetensors").write_bytes(b"")
    (root / "empty.pth").write_bytes(b"")
    torch.save({"model": Evil()}, root / "evil.pth")
    torch.save({k: v for k, v in good.items() if not k.startswith("fc.")}, root / "missing.pth")
    torch.save({**good, "extra.weight": torch.zeros(1)}, root / "unexpected.pth")
    torch.save({**good, "conv1.weight": torch.zeros(64, 3, 5, 5)}, root / "shape.pth")
    nan = dict(good)
    nan["layer1.0.conv1.weight"] = torch.full_like(good["layer1.0.conv1.weight"], float("nan"))
    save_file(nan, str(root / "nan.safetensors"))
    torch.save([1, 2, 3], root / "notadict.pth")
    (root / "noweights").mkdir()
    (root / "noweights" / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    (root / "badconfig").mkdir()
    (root / "badconfig" / "config.json").write_text("{not json")
    (root / "loop").mkdir()
    try:
        (root / "loop" / "a.safetensors").symlink_to(root / "loop" / "b.safetensors")
        (root / "loop" / "b.safetensors").symlink_to(root / "loop" / "a.safetensors")
    except OSError:
        pass
    return {
        "truncated": ([str(root / "truncated.safetensors"), "--arch", "resnet18"], "not a valid safetensors"),
        "garbage": ([str(root / "garbage.safetensors"), "--arch", "resnet18"], "not a valid safetensors"),
        "empty safetensors": ([str(root / "empty.safetensors"), "--arch", "resnet18"], "file is empty"),
        "empty pth": ([str(root / "empty.pth"), "--arch", "resnet18"], "file is empty"),
        "pickle": ([str(root / "evil.pth"), "--arch", "resnet18"], "refused"),
        "missing keys": ([str(root / "missing.pth"), "--arch", "resnet18"], "missing key(s): fc.weight"),
        "unexpected keys": ([str(root / "unexpected.pth"), "--arch", "resnet18"], "unexpected key(s): extra.weight"),
        "shape": ([str(root / "shape.pth"), "--arch", "resnet18"], "shape mismatch(es): conv1.weight"),
        "nan": ([str(root / "nan.safetensors"), "--arch", "resnet18"], "NaN or Inf"),
        "wrong architecture": ([str(root / "good.safetensors"), "--arch", "mobilenetv2_100"], "does not fit"),
        "unknown architecture": ([str(root / "good.safetensors"), "--arch", "resnet999"], "unknown architecture"),
        "not a dict": ([str(root / "notadict.pth"), "--arch", "resnet18"], "holds no state dict"),
        "directory without weights": ([str(root / "noweights")], "no weights file"),
        "bad config": ([str(root / "badconfig")], "not valid JSON"),
        "symlink loop": ([str(root / "loop" / "a.safetensors"), "--arch", "resnet18"], "symbolic link"),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[list[str], str]]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("case", ["truncated", "garbage", "empty safetensors", "empty pth", "pickle",
                                  "missing keys", "unexpected keys", "shape", "nan", "wrong architecture",
                                  "unknown architecture", "not a dict", "directory without weights", "bad config",
                                  "symlink loop"])
def test_bad_checkpoints(corpus, case, tmp_path):
    arguments, fragment = corpus[case]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", *arguments, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert not Path("/tmp/surgeon-pwned").exists()


def test_non_strict_allows_missing_keys(corpus, tmp_path):
    arguments, _ = corpus["missing keys"]
    result = CliRunner().invoke(app, ["convert", *arguments, "--non-strict", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------ recipes
TINY = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.GELU(),
                     nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.Sigmoid()).eval()
EXAMPLE = torch.randn(2, 3, 12, 12)

values = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(-2, 3), st.just(float("nan")),
                   st.text(max_size=6), st.lists(st.text(max_size=6), max_size=3))
rule_keys = st.sampled_from(["target", "layer", "include", "exclude", "rank", "a_kernel", "a_dilation", "b_kernel",
                             "b_dilation", "b_init_std", "train_bias", "keep_branches", "min_kernel",
                             "saved_input_bits", "ops", "bits", "output_bits", "group_size", "attention",
                             "batchnorm", "layernorm", "layernorm_bits", "colour"])
targets = st.sampled_from(["depthwise_conv", "activation", "conv", "norm", "nonsense"])


@st.composite
def random_recipes(draw):
    rules = []
    for _ in range(draw(st.integers(0, 3))):
        rule = {"target": draw(targets)}
        for key in draw(st.lists(rule_keys, max_size=4, unique=True)):
            rule[key] = draw(values)
        if draw(st.booleans()):
            rule["include"] = draw(st.lists(st.sampled_from(["*", "0", "2", "blocks.*", "re:[0-9]+", "re:("]),
                                            max_size=2))
        rules.append(rule)
    recipe = {"name": "r" if draw(st.integers(0, 4)) else draw(values), "rules": rules}
    if draw(st.booleans()):
        recipe[draw(st.sampled_from(["trainable", "description", "extra"]))] = draw(values)
    return recipe


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(random_recipes())
def test_random_recipes_error_cleanly_or_convert_exactly(recipe):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SurgeonWarning)  # recipes with nothing to train are valid
            converted = surgeon.convert(TINY, recipe, example_input=EXAMPLE[:1])
    except RecipeError as exc:
        message = str(exc)
        assert "\n" not in message
        named = re.search(r"field '([^']+)'", message)
        assert named, message
        assert field_exists(recipe, named.group(1)), message  # the error points at a field the recipe has
        return
    with torch.no_grad():
        assert torch.equal(converted(EXAMPLE), TINY(EXAMPLE))


def field_exists(recipe: dict, path: str) -> bool:
    """Whether a field path of an error message (``name``, ``rules[1].bits``) is present in ``recipe``."""
    match = re.fullmatch(r"rules\[(\d+)\](?:\.(\w+))?", path)
    if match is None:
        return path in recipe
    rules = recipe.get("rules")
    index, key = int(match.group(1)), match.group(2)
    return isinstance(rules, list) and index < len(rules) and (key is None or key in rules[index])


@pytest.mark.parametrize("rule,field", [
    ({"target": "depthwise_conv", "rank": 0}, "rank"),
    ({"target": "activation", "bits": 3}, "bits"),
    ({"target": "depthwise_conv", "a_kernel": 3, "a_dilation": 9}, "a_dilation"),
    ({"target": "depthwise_conv", "include": []}, None),
    ({"target": "depthwise_conv", "include": ["blocks.*"]}, "rules[0].include"),
])
def test_recipe_edge_cases(rule, field):
    recipe = {"name": "x", "rules": [rule]}
    if field is None:  # an empty include list selects everything, as no include does
        def swapped(recipe: dict) -> list[str]:
            converted = surgeon.convert(TINY, recipe, example_input=EXAMPLE[:1])
            return [s.path for s in converted.surgeon_info.sites if s.action == "swap"]

        assert swapped(recipe) == swapped({"name": "x", "rules": [{"target": "depthwise_conv"}]}) == ["2"]
        return
    with pytest.raises(RecipeError, match=field.replace("[", r"\[").replace("]", r"\]")):
        surgeon.convert(TINY, recipe, example_input=EXAMPLE[:1])


def test_recipe_type_errors_name_the_field():
    with pytest.raises(RecipeError, match=r"'rules\[0\]\.ops'"):
        parse_recipe({"name": "x", "rules": [{"target": "activation", "ops": "relu"}]})


# ------------------------------------------------------------------------------------------ crash safety
SAVER = """
import sys, torch, surgeon, timm
model = timm.create_model("convnext_tiny", pretrained=False).eval()
converted = surgeon.convert(model, "quadranet-v2", base={"architecture": "convnext_tiny", "model_args": {}})
while True:
    surgeon.save(converted, sys.argv[1], force=True)
    print("saved", flush=True)
    if sys.argv[2] == "once":
        break
"""


def test_sigkill_during_save_leaves_the_previous_artifact_and_no_debris(tmp_path):
    out = tmp_path / "artifact"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    killed_mid_save = 0
    for delay in (0.05, 0.3, 0.7, 1.1):
        process = subprocess.Popen([sys.executable, str(script), str(out), "loop"], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "saved"  # one complete save before the kill
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        debris = [p.name for p in tmp_path.iterdir() if p.name.startswith(".artifact.")]
        killed_mid_save += bool(debris)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        assert surgeon.load(out) is not None  # complete and verified (SHA-256 matches)
    assert killed_mid_save, "no kill landed inside a save; the test proved nothing"
    subprocess.run([sys.executable, str(script), str(out), "once"], check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "saver.py"]  # dead writers' staging removed


def test_existing_out_needs_force(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3))
    converted = surgeon.convert(model, "quadranet-v2", example_input=torch.randn(1, 3, 8, 8))
    surgeon.save(converted, tmp_path / "a")
    with pytest.raises(surgeon.SurgeonError, match="--force"):
        surgeon.save(converted, tmp_path / "a")


# ------------------------------------------------------------------------------------------ CLI contract
def test_real_subprocess_json_and_no_progress_without_tty(tmp_path):
    result = subprocess.run([sys.executable, "-m", "surgeon", "plan", "convnext_atto", "--json"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert document["schema"] == "surgeon.plan/1" and document["sites"]
    assert "\x1b[" not in result.stderr and "⠋" not in result.stderr  # no spinner or colour codes
    bad = subprocess.run([sys.executable, "-m", "surgeon", "convert", "resnet18"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and bad.stdout == ""
    usage = subprocess.run([sys.executable, "-m", "surgeon", "plan"], capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2
