"""The emulation's cooperative blocks (``kernels/cpu_emulation.h``): a block reduces through ``__shared__`` memory as
on the GPU, every thread reaching each barrier before any passes it, and a barrier that cannot be honoured (outside a
cooperative launch, or one that some threads of the block never reach) aborts the launch instead of giving a wrong
answer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "kernels"

PROGRAM = r"""
#include "cpu_emulation.h"
#include <cstdio>
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// each block sums its 64 values through shared memory, a tree of halvings with a barrier between rounds
template <bool BARRIERS>
__global__ void block_sum(const float* x, float* out) {
    __shared__ float partial[64];
    const unsigned t = threadIdx.x;
    partial[t] = x[blockIdx.x * 64 + t];
    if (BARRIERS) __syncthreads();
    for (unsigned half = 32; half > 0; half /= 2) {
        if (t < half) partial[t] += partial[t + half];
        if (BARRIERS) __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

__global__ void divergent_barrier(float* out) {
    if (threadIdx.x < 16) __syncthreads();  // half the block never arrives
    out[threadIdx.x] = 1.0f;
}

int main(int argc, char** argv) {
    float x[3 * 64], out[64];
    for (int i = 0; i < 3 * 64; ++i) x[i] = (float)(i % 7) + 0.25f * (float)(i / 64);
    const int which = argv[1][0] - '0';
    if (which == 0) SURGEON_LAUNCH_COOPERATIVE(block_sum<true>, 3, 64, x, out);
    if (which == 1) SURGEON_LAUNCH(block_sum<false>, 3, 64, x, out);
    if (which == 2) SURGEON_LAUNCH(block_sum<true>, 3, 64, x, out);
    if (which == 3) SURGEON_LAUNCH_COOPERATIVE(divergent_barrier, 1, 32, out);
    for (int b = 0; b < 3; ++b) std::printf("%g\n", out[b]);
    return 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("barriers")
    (folder / "barriers.cpp").write_text(PROGRAM)
    binary = folder / "barriers"
    result = subprocess.run(["g++", "-O1", "-std=c++17", f"-I{KERNELS}", "-o", str(binary),
                             str(folder / "barriers.cpp")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return binary


def expected_sums() -> list[float]:
    return [sum((i % 7) + 0.25 * (i // 64) for i in range(64 * b, 64 * (b + 1))) for b in range(3)]


def run(program: Path, case: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), str(case)], capture_output=True, text=True)


def test_a_cooperative_block_reduces_through_shared_memory(program):
    result = run(program, 0)
    assert result.returncode == 0
    assert [float(v) for v in result.stdout.split()] == expected_sums()


def test_a_reduction_without_barriers_is_wrong_when_threads_run_in_turn(program):
    """The control: without barriers the sum reads partial sums other threads have not written yet, so the
    cooperative launch's correct answer above is the barriers' doing."""
    result = run(program, 1)
    assert result.returncode == 0
    assert [float(v) for v in result.stdout.split()] != expected_sums()


@pytest.mark.parametrize("case", [2, 3], ids=["barrier-outside-a-cooperative-launch", "divergent-barrier"])
def test_a_barrier_that_cannot_be_honoured_aborts(program, case):
    result = run(program, case)
    assert result.returncode == -6  # SIGABRT: the launch aborted
