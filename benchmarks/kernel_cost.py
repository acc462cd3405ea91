"""Static cost of the specialised quadratic depthwise kernel, from the compiler's own output (no GPU needed).

For ConvNeXt-T's four stage shapes (batch 32, 7×7, rank 1, the default atrous branches) the kernel's template
instantiations are compiled with ``nvcc`` for sm_90 and read back:

* **resources** (``ptxas --resource-usage``): registers, stack frame and spills of the whole kernel;
* **SASS** (``cuobjdump -sass``, from the ``nvidia-cuda-cuobjdump`` wheel) of each of the kernel's two paths,
  compiled alone: the interior path (``SURGEON_INTERIOR_ONLY``: a warp whose windows all lie inside the image) and
  the checked path (``SURGEON_CHECKED_ONLY``: a warp with a window reaching into the padding, a predicate per
  load). Every loop of either path is unrolled, and the thread's placement divides without a branch, so a path's
  cost is the instructions on the longest way through its SASS for one pass of the grid-stride loop (forward
  branches followed both ways, the loop's back edge not taken, code after the last ``EXIT`` unreachable): the most
  a thread issues, prologue and epilogue included. The static total also counts the skipped side of each
  branch (with a bias / without one) and the alignment padding, so it is higher;
* **which warps take which path**: the kernel's own placement of threads (output tiles of 4 neighbouring outputs,
  channels fastest in NHWC, tiles fastest in NCHW) and its warp vote, replayed for the stage's shape; a warp issues
  every instruction of its path once for its 32 lanes, and a tile past the row's end still runs whole. Their sum,
  divided by the outputs the stage produces, is the cost per output;
* **FMAs needed** per output: the primary taps plus the non-zero branch taps times the rank (49 + 16 + 4 = 69);
* **bytes moved**: input and output once, plus the weights (fp32, whatever the storage type).

From those it predicts the time on an H100 SXM (132 SMs at 1.755 GHz, 4 schedulers issuing one warp instruction
per clock each, 128 fp32 FMAs per clock per SM, 3.35 TB/s HBM3): the issue floor, the FMA floor and the HBM floor;
the kernel cannot beat the largest of them.

With ``--training``, the same for training's quadratic term kernels (``quadratic_term``: the forward's ``add``
and the backward's ``a_and_b_times``), whose required FMAs are the branch taps alone (16 + 4 at rank 1).

Run: python benchmarks/kernel_cost.py [--arch sm_90] [--training] [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from surgeon.methods.quadratic.inference import QuadraConvDW
from surgeon.methods.quadratic.layer import default_branches
from surgeon.ops.kernels import cuda as cuda_kernels
from surgeon.ops.package_data import data_dir

STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))  # ConvNeXt-T: channels, feature map side
BATCH = 32
H100 = {"sms": 132, "clock_hz": 1.755e9, "warp_issue_per_sm_clock": 4, "fma_per_sm_clock": 128, "hbm_bytes_s": 3.35e12}
TARGET_INSTRUCTIONS_PER_FMA = 4.0


def tool(name: str) -> str:
    """A CUDA binary tool: on PATH, else from the ``nvidia-cuda-*`` wheels (``nvidia/cu*/bin``)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in sys.path:
        for candidate in sorted(glob.glob(os.path.join(folder, "nvidia", "cu*", "bin", name))):
            return candidate
    raise FileNotFoundError(f"{name} not found: pip install nvidia-cuda-{name}")


def layer_geometry(kernel: int = 7, stride: int = 1, rank: int = 1, dilation: int = 1) -> cuda_kernels.AtrousGeometry:
    """The specialised kernel's geometry for a merged layer with QuadraNet V2's default branches."""
    branch_a, branch_b = default_branches((kernel, kernel), (dilation, dilation))
    pad = kernel // 2 * dilation
    layer = QuadraConvDW(8, (kernel, kernel), (stride, stride), (pad, pad), (dilation, dilation),
                         rank=rank, branch_a=branch_a, branch_b=branch_b)
    return layer.atrous_geometry()


def instantiation_source(expressions: list[str]) -> str:
    """A translation unit that instantiates each name expression (explicit instantiations of the templates of
    ``quadratic_atrous.cu``: ``quadconv_atrous`` and ``quadratic_term``)."""
    source = data_dir("kernels").joinpath("quadratic_atrous.cu").read_text(encoding="utf-8")
    lines = ['#include "quadratic_atrous.cu"']
    for expression in expressions:
        kernel, arguments = expression.split("<", 1)
        match = re.search(rf"__global__ void {re.escape(kernel.strip())}\(([^)]*)\)", source)
        assert match is not None, f"no template kernel {kernel!r} in quadratic_atrous.cu"
        storage = arguments.split(",", 1)[0].strip()
        params = re.sub(r"\bT\b", storage, match.group(1))  # the declared parameters, names and all
        lines.append(f"template __global__ void {expression}({params});")
    return "\n".join(lines) + "\n"


