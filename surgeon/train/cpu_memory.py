"""Keeping freed CPU memory in the process while training, as CUDA's caching allocator does on a GPU.

PyTorch's CPU tensors come from the C allocator. glibc serves every block above its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and unmaps it on free, so each large activation, gradient or temporary of every step
is faulted in page by page again (hundreds of thousands of minor faults per step, and an elementwise op on a fresh
150 MB tensor spends most of its time in them). Turning ``mmap`` off and raising the trim threshold makes freed
blocks stay in the heap for the next step's tensors of the same sizes. The resident size then stays at the
step's peak instead of falling between ops.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BELOW = 2**31 - 1  # bytes of free heap top kept before any is returned (mallopt takes an int)

_retained = False


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (process-wide, from now on). False where that is not possible
    (not Linux, or a C library without ``mallopt``); training then runs exactly the same, only slower."""
    global _retained
    if _retained:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _retained = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW))
    return _retained
