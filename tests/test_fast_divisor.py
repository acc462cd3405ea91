"""The specialised kernels place a thread by dividing its index by launch-time numbers without a divide: the
launcher's constants and the kernel's ``SurgeonDivisor`` (kernels/common.cuh, compiled here with g++ and the
emulation header) must give ``divmod`` exactly for every index below 2**31."""

from __future__ import annotations

import random
import subprocess

import pytest

from surgeon.ops.kernels.fast_divisor import MAX_DIVIDEND, fast_divisor, quotient
from tests import fake_cupy


def hard_cases(seed: int = 0) -> list[tuple[int, int]]:
    """(n, d) pairs where a too-small multiplier or a wrong shift shows first: every d up to 300, powers of two and
    their neighbours, large random divisors; n at multiples of d and one below them, and near 2**31."""
    generator = random.Random(seed)
    divisors = list(range(1, 301)) + [2**k + e for k in range(1, 31) for e in (-1, 0, 1)]
    divisors += [generator.randrange(1, MAX_DIVIDEND) for _ in range(200)]
    cases = []
    for d in (d for d in divisors if 1 <= d < MAX_DIVIDEND):
        top = (MAX_DIVIDEND - 1) // d
        for k in (0, 1, 2, 3, top // 2, top - 1, top):
            cases += [(k * d + r, d) for r in (0, d - 1) if 0 <= k * d + r < MAX_DIVIDEND]
        cases += [(MAX_DIVIDEND - 1, d), (generator.randrange(MAX_DIVIDEND), d)]
    return cases


def test_the_constants_divide_exactly():
    for n, d in hard_cases():
        multiplier, shift = fast_divisor(d)
        assert multiplier < 2**32 and shift <= 31
        assert quotient(n, multiplier, shift) == n // d, (n, d)


def test_every_small_index_and_divisor():
    for d in range(1, 65):
        multiplier, shift = fast_divisor(d)
        assert all(quotient(n, multiplier, shift) == n // d for n in range(4096))


@pytest.mark.parametrize("divisor", [0, -3, MAX_DIVIDEND])
def test_a_divisor_out_of_range_is_refused(divisor):
    with pytest.raises(ValueError, match="fast divisor"):
        fast_divisor(divisor)


def test_the_kernel_struct_peels_indices_as_divmod(tmp_path):
    """SurgeonDivisor::peel, as the kernels run it, on the launcher's constants."""
    program = tmp_path / "divide"
    (tmp_path / "divide.cpp").write_text(
        '#include "cpu_emulation.h"\n#include "common.cuh"\n#include <cstdio>\n'
        "thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;\n"
        "int main() {\n  unsigned n, d, m, s;\n"
        '  while (std::scanf("%u %u %u %u", &n, &d, &m, &s) == 4) {\n'
        "    const SurgeonDivisor divisor{d, m, s};\n    unsigned rest = n;\n"
        "    const unsigned remainder = divisor.peel(rest);\n"
        '    std::printf("%u %u\\n", rest, remainder);\n  }\n}\n')
    subprocess.run(["g++", "-std=c++17", f"-I{fake_cupy.KERNELS}", "-o", str(program), str(tmp_path / "divide.cpp")],
                   check=True)
    cases = hard_cases(seed=1)
    lines = "".join(f"{n} {d} {' '.join(map(str, fast_divisor(d)))}\n" for n, d in cases)
    out = subprocess.run([str(program)], input=lines, capture_output=True, text=True, check=True).stdout.split("\n")
    assert len(cases) > 5000
    for (n, d), line in zip(cases, out):
        assert tuple(map(int, line.split())) == divmod(n, d), (n, d)