@dataclass
class Resources:
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int


def compile_kernels(code: str, arch: str, directory: Path, defines: tuple[str, ...] = ()
                    ) -> tuple[Path, dict[str, Resources]]:
    """nvcc a translation unit to a cubin; returns it and each function's resources (by mangled name)."""
    stem = f"unit-{arch}" + "".join(f"-{d.lower()}" for d in defines)
    source, cubin = directory / f"{stem}.cu", directory / f"{stem}.cubin"
    source.write_text(code)
    result = subprocess.run(["nvcc", f"-arch={arch}", "-cubin", "--resource-usage", *(f"-D{d}" for d in defines),
                             f"-I{data_dir('kernels')}", "-o", str(cubin), str(source)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return cubin, parse_resources(result.stdout + result.stderr)


def parse_resources(log: str) -> dict[str, Resources]:
    found: dict[str, Resources] = {}
    pattern = (r"Function properties for (\S+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
               r"spill loads\s+ptxas info\s+: Used (\d+) registers")
    for name, stack, stores, loads, registers in re.findall(pattern, log):
        found[name] = Resources(int(registers), int(stack), int(stores), int(loads))
    return found


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # FFMA, LDG, BRA, ...
    predicated: bool  # runs under a predicate (@P0, @!P1, ...): for a branch or an exit, a conditional one
    target: int | None  # a branch's destination


def sass_functions(cubin: Path) -> dict[str, list[Instruction]]:
    """Each function's SASS instructions in address order (``cuobjdump -sass``)."""
    # cuobjdump disassembles through nvdisasm, which it looks for on PATH
    path = os.pathsep.join([os.path.dirname(tool("nvdisasm")), os.environ.get("PATH", "")])
    text = subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True,
                          env={**os.environ, "PATH": path}).stdout
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in text.splitlines():
        function = re.match(r"\s+Function : (\S+)", line)
        if function:
            current = functions.setdefault(function.group(1), [])
            continue
        found = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)([^;]*);", line)
        if found and current is not None:
            opcode = found.group(3)
            target = re.search(r"(?:^|\s)(0x[0-9a-f]+)\s*$", found.group(4)) if opcode == "BRA" else None
            current.append(Instruction(int(found.group(1), 16), opcode, found.group(2) is not None,
                                       int(target.group(1), 16) if target else None))
    return functions


def longest_path(instructions: list[Instruction]) -> int:
    """The most instructions one thread can issue in one pass through a function: the longest way from its entry
    to an exit, following every forward branch both ways (a conditional one) or its way (an unconditional one),
    never a backward branch (a loop's next pass). Raises on a call: a subroutine's cost is not counted."""
    at = {instruction.address: index for index, instruction in enumerate(instructions)}
    longest = [0] * (len(instructions) + 1)  # from each instruction to the end of the pass; the sentinel ends it
    for index in range(len(instructions) - 1, -1, -1):
        instruction = instructions[index]
        if instruction.opcode == "CALL":
            raise ValueError(f"a call at {instruction.address:#x}: the kernel is meant to have no subroutine")
        after: list[int] = []
        ends = instruction.opcode in ("EXIT", "RET", "BRA")
        if not ends or instruction.predicated:
            after.append(index + 1 if index + 1 < len(instructions) else len(instructions))
        if instruction.opcode == "BRA" and instruction.target is not None and instruction.target > instruction.address:
            after.append(at[instruction.target])
        if instruction.opcode in ("EXIT", "RET") or (instruction.opcode == "BRA" and not after):
            after.append(len(instructions))  # the pass ends here (an exit, or a loop's branch back)
        longest[index] = 1 + max(longest[successor] for successor in after)
    return longest[0]


def sass_counts(cubin: Path) -> dict[str, dict[str, int]]:
    """Per function: ``total`` (every instruction), ``path`` (:func:`longest_path`) and each opcode's count
    (``FFMA``, ``LDG``, ...)."""
    counts: dict[str, dict[str, int]] = {}
    for name, instructions in sass_functions(cubin).items():
        found = counts[name] = {"total": len(instructions), "path": longest_path(instructions)}
        for instruction in instructions:
            found[instruction.opcode] = found.get(instruction.opcode, 0) + 1
    return counts


def mangled_key(expression: str) -> str:
    """What identifies an instantiation inside its mangled name: its integer template arguments in order."""
    values = [v.strip() for v in expression.split("<", 1)[1].rstrip(">").split(",")]
    storage = {"float": "If", "surgeon_half": "I12surgeon_half", "surgeon_bfloat16": "I16surgeon_bfloat16"}[values[0]]
    layout = "Lb1E" if values[1] == "true" else "Lb0E"
    return storage + layout + "".join(f"Li{v}E" for v in values[2:])


