"""A stand-in for ``cupy`` that runs surgeon's real kernel wrappers on the CPU.

``RawModule(code, options).get_function(name)`` returns a function that takes arguments the way CuPy does (arrays
become device pointers, NumPy scalars are passed as their bytes) and launches the *same* ``.cu`` source, built with
g++ and ``kernels/cpu_emulation.h``, through one generic ``launch(name, grid, block, void** args)`` entry generated
from the kernels' ``extern "C"`` prototypes. On every launch the harness

* checks each argument against its prototype (``T*`` against the array's dtype, ``int`` against ``np.int32``,
  ``unsigned int`` against ``np.uint32``, ``long long`` against ``np.int64``, ``float`` against ``np.float32``; a
  raw pointer only as a null pointer),
* bounds-checks every load and store: arrays are copied into shared memory that ends (then, in a second run,
  starts) at an inaccessible guard page, and the kernel runs in a forked child, so touching one byte outside any
  buffer kills the child with SIGSEGV and fails the launch,
* records that it ran under the wrapper's device guard and inside the CuPy stream made from that guard's stream.
"""

from __future__ import annotations

import ctypes
import faulthandler
import mmap
import os
import re
import signal
import subprocess
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
SOURCES = ("bitpack.cu", "quadratic_dwconv.cu", "layer_norm.cu")  # extern "C" entries
TEMPLATE_SOURCES = ("quadratic_atrous.cu",)  # instantiated per name expression
# kernels whose block threads wait for each other (__syncthreads): run as fibers; any other kernel that reaches a
# barrier aborts its launch
COOPERATIVE_KERNELS = ("rows_quantize_", "layer_norm_backward_")
POINTEE_DTYPES = {"float": torch.float32, "surgeon_half": torch.float16, "surgeon_bfloat16": torch.bfloat16,
                  "unsigned char": torch.uint8}
SCALAR_TYPES = {"int": np.int32, "unsigned int": np.uint32, "long long": np.int64, "float": np.float32}
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class LaunchError(AssertionError):
    """A launch the real GPU would have run wrongly: bad argument type, out-of-bounds access, wrong stream."""


# ------------------------------------------------------------------------------------------ building
def parse_prototypes(preprocessed: str) -> dict[str, list[str]]:
    """Kernel name -> parameter types, from the macro-expanded sources."""
    found = {}
    for name, params in re.findall(r'extern "C"\s*void\s+(\w+)\s*\(([^)]*)\)', preprocessed):
        found[name] = [" ".join(p.strip().split()[:-1]).replace(" *", "*") for p in params.split(",")]
    return found


def _c_type(declared: str) -> str:
    return declared.replace("const ", "").replace("*", "").strip()


def build_harness(directory: Path) -> tuple[ctypes.CDLL, dict[str, list[str]]]:
    """Compile the kernels with a generated ``launch`` entry; returns the library and the prototypes."""
    includes = '#include "cpu_emulation.h"\nthread_local dim3 threadIdx, blockIdx, blockDim, gridDim;\n' + \
        "".join(f'#include "{name}"\n' for name in SOURCES)
    preprocessed = subprocess.run(["g++", "-x", "c++", "-E", "-P", "-std=c++17", f"-I{KERNELS}", "-"], input=includes,
                                  capture_output=True, text=True, check=True).stdout
    prototypes = parse_prototypes(preprocessed)
    cases = []
    for name, params in prototypes.items():
        casts = ", ".join(f"*({p}*)args[{i}]" for i, p in enumerate(params))  # args[i] points at the value
        launch = "SURGEON_LAUNCH_COOPERATIVE" if name.startswith(COOPERATIVE_KERNELS) else "SURGEON_LAUNCH"
        cases.append(f'    if (std::strcmp(name, "{name}") == 0) {{ {launch}({name}, grid, block, {casts}); '
                     "return 0; }")
    source = includes + "#include <cstring>\n" + (
        'extern "C" int launch(const char* name, unsigned grid, unsigned block, void** args) {\n'
        + "\n".join(cases) + "\n    return 1;\n}\n")
    (directory / "launcher.cpp").write_text(source)
    library = directory / "launcher.so"
    subprocess.run(["g++", "-O1", "-std=c++17", "-shared", "-fPIC", f"-I{KERNELS}", "-o", str(library),
                    str(directory / "launcher.cpp")], check=True, capture_output=True, text=True)
    harness = ctypes.CDLL(str(library))
    harness.launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
    return harness, prototypes


