"""Crafted artifacts and careless outputs, tried as a malicious repository or a hurried user would.

Each case runs the real CLI in-process with the network blocked (only loopback connects), next to a local HTTP
server that counts every request a crafted URL could cause. Every case must end in one line and exit 2, within
10 s, with no request made, nothing written outside its own output, and no tensor allocated beyond a bound.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app

ARCH = "mobilenetv3_small_050"
MAX_TENSOR_BYTES = 64 << 20  # the test model's largest tensor is 2 MB; a size bomb asks for gigabytes


class _Trap(BaseHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def trap(monkeypatch, tmp_path):
    """A counting HTTP server on loopback; every other destination is refused, and the Hub points at the trap."""
    handler = type("Trap", (_Trap,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    real_connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"network blocked in this test ({host})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield url, handler.requests
    server.shutdown()
    server.server_close()


class LargestTensor(TorchDispatchMode):
    """The largest tensor any op produced (meta tensors hold no memory and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One converted, one adapter-only and one merged artifact of a small timm model, plus its weights file."""
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    loaded = surgeon.load_model(ARCH, pretrained=False)
    converted = surgeon.convert(loaded.model, "quadranet-v2-s2a", base=loaded.base)
    surgeon.save(converted, root / "converted")
    surgeon.save_adapter(converted, root / "adapter")
    surgeon.save_merged(surgeon.merge(converted, fold_bn=True), root / "merged")
    return root


def _edit(directory: Path, change: Callable[[dict], None], name: str = "config.json") -> None:
    config = json.loads((directory / name).read_text())
    change(config)
    (directory / name).write_text(json.dumps(config))


def _section(**values: Any) -> Callable[[dict], None]:
    return lambda config: config["surgeon"].update(values)


def _top(**values: Any) -> Callable[[dict], None]:
    return lambda config: config.update(values)


def _args(**values: Any) -> Callable[[dict], None]:
    return lambda config: config.setdefault("model_args", {}).update(values)


def _layer(**values: Any) -> Callable[[dict], None]:
    return lambda config: config["surgeon"]["layers"][0].update(values)


def _rule(index: int, **values: Any) -> Callable[[dict], None]:
    return lambda config: config["surgeon"]["recipe"]["rules"][index].update(values)


def _no_sha(config: dict) -> None:
    config["surgeon"].pop("weights_sha256")


# (case id, artifact kind, config change, expected message) - ``{trap}`` and ``{outside}`` are filled in per run
ADAPTER = "adapter_config.json"
CASES: list[tuple[str, str, Callable[..., Callable[[dict], None]], str]] = [
    ("download-url-into-any-dir", "adapter", lambda t, o: _args(
        pretrained_cfg_overlay={"url": f"{t}/x.pth", "hf_hub_id": None}, cache_dir=str(o)),
     r"model_args\.(pretrained_cfg_overlay|cache_dir)"),
    ("checkpoint-path", "adapter", lambda t, o: _args(checkpoint_path="/etc/passwd"), r"model_args\.checkpoint_path"),
    ("cache-dir", "adapter", lambda t, o: _args(cache_dir=str(o)), r"model_args\.cache_dir"),
    ("file-arg", "adapter", lambda t, o: _args(file=str(o / "x.pth")), r"model_args\.file"),
    ("unknown-constructor-arg", "adapter", lambda t, o: _args(not_an_argument=1), r"model_args\.not_an_argument"),
    ("url-valued-arg", "converted", lambda t, o: _args(global_pool=f"{t}/pool"), r"model_args\.global_pool"),
    ("base-is-url", "adapter", lambda t, o: _section(base_model=f"{t}/base.pth", base_weights=None),
     r"neither timm:NAME nor hf-hub"),
    ("base-is-absolute-path", "adapter", lambda t, o: _section(base_model=str(o / "b.safetensors"),
                                                                base_weights=None), r"neither timm:NAME nor hf-hub"),
    ("base-is-relative-path", "adapter", lambda t, o: _section(base_model="../base.safetensors", base_weights=None),
     r"neither timm:NAME nor hf-hub"),
    ("base-is-local-dir", "adapter", lambda t, o: _section(base_model=f"local-dir:{o}", base_weights=None),
     r"neither timm:NAME nor hf-hub"),
    ("base-is-other-architecture", "adapter", lambda t, o: _section(base_model="timm:resnet18", base_weights="timm"),
     r"not the recorded timm architecture"),
    ("base-hub-id-malformed", "adapter", lambda t, o: _section(base_model="hf-hub:../../etc", base_weights="hf-hub"),
     r"not a Hub repo id"),
    ("random-init-base", "adapter", lambda t, o: _section(base_model=None, base_weights="random-init"),
     r"randomly initialised model; pass the base yourself"),
    ("weights-outside-dir", "converted", lambda t, o: _section(weights_file="../model.safetensors"),
     r"weights_file.*not a plain file name"),
    ("weights-absolute", "merged", lambda t, o: _section(weights_file="/etc/passwd"), r"weights_file"),
    ("adapter-weights-outside", "adapter", lambda t, o: _section(weights_file="../x.safetensors"), r"weights_file"),
    ("no-sha256", "converted", lambda t, o: _no_sha, r"weights_sha256.*required|weights_sha256.*Field required"),
    ("sha256-not-hex", "merged", lambda t, o: _section(weights_sha256="0" * 63 + "g"), r"weights_sha256"),
    ("backtracking-pattern", "converted", lambda t, o: _rule(0, exclude=[r"re:(.|.|.)*\d\d\d"]), r"backtracks"),
    ("rank-bomb", "converted", lambda t, o: _rule(0, rank=10**6), r"rank.*from 1 to 8"),
    ("example-input-bomb", "converted", lambda t, o: _section(example_input_shape=[1, 3, 16384, 16384]),
     r"example_input_shape"),
    ("example-input-batch", "adapter", lambda t, o: _section(example_input_shape=[64, 3, 224, 224]),
     r"example_input_shape.*batch 1"),
    ("num-classes-bomb", "converted", lambda t, o: _top(num_classes=10**9), r"num_classes"),
    ("num-classes-vs-weights", "merged", lambda t, o: _top(num_classes=50_000), r"num_classes.*50000.*rows"),
    ("model-args-classes-vs-weights", "converted", lambda t, o: _args(num_classes=77_000), r"num_classes"),
    ("adapter-head-bomb", "adapter", lambda t, o: _args(num_classes=90_000), r"num_classes.*90000.*no classifier"),
    ("size-bomb-in-model-args", "converted", lambda t, o: _args(in_chans=200_000), r"weight elements"),
    ("layer-channels-vs-weights", "merged", lambda t, o: _layer(channels=60_000), r"geometry asks for"),
    ("layer-kernel-vs-weights", "merged", lambda t, o: _layer(kernel_size=[31, 31]), r"geometry asks for"),
    ("layer-rank-bomb", "merged", lambda t, o: _layer(rank=4096), r"layers\.0\.rank"),
    ("unknown-top-level-key", "converted", lambda t, o: _top(trust_remote_code=True), r"trust_remote_code"),
    ("unknown-format", "merged", lambda t, o: _section(format="pickle"), r"surgeon"),
    ("export-outside-dir", "merged", lambda t, o: _section(exports=[{"file": "../../x.onnx", "format": "onnx",
                                                                     "sha256": "0" * 64}]), r"exports\.0\.file"),
]


def _run(argv: list[str]) -> tuple[Any, float, int]:
    mode = LargestTensor()
    start = time.perf_counter()
    with mode:
        result = CliRunner().invoke(app, argv)
    return result, time.perf_counter() - start, mode.largest


def _command(kind: str, directory: Path, out: Path) -> list[str]:
    if kind == "adapter":
        return ["merge", str(directory), "--out", str(out)]
    if "exports" in json.loads((directory / "config.json").read_text())["surgeon"]:
        return ["push", str(directory), "org/name", "--dry-run"]
    return ["plan", str(directory), "--json"]


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_hostile_artifact_is_one_line_error(case, good, trap, tmp_path):
    _, kind, make_change, expected = case
    url, requests = trap
    outside = tmp_path / "outside"
    directory = tmp_path / kind
    shutil.copytree(good / kind, directory)
    if kind == "adapter":  # as if trained over timm's pretrained weights: the base a crafted config would aim at
        _edit(directory, _section(base_model=f"timm:{ARCH}", base_weights="timm"), ADAPTER)
    _edit(directory, make_change(url, outside), ADAPTER if kind == "adapter" else "config.json")
    before = _tree(tmp_path)
    result, seconds, largest = _run(_command(kind, directory, tmp_path / "out"))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    import re

    assert re.search(expected, lines[0]), lines[0]
    assert requests == [], requests
    assert seconds < 10, seconds
    assert largest < MAX_TENSOR_BYTES, largest
    assert _tree(tmp_path) == before  # nothing written, outside the target or anywhere
    assert not outside.exists()


def test_huge_or_nested_config_is_refused_before_parsing(good, tmp_path):
    directory = tmp_path / "converted"
    shutil.copytree(good / "converted", directory)
    (directory / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    result, seconds, _ = _run(["plan", str(directory)])
    assert result.exit_code == 2 and "not valid JSON" in result.output and seconds < 10
    with open(directory / "config.json", "w") as handle:
        handle.write('{"surgeon": {"pad": "' + "x" * (33 << 20) + '"}}')
    result, _, _ = _run(["plan", str(directory)])
    assert result.exit_code == 2 and "larger than a config can be" in result.output, result.output


def test_good_artifacts_still_load(good, trap):
    """The corpus's own originals load (the checks refuse the crafted copies, not the format)."""
    _, requests = trap
    x = torch.randn(1, 3, 224, 224)
    base = timm.create_model(ARCH, pretrained=False)
    for kind in ("converted", "merged"):
        with torch.no_grad():
            assert torch.isfinite(surgeon.load(good / kind)(x)).all()
    surgeon.load(good / "adapter", model=base)
    assert requests == []


# ------------------------------------------------------------------------------------------ outputs
def _user_directory(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    (path / "config.json").write_text(json.dumps({"surgeon": {"format": "converted"}}))  # looks like ours
    return path


def test_force_never_replaces_a_directory_with_user_files(good, tmp_path):
    user = _user_directory(tmp_path / "thesis")
    result = CliRunner().invoke(app, ["convert", ARCH, "--random-init", "--out", str(user), "--force"])
    assert result.exit_code == 2 and "thesis.tex is not a file surgeon wrote" in result.output, result.output
    result = CliRunner().invoke(app, ["merge", str(good / "converted"), "--out", str(user), "--force"])
    assert result.exit_code == 2 and "refusing to replace" in result.output
    assert (user / "thesis.tex").read_text() == "years of work"
    converted = surgeon.load(good / "converted")
    with pytest.raises(surgeon.SurgeonError, match="refusing to replace"):
        surgeon.save(converted, user, force=True)
    with pytest.raises(surgeon.SurgeonError, match="already exists"):
        surgeon.save(converted, good / "converted")
    assert sorted(p.name for p in user.iterdir()) == ["config.json", "thesis.tex"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    surgeon.save(converted, tmp_path / "ours")
    surgeon.save(converted, tmp_path / "ours", force=True)  # surgeon's own artifact is replaced


def test_adapt_api_needs_force_and_never_replaces_user_files(good, tmp_path):
    from tests.test_adapt import write_images

    write_images(tmp_path / "data", {"0": 2, "1": 2})
    model = surgeon.load(good / "converted")
    loader = [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))]
    user = _user_directory(tmp_path / "user")
    with pytest.raises(surgeon.SurgeonError, match="already exists"):
        surgeon.adapt(model, loader, epochs=1, out=user, progress=False)
    with pytest.raises(surgeon.SurgeonError, match=r"thesis\.tex is not a file surgeon wrote"):
        surgeon.adapt(model, loader, epochs=1, out=user, force=True, progress=False)
    assert (user / "thesis.tex").read_text() == "years of work"


def test_adapter_out_must_be_its_own_directory(good, tmp_path):
    from tests.test_adapt import write_images

    write_images(tmp_path / "data", {"0": 2, "1": 2})
    for adapter_out in (tmp_path / "out", tmp_path / "out" / "adapter"):
        result = CliRunner().invoke(app, ["adapt", str(good / "converted"), "--data", str(tmp_path / "data"),
                                          "--out", str(tmp_path / "out"), "--adapter-out", str(adapter_out),
                                          "--epochs", "1"])
        assert result.exit_code == 2 and "must be a directory of its own" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_out_dot_and_symlinked_out(good, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["convert", ARCH, "--random-init", "--out", ".", "--force"])
    assert result.exit_code == 2 and "working directory" in result.output, result.output
    real = tmp_path / "real"
    (tmp_path / "link").symlink_to(real)
    converted = surgeon.load(good / "converted")
    surgeon.save(converted, tmp_path / "link")
    surgeon.save(converted, tmp_path / "link", force=True)
    assert (tmp_path / "link").is_symlink() and (real / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no staging left behind


def test_new_artifacts_follow_the_umask(good, tmp_path):
    previous = os.umask(0o022)
    try:
        surgeon.save(surgeon.load(good / "converted"), tmp_path / "shared")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "shared").iterdir()} == {0o644}


