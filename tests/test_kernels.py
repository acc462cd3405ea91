"""CUDA kernels without a GPU: they compile (nvcc for sm_80/sm_90, NVRTC as CuPy runs them), and the same
sources built for the CPU with g++ and ``kernels/cpu_emulation.h`` match the torch reference."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from surgeon.methods.quadratic.inference import QuadraConvDW
from surgeon.methods.quadratic.layer import QuadraticDepthwiseConv2d
from surgeon.ops import bitpack
from surgeon.ops.derivative_codebook import codebook, encode
from surgeon.ops.kernels import cuda as cuda_kernels
from surgeon.ops.package_data import data_dir
from surgeon.ops.row_quantizer import quantize_rows

KERNELS = Path(str(data_dir("kernels")))
HARNESS = Path(__file__).parent / "kernel_harness" / "harness.cpp"


def nvcc() -> str:
    found = shutil.which("nvcc")
    assert found, "nvcc (CUDA toolkit) must be on PATH to check the kernels compile"
    return found


@pytest.mark.parametrize("source", cuda_kernels.KERNEL_FILES)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles(source, arch, tmp_path):
    result = subprocess.run([nvcc(), f"-arch={arch}", "-cubin", "-o", str(tmp_path / "k.cubin"),
                             str(KERNELS / source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 1000


MAX_REGISTERS = 64  # 4 blocks of 256 threads per SM


def model_geometries() -> list[str]:
    """Instantiations of the specialised kernels for the layers of real models: ConvNeXt's 7x7 (ranks 1 to 3, and
    stride 2), EfficientNet's and MobileNet's 3x3 and 5x5 at stride 1 and 2, in every storage type and layout; the
    merged layer's ``quadconv_atrous`` and training's ``quadratic_term`` in each of its modes. (Rank 4 is left out:
    its merged fp16 channels-last kernel takes 66 registers at sm_90, though each of its paths alone fits 64.)"""
    from benchmarks.kernel_cost import layer_geometry

    geometries = [layer_geometry(7, 1, rank) for rank in (1, 2, 3)]
    geometries += [layer_geometry(7, 2, 1), layer_geometry(3, 1, 1), layer_geometry(3, 2, 1), layer_geometry(5, 1, 1),
                   layer_geometry(5, 2, 1), layer_geometry(3, 1, 1, 2)]
    cases = [(geometry, dtype, nhwc) for geometry in geometries
             for dtype in (torch.float32, torch.float16, torch.bfloat16) for nhwc in (True, False)]
    merged = [geometry.name_expression(dtype, nhwc, 96) for geometry, dtype, nhwc in cases]
    training = [geometry.term_expression(dtype, nhwc, 96, mode) for geometry, dtype, nhwc in cases
                for mode in cuda_kernels.TERM_MODES.values()]
    return merged + training


def extern_entries(code: str) -> int:
    """extern "C" kernels of a source, the per-dtype macro's entries counted once per dtype it is expanded for."""
    macro = re.search(r"#define\s+(\w+)\(([^)]*)\)((?:.*\\\n)+.*)", code)
    plain = len(re.findall(r'^extern "C" __global__', code, re.MULTILINE))
    if macro is None or "__global__" not in macro.group(3):
        return plain
    return plain + macro.group(3).count("__global__") * len(re.findall(rf"^{macro.group(1)}\(", code, re.MULTILINE))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_fits_its_resource_budget(arch, tmp_path):
    """ptxas' own accounting for every kernel: no stack frame, no spills, at most 64 registers."""
    from benchmarks.kernel_cost import compile_kernels, instantiation_source

    units = [(KERNELS / name).read_text() for name in cuda_kernels.KERNEL_FILES]
    units.append(instantiation_source(model_geometries()))
    checked = 0
    for index, code in enumerate(units):
        folder = tmp_path / str(index)
        folder.mkdir()
        _, resources = compile_kernels(code, arch, folder)
        assert resources, "ptxas reported no kernel"
        for name, used in resources.items():
            assert (used.stack, used.spill_stores, used.spill_loads) == (0, 0, 0), (name, used)
            assert used.registers <= MAX_REGISTERS, (name, used)
        checked += len(resources)
    expected = sum(extern_entries(code) for code in units[:-1]) + len(model_geometries())
    assert checked == expected  # every extern "C" entry and every instantiation, each reported once


