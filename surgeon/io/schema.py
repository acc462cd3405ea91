"""The schema of an artifact's ``config.json`` / ``adapter_config.json``: the one place a config from disk or the
Hub is turned from untrusted JSON into checked values.

A config may have been written by anyone. Every key must be known, every value has a type and a bound, and file
names are bare names inside the artifact directory, so a config can neither choose what is read or fetched nor ask
for an allocation beyond the bounds below (sizes are then checked against the weights file itself, see
:mod:`surgeon.io.untrusted`). A problem is one :class:`~surgeon.errors.CheckpointError` naming the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from surgeon.errors import CheckpointError
from surgeon.methods.quadratic.config import MAX_RANK

MAX_CONFIG_BYTES = 32 << 20  # the largest real config (a few hundred sites) is under 2 MiB
MAX_CLASSES = 100_000  # ImageNet-22k has 21,843
MAX_EXAMPLE_ELEMENTS = 4 << 20  # batch 1 at up to 1024×1024 with 4 channels
MAX_CHANNELS = 1 << 16
MAX_KERNEL = 31
MAX_ENTRIES = 1 << 16  # sites, trainable tensors, layers per artifact

_BARE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

Count = Annotated[int, Field(ge=0, le=1 << 40)]
Pair = Annotated[list[Annotated[int, Field(ge=0, le=1024)]], Field(min_length=2, max_length=2)]
Name = Annotated[str, Field(max_length=512)]


def bare_name(value: str) -> str:
    """A file name inside the artifact directory: no separators, no ``..``, no hidden or absolute paths."""
    if not _BARE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{value!r} is not a plain file name inside the artifact directory")
    return value


def _sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise ValueError("expected a lowercase hex SHA-256")
    return value


BareName = Annotated[str, AfterValidator(bare_name)]
Sha256 = Annotated[str, AfterValidator(_sha256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Branch(_Strict):
    kernel: Pair
    dilation: Pair


class LayerEntry(_Strict):
    """One dense quadratic layer of a merged checkpoint (``QuadraConvDW.geometry()`` plus where it goes)."""

    path: Name
    aliases: Annotated[list[Name], Field(max_length=64)] = []
    channels: Annotated[int, Field(ge=1, le=MAX_CHANNELS)]
    kernel_size: Annotated[list[Annotated[int, Field(ge=1, le=MAX_KERNEL)]], Field(min_length=2, max_length=2)]
    stride: Annotated[list[Annotated[int, Field(ge=1, le=64)]], Field(min_length=2, max_length=2)]
    padding: Literal["same", "valid"] | Pair
    dilation: Annotated[list[Annotated[int, Field(ge=1, le=64)]], Field(min_length=2, max_length=2)]
    bias: bool
    rank: Annotated[int, Field(ge=1, le=MAX_RANK)]
    same_dynamic: bool
    branch_a: Branch | None
    branch_b: Branch | None


class ExportEntry(_Strict):
    """An exported file recorded by ``surgeon export`` (``push`` uploads it, verified by its SHA-256)."""

    file: BareName
    format: Literal["onnx", "torch-export"]
    sha256: Sha256
    input_shape: Annotated[list[Annotated[int, Field(ge=1, le=1 << 16)]], Field(max_length=8)] = []
    dynamic_batch: bool = True
    quadratic_ops: Count = 0
    bytes: Count = 0
    check: dict[str, Any] | None = None



class _Section(_Strict):
    """Fields every surgeon section has."""

    version: Annotated[str, Field(max_length=64)]
    recipe: dict[str, Any]
    base_model: Annotated[str, Field(max_length=512)] | None = None
    base_class: Annotated[str, Field(max_length=512)] | None = None
    base_weights: Literal["timm", "hf-hub", "file", "random-init", "unknown"] | None = None
    weights_file: BareName
    weights_sha256: Sha256  # required: the weights are verified against it
    memory_format: Literal["contiguous", "channels_last"] | None = None
    metrics: dict[str, float | int | str | None] | None = None
    # a transformers base: its config (rebuilt with AutoModelForImageClassification, never remote code) and the
    # preprocessing of its image processor
    transformers_config: dict[str, Any] | None = None
    transformers_preprocessing: dict[str, Any] | None = None
    exports: Annotated[list[ExportEntry], Field(max_length=64)] = []


def _example_shape(value: list[int]) -> list[int]:
    if value and (len(value) < 2 or value[0] != 1):
        raise ValueError("expected batch 1 and at least one more dimension")
    elements = 1
    for size in value:
        elements *= size
    if elements > MAX_EXAMPLE_ELEMENTS:
        raise ValueError(f"{elements:,} elements, more than the {MAX_EXAMPLE_ELEMENTS:,} allowed")
    return value


ExampleShape = Annotated[list[Annotated[int, Field(ge=1, le=1 << 14)]], AfterValidator(_example_shape),
                         Field(max_length=6)]
Trainable = Annotated[list[Name], Field(max_length=MAX_ENTRIES)]


class ConvertedSection(_Section):
    format: Literal["converted"]
    example_input_shape: ExampleShape = []
    trainable: Trainable = []
    sites: Annotated[list[dict[str, Any]], Field(max_length=MAX_ENTRIES)] = []


class AdapterSection(_Section):
    format: Literal["adapter"]
    example_input_shape: ExampleShape = []
    trainable: Trainable = []


class MergedSection(_Section):
    format: Literal["merged"]
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    layers: Annotated[list[LayerEntry], Field(max_length=MAX_ENTRIES)] = []
    folded_batchnorm: dict[Name, Annotated[str, Field(max_length=64)]] = {}
    unfolded_batchnorm: dict[Name, Annotated[str, Field(max_length=512)]] = {}
    merge_verification: dict[str, float] = {}


Section = Annotated[ConvertedSection | AdapterSection | MergedSection, Field(discriminator="format")]
ModelArgs = Annotated[dict[Annotated[str, Field(max_length=64)], Any], Field(max_length=64)]


class ArtifactConfig(BaseModel):
    """``config.json`` (timm's fields plus ``surgeon``) or ``adapter_config.json`` (no timm fields but these)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    architecture: Annotated[str, Field(max_length=200)] | None = None
    num_classes: Annotated[int, Field(ge=0, le=MAX_CLASSES)] | None = None
    num_features: Annotated[int, Field(ge=0, le=1 << 20)] | None = None
    global_pool: Annotated[str, Field(max_length=512)] | None = None
    pretrained_cfg: dict[str, Any] | None = None
    label_names: Annotated[list[Annotated[str, Field(max_length=512)]], Field(max_length=MAX_CLASSES)] | None = None
    model_args: ModelArgs = {}
    surgeon: Section


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    if len(location) >= 2 and location[0] == "surgeon" and location[1] in ("converted", "adapter", "merged"):
        del location[1]  # the discriminator tag pydantic puts in the path
    message = first["msg"].removeprefix("Value error, ")
    return f"field '{'.'.join(location) or '(top level)'}': {message}"


def read_json(path: Path) -> Any:
    """A JSON file of bounded size (a huge config is refused before it is read)."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, larger than a config can be")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({str(exc).splitlines()[0] if str(exc) else exc})") from exc


def parse_artifact_config(data: Any, where: Path) -> ArtifactConfig:
    """Validate an artifact config mapping; one line naming the first bad field."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    if not isinstance(data.get("surgeon"), dict):
        raise CheckpointError(f"{where}: no 'surgeon' section (not a surgeon artifact)")
    try:
        return ArtifactConfig.model_validate(data)
    except ValidationError as exc:
        raise CheckpointError(f"{where}: {_describe(exc)}") from None