def template_prototype(source: str, expression: str) -> list[str]:
    """Parameter types of a template kernel instantiation ``name<T, ...>``: the kernel's declared parameters with
    ``T`` replaced by the expression's first template argument."""
    name, arguments = expression.split("<", 1)
    storage = arguments.split(",", 1)[0].strip()
    match = re.search(rf"__global__ void (?:__launch_bounds__\([^)]*\) )?{name.strip()}\(([^)]*)\)", source)
    if match is None:
        raise LaunchError(f"no template kernel named {name!r}")
    params = []
    for param in match.group(1).split(","):
        words = [w for w in param.replace("__restrict__", "").replace("*", " * ").split() if w]
        declared = " ".join(words[:-1]).replace(" *", "*")
        params.append(re.sub(r"\bT\b", storage, declared))
    return params


_TEMPLATE_BUILDS: dict[tuple[Path, tuple[str, ...]], tuple[ctypes.CDLL, dict[str, list[str]]]] = {}


def build_templates(directory: Path, expressions: tuple[str, ...]) -> tuple[ctypes.CDLL, dict[str, list[str]]]:
    """Compile the template kernels' instantiations named by ``expressions`` behind a ``launch`` entry (once per
    test session: each instantiation is a g++ build of an unrolled kernel)."""
    if (directory, expressions) not in _TEMPLATE_BUILDS:
        _TEMPLATE_BUILDS[(directory, expressions)] = _build_templates(directory, expressions)
    return _TEMPLATE_BUILDS[(directory, expressions)]


def _build_templates(directory: Path, expressions: tuple[str, ...]) -> tuple[ctypes.CDLL, dict[str, list[str]]]:
    includes = '#include "cpu_emulation.h"\nthread_local dim3 threadIdx, blockIdx, blockDim, gridDim;\n' + \
        "".join(f'#include "{name}"\n' for name in TEMPLATE_SOURCES)
    source = "".join((KERNELS / name).read_text() for name in TEMPLATE_SOURCES)
    prototypes = {expression: template_prototype(source, expression) for expression in expressions}
    cases = []
    for expression, params in prototypes.items():
        casts = ", ".join(f"*({p}*)args[{i}]" for i, p in enumerate(params))
        cases.append(f'    if (std::strcmp(name, "{expression}") == 0) {{ SURGEON_LAUNCH(({expression}), grid, block, '
                     f"{casts}); return 0; }}")
    code = includes + "#include <cstring>\n" + (
        'extern "C" int launch(const char* name, unsigned grid, unsigned block, void** args) {\n'
        + "\n".join(cases) + "\n    return 1;\n}\n")
    stem = f"templates-{abs(hash(expressions)):x}"
    (directory / f"{stem}.cpp").write_text(code)
    library = directory / f"{stem}.so"
    subprocess.run(["g++", "-O1", "-std=c++17", "-Wno-unknown-pragmas", "-shared", "-fPIC", f"-I{KERNELS}", "-o",
                    str(library), str(directory / f"{stem}.cpp")], check=True, capture_output=True, text=True)
    harness = ctypes.CDLL(str(library))
    harness.launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
    return harness, prototypes