def test_the_specialised_kernels_never_divide_by_a_register(tmp_path):
    """A thread's placement divides by launch-time numbers through multiply-high constants (SurgeonDivisor): the PTX
    of every specialised kernel has no integer divide or remainder (some twenty SASS instructions each in 32 bits,
    a call into a routine with a slow path in 64), only what NVVM makes of divisions by compile-time constants."""
    from benchmarks.kernel_cost import instantiation_source

    source, ptx = tmp_path / "unit.cu", tmp_path / "unit.ptx"
    source.write_text(instantiation_source(model_geometries()))
    subprocess.run(["nvcc", "-arch=sm_90", "-ptx", f"-I{KERNELS}", "-o", str(ptx), str(source)], check=True)
    text = ptx.read_text()
    assert len(re.findall(r"^\.visible \.entry", text, re.MULTILINE)) == len(model_geometries())
    assert not re.findall(r"\b(?:div|rem)\.[su](?:32|64)\b", text)


def test_the_specialised_kernel_costs_at_most_4_instructions_per_required_fma():
    """SASS of both paths for ConvNeXt-T's four stage shapes (benchmarks/kernel_cost.py): what each stage issues,
    both paths weighted by the warps that take them, within 4 instructions per required FMA; the checked path
    (windows reaching into the padding, every load predicated) within 1.4x the interior path's instructions: no slow
    border fallback."""
    from benchmarks.kernel_cost import TARGET_INSTRUCTIONS_PER_FMA, stage_costs

    rows = stage_costs("sm_90")
    assert len(rows) == 4 * 2 * 2
    for row in rows:
        assert row.fma_needed == 69 and row.ffma_per_output >= row.fma_needed  # every required FMA is there
        assert row.interior_per_fma <= row.instructions_per_fma <= TARGET_INSTRUCTIONS_PER_FMA, row
        assert row.interior_per_output < row.checked_per_output <= 1.4 * row.interior_per_output, row
        # what a stage issues per output lies between its paths' costs, stretched by tiles past the row's end
        side, out_w = int(row.stage.split("×")[-1]), cuda_kernels.ATROUS_OUT_W  # rank 1: 4 outputs per thread
        slots = out_w * -(-side // out_w) / side
        assert row.interior_per_output <= row.instructions_per_output <= row.checked_per_output * slots * (1 + 1e-12)


def test_the_cost_model_counts_training_term_kernels_by_their_branch_taps():
    """``kernel_cost.py --training``: training's forward term kernel needs the 20 branch FMAs per output (no primary
    taps) and has all of them; its rows are costed like the merged kernel's."""
    from benchmarks.kernel_cost import stage_costs

    rows = stage_costs("sm_90", (torch.float32,), kernel="add")
    assert len(rows) == 4 * 2
    for row in rows:
        assert row.fma_needed == 20 and row.ffma_per_output >= row.fma_needed, row
        assert row.interior_per_output < row.checked_per_output and row.registers <= MAX_REGISTERS, row
        assert row.interior_per_output <= row.instructions_per_output, row


def test_the_longest_path_follows_forward_branches_and_stops_at_the_loop():
    """The cost model's count of what one thread issues: both ways of a conditional forward branch (the longer
    counts), an unconditional branch's way only, a conditional exit as a way out, no backward branch, nothing past
    the last exit; a call cannot be counted."""
    from benchmarks.kernel_cost import Instruction, longest_path

    def sass(*lines: str) -> list:
        out = []
        for index, line in enumerate(lines):
            words = line.split()
            predicated = words[0].startswith("@")
            opcode = words[1 if predicated else 0]
            target = int(words[-1]) * 16 if opcode == "BRA" else None
            out.append(Instruction(index * 16, opcode, predicated, target))
        return out

    straight = sass("LDG", "FFMA", "STG", "EXIT", "BRA 4", "NOP", "NOP")
    assert longest_path(straight) == 4  # the trap loop and the padding after EXIT are unreachable
    branches = sass("ISETP", "@P0 BRA 5", "FFMA", "FFMA", "BRA 6", "FADD", "STG", "EXIT")
    assert longest_path(branches) == 2 + 3 + 2  # the longer side (FFMA FFMA BRA) over the shorter (FADD)
    loop = sass("S2R", "FFMA", "IADD3", "@P0 BRA 1", "EXIT")
    assert longest_path(loop) == 5  # one pass: the backward branch falls through
    early = sass("ISETP", "@P0 EXIT", "FFMA", "EXIT")
    assert longest_path(early) == 4
    with pytest.raises(ValueError, match="call"):
        longest_path(sass("MOV", "CALL", "EXIT"))


def test_warps_take_the_checked_path_where_a_lane_reaches_the_padding():
    """The thread placement the cost model replays, against counts made by hand for a 7x7 "same" layer: at 56x56,
    output rows 3..52 and tiles 1..12 of 14 have windows inside the image; in NHWC a warp is 32 channels of one
    tile, so the warps of the other tiles take the checked path; in NCHW a warp's 32 tiles span rows and always
    include a row's first tile; at 7x7 no window fits."""
    from benchmarks.kernel_cost import checked_warps, interior_threads, layer_geometry

    geometry = layer_geometry()
    nhwc = interior_threads(geometry, (2, 96, 56, 56), True)
    assert nhwc.numel() == 2 * 96 * 56 * 14 and int(nhwc.sum()) == 2 * 96 * 50 * 12
    slow, warps = checked_warps(nhwc)
    assert (slow, warps) == (2 * 3 * (56 * 14 - 50 * 12), 2 * 3 * 56 * 14)
    assert checked_warps(interior_threads(geometry, (2, 96, 56, 56), False)) == (warps, warps)
    assert not interior_threads(geometry, (1, 8, 7, 7), True).any()
    # a warp straddling channel groups (C = 48): lanes of two tiles vote together
    straddling = interior_threads(geometry, (1, 48, 56, 56), True)
    assert checked_warps(straddling)[0] > checked_warps(interior_threads(geometry, (1, 64, 56, 56), True))[0] * 48 / 64


@pytest.mark.parametrize("source", cuda_kernels.KERNEL_FILES)
def test_nvrtc_compiles_what_the_loader_loads(source):
    from cupy.cuda import nvrtc

    code = cuda_kernels.kernel_source(source)
    assert "#include <" not in code  # no CUDA header: any CuPy's NVRTC compiles it, whatever toolkit is around
    # the options CuPy's RawModule adds to ours (cupy.cuda.compiler._compile_with_cache_cuda and its NVRTC path)
    options = [*cuda_kernels.nvrtc_options(), "-ftz=true", "--device-as-default-execution-space"]

    def compile_with(arch: str, output):
        program = nvrtc.createProgram(code, source, [], [])
        try:
            nvrtc.compileProgram(program, [*options, f"-arch={arch}"])
            return output(program)
        finally:
            nvrtc.destroyProgram(program)

    assert len(compile_with("sm_90", nvrtc.getCUBIN)) > 1000
    ptx = compile_with("compute_80", nvrtc.getPTX)
    entries = {"quadratic_dwconv.cu": ["quadconv_fwd_f32_nhwc", "quadconv_fwd_bf16_nchw"],
               "bitpack.cu": ["pack_codes", "codebook_pack_f16", "rows_pack_bf16", "mask_pack_f32"],
               "layer_norm.cu": ["layer_norm_backward_f32_to_bf16", "layer_norm_backward_f16_to_f16"]}[source]
    text = ptx.decode() if isinstance(ptx, bytes) else ptx
    for entry in entries:
        assert f".entry {entry}" in text


def test_nvrtc_instantiates_the_specialised_kernel_by_name_expression():
    """As CuPy's ``RawModule(name_expressions=...)`` does: the expression the wrapper builds names a kernel that
    NVRTC instantiates and lowers, for sm_90 with CuPy's own options."""
    from cupy.cuda import nvrtc

    code = cuda_kernels.kernel_source("quadratic_atrous.cu")
    assert "#include <" not in code
    options = [*cuda_kernels.nvrtc_options(), "-ftz=true", "--device-as-default-execution-space", "-arch=sm_90"]
    expressions = model_geometries()[:4]
    program = nvrtc.createProgram(code, "quadratic_atrous.cu", [], [])
    try:
        for expression in expressions:
            nvrtc.addNameExpression(program, expression)
        nvrtc.compileProgram(program, options)
        lowered = [nvrtc.getLoweredName(program, expression) for expression in expressions]
        cubin = nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
    assert len(set(lowered)) == 4 and all(name.startswith("_Z15quadconv_atrous") for name in lowered)
    assert len(cubin) > 1000


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> ctypes.CDLL:
    library = tmp_path_factory.mktemp("harness") / "harness.so"
    result = subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{KERNELS}", "-o", str(library),
                             str(HARNESS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def run_quadconv(harness: ctypes.CDLL, layer: QuadraConvDW, x: torch.Tensor, channels_last: bool,
                 grid: int | None = None) -> torch.Tensor:
    launch = cuda_kernels.quadconv_arguments(layer, x, channels_last=channels_last)
    assert launch is not None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    w3, w1, w2 = (t.detach().to(x.dtype).contiguous() for t in (layer.P.conv3.weight, layer.P.conv1.weight,
                                                                 layer.P.conv2.weight))
    bias = layer.P.conv3.bias.detach().to(x.dtype).contiguous() if layer.P.conv3.bias is not None else w3
    y = cuda_kernels.output_tensor(launch, x)
    getattr(harness, f"launch_{launch.kernel}")(
        ctypes.c_uint(grid or min(launch.grid, 64)), ctypes.c_uint(launch.block), ptr(x), ptr(w3), ptr(bias),
        ptr(w1), ptr(w2), ptr(y), *(ctypes.c_int(v) for v in launch.ints))
    return y


def merged_layer(kernel, stride, padding, dilation, rank, same, channels=5, bias=True) -> QuadraConvDW:
    if same:
        from timm.layers.conv2d_same import Conv2dSame

        conv = Conv2dSame(channels, channels, kernel, stride, dilation=dilation, groups=channels, bias=bias)
    else:
        conv = nn.Conv2d(channels, channels, kernel, stride, padding, dilation, groups=channels, bias=bias)
    adapter = QuadraticDepthwiseConv2d.from_conv(conv, same_dynamic=same, rank=rank)
    nn.init.normal_(adapter.weight_a, 0, 0.3)
    return QuadraConvDW.from_adapter(adapter)


SWEEP = [
    # kernel, stride, padding, dilation, rank, same, (H, W)
    (3, 1, 1, 1, 1, False, (9, 11)),
    (3, 2, 1, 1, 2, False, (10, 7)),
    (5, 1, 2, 1, 1, False, (8, 8)),
    (5, 2, 0, 1, 3, True, (11, 13)),
    (7, 1, 3, 1, 1, False, (14, 9)),
    (7, 2, 3, 1, 2, False, (15, 15)),
    (4, 1, 0, 1, 1, True, (9, 10)),
    (2, 2, 0, 1, 1, False, (7, 9)),
    (3, 1, 2, 2, 1, False, (12, 7)),
    (9, 1, 4, 1, 8, False, (10, 12)),
    (31, 1, 15, 1, 1, False, (17, 19)),
    (6, 2, 1, 1, 2, False, (13, 12)),
]


@pytest.mark.parametrize("kernel,stride,padding,dilation,rank,same,size", SWEEP)
@pytest.mark.parametrize("channels_last", [False, True])
def test_quadconv_matches_torch_fp32(harness, kernel, stride, padding, dilation, rank, same, size, channels_last):
    torch.manual_seed(kernel * 100 + stride)
    layer = merged_layer(kernel, stride, padding, dilation, rank, same, bias=kernel != 2)
    x = torch.randn(2, 5, *size)
    got = run_quadconv(harness, layer, x, channels_last)
    with torch.no_grad():
        want = layer.double().forward_dense(x.double())
    layer.float()
    assert got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    scale = max(1.0, want.abs().max().item())
    assert (got.double() - want).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_quadconv_half_precisions(harness, dtype, tolerance, channels_last):
    torch.manual_seed(0)
    layer = merged_layer(5, 2, 2, 1, 2, False)
    x = torch.randn(2, 5, 11, 9).to(dtype)
    got = run_quadconv(harness, layer.to(dtype), x, channels_last)
    assert got.dtype == dtype
    with torch.no_grad():
        want = layer.double().forward_dense(x.double())  # same rounded inputs, exact arithmetic
    scale = max(1.0, want.abs().max().item())
    assert (got.double() - want).abs().max().item() <= tolerance * scale


def test_grid_size_does_not_matter(harness):
    torch.manual_seed(1)
    layer = merged_layer(3, 1, 1, 1, 2, False)
    x = torch.randn(1, 5, 9, 9)
    results = [run_quadconv(harness, layer, x, False, grid=g) for g in (1, 3, 1000)]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_kernels(harness, bits):
    n = 1003
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = torch.zeros(bitpack.packed_numel(n, bits), dtype=torch.uint8)
    harness.launch_pack_codes(ctypes.c_uint(4), ctypes.c_uint(32), ptr(codes), ptr(packed), ctypes.c_longlong(n),
                              ctypes.c_int(bits))
    assert torch.equal(packed, bitpack.pack(codes, bits))
    out = torch.zeros(n, dtype=torch.uint8)
    harness.launch_unpack_codes(ctypes.c_uint(4), ctypes.c_uint(32), ptr(packed), ptr(out), ctypes.c_longlong(n),
                                ctypes.c_int(bits))
    assert torch.equal(out, codes)


def test_mask_pack_kernel(harness):
    x = torch.randn(777) * 5
    x[:3] = torch.tensor([0.0, 6.0, 3.0])
    out = torch.zeros(bitpack.packed_numel(777, 1), dtype=torch.uint8)
    harness.launch_mask_pack_f32(ctypes.c_uint(2), ctypes.c_uint(64), ptr(x), ctypes.c_float(0.0),
                                 ctypes.c_float(6.0), ptr(out), ctypes.c_longlong(777))
    assert torch.equal(out, bitpack.pack((x > 0) & (x < 6), 1))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codebook_pack_kernel(harness, bits):
    from surgeon.ops.derivative_codebook import inverse_step

    x = torch.randn(999) * 3
    book = codebook("gelu", bits)
    x[:3] = torch.tensor([-50.0, 50.0, float("nan")])  # clamped ends and NaN
    x[3:3 + book.boundaries.numel()] = book.boundaries  # exactly on the interval edges
    out = torch.zeros(bitpack.packed_numel(999, bits), dtype=torch.uint8)
    harness.launch_codebook_pack_f32(ctypes.c_uint(3), ctypes.c_uint(64), ptr(x), ctypes.c_float(book.low),
                                     ctypes.c_float(inverse_step(book.step)), ptr(book.cell_codes),
                                     ctypes.c_int(book.cell_codes.numel()), ptr(out), ctypes.c_longlong(999),
                                     ctypes.c_int(bits))
    assert torch.equal(out, bitpack.pack(encode(x, book), bits))


@pytest.mark.parametrize("nonnegative", [False, True])
def test_rows_pack_kernel(harness, nonnegative):
    rows = torch.rand(37, 50) if nonnegative else torch.randn(37, 50)
    q = quantize_rows(rows, 4, nonnegative=nonnegative)
    out = torch.zeros_like(q.packed)
    low = ctypes.c_void_p(None) if nonnegative else ptr(q.offset)
    harness.launch_rows_pack_f32(ctypes.c_uint(5), ctypes.c_uint(64), ptr(rows), low, ptr(q.step),
                                 ctypes.c_longlong(50), ptr(out), ctypes.c_longlong(rows.numel()), ctypes.c_int(4))
    assert torch.equal(out, q.packed)


NON_FINITE = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, 6.0, 3.0, -1.0, 7.0])


