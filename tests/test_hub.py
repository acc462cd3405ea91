"""Push and load through a real HTTP server that speaks the Hub API subset huggingface_hub uses."""

from __future__ import annotations

import hashlib
import json

import huggingface_hub
import pytest
import timm
import torch
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.errors import CheckpointError
from tests.hub_server import LocalHub

TOKEN = "hf_test_token"


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    with LocalHub(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # LFS, not xet (see server)
        yield server


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("artifacts")
    base = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    converted = surgeon.convert(base, "quadranet-v2-s2a", base={"architecture": "mobilenetv3_small_050",
                                                                 "model_args": {}})
    with torch.no_grad():
        for name, param in surgeon.trainable_parameters(converted).items():
            if name.endswith("weight_a"):
                param.normal_(0, 0.1)
    converted.surgeon_metrics = {"val_top1": 81.5, "val_top5": 97.0, "epochs_trained": 3}
    surgeon.save(converted, root / "adapter")
    surgeon.save_merged(surgeon.merge(converted, fold_bn=True), root / "merged")
    return root, converted


@pytest.mark.parametrize("kind", ["merged", "adapter"])
def test_push_and_load_back(hub, artifacts, kind):
    root, converted = artifacts
    result = surgeon.push_to_hub(root / kind, f"org/{kind}", token=TOKEN)
    assert result.card_written and result.commit_url.startswith(hub.url)
    files = hub.state.repos[f"org/{kind}"].files
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert hub.state.repos[f"org/{kind}"].lfs_files == {"model.safetensors"}  # weights take the LFS branch
    assert hashlib.sha256(files["model.safetensors"]).hexdigest() in hub.state.lfs_uploads
    assert files["model.safetensors"] == (root / kind / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "library_name: timm" in card and "quadranet-v2" in card and "s2a" in card
    assert f'surgeon.load("hf-hub:org/{kind}")' in card
    config = json.loads(files["config.json"])
    assert config["architecture"] == "mobilenetv3_small_050" and "pretrained_cfg" in config
    loaded = surgeon.load(f"hf-hub:org/{kind}")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = converted.eval()(x)
        got = loaded(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # every command taking MODEL accepts the repo id too
    plan = CliRunner().invoke(app, ["plan", f"hf-hub:org/{kind}", "--json"])
    assert plan.exit_code == 0, plan.output


def test_card_mentions_metrics_and_merge_error(hub, artifacts):
    root, _ = artifacts
    surgeon.push_to_hub(root / "merged", "org/m", token=TOKEN)
    card = hub.state.repos["org/m"].files["README.md"].decode()
    assert "merge verification" in card and "folded BatchNorms" in card
    surgeon.push_to_hub(root / "adapter", "org/a", token=TOKEN)
    card = hub.state.repos["org/a"].files["README.md"].decode()
    assert "top-1 81.5" in card and "added parameters" in card


def test_existing_readme_is_kept(hub, artifacts):
    root, _ = artifacts
    surgeon.push_to_hub(root / "merged", "org/kept", token=TOKEN)
    hub.state.repos["org/kept"].files["README.md"] = b"my own card"
    result = CliRunner().invoke(app, ["push", str(root / "merged"), "org/kept", "--token", TOKEN])
    assert result.exit_code == 0, result.output
    assert "kept the README.md" in result.stdout
    assert hub.state.repos["org/kept"].files["README.md"] == b"my own card"
    surgeon.push_to_hub(root / "merged", "org/kept", token=TOKEN, overwrite_card=True)
    assert hub.state.repos["org/kept"].files["README.md"] != b"my own card"


def test_create_pr(hub, artifacts):
    root, _ = artifacts
    surgeon.push_to_hub(root / "merged", "org/pr", token=TOKEN)
    result = surgeon.push_to_hub(root / "adapter", "org/pr", token=TOKEN, create_pr=True)
    assert result.pull_request_url and "discussions/1" in result.pull_request_url
    assert json.loads(hub.state.repos["org/pr"].files["config.json"])["surgeon"]["format"] == "merged"


def test_wrong_token(hub, artifacts):
    root, _ = artifacts
    result = CliRunner().invoke(app, ["push", str(root / "merged"), "org/x", "--token", "hf_wrong"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith("error:") and "not authorised" in line and "--token" in line
    assert len(line.splitlines()) == 1 and "org/x" not in hub.state.repos


def test_server_error_mid_upload(hub, artifacts):
    root, _ = artifacts
    hub.state.fail_commits = 1  # a transient 500 is retried by the client and the push succeeds
    surgeon.push_to_hub(root / "merged", "org/transient", token=TOKEN)
    assert "model.safetensors" in hub.state.repos["org/transient"].files
    hub.state.fail_commits = 100  # a server that keeps failing: one clear error, nothing claimed as done
    result = CliRunner().invoke(app, ["push", str(root / "merged"), "org/flaky", "--token", TOKEN])
    assert result.exit_code == 2
    assert "500" in result.output and "nothing was committed" in result.output and "retry" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert hub.state.repos["org/flaky"].files == {}
    hub.state.fail_commits = 0
    surgeon.push_to_hub(root / "merged", "org/flaky", token=TOKEN)  # retrying later works
    assert "model.safetensors" in hub.state.repos["org/flaky"].files


def test_offline(monkeypatch, artifacts, tmp_path):
    root, _ = artifacts
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(app, ["push", str(root / "merged"), "org/x"])
    assert result.exit_code == 2 and "HF_HUB_OFFLINE" in result.output
    with pytest.raises(CheckpointError, match="not in the local cache"):
        surgeon.load("hf-hub:org/never-downloaded")
    plan = CliRunner().invoke(app, ["plan", "hf-hub:org/never-downloaded"])
    assert plan.exit_code == 2 and len(plan.output.strip().splitlines()) == 1


def test_pushing_the_same_weights_again_uploads_no_lfs_object(hub, artifacts):
    root, _ = artifacts
    surgeon.push_to_hub(root / "merged", "org/once", token=TOKEN)
    uploads = len(hub.state.lfs_uploads)
    surgeon.push_to_hub(root / "merged", "org/twice", token=TOKEN)
    assert len(hub.state.lfs_uploads) == uploads  # the server already has the object: no upload action
    weights = (root / "merged" / "model.safetensors").read_bytes()
    assert hub.state.repos["org/twice"].files["model.safetensors"] == weights


def test_adapter_only_repo_is_small_and_loads_over_its_base(hub, artifacts, tmp_path):
    root, converted = artifacts
    surgeon.save_adapter(converted, tmp_path / "adapter-only")
    surgeon.push_to_hub(tmp_path / "adapter-only", "org/adapter-only", token=TOKEN)
    files = hub.state.repos["org/adapter-only"].files
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    full = (root / "adapter" / "model.safetensors").stat().st_size
    assert len(files["adapter_model.safetensors"]) * 10 < full
    card = files["README.md"].decode()
    assert "adapter-only" in card and 'model=base_model' in card
    torch.manual_seed(0)  # the artifacts fixture's base: same seed, same random weights
    base = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    loaded = surgeon.load("hf-hub:org/adapter-only", model=base)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))


def test_timm_create_model_from_the_hub_plus_from_timm(hub, artifacts, tmp_path, monkeypatch):
    root, _ = artifacts
    surgeon.push_to_hub(root / "merged", "org/timm-merged", token=TOKEN)
    # timm downloads with huggingface_hub's import-time settings: point them at the test server
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "timm-cache"))
    card = hub.state.repos["org/timm-merged"].files["README.md"].decode()
    assert 'surgeon.from_timm(timm.create_model("hf-hub:org/timm-merged", pretrained=False))' in card
    model = surgeon.from_timm(timm.create_model("hf-hub:org/timm-merged", pretrained=False))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), surgeon.load(root / "merged")(x))
