"""Division by a launch-time constant inside a kernel, as a multiply-high, an add and a shift.

A kernel that maps a flat thread index to (image, row, tile, channel) divides by numbers known only at launch.
On the GPU a 32-bit divide by a register is some twenty instructions, and a 64-bit one a call into a routine with
a slow path: for the specialised quadratic kernels that was a large share of a thread's prologue. The launcher
makes the two constants of each divisor once (Granlund and Montgomery, "Division by invariant integers using
multiplication"); the kernel's ``SurgeonDivisor`` (``kernels/common.cuh``) then computes, for every ``n < 2**31``,
``n // d == (umulhi(n, multiplier) + n) >> shift``.
"""

from __future__ import annotations

MAX_DIVIDEND = 2**31  # every index divided is below this: the sum umulhi + n stays within 32 bits


def fast_divisor(divisor: int) -> tuple[int, int]:
    """``(multiplier, shift)`` for ``divisor`` (1 <= divisor < 2**31): ``shift = ceil(log2(divisor))``,
    ``multiplier = floor(2**32 * (2**shift - divisor) / divisor) + 1``, which is below ``2**32``."""
    if not 1 <= divisor < MAX_DIVIDEND:
        raise ValueError(f"a fast divisor must lie in [1, 2**31), got {divisor}")
    shift = (divisor - 1).bit_length()
    multiplier = ((2**shift - divisor) << 32) // divisor + 1
    return multiplier, shift


def quotient(n: int, multiplier: int, shift: int) -> int:
    """What the kernel computes for ``n // divisor`` (for checks on the CPU)."""
    return (((n * multiplier) >> 32) + n) >> shift