@pytest.mark.parametrize("op,expected", [("relu", [1, 0, 0, 0, 1, 1, 0, 1]), ("relu6", [0, 0, 0, 0, 0, 1, 0, 0])])
def test_mask_of_non_finite_inputs_is_the_same_on_both_routes(harness, op, expected):
    from surgeon.methods.s2a.activation import _mask_bounds, pack_mask
    from surgeon.ops.activations import ActivationSpec

    spec = ActivationSpec(op, ())
    low, high = _mask_bounds(spec)
    x = NON_FINITE.repeat(5)
    cpu = pack_mask(x, spec)
    kernel = torch.zeros_like(cpu)
    harness.launch_mask_pack_f32(ctypes.c_uint(2), ctypes.c_uint(8), ptr(x), ctypes.c_float(low),
                                 ctypes.c_float(high), ptr(kernel), ctypes.c_longlong(x.numel()))
    assert torch.equal(kernel, cpu)
    assert bitpack.unpack(cpu, 1, 8).tolist() == expected  # ReLU passes +inf (torch's own backward does too)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_rows_with_non_finite_values_stay_finite_on_both_routes(harness, nonnegative):
    from surgeon.ops.row_quantizer import dequantize_rows

    torch.manual_seed(0)
    rows = torch.rand(6, 16) if nonnegative else torch.randn(6, 16)
    rows[1, 3], rows[2, 0], rows[2, 5], rows[3, 7] = float("inf"), float("nan"), -float("inf"), float("nan")
    rows[4] = float("nan")  # a row with no finite value at all
    q = quantize_rows(rows, 4, nonnegative=nonnegative)
    assert torch.isfinite(q.step).all() and torch.isfinite(q.offset).all()
    out = torch.zeros_like(q.packed)
    low = ctypes.c_void_p(None) if nonnegative else ptr(q.offset)
    harness.launch_rows_pack_f32(ctypes.c_uint(3), ctypes.c_uint(16), ptr(rows), low, ptr(q.step),
                                 ctypes.c_longlong(16), ptr(out), ctypes.c_longlong(rows.numel()), ctypes.c_int(4))
    assert torch.equal(out, q.packed)
    back = dequantize_rows(*q.tensors(), 6, 16, 4, torch.float32)
    assert torch.isfinite(back).all()
    finite = torch.isfinite(rows)
    assert ((back - rows).abs()[finite] <= q.step.expand_as(rows)[finite] / 2 + 1e-6).all()
    row_max = rows.masked_fill(~finite, -float("inf")).amax(1)
    assert back[1, 3] == pytest.approx(row_max[1].item(), abs=q.step[1].item() / 2)  # +inf saturates at the top
    bottom = 0.0 if nonnegative else rows[2][finite[2]].min().item()
    assert back[2, 0] == pytest.approx(bottom, abs=1e-6) and back[2, 5] == pytest.approx(bottom, abs=1e-6)
