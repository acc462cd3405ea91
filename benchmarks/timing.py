"""Side-by-side timing: candidates are run interleaved, round after round, and each gets its median."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def compare(candidates: dict[str, Callable[[], object]], rounds: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median wall time in milliseconds of each candidate, measured in alternation so drift hits all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def machine() -> str:
    import os
    import platform

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")