def test_demo_refuses_a_directory_it_did_not_write(tmp_path):
    user = _user_directory(tmp_path / "mine")
    result = CliRunner().invoke(app, ["demo", "--out", str(user), "--epochs", "1"])
    assert result.exit_code == 2 and "not written by `surgeon demo`" in result.output, result.output
    assert sorted(p.name for p in user.iterdir()) == ["config.json", "thesis.tex"]


def test_export_force_replaces_only_its_own_export(good, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(good / "merged", merged)
    (merged / "model.onnx").write_text("a user's file")
    result = CliRunner().invoke(app, ["export", str(merged), "--force", "--no-check"])
    assert result.exit_code == 2 and "surgeon did not write it" in result.output, result.output
    assert (merged / "model.onnx").read_text() == "a user's file"


# ------------------------------------------------------------------------------------------ push
def _secrets(directory: Path, tmp_path: Path) -> None:
    (tmp_path / "id_rsa").write_text("PRIVATE KEY")
    (tmp_path / "private-model").mkdir()
    (tmp_path / "private-model" / "model.safetensors").write_text("private weights")
    (directory / "token").write_text("hf_secret")
    (directory / "notes").mkdir()
    (directory / "notes" / "plan.md").write_text("unpublished")
    (directory / "README.md").write_text("my own notes")
    (directory / "key").symlink_to(tmp_path / "id_rsa")
    (directory / "other").symlink_to(tmp_path / "private-model")


def test_push_sends_only_the_allowlist(good, tmp_path, monkeypatch):
    import huggingface_hub

    from tests.hub_server import LocalHub

    directory = tmp_path / "merged"
    shutil.copytree(good / "merged", directory)
    _secrets(directory, tmp_path)
    dry = CliRunner().invoke(app, ["push", str(directory), "org/model", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["files"] == ["config.json", "model.safetensors", "README.md"]
    with LocalHub("tok") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        surgeon.push_to_hub(directory, "org/model", token="tok")
        files = hub.state.repos["org/model"].files
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    sent = b"".join(files.values())
    for secret in (b"hf_secret", b"PRIVATE KEY", b"private weights", b"unpublished", b"my own notes"):
        assert secret not in sent


def test_push_refuses_symlinked_weights(good, tmp_path):
    directory = tmp_path / "merged"
    shutil.copytree(good / "merged", directory)
    (tmp_path / "elsewhere.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    result = CliRunner().invoke(app, ["push", str(directory), "org/model", "--dry-run"])
    assert result.exit_code == 2 and "symbolic link" in result.output, result.output


def test_card_escapes_config_fields_and_names_only_the_real_base(good, tmp_path):
    from surgeon.io.push import _card

    config = json.loads((good / "merged" / "config.json").read_text())
    config["surgeon"]["recipe"]["description"] = "<script>alert(1)</script>\n```\n# injected"
    config["surgeon"]["recipe"]["name"] = "x```y"
    card = _card(config, "org/model")
    assert "<script>" not in card and "\n# injected" not in card
    body = card.split("## Recipe")[1]
    assert body.count("```") == 2  # the recipe's own fence only
    assert "base_model" not in card.split("---")[1]  # random-init base: no Hub base named
    config["surgeon"].update(base_model="timm:" + ARCH, base_weights="timm")
    assert f"base_model: {config['pretrained_cfg']['hf_hub_id']}" in _card(config, "org/model")


# ------------------------------------------------------------------------------------------ hub fetches
def test_hub_load_fetches_only_the_artifact_files(good, tmp_path, monkeypatch):
    import huggingface_hub

    from tests.hub_server import LocalHub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with LocalHub("tok") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        surgeon.push_to_hub(good / "merged", "org/model", token="tok")
        hub.state.repos["org/model"].files["evil.py"] = b"import os"
        hub.state.repos["org/model"].files["huge.bin"] = b"0" * 1000
        surgeon.load("hf-hub:org/model", token="tok")
    fetched = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() or p.is_symlink()}
    assert "evil.py" not in fetched and "huge.bin" not in fetched and "model.safetensors" in fetched


def test_offline_uncached_repo_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(app, ["plan", "hf-hub:org/not-cached"])
    assert result.exit_code == 2 and "not in the local cache" in result.output, result.output