# ------------------------------------------------------------------------------------------ memory
class GuardedCopy:
    """A copy of a tensor's bytes in shared memory, flush against a PROT_NONE page at its end or its start."""

    def __init__(self, source: torch.Tensor, at_end: bool) -> None:
        self.source = source
        self.nbytes = source.numel() * source.element_size()
        inner = max(PAGE, -(-self.nbytes // PAGE) * PAGE)
        self.map = mmap.mmap(-1, inner + 2 * PAGE)  # anonymous + shared: a forked child's writes are seen here
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        for start in (self.base, self.base + PAGE + inner):
            if _libc.mprotect(start, PAGE, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        self.address = self.base + PAGE + (inner - self.nbytes if at_end else 0)
        ctypes.memmove(self.address, source.data_ptr(), self.nbytes)
        self.slot = ctypes.c_void_p(self.address)

    def copy_back(self) -> None:
        ctypes.memmove(self.source.data_ptr(), self.address, self.nbytes)


# ------------------------------------------------------------------------------------------ the fake module
@dataclass
class FakeArray:
    """What ``cupy.from_dlpack`` returns: a flat tensor's storage, seen as device memory."""

    tensor: torch.Tensor


@dataclass
class Launch:
    name: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    device: Any
    stream: int | None
    guard_stream: int | None


@dataclass
class State:
    harness: ctypes.CDLL
    prototypes: dict[str, list[str]]
    launches: list[Launch] = field(default_factory=list)
    compiled: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    fail_compile: str | None = None  # an NVRTC error message to raise
    corrupt: set[str] = field(default_factory=set)  # kernels whose output is deliberately spoiled
    device: Any = None  # set by the fake device guard
    guard_stream: int | None = None
    stream: int | None = None
    ml_dtypes: bool = False  # CuPy 14 takes bf16 through DLPack only when ml_dtypes is importable
    build_directory: Path | None = None  # where template instantiations are compiled


class FakeFunction:
    def __init__(self, state: State, name: str, harness: ctypes.CDLL | None = None,
                 prototypes: dict[str, list[str]] | None = None) -> None:
        self.prototypes = prototypes if prototypes is not None else state.prototypes
        if name not in self.prototypes:
            raise LaunchError(f"no kernel named {name!r} in the sources")
        self.state, self.name = state, name
        self.harness = harness if harness is not None else state.harness

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        state = self.state
        if state.device is None:
            raise LaunchError(f"{self.name} launched outside the device guard")
        if state.stream is None or state.stream != state.guard_stream:
            raise LaunchError(f"{self.name} launched outside the stream of the device guard")
        params = self.prototypes[self.name]
        if len(args) != len(params):
            raise LaunchError(f"{self.name} takes {len(params)} arguments, got {len(args)}")
        arrays = [check_argument(self.name, i, declared, value) for i, (declared, value) in
                  enumerate(zip(params, args))]
        null = ctypes.c_void_p(0)
        for at_end in (True, False):  # overruns hit the page after, underruns the page before
            copies: dict[int, GuardedCopy] = {}
            slots = (ctypes.c_void_p * len(args))()
            keep: list[Any] = []
            for i, (value, array) in enumerate(zip(args, arrays)):
                if array is NULL:
                    slots[i] = ctypes.addressof(null)
                elif array is not None:
                    copies[i] = GuardedCopy(array, at_end)
                    slots[i] = ctypes.addressof(copies[i].slot)
                else:
                    scalar = np.array(value)  # a NumPy scalar's bytes, as CuPy passes it
                    keep.append(scalar)
                    slots[i] = scalar.ctypes.data
            run_in_child(self.harness, self.name, grid[0], block[0], slots, at_end)
            if at_end:
                for copy in copies.values():
                    copy.copy_back()
        state.launches.append(Launch(self.name, grid, block, state.device, state.stream, state.guard_stream))
        if self.name in state.corrupt:
            out = arrays[next(i for i, p in enumerate(params) if p.endswith("*") and "const" not in p)]
            out.view(torch.uint8).bitwise_xor_(0x5A)


NULL = torch.empty(0)  # marks a null pointer argument


def check_argument(kernel: str, index: int, declared: str, value: Any) -> torch.Tensor | None:
    """The tensor behind a pointer argument (None for a scalar); raises on a type CuPy would pass wrongly."""
    where = f"argument {index} ({declared}) of {kernel}"
    if declared.endswith("*"):
        if isinstance(value, np.uint64) and int(value) == 0:
            return NULL
        if not isinstance(value, FakeArray):
            raise LaunchError(f"{where}: expected an array, got {type(value).__name__}")
        want = POINTEE_DTYPES[_c_type(declared)]
        # CuPy checks no pointee type: a same-size integer view of 16-bit storage is the same bytes
        same_bytes = want in (torch.float16, torch.bfloat16) and value.tensor.dtype == torch.int16
        if value.tensor.dtype != want and not same_bytes:
            raise LaunchError(f"{where}: expected {want}, got an array of {value.tensor.dtype}")
        return value.tensor
    want_type = SCALAR_TYPES[declared]
    if type(value) is not want_type:
        raise LaunchError(f"{where}: expected {want_type.__name__}, got {type(value).__name__}")
    return None


def run_in_child(harness: ctypes.CDLL, name: str, grid: int, block: int, slots: Any, at_end: bool) -> None:
    pid = os.fork()
    if pid == 0:  # the child only calls into the harness: no Python-level torch work after fork
        faulthandler.disable()  # a fault here is the expected verdict, reported by the parent
        code = 3
        try:
            code = harness.launch(name.encode(), grid, block, slots)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGABRT:
            raise LaunchError(f"{name}: aborted - a barrier in a kernel not launched cooperatively, or a barrier "
                              "that some threads of a block never reach")
        side = "past the end of" if at_end else "before the start of"
        raise LaunchError(f"{name}: {signal.Signals(sig).name} - a load or store {side} one of its buffers")
    if os.WEXITSTATUS(status) != 0:
        raise LaunchError(f"{name}: the harness has no such entry (exit {os.WEXITSTATUS(status)})")


def install(state: State) -> types.ModuleType:
    """A module object to put in ``sys.modules['cupy']``."""
    cupy = types.ModuleType("cupy")

    class RawModule:
        def __init__(self, code: str, options: tuple[str, ...] = (), name_expressions: Any = None) -> None:
            self.code, self.options = code, tuple(options)
            self.name_expressions = tuple(name_expressions or ())
            self.templates: tuple[ctypes.CDLL, dict[str, list[str]]] | None = None

        def compile(self) -> None:
            if state.fail_compile:
                raise RuntimeError(state.fail_compile)
            if "#include <" in self.code:
                raise RuntimeError("catastrophic error: cannot open source file (a CUDA header)")
            state.compiled.append((self.code[:40], self.options))
            if self.name_expressions:
                assert state.build_directory is not None, "the fake needs a build directory for templates"
                self.templates = build_templates(state.build_directory, self.name_expressions)

        def get_function(self, name: str) -> FakeFunction:
            if self.name_expressions:  # CuPy looks a template kernel up by the expression it was compiled for
                if name not in self.name_expressions or self.templates is None:
                    raise LaunchError(f"{name!r} is not one of this module's name expressions")
                return FakeFunction(state, name, *self.templates)
            return FakeFunction(state, name)

    class ExternalStream:
        def __init__(self, pointer: int) -> None:
            self.pointer = pointer

        def __enter__(self) -> ExternalStream:
            state.stream = self.pointer
            return self

        def __exit__(self, *exc: Any) -> None:
            state.stream = None

    def from_dlpack(tensor: torch.Tensor) -> FakeArray:
        if tensor.dtype == torch.bfloat16 and not state.ml_dtypes:  # CuPy 14 without ml_dtypes
            raise NotImplementedError("CuPy does not support bfloat16 yet")
        if tensor.requires_grad:  # what torch's __dlpack__ does
            raise BufferError("Can't export tensors that require gradient, use tensor.detach()")
        if not tensor.is_contiguous():
            raise BufferError("the wrapper hands CuPy flat views only")
        return FakeArray(tensor)

    cuda = types.SimpleNamespace(ExternalStream=ExternalStream,
                                 runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    cupy.RawModule, cupy.from_dlpack, cupy.cuda = RawModule, from_dlpack, cuda
    return cupy
