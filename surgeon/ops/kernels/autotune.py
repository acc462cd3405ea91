"""First-use autotuning of the merged quadratic conv on CUDA: the fused kernel or the torch route, whichever ran
faster on this device for this geometry, shape, dtype and layout.

The first call of each such key times both routes with CUDA events (warm-up calls, then the median of a few
repetitions) and keeps the faster; a tie keeps the torch route, so the fused kernel is never the slower choice.
Choices are remembered for the process and in a JSON file (``$SURGEON_AUTOTUNE_CACHE``, default
``~/.cache/surgeon/quadconv-routes.json``; ``off`` keeps them in memory only), under a key naming the device, its
driver and the CuPy and surgeon versions, so an upgrade tunes again. The file is read as untrusted input: anything
but the expected shape is ignored. ``SURGEON_QUADCONV_ROUTE=fused|torch|auto`` forces a route (default ``auto``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROUTE_VARIABLE = "SURGEON_QUADCONV_ROUTE"
CACHE_VARIABLE = "SURGEON_AUTOTUNE_CACHE"
ROUTES = ("auto", "fused", "torch")
CHOICES = ("fused", "torch")
CACHE_FORMAT = 1
MAX_CACHE_BYTES = 1 << 20  # a routes file is a few kB; anything larger is not one
WARMUP, REPETITIONS = 2, 5

Timer = Callable[[Callable[[], Any]], float]


def forced_route() -> str:
    """The route ``SURGEON_QUADCONV_ROUTE`` asks for (``auto`` when unset)."""
    value = os.environ.get(ROUTE_VARIABLE, "auto").strip().lower() or "auto"
    if value not in ROUTES:
        raise ValueError(f"{ROUTE_VARIABLE} must be one of {', '.join(ROUTES)}; got {value!r}")
    return value


def cuda_event_time(run: Callable[[], Any], repetitions: int = REPETITIONS, warmup: int = WARMUP) -> float:
    """Median milliseconds of ``run`` on the current CUDA stream, after warm-up calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repetitions):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@dataclass(frozen=True)
class RouteKey:
    """What makes one tuning decision: the layer's geometry and the input's shape, dtype and layout."""

    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    span: tuple[int, ...]
    stride: tuple[int, ...]
    pads: tuple[int, ...]
    rank: int
    shape: tuple[int, ...]
    dtype: str
    channels_last: bool
    op: str = "quadratic_atrous"  # which computation: the merged layer's, or a training step's quadratic term

    def text(self) -> str:
        def dims(values: tuple[int, ...]) -> str:
            return "x".join(str(v) for v in values)

        prefix = "" if self.op == "quadratic_atrous" else f"{self.op} "
        return (f"{prefix}k{dims(self.kernel_size)} d{dims(self.dilation)} span{dims(self.span)} s{dims(self.stride)} "
                f"p{dims(self.pads)} r{self.rank} in{dims(self.shape)} {self.dtype} "
                f"{'nhwc' if self.channels_last else 'nchw'}")


def environment(device: torch.device) -> str:
    """The device, driver and library versions a choice was measured under."""
    try:
        surgeon_version = importlib.metadata.version("surgeon")  # metadata, not an import: ops stands alone
    except importlib.metadata.PackageNotFoundError:
        surgeon_version = "unknown"
    try:
        name = torch.cuda.get_device_name(device)
    except Exception:
        name = str(device)
    try:
        import cupy

        driver, cupy_version = str(cupy.cuda.runtime.driverGetVersion()), str(cupy.__version__)
    except Exception:
        driver = cupy_version = "unknown"
    return f"{name} | driver {driver} | cupy {cupy_version} | surgeon {surgeon_version}"


def default_cache_path() -> Path | None:
    configured = os.environ.get(CACHE_VARIABLE)
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "0", "none") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "surgeon" / "quadconv-routes.json"


def read_cache(path: Path) -> dict[str, dict[str, str]]:
    """The choices in a routes file, keeping only well-formed entries (a missing or foreign file: none)."""
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("choices"), dict):
        return {}
    kept: dict[str, dict[str, str]] = {}
    for env, choices in data["choices"].items():
        if isinstance(env, str) and isinstance(choices, dict):
            kept[env] = {key: route for key, route in choices.items()
                         if isinstance(key, str) and route in CHOICES}
    return kept


def write_cache(path: Path, choices: dict[str, dict[str, str]]) -> None:
    """Write atomically (a temporary file renamed over the old one): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".quadconv-routes-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump({"format": CACHE_FORMAT, "choices": choices}, out, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class RouteTuner:
    """Remembers, per (environment, key), which route to run; times both on a key's first use."""

    def __init__(self, timer: Timer = cuda_event_time,
                 cache_path: Path | Callable[[], Path | None] | None = default_cache_path) -> None:
        """``cache_path``: the routes file, None for none, or a function giving it (read on first use, so the
        environment variable is honoured whenever it is set)."""
        self.timer = timer
        self._cache_path = cache_path
        self.choices: dict[str, dict[str, str]] = {}
        self.timings: dict[str, dict[str, tuple[float, float]]] = {}  # env -> key -> (fused ms, torch ms)
        self._loaded = False

    @property
    def cache_path(self) -> Path | None:
        if callable(self._cache_path):
            self._cache_path = self._cache_path()
        return self._cache_path

    @cache_path.setter
    def cache_path(self, value: Path | None) -> None:
        self._cache_path = value

    def _load(self) -> None:
        if not self._loaded and self.cache_path is not None:
            for env, choices in read_cache(Path(self.cache_path)).items():
                self.choices.setdefault(env, {}).update(choices)
        self._loaded = True

    def _save(self) -> None:
        if self.cache_path is None:
            return
        try:
            merged = read_cache(Path(self.cache_path))
            for env, choices in self.choices.items():
                merged.setdefault(env, {}).update(choices)
            write_cache(Path(self.cache_path), merged)
        except OSError as exc:  # a read-only home: the choice still holds for this process
            warnings.warn(f"surgeon: could not save the autotuned route to {self.cache_path} ({exc})",
                          RuntimeWarning, stacklevel=4)
            self.cache_path = None

    def route(self, key: RouteKey, device: torch.device, fused: Callable[[], torch.Tensor | None],
              torch_route: Callable[[], torch.Tensor]) -> str:
        """``fused`` or ``torch`` for this call. ``fused()`` returns None when the kernel cannot run (a fallback):
        then the torch route is chosen."""
        forced = forced_route()
        if forced != "auto":
            return forced
        self._load()
        env, text = environment(device), key.text()
        known = self.choices.get(env, {}).get(text)
        if known is not None:
            return known
        if fused() is None:  # cannot run here (compile failure, self-check, unsupported case): nothing to time
            choice, timing = "torch", None
        else:
            fused_ms, torch_ms = self.timer(fused), self.timer(torch_route)
            choice, timing = ("fused" if fused_ms < torch_ms else "torch"), (fused_ms, torch_ms)
        self.choices.setdefault(env, {})[text] = choice
        if timing is not None:  # a measured choice is kept on disk; a fallback only for this process
            self.timings.setdefault(env, {})[text] = timing
            self._save()
        return choice


TUNER = RouteTuner()
