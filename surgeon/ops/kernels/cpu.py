"""The CPU training kernels in ``kernels/quadratic_dwconv_cpu.cpp``, built on first use by
``torch.utils.cpp_extension`` (the host C++ compiler and ninja; cached on disk under torch's extensions folder, so a
process after the first loads it in well under a second).

As with the CUDA kernels, a kernel is never the only way to a result: when the build fails (no compiler, no
ninja, ...) one warning names the cause and the torch route runs from then on. ``SURGEON_DISABLE_CPU_KERNELS=1``
turns the kernels off (the torch route is the reference they are tested against).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from typing import Any

import torch

from surgeon.ops.device_route import takes_cpu_route
from surgeon.ops.package_data import data_dir

SOURCE = "quadratic_dwconv_cpu.cpp"


class CpuKernelWarning(UserWarning):
    """The CPU kernels are not used (they did not build here)."""


def _flags(capability: str) -> list[str]:
    """Optimisation flags for the ISA torch itself runs at (``ATEN_CPU_CAPABILITY`` included), so the build never
    uses an instruction the machine or the user's setting rules out. ``-fopenmp``: ``at::parallel_for`` is inline
    and runs serially without it; the extension then shares torch's OpenMP runtime (same soname, already loaded)
    and so its thread count."""
    isa = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]}
    return ["-O3", "-fopenmp", *isa.get(capability, [])]


def enabled() -> bool:
    """Off with ``SURGEON_DISABLE_CPU_KERNELS=1`` and inside :func:`surgeon.ops.device_route.cuda_route`."""
    return not os.environ.get("SURGEON_DISABLE_CPU_KERNELS") and takes_cpu_route(torch.device("cpu"))


@contextmanager
def _ninja_on_path() -> Iterator[None]:
    """cpp_extension runs ``ninja`` from PATH; a venv used without activating it has the ``ninja`` package's binary
    but not on PATH, so put it there for the build only."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja
    except ImportError:
        yield
        return
    previous = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + previous
    try:
        yield
    finally:
        os.environ["PATH"] = previous


@lru_cache(maxsize=1)
def module() -> Any | None:
    """The built extension, or None (one warning) when it cannot be built here."""
    if not enabled():
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        with resources.as_file(data_dir("kernels").joinpath(SOURCE)) as source:
            digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
            # cpp_extension logs that it found no CUDA runtime on a machine with a toolkit but no GPU: not ours
            logger = logging.getLogger("torch.utils.cpp_extension")
            level = logger.level
            logger.setLevel(logging.ERROR)
            try:
                from torch.utils import cpp_extension

                with _ninja_on_path():
                    return cpp_extension.load(
                        name=f"surgeon_quadratic_cpu_{capability.lower()}_{digest}", sources=[str(source)],
                        extra_cflags=_flags(capability), extra_ldflags=["-fopenmp"], verbose=False)
            finally:
                logger.setLevel(level)
    except Exception as exc:
        text = str(exc).strip()
        cause = text.splitlines()[0][:300] if text else type(exc).__name__
        warnings.warn(f"surgeon: the CPU kernels in {SOURCE} did not build ({cause}); the torch route runs instead",
                      CpuKernelWarning, stacklevel=3)
        return None
