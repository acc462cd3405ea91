"""Export a merged model to ONNX or to a ``torch.export`` program, checked against PyTorch before it is written.

* ``torch-export``: a ``.pt2`` program where each merged quadratic layer is one ``surgeon.quadratic_dwconv`` node
  (the fused CUDA kernel on GPU, its torch reference on CPU); load it with ``import surgeon`` first so the op is
  registered.
* ``onnx``: the dynamo exporter; quadratic layers become standard ``Conv``/``Mul``/``Add`` nodes (their atrous
  route), so any ONNX runtime runs the file.

Both have a dynamic batch dimension. The file is written to a temporary name, run on the check inputs (at a batch
size other than the traced one, to prove the dynamic batch) and compared with the PyTorch model; only a file within
tolerance is renamed into place, in the manner of Optimum's exporter validation.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.io.atomic import current_umask
from surgeon.io.checkpoint import sha256_file
from surgeon.methods.quadratic.inference import QuadraConvDW
from surgeon.ops.model_outputs import logits as logits_of

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
# relative tolerance (max |Δ| / max |output|) by the model's dtype: 1e-5 in fp32 as Optimum's default
DEFAULT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
MAX_BATCH = 4096


class ExportError(SurgeonError):
    """The export or its check failed; nothing was written."""


@dataclass
class ExportCheck:
    """How the exported file compared with the PyTorch model."""

    inputs: str
    batch_sizes: list[int]
    max_abs_diff: float
    max_abs_output: float
    relative: float
    tolerance: float
    runtime: str

    @property
    def passed(self) -> bool:
        return self.relative <= self.tolerance


@dataclass
class ExportResult:
    format: str
    path: str
    input_shape: list[int]
    dynamic_batch: bool
    quadratic_ops: int
    bytes: int
    sha256: str
    seconds: float
    check: ExportCheck | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.check is not None:
            data["check"]["passed"] = self.check.passed
        return data


# ------------------------------------------------------------------------------------------ inputs
def image_inputs(model: nn.Module, folder: str | Path, limit: int = 8) -> tuple[torch.Tensor, str]:
    """Up to ``limit`` images under ``folder`` (searched recursively, in sorted order) through the model's own
    evaluation transform (timm's data config)."""
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_data_config

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: not a directory of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
    if not files:
        raise ExportError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    transform = create_transform(**resolve_data_config({}, model=model))
    tensors = []
    for path in files:
        try:
            with Image.open(path) as image:
                tensors.append(transform(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise ExportError(f"{path}: cannot read the image ({exc})") from exc
    return torch.stack(tensors), f"{len(files)} images from {folder}"


def random_inputs(model: nn.Module, batch: int) -> tuple[torch.Tensor, str]:
    from surgeon.graph.probe import default_input

    return default_input(model, batch=batch), f"{batch} seeded N(0, 1) inputs"


# ------------------------------------------------------------------------------------------ formats
@contextmanager
def quadratic_layers_as_ops(model: nn.Module, enabled: bool) -> Iterator[int]:
    """Make every merged quadratic layer call ``torch.ops.surgeon.quadratic_dwconv`` while exporting."""
    layers = [m for m in model.modules() if isinstance(m, QuadraConvDW)] if enabled else []
    for layer in layers:
        layer.as_custom_op = True
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.as_custom_op = False


def _dynamic_batch() -> Any:
    from torch.export import Dim

    return ({0: Dim("batch", min=1, max=MAX_BATCH)},)


def _write_torch_export(model: nn.Module, example: torch.Tensor, path: Path) -> int:
    with quadratic_layers_as_ops(model, enabled=True):
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
    with warnings.catch_warnings():
        # weights that share storage (views of one checkpoint tensor) make torch.export warn about "complete
        # tensors", which matters only for weights off the CPU; the program is exported from the CPU
        warnings.filterwarnings("ignore", message="No complete tensor found", category=UserWarning)
        torch.export.save(program, str(path))
    return sum(1 for node in program.graph.nodes if node.op == "call_function"
               and "surgeon.quadratic_dwconv" in str(node.target))


def _load_torch_export(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    module = torch.export.load(str(path)).module()

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(inputs)

    return run


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> int:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install 'surgeon[export]'") \
            from exc
    options: dict[str, Any] = {"opset_version": opset} if opset else {}
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=_dynamic_batch(), verbose=False,
                                input_names=["pixel_values"], output_names=["logits"], **options)
    if program is None:
        raise ExportError("the ONNX exporter returned nothing")
    program.save(str(path), external_data=False)
    return 0


def _load_onnx(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError("checking an ONNX export needs onnxruntime: pip install 'surgeon[export]' (or pass "
                          "--no-check)") from exc
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(inputs: torch.Tensor) -> torch.Tensor:
        output = session.run(None, {name: inputs.detach().cpu().numpy()})[0]  # "logits" is the first output
        return torch.from_numpy(output)

    return run


# ------------------------------------------------------------------------------------------ check
def _check(path: Path, format: str, model: nn.Module, inputs: torch.Tensor, description: str,
           tolerance: float) -> ExportCheck:
    """Compare the written file with the model at two batch sizes, neither of them the traced one."""
    batches = [inputs, inputs[:1]] if inputs.shape[0] > 1 else [inputs]
    run = (_load_onnx if format == "onnx" else _load_torch_export)(path)  # loaded once, run per batch
    diff = peak = 0.0
    for batch in batches:
        with torch.no_grad():
            want = logits_of(model(batch)).float()  # a tensor, tuple, dict or ModelOutput: its logits
        got = logits_of(run(batch)).float()
        if got.shape != want.shape:
            raise ExportError(f"the exported {format} model returned shape {tuple(got.shape)} for batch "
                              f"{batch.shape[0]}, PyTorch {tuple(want.shape)}")
        diff = max(diff, (got - want).abs().max().item())
        peak = max(peak, want.abs().max().item())
    relative = diff / peak if peak > 0 else diff
    runtime = "onnxruntime (CPU)" if format == "onnx" else "torch.export program"
    return ExportCheck(description, [int(b.shape[0]) for b in batches], diff, peak, relative, tolerance, runtime)


def export_model(model: nn.Module, out: str | Path, format: str = "onnx", inputs: torch.Tensor | None = None,
                 inputs_description: str | None = None, tolerance: float | None = None, check: bool = True,
                 opset: int | None = None, force: bool = False) -> ExportResult:
    """Export ``model`` (eval mode, CPU) to ``out`` with a dynamic batch dimension; unless ``check`` is False, run
    the file on ``inputs`` (default: seeded random inputs at the model's resolution) and refuse to write it if
    max |Δ| / max |output| exceeds ``tolerance``."""
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists (use --force to replace it)")
    if out.exists() and (out.is_symlink() or not out.is_file()):
        raise ExportError(f"{out} exists and is not a file")
    if out.exists() and not _recorded_export(out):
        raise ExportError(f"refusing to replace {out}: surgeon did not write it (it is not an unchanged export "
                          "recorded in the config.json beside it); choose another --out")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    model = model.eval().cpu()
    if inputs is None:
        inputs, inputs_description = random_inputs(model, batch=3)
    inputs = inputs.to(dtype)
    description = inputs_description or f"{inputs.shape[0]} given inputs"
    example = inputs[:1].expand(2, *inputs.shape[1:]).contiguous()  # traced at batch 2, checked at others
    tolerance = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, 1e-5)
    out.parent.mkdir(parents=True, exist_ok=True)
    # same folder (one rename), same suffix (torch.export.load wants ``.pt2``), hidden name
    handle, scratch = tempfile.mkstemp(prefix=f".{out.stem}.tmp-{os.getpid()}-", suffix=FORMATS[format],
                                       dir=out.parent)
    os.close(handle)
    os.chmod(scratch, 0o666 & ~current_umask())  # mkstemp's 0600 would follow the file into place
    scratch_path = Path(scratch)
    start = time.perf_counter()
    try:
        try:
            if format == "onnx":
                ops = _write_onnx(model, example, scratch_path, opset)
            else:
                ops = _write_torch_export(model, example, scratch_path)
        except ExportError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise ExportError(f"{format} export failed: {type(exc).__name__}: {first}") from exc
        result_check = _check(scratch_path, format, model, inputs, description, tolerance) if check else None
        if result_check is not None and not result_check.passed:
            raise ExportError(f"the exported model differs from PyTorch: max |Δ| = {result_check.max_abs_diff:.3g}"
                              f" (relative {result_check.relative:.3g} > tolerance {tolerance:.3g}) on "
                              f"{description}; nothing written")
        seconds = time.perf_counter() - start
        size, digest = scratch_path.stat().st_size, sha256_file(scratch_path)
        os.replace(scratch_path, out)
    finally:
        scratch_path.unlink(missing_ok=True)
    return ExportResult(format=format, path=str(out), input_shape=list(inputs.shape[1:]), dynamic_batch=True,
                        quadratic_ops=ops, bytes=size, sha256=digest, seconds=seconds, check=result_check)


def _recorded_export(path: Path) -> bool:
    """Whether ``path`` is an export surgeon wrote and recorded in the artifact config beside it, unchanged."""
    from surgeon.io.names import CONFIG_NAME

    config_path = path.parent / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        exports = config["surgeon"]["exports"]
        entry = next(e for e in exports if e.get("file") == path.name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return False
    return entry.get("sha256") == sha256_file(path)


# ------------------------------------------------------------------------------------------ artifact record
def record_export(directory: str | Path, result: ExportResult) -> bool:
    """List an export that lies inside an artifact directory in its ``config.json`` (so ``push`` uploads it and
    its model card shows the check); replaced atomically. False when the file is outside ``directory``."""
    from surgeon.io.names import CONFIG_NAME

    directory = Path(directory).resolve()
    try:
        relative = Path(result.path).resolve().relative_to(directory)
    except ValueError:
        return False
    config_path = directory / CONFIG_NAME
    config = json.loads(config_path.read_text(encoding="utf-8"))
    entry = {key: value for key, value in result.to_dict().items() if key not in ("path", "seconds")}
    entry["file"] = relative.as_posix()
    exports = [e for e in config["surgeon"].get("exports", []) if e.get("file") != entry["file"]]
    config["surgeon"]["exports"] = [*exports, entry]
    handle, scratch = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.tmp-{os.getpid()}-", dir=directory)
    os.chmod(scratch, config_path.stat().st_mode & 0o777)  # the config keeps its mode
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(json.dumps(config, indent=2) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(scratch, config_path)
    finally:
        Path(scratch).unlink(missing_ok=True)
    return True