def find(functions: dict, expression: str) -> object:
    key = mangled_key(expression)
    matches = [value for name, value in functions.items() if key in name]
    if len(matches) != 1:
        raise KeyError(f"{expression}: {len(matches)} compiled functions match")
    return matches[0]


def interior_threads(geometry: cuda_kernels.AtrousGeometry, shape: tuple[int, int, int, int], nhwc: bool,
                     pads: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Per thread of the launch, in thread order: whether its tile's window lies wholly inside the image (the
    kernel's ``AtrousLayer::place`` and ``interior``). ``shape``: the input's N, C, H, W; ``pads``: (left, right,
    top, bottom) padding (default: half the span on each side, the "same" output at stride 1)."""
    n, c, h, w = shape
    span_h, span_w = geometry.span()
    sy, sx = geometry.stride
    pads = pads if pads is not None else (span_w // 2, span_w // 2, span_h // 2, span_h // 2)
    left, _, top, _ = pads
    ho, wo = cuda_kernels.output_size((h, w), (span_h, span_w), (sy, sx), pads)
    tiles = geometry.tiles(wo, nhwc)
    ih0 = torch.arange(ho) * sy - top
    iw0 = torch.arange(tiles) * geometry.out_w(nhwc) * sx - left
    rows_inside = (ih0 >= 0) & (ih0 + span_h <= h)
    cols_inside = (iw0 >= 0) & (iw0 + geometry.columns(nhwc) <= w)
    inside = rows_inside[:, None] & cols_inside[None, :]  # [oh, tile]
    if nhwc:  # (n, oh, tile, c), c fastest
        return inside[None, :, :, None].expand(n, ho, tiles, c).reshape(-1)
    return inside[None, None].expand(n, c, ho, tiles).reshape(-1)  # (n, c, oh, tile), the tile fastest


def checked_warps(interior: torch.Tensor, warp: int = 32) -> tuple[int, int]:
    """(warps taking the checked path, all warps): a warp votes for the interior path only if every lane's tile
    is interior (the launcher's blocks are whole warps, and the grid-stride step is a multiple of the block)."""
    lanes = torch.nn.functional.pad(interior, (0, (-interior.numel()) % warp), value=True).view(-1, warp)
    return int((~lanes.all(dim=1)).sum()), lanes.shape[0]


@dataclass
class StageCost:
    stage: str
    dtype: str
    layout: str
    registers: int
    stack: int
    spills: int
    interior_per_output: float  # SASS instructions of the interior path per thread, / outputs per thread
    checked_per_output: float  # the same for the checked path
    checked_warps: float  # fraction of the stage's warps that take the checked path
    instructions_per_output: float  # instructions issued per output the stage produces, both paths weighted
    fma_needed: int
    instructions_per_fma: float  # of instructions_per_output
    interior_per_fma: float
    ffma_per_output: float  # FFMA of the interior path per output of a thread
    mbytes: float
    issue_floor_us: float
    fma_floor_us: float
    hbm_floor_us: float


# what each kernel costs per output: (FMAs needed: does it run the primary taps?, tensors of the output's size read
# and written besides the input, per rank: the factors a training step's backward writes)
KERNELS = {"merged": (True, 1, 0), "add": (False, 2, 0), "a_and_b_times": (False, 1, 2)}


def stage_costs(arch: str = "sm_90", dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
                kernel: str = "merged") -> list[StageCost]:
    """Costs at ConvNeXt-T's stages of the merged layer's kernel (``merged``) or of training's quadratic term in
    one of its modes (``add``: the forward, ``a_and_b_times``: the backward's two factors; the branch taps only)."""
    geometry = layer_geometry()
    primary, outputs_moved, per_rank_moved = KERNELS[kernel]
    fma_needed = (49 if primary else 0) + (16 + 4) * geometry.rank
    cases = [(c, side, dtype, nhwc) for c, side in STAGES for dtype in dtypes for nhwc in (True, False)]
    expressions = [geometry.name_expression(dtype, nhwc, c) if kernel == "merged" else
                   geometry.term_expression(dtype, nhwc, c, cuda_kernels.TERM_MODES[kernel])
                   for c, _, dtype, nhwc in cases]
    unique = list(dict.fromkeys(expressions))
    with tempfile.TemporaryDirectory() as folder:
        code = instantiation_source(unique)
        _, resources = compile_kernels(code, arch, Path(folder))
        interior_sass = sass_counts(compile_kernels(code, arch, Path(folder), ("SURGEON_INTERIOR_ONLY",))[0])
        checked_sass = sass_counts(compile_kernels(code, arch, Path(folder), ("SURGEON_CHECKED_ONLY",))[0])
    rows = []
    for (channels, side, dtype, nhwc), expression in zip(cases, expressions):
        used = find(resources, expression)
        interior, checked = find(interior_sass, expression), find(checked_sass, expression)
        interior_thread, checked_thread = interior["path"], checked["path"]  # type: ignore[index]
        slow, warps = checked_warps(interior_threads(geometry, (BATCH, channels, side, side), nhwc))
        out_w = geometry.out_w(nhwc)
        outputs = BATCH * channels * side * side
        issued = 32 * (slow * checked_thread + (warps - slow) * interior_thread)  # thread-instructions
        per_output = issued / outputs
        size = torch.empty(0, dtype=dtype).element_size()
        # input, outputs and weights once (the merged kernel's weights in fp32, the term kernel's in the storage type)
        moved = (1 + outputs_moved + per_rank_moved * geometry.rank) * outputs * size + \
            channels * fma_needed * (4 if kernel == "merged" else size)
        sm_clock = H100["sms"] * H100["clock_hz"]
        rows.append(StageCost(
            stage=f"{BATCH}×{channels}×{side}×{side}", dtype=str(dtype).removeprefix("torch."),
            layout="NHWC" if nhwc else "NCHW", registers=used.registers, stack=used.stack,  # type: ignore[attr-defined]
            spills=used.spill_stores + used.spill_loads,  # type: ignore[attr-defined]
            interior_per_output=interior_thread / out_w, checked_per_output=checked_thread / out_w,
            checked_warps=slow / warps, instructions_per_output=per_output, fma_needed=fma_needed,
            instructions_per_fma=per_output / fma_needed, interior_per_fma=interior_thread / out_w / fma_needed,
            ffma_per_output=interior.get("FFMA", 0) / out_w,  # type: ignore[union-attr]
            mbytes=moved / 1e6,
            issue_floor_us=issued / (sm_clock * H100["warp_issue_per_sm_clock"] * 32) * 1e6,
            fma_floor_us=outputs * fma_needed / (sm_clock * H100["fma_per_sm_clock"]) * 1e6,
            hbm_floor_us=moved / H100["hbm_bytes_s"] * 1e6))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--training", action="store_true",
                        help="also training's quadratic term kernels (forward: add; backward: a_and_b_times)")
    args = parser.parse_args()
    titles = {"merged": f"quadconv_atrous (the merged layer), target ≤ {TARGET_INSTRUCTIONS_PER_FMA:g} SASS "
                        "instructions per required FMA",
              "add": "quadratic_term, mode add (training's forward: the branch taps, the primary's output given)",
              "a_and_b_times": "quadratic_term, mode a_and_b_times (training's backward: both factors times the "
                               "gradient)"}
    everything = {}
    for kernel in ("merged", "add", "a_and_b_times") if args.training else ("merged",):
        rows = everything[kernel] = stage_costs(args.arch, kernel=kernel)
        print(f"{titles[kernel]}; 7×7 rank 1 (a: 4×4 at dilation 2, b: 2×2 at dilation 6), {args.arch}")
        print("instructions per output: interior path, checked path, and issued per output the stage produces "
              "(warps weighted by the path they take)")
        print(f"{'stage':18} {'dtype':9} {'layout':6} {'regs':>4} {'stack':>5} {'interior':>8} {'checked':>7} "
              f"{'chk warps':>9} {'instr/out':>9} {'FMA/out':>7} {'instr/FMA':>9} {'MB':>6} {'issue µs':>8} "
              f"{'FMA µs':>7} {'HBM µs':>7} {'H100 µs':>8}")
        for row in rows:
            predicted = max(row.issue_floor_us, row.fma_floor_us, row.hbm_floor_us)
            print(f"{row.stage:18} {row.dtype:9} {row.layout:6} {row.registers:>4} {row.stack:>5} "
                  f"{row.interior_per_output:>8.1f} {row.checked_per_output:>7.1f} {row.checked_warps:>9.1%} "
                  f"{row.instructions_per_output:>9.1f} {row.fma_needed:>7} {row.instructions_per_fma:>9.2f} "
                  f"{row.mbytes:>6.1f} {row.issue_floor_us:>8.1f} {row.fma_floor_us:>7.1f} {row.hbm_floor_us:>7.1f} "
                  f"{predicted:>8.1f}")
        print()
    if args.json:
        Path(args.json).write_text(json.dumps({kernel: [asdict(row) for row in rows]
                                               for kernel, rows in everything.items()}, indent=2))


if __name__ == "__main__":
    main()
