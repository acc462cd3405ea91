"""Adapter training: only adapters move, checkpoints load, resume is exact, data errors are clear, DDP agrees."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.errors import SurgeonError
from surgeon.train.distributed import trainable_digest
from surgeon.train.training_state import load_training_state


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act = nn.GELU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.dw(self.stem(x))).mean((2, 3)))


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(48, 3, 12, 12, generator=generator)
    targets = (images[:, 0].mean((1, 2)) > 0).long() + (images[:, 1].mean((1, 2)) > 0).long()
    data = TensorDataset(images, targets)
    return (DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(data, batch_size=16))


def converted_tiny() -> nn.Module:
    torch.manual_seed(0)
    return surgeon.convert(Tiny().eval(), "quadranet-v2-s2a", example_input=torch.randn(1, 3, 12, 12))


def test_only_trainable_parameters_change(tmp_path):
    model = converted_tiny()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train, val = loaders()
    report = surgeon.adapt(model, train, val, epochs=4, lr=0.05, out=tmp_path / "run", log=lambda _: None)
    assert len(report.history) == 4
    assert report.history[-1].train_loss < report.history[0].train_loss
    for name, before in frozen.items():
        assert torch.equal(model.get_parameter(name), before), name
    assert model.dw.weight_a.abs().sum() > 0
    reloaded = surgeon.load(tmp_path / "run", model=Tiny())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model.eval()(x))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["surgeon"]["metrics"]["epochs_trained"] == 4
    assert load_training_state(tmp_path / "run")["epoch"] == 3


def test_resume_is_exact(tmp_path):
    straight = converted_tiny()
    train, val = loaders()
    surgeon.adapt(straight, train, val, epochs=3, lr=0.05, out=tmp_path / "a", log=lambda _: None)

    class Interrupted(Exception):
        pass

    def crash_after_second_epoch(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise Interrupted

    first = converted_tiny()
    train, val = loaders()
    with pytest.raises(Interrupted):
        surgeon.adapt(first, train, val, epochs=3, lr=0.05, out=tmp_path / "b", log=crash_after_second_epoch)
    resumed = surgeon.load(tmp_path / "b", model=Tiny())
    torch.manual_seed(12345)  # whatever the caller's RNG is, the saved state wins
    train, val = loaders()
    report = surgeon.adapt(resumed, train, val, epochs=3, lr=0.05, out=tmp_path / "b", resume=True,
                           log=lambda _: None)
    assert [h.epoch for h in report.history] == [0, 1, 2]
    assert trainable_digest(resumed) == trainable_digest(straight)


def test_options_are_validated():
    model = converted_tiny()
    train, _ = loaders()
    with pytest.raises(SurgeonError, match="lr"):
        surgeon.adapt(model, train, lr=-1)
    with pytest.raises(SurgeonError, match="resume"):
        surgeon.adapt(model, train, resume=True)


# ------------------------------------------------------------------------------------------ CLI + data
def write_images(root: Path, classes: dict[str, int], size: int = 24, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for index, (name, count) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count if split == "train" else max(1, count // 2)):
                pixels = rng.integers(0, 80, (size, size, 3)) + 120 * index
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    base = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    converted = surgeon.convert(base, "quadranet-v2-s2a", base={"architecture": "mobilenetv3_small_050",
                                                                 "model_args": {}})
    return surgeon.save(converted, tmp_path_factory.mktemp("art") / "small")


def test_cli_new_classes_reset_head_and_corrupt_images_are_skipped(tmp_path, small_artifact):
    write_images(tmp_path / "data", {"cat": 6, "dog": 6})
    (tmp_path / "data" / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    result = CliRunner().invoke(app, ["adapt", str(small_artifact), "--data", str(tmp_path / "data"), "--out",
                                      str(tmp_path / "out"), "--epochs", "2", "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image" in result.stderr
    assert "classifier head reset to 2 classes" in result.stderr
    report = json.loads(result.stdout)
    assert len(report["history"]) == 2 and report["history"][-1]["val_top1"] is not None
    loaded = surgeon.load(tmp_path / "out")
    assert loaded.num_classes == 2 and loaded.get_classifier().weight.requires_grad
    again = CliRunner().invoke(app, ["adapt", str(small_artifact), "--data", str(tmp_path / "data"), "--out",
                                     str(tmp_path / "out")])
    assert again.exit_code == 2 and "--resume" in again.output


@pytest.mark.parametrize("layout,message", [
    ({}, "data directory does not exist"),
    ({"train": {}}, "no class folders"),
    ({"train": {"a": 0}}, "no images"),
    ({"train": {"a": 2, "b": 2}, "val": {"a": 1}}, "class mismatch"),
])
def test_cli_data_errors(tmp_path, small_artifact, layout, message):
    root = tmp_path / "data"
    for split, classes in layout.items():
        (root / split).mkdir(parents=True)
        for name, count in classes.items():
            (root / split / name).mkdir()
            for i in range(count):
                Image.new("RGB", (8, 8)).save(root / split / name / f"{i}.png")
    result = CliRunner().invoke(app, ["adapt", str(small_artifact), "--data", str(root), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(arguments: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "--master_addr=127.0.0.1", "-m", "surgeon", "adapt", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_torchrun_ranks_split_the_batch_count_validation_once_and_resume_exactly(tmp_path, small_artifact):
    write_images(tmp_path / "data", {"a": 8, "b": 8})
    Image.new("RGB", (24, 24), (200, 10, 10)).save(tmp_path / "data" / "val" / "a" / "extra.png")  # 9 val images
    common = [str(small_artifact), "--data", str(tmp_path / "data"), "--epochs", "2", "--lr", "0.005"]
    two_ranks = torchrun([*common, "--out", str(tmp_path / "ddp"), "--batch-size", "4"])
    digests = re.findall(r"rank (\d): trainable sha256 ([0-9a-f]{64})", two_ranks.stdout)
    assert sorted(rank for rank, _ in digests) == ["0", "1"] and digests[0][1] == digests[1][1]
    ddp = surgeon.load(tmp_path / "ddp")
    assert trainable_digest(ddp) == digests[0][1]
    state = load_training_state(tmp_path / "ddp")
    assert len(state["rng"]) == 2  # each rank's own streams
    assert [h["val_images"] for h in state["history"]] == [9, 9]  # no padding duplicates counted

    # one process with the whole batch (8) sees the same global batches as two ranks with 4 each
    single = CliRunner().invoke(app, ["adapt", *common, "--out", str(tmp_path / "single"), "--batch-size", "8"])
    assert single.exit_code == 0, single.output
    alone = surgeon.trainable_parameters(surgeon.load(tmp_path / "single"))
    shared = surgeon.trainable_parameters(ddp)
    start = surgeon.trainable_parameters(surgeon.load(small_artifact))
    assert set(alone) == set(shared)
    moved = max((alone[n] - start[n]).abs().max().item() for n in start)  # how far training moved the adapters
    gap = max((alone[n] - shared[n]).abs().max().item() for n in alone)
    assert gap <= 0.01 * moved, (gap, moved)  # measured: 0.0045

    # a run stopped after one epoch and resumed on two ranks ends where the straight run ended
    torchrun([*common, "--out", str(tmp_path / "split"), "--batch-size", "4", "--stop-after", "1"])
    assert load_training_state(tmp_path / "split")["epoch"] == 0
    torchrun([*common, "--out", str(tmp_path / "split"), "--batch-size", "4", "--resume"])
    histories = [load_training_state(tmp_path / run)["history"] for run in ("ddp", "split")]
    assert trainable_digest(surgeon.load(tmp_path / "split")) == digests[0][1], histories


def test_samplers_split_every_epoch_between_ranks_and_count_validation_once():
    from surgeon.train.sampling import EpochPermutationSampler, ShardSampler

    shares = [EpochPermutationSampler(10, seed=3, rank=r, world=3) for r in range(3)]
    for sampler in shares:
        sampler.set_epoch(5)
    keys = [list(s) for s in shares]
    assert all(len(k) == 4 for k in keys)  # equal steps on every rank (10 padded to 12)
    indices = [i for k in keys for _, i in k]
    assert set(indices) == set(range(10)) and all(epoch == 5 for k in keys for epoch, _ in k)
    distinct = [EpochPermutationSampler(12, seed=3, rank=r, world=3) for r in range(3)]
    parts = [{i for _, i in s} for s in distinct]
    assert sum(map(len, parts)) == 12 and set.union(*parts) == set(range(12))  # ranks see different samples
    single = EpochPermutationSampler(10, seed=3)
    single.set_epoch(5)
    assert [i for _, i in single][:9] == [keys[p % 3][p // 3][1] for p in range(9)]  # one shared permutation
    single.set_epoch(6)
    assert [i for _, i in single] != [i for _, i in EpochPermutationSampler(10, seed=3)]
    validation = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(i for part in validation for i in part) == list(range(10))  # no padding duplicates


def test_resume_is_exact_with_data_loader_workers(tmp_path, small_artifact):
    from surgeon.train.data import image_folder_data

    write_images(tmp_path / "data", {"0": 6, "1": 6})

    def run(out: Path, crash: bool) -> nn.Module:
        model = surgeon.load(out if out.exists() else small_artifact)
        data, _ = image_folder_data(tmp_path / "data", model, batch_size=4, workers=2, seed=0)

        def log(line: str) -> None:
            if crash and line.startswith("epoch 2/3"):
                raise InterruptedError

        surgeon.adapt(model, data.train, None, epochs=3, lr=0.005, out=out, log=log, resume=out.exists())
        return model

    straight = run(tmp_path / "straight", crash=False)
    with pytest.raises(InterruptedError):
        run(tmp_path / "split", crash=True)
    torch.manual_seed(999)  # whatever the caller's RNG is, the saved state wins
    resumed = run(tmp_path / "split", crash=False)
    assert trainable_digest(resumed) == trainable_digest(straight)
