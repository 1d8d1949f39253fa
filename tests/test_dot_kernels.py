"""Tensorized int8 dot kernels (backends/dot*.py, intrin_*.py): bit-exact against the integer
reference on the host, the dispatch per target, the assembly of the VNNI and SDOT builds, the
SDOT kernel run under qemu, and qc.compile using them with the requantizer fused."""

import shutil

import numpy as np
import pytest
import torch
import tvm
from tvm import s_tir
from tvm.target.codegen import llvm_cpu_has_features

import qcompiler as qc
from qcompiler.backends import dot, dot_kernels as dk
from qcompiler.backends.dot_schedule import fused_kernels, schedule_dot, scheduled_dots
from qcompiler.backends.intrin_x86 import u8s8_pairs_exact
from qcompiler.backends.lowering import to_relax
from qcompiler.backends.targets import get_target, tvm_target

HOST = tvm_target(get_target("host"))
ZNVER3 = {"kind": "llvm", "mcpu": "znver3"}
CASCADELAKE = {"kind": "llvm", "mcpu": "cascadelake"}
ARM = tvm_target(get_target("arm"))
needs_avx2 = pytest.mark.skipif(not llvm_cpu_has_features("avx2", tvm.target.Target(HOST)),
                                reason="the host CPU has no AVX2")


def _run_host(func, inputs, out_shape, out_dtype="int32"):
    lib = dk.build(func, HOST)
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs], out)
    return out.numpy()


def _operands(rng, x_shape, n, w_max):
    """Random int8 x and w with extremes planted: x rows of 127 and -128, w rows at +-w_max."""
    x = rng.integers(-128, 128, x_shape).astype(np.int8)
    rows = x.reshape(-1, x_shape[-1])
    rows[0], rows[-1] = 127, -128
    w = rng.integers(-w_max, w_max + 1, (n, x_shape[-1])).astype(np.int8)
    w[0], w[1] = w_max, -w_max - (w_max == 127)  # full-range rows reach -128
    return x, w, rng.integers(-5000, 5000, n).astype(np.int32)


@needs_avx2
@pytest.mark.parametrize("kernel,x_shape,n,zx,requantize", [
    ("avx2_u8s8", (16, 64), 32, 3, False),
    ("avx2_u8s8", (2, 13, 70), 33, -128, True),  # ragged rows, K and N; a batch dimension
    ("avx2_s16s8", (16, 64), 40, 127, True),
    ("avx2_s16s8", (1, 70), 33, -7, False),  # one row (GEMV tile), ragged K and N
])
def test_linear_kernel_bit_exact(kernel, x_shape, n, zx, requantize):
    """Linear kernel on the host equals the int64 reference on random operands with extremes
    (x = 127 / -128 rows, weights at the kernel's limits), for ragged shapes too, with and
    without the fused requantize epilogue."""
    rng = np.random.default_rng(hash((kernel, x_shape)) % 2**32)
    x, w, b = _operands(rng, x_shape, n, 64 if kernel == "avx2_u8s8" else 127)
    assert u8s8_pairs_exact(w) == (kernel == "avx2_u8s8")
    func, consts = dk.linear_kernel(kernel, x_shape, w, zx, b, requantize=requantize)
    assert str(func.attrs["qc.dot_schedule"]).endswith("fused")
    ref = dk.reference_linear(x, zx, w, b)
    if requantize:
        ref = dk.reference_requantize(ref)
    got = _run_host(func, [x, *consts], ref.shape, str(ref.dtype))
    np.testing.assert_array_equal(got, ref)


@needs_avx2
@pytest.mark.parametrize("bits,x_shape,n,zx", [
    (4, (16, 64), 32, 3),
    (4, (2, 13, 70), 33, -128),  # ragged rows, K and N; a batch dimension
    (2, (1, 70), 37, 5),  # one row (GEMV tile)
    (2, (16, 256), 64, 0),  # tiles of L*S = 32 weights: 8 bytes at 2 bits
])
def test_sub_byte_weights_on_the_dot_kernel_bit_exact(bits, x_shape, n, zx):
    """4- and 2-bit weights take the u8 x s8 kernel: stored packed (`bits` per weight, one packed
    block per L x S tile), expanded by the kernel's vectorized unpack stage, and the result
    equals the int64 reference, with the weights at both ends of their range."""
    rng = np.random.default_rng(bits * 100 + n)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x, _, b = _operands(rng, x_shape, n, 1)
    w = rng.integers(lo, hi + 1, (n, x_shape[-1])).astype(np.int8)
    w[0], w[1] = hi, lo
    func, consts = dk.linear_kernel("avx2_u8s8", x_shape, w, zx, b, requantize=True, bits=bits)
    assert str(func.attrs["qc.dot_schedule"]).endswith("fused")
    kern = dot.KERNELS["avx2_u8s8"]
    tiles = dot.packed_shape(n, x_shape[-1], kern, dot.tiles(kern, x_shape[-2], n)[1])
    assert consts[0].dtype == np.uint8 and consts[0].size == np.prod(tiles) * bits // 8
    ref = dk.reference_requantize(dk.reference_linear(x, zx, w, b))
    np.testing.assert_array_equal(_run_host(func, [x, *consts], ref.shape, "int8"), ref)


def test_u8s8_exactness_condition_at_its_boundary():
    """u8s8_pairs_exact: a pair of weights may hold up to 128 of positive (or negative) weight:
    255 * 128 fits int16, 255 * 129 does not."""
    ok = [[64, 64], [65, 63], [-64, -64], [127, -128], [-128, 127, 0, 0], [127]]
    bad = [[65, 64], [-65, -64], [127, 127], [0, 0, -128, -1]]
    assert all(u8s8_pairs_exact(np.array([r], np.int8)) for r in ok)
    assert not any(u8s8_pairs_exact(np.array([r], np.int8)) for r in bad)


@needs_avx2
def test_dispatch_avoids_pmaddubsw_saturation():
    """Full-range weights on which vpmaddubsw saturates: the u8s8 kernel forced on them is wrong
    (the comparison can fail), the dispatch picks the exact sign-trick kernel, and it is exact."""
    x = np.full((4, 8), 127, np.int8)  # x + 128 = 255
    w = np.array([[127] * 8, [-128] * 8, [127, 100, -128, 5, 0, 1, 2, 3]], np.int8)
    ref = dk.reference_linear(x, 0, w)
    assert not u8s8_pairs_exact(w)
    assert dot.choose_linear(tvm.target.Target(ZNVER3), w).name == "avx2_sign"
    forced, consts = dk.linear_kernel("avx2_u8s8", x.shape, w, 0)
    assert not np.array_equal(_run_host(forced, [x, *consts], ref.shape), ref)
    kern = dot.choose_linear(tvm.target.Target(HOST), w).name
    func, consts = dk.linear_kernel(kern, x.shape, w, 0)
    np.testing.assert_array_equal(_run_host(func, [x, *consts], ref.shape), ref)


@needs_avx2
@pytest.mark.parametrize("batch,m,k,n,za,zb", [((), 16, 64, 40, 3, -5), ((2, 3), 5, 33, 21, 127, -128)])
def test_matmul_kernel_bit_exact(batch, m, k, n, za, zb):
    """Activation x activation kernel (both operands with zero points, b packed at run time)
    equals the reference, extremes and ragged shapes included."""
    rng = np.random.default_rng(m * k + n)
    a = rng.integers(-128, 128, (*batch, m, k)).astype(np.int8)
    b = rng.integers(-128, 128, (*batch, k, n)).astype(np.int8)
    a.reshape(-1)[:3], b.reshape(-1)[:3] = [-128, 127, -128], [127, -128, -128]
    ref = dk.reference_matmul(a, za, b, zb)
    func = dk.matmul_kernel(dot.choose_matmul(tvm.target.Target(HOST), k).name, a.shape, b.shape, za, zb)
    np.testing.assert_array_equal(_run_host(func, [a, b], ref.shape), ref)


def test_dispatch_by_target_features():
    """The kernel follows the target's mcpu/mattr: VNNI where avx512vnni, u8s8 only for weights
    that cannot saturate, SDOT with dotprod, the plain kernel elsewhere."""
    small, full = np.full((8, 16), 64, np.int8), np.full((8, 16), 127, np.int8)

    def linear(t, w):
        k = dot.choose_linear(tvm.target.Target(t), w)
        return k and k.name

    assert (linear(ZNVER3, small), linear(ZNVER3, full)) == ("avx2_u8s8", "avx2_sign")
    assert linear(CASCADELAKE, full) == linear({"kind": "llvm", "mcpu": "sapphirerapids"}, small) == "vnni"
    assert linear(ARM, full) == "sdot"
    assert linear({**ARM, "mcpu": "cortex-a53", "mattr": ["+neon"]}, full) is None  # no dotprod
    assert linear({"kind": "llvm", "mcpu": "x86-64"}, full) is None and linear({"kind": "c"}, full) is None
    matmul = [dot.choose_matmul(tvm.target.Target(t), 64) for t in (ZNVER3, CASCADELAKE, ARM)]
    assert [k and k.name for k in matmul] == ["avx2_s16", "avx2_s16", None]


@pytest.mark.parametrize("kernel,target,instruction,absent", [
    ("vnni", CASCADELAKE, "vpdpbusd", "vpmaddubsw"),
    ("sdot", ARM, "sdot", "smull"),
    ("avx2_u8s8", ZNVER3, "vpmaddubsw", "vpdpbusd"),
    ("avx2_s16s8", ZNVER3, "vpmaddwd", "vpmaddubsw"),
])
def test_kernel_assembly(kernel, target, instruction, absent):
    """Compile-only: the kernel's assembly uses its dot-product instruction (VNNI and SDOT do not
    run on this machine; the SDOT kernel runs under qemu below)."""
    w = np.random.default_rng(0).integers(-64, 65, (48, 64)).astype(np.int8)
    func, _ = dk.linear_kernel(kernel, (16, 64), w, 5)
    asm = dk.build(func, target).inspect_source("s")
    assert instruction in asm and absent not in asm


@pytest.mark.skipif(not llvm_cpu_has_features("avx512vnni", tvm.target.Target(HOST)),
                    reason="the host CPU has no avx512_vnni: the VNNI kernel is only compiled (test_kernel_assembly)")
def test_vnni_kernel_bit_exact_where_supported():
    """VNNI kernel on a CPU with avx512_vnni: equals the reference, full-range weights included."""
    rng = np.random.default_rng(1)
    x, w, b = _operands(rng, (13, 70), 40, 127)
    func, consts = dk.linear_kernel("vnni", x.shape, w, -3, b)
    ref = dk.reference_linear(x, -3, w, b)
    np.testing.assert_array_equal(_run_host(func, [x, *consts], ref.shape), ref)


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (make toolchains)")
def test_sdot_kernel_bit_exact_under_qemu():
    """SDOT kernel for the arm target, run by the arm runner under qemu-aarch64 -cpu cortex-a76:
    equals the reference, and executes exactly one sdot per 16 multiply-adds of its padded tile."""
    rng = np.random.default_rng(2)
    x, w, b = _operands(rng, (8, 64), 32, 127)
    func, consts = dk.linear_kernel("sdot", x.shape, w, 9, b)
    got, counts = dk.arm_run(func, [x], consts, (8, 32), "int32", count=True)
    np.testing.assert_array_equal(got, dk.reference_linear(x, 9, w, b))
    assert counts.class_total("sdot") == 8 * 32 * 64 // 16  # tiles 4x4 (16 columns): no padding here
    w4 = rng.integers(-8, 8, w.shape).astype(np.int8)  # 4-bit weights: packed, unpacked by the kernel
    func, consts = dk.linear_kernel("sdot", x.shape, w4, 9, b, bits=4)
    got, counts4 = dk.arm_run(func, [x], consts, (8, 32), "int32", count=True)
    np.testing.assert_array_equal(got, dk.reference_linear(x, 9, w4, b))
    assert consts[0].nbytes == w.size // 2 and counts4.class_total("sdot") == counts.class_total("sdot")


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.o(torch.relu(self.q(x) @ self.k(x).transpose(-1, -2)))


@needs_avx2
def test_compile_uses_the_kernels_with_the_requantizer_fused():
    """qc.compile(w8a8) on the host: every linear_int / matmul_int becomes a tensorized kernel
    scheduled with its epilogue (the requantizer or dequantize) fused, and the output equals
    the IR's exactly."""
    torch.manual_seed(0)
    model, x = _Attention().eval(), torch.randn(2, 8, 32)
    art = qc.compile(model, (x,), calib=[torch.randn(4, 8, 32)])
    tgt = tvm.target.Target(HOST)
    with tgt:
        kernels = scheduled_dots(fused_kernels(to_relax(art.ir, (x,)), tgt))
    ops = [n.target.__name__ for n in art.ir.graph.nodes if n.op == "call_function"]
    assert len(kernels) == ops.count("linear_int.default") + ops.count("matmul_int.default") == 4
    assert all(how.endswith("fused") for how in kernels.values()), kernels
    assert sum("right_shift" in name for name in kernels) == 3  # requantized (the last one dequantizes)
    xs = torch.randn(2, 8, 32)
    assert torch.equal(art(xs), art.ir(xs))


@needs_avx2
@pytest.mark.parametrize("quant", ["w4a8g0", "w2a8g0"])
def test_compile_sub_byte_per_channel_linears_use_the_dot_kernel(quant):
    """qc.compile with 4- or 2-bit per-channel weights: every linear_int is the tensorized u8 x s8
    kernel with its sub-byte weights unpacked in the kernel, and the output equals the IR's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)).eval()
    x = torch.randn(5, 64)
    art = qc.compile(model, (x,), quant=quant, calib=[torch.randn(8, 64)])
    with tvm.target.Target(HOST) as tgt:
        mod = fused_kernels(to_relax(art.ir, (x,)), tgt)
    kernels = scheduled_dots(mod)
    assert len(kernels) == 2 and all(how.startswith("avx2_u8s8") and how.endswith("fused") for how in kernels.values())
    assert all("qc_dot_unpack" in mod[name].script() for name in kernels)
    xs = torch.randn(5, 64)
    assert torch.equal(art(xs), art.ir(xs))


@needs_avx2
@pytest.mark.parametrize("quant,k", [("w4a8", 200), ("w2a8g32", 64), ("w8a8g64", 128)])
def test_compile_grouped_linears_use_the_dot_kernel(quant, k):
    """Group-wise weights (4-, 2- or 8-bit; K = 200 leaves a ragged last group of 72): the exact
    int32 sum of each group on the tensorized kernel, the groups its batch dimension, combined
    in float32 in group order as the IR's op adds them, so the output equals the IR's bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(k, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10)).eval()
    x = torch.randn(2, 5, k)
    art = qc.compile(model, (x,), quant=quant, calib=[torch.randn(4, 5, k)])
    ops = [n.target.__name__ for n in art.ir.graph.nodes if n.op == "call_function"]
    assert ops.count("linear_int_grouped.default") >= 1
    with tvm.target.Target(HOST) as tgt:
        kernels = scheduled_dots(fused_kernels(to_relax(art.ir, (x,)), tgt))
    assert len(kernels) == 2 and all(how.endswith("fused") for how in kernels.values()), kernels
    xs = torch.randn(2, 5, k)
    assert torch.equal(art(xs), art.ir(xs))


class _Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(16, 24, 1)
        self.c = torch.nn.Conv2d(24, 8, 3, padding=2, dilation=2)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise: stays on the plain conv kernel

    def forward(self, x):
        return self.dw(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


@needs_avx2
@pytest.mark.parametrize("pipeline", [
    "fake-quant(w=8,a=8),calibrate,convert",
    "fake-quant(w=4,a=8,a_symmetric=false),calibrate,convert",  # zero points: the padding holds them
    "fake-quant(w=2,a=8),calibrate,convert",
])
def test_compile_convs_use_the_dot_kernel_over_im2col_rows(pipeline):
    """conv2d_int with groups = 1 (strided, padded, dilated, 1x1) runs as the dot kernel over
    im2col rows, at 8, 4 and 2 bits; a depthwise conv keeps the plain kernel; the output equals
    the IR's exactly."""
    torch.manual_seed(0)
    model, x = _Convs().eval(), torch.randn(2, 3, 15, 13)
    art = qc.compile(model, (x,), pipeline=pipeline, calib=[torch.randn(4, 3, 15, 13)])
    with tvm.target.Target(HOST) as tgt:
        kernels = scheduled_dots(fused_kernels(to_relax(art.ir, (x,)), tgt))
    assert len(kernels) == 3 and all(how.endswith("fused") for how in kernels.values()), kernels
    xs = torch.randn(2, 3, 15, 13)
    assert torch.equal(art(xs), art.ir(xs))


@needs_avx2
@pytest.mark.parametrize("hw,stride,padding", [(14, 1, 1), (16, 2, 1), (12, 1, 0)])
def test_depthwise_conv_between_nchw_tensors_is_scheduled_in_three_passes_and_exact(hw, stride, padding):
    """A depthwise conv fused with its quantize and requantize, between NCHW float tensors, is
    scheduled as three vectorized passes (`window_schedule`): the quantize computed once per
    input element inside the NHWC zero-point padding (not once per window tap), the conv along
    the channels, then the requantize into the NCHW output (rows of 14 vectorize with the
    columns fused). The output equals the IR's exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(24, 24, 3, stride=stride, padding=padding, groups=24),
                                torch.nn.ReLU6()).eval()
    x = torch.randn(1, 24, hw, hw)
    art = qc.compile(model, (x,), calib=[torch.randn(2, 24, hw, hw)])
    with tvm.target.Target(HOST) as tgt:
        mod = fused_kernels(to_relax(art.ir, (x,)), tgt)
    (done,) = [f for gv, f in mod.functions.items() if "depthwise_int" in gv.name_hint]  # as the build schedules it
    sch = s_tir.Schedule(done)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    assert len(names) == 3 and names[1] == "depthwise_int" and (names[0] == "pad_zp") == bool(padding)
    assert done.attrs["tirx.is_scheduled"]
    first, rest = done.script().split('T.sblock("depthwise_int")')
    assert "nearbyint" in first and "nearbyint" not in rest  # the rounding: once per input element
    assert done.script().count("T.vectorized") == 3  # each pass's innermost loop
    xs = torch.randn(1, 24, hw, hw)
    assert torch.equal(art(xs), art.ir(xs))


@needs_avx2
def test_depthwise_between_dot_convs_runs_channels_last_in_one_kernel():
    """In a MobileNet/EfficientNet block (1x1 conv, depthwise, 1x1 conv) the depthwise conv is one
    kernel from the expand conv's NHWC rows [H*W, C] to the project conv's [OH*OW, C]: its padded
    stage is [1, H+2, W+2, C] and both passes are vectorized along the channels (no transposes:
    in NCHW, EfficientNet-Lite0's depthwise kernels took 3.5x longer). Output equals the IR's."""
    from tvm.s_tir import meta_schedule as ms

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32), torch.nn.ReLU6(),
                                torch.nn.Conv2d(32, 16, 1)).eval()
    x = torch.randn(1, 8, 14, 14)
    art = qc.compile(model, (x,), calib=[torch.randn(2, 8, 14, 14)])
    with tvm.target.Target(HOST) as tgt:
        mod = fused_kernels(to_relax(art.ir, (x,)), tgt)
    (func,) = [f for gv, f in mod.functions.items() if "depthwise_int" in gv.name_hint]
    args = ms.arg_info.ArgInfo.from_prim_func(func)
    assert [int(d) for d in args[0].shape] == [14 * 14, 32] and [int(d) for d in args[-1].shape] == [7 * 7, 32]
    sch = s_tir.Schedule(func)
    (pad,) = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint == "pad_zp"]
    assert [int(d) for d in sch.get(pad).writes[0].source.shape] == [1, 16, 16, 32]
    assert func.script().count("T.vectorized") == 2
    xs = torch.randn(1, 8, 14, 14)
    assert torch.equal(art(xs), art.ir(xs))


@needs_avx2
def test_ops_between_convs_are_one_kernel_of_vectorized_stages_and_exact():
    """The ops between two 3x3 convs (the first's NHWC rows, requantize, ReLU, the second's
    im2col rows) are one kernel of two vectorized stages (`injective_schedule`): the quantized
    input in NHWC [1, H, W, C], once per element, then the rows, each tap C consecutive values;
    the float output after the last conv is one block. Every kernel is scheduled; functions with
    a reduction or a single block are left alone. The output equals the IR's."""
    from tvm import te, topi

    from qcompiler.backends.injective_schedule import schedule_injective

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)).eval()
    x = torch.randn(1, 8, 12, 12)
    art = qc.compile(model, (x,), calib=[torch.randn(2, 8, 12, 12)])
    with tvm.target.Target(HOST) as tgt:
        mod = fused_kernels(to_relax(art.ir, (x,)), tgt)
    blocks = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            assert f.attrs["tirx.is_scheduled"], gv.name_hint
            sch = s_tir.Schedule(f)
            blocks[gv.name_hint] = [[int(d) for d in sch.get(b).writes[0].source.shape]
                                    for b in sch.get_child_blocks(sch.get_sblock("root"))]
    assert sorted(b for b in blocks.values() if len(b) == 2) == [[[1, 12, 12, 8], [144, 72]],
                                                                  [[1, 12, 12, 16], [36, 144]]]
    assert [[1, 32, 6, 6]] in blocks.values()
    xs = torch.randn(1, 8, 12, 12)
    assert torch.equal(art(xs), art.ir(xs))
    a = te.placeholder((4, 64), "float32", "a")
    assert schedule_injective(te.create_prim_func([a, topi.nn.softmax(a)])) is None
    assert schedule_injective(te.create_prim_func([a, topi.exp(a)])) is None
    pairs = te.compute((4, 64), lambda i, j: a[i, j] + a[i, j ^ 1], name="pairs")  # a butterfly reads two
    butterfly = te.compute((4, 64), lambda i, j: pairs[i, j] - pairs[i, j ^ 2], name="butterfly")
    sch = s_tir.Schedule(schedule_injective(te.create_prim_func([a, butterfly])))
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    assert names == ["pairs", "butterfly"]  # read twice per element: a stage, not inlined


def test_schedule_rejects_tiles_that_do_not_divide_the_padding():
    """A register tile that does not divide the tile the operands were padded to is a
    LoweringError naming the valid divisors; a function without a dot kernel is refused."""
    x = tvm.te.placeholder((8, 32), "int8", "x")
    wp = tvm.te.placeholder((2, 16, 8, 2), "int8", "wp")
    func = tvm.te.create_prim_func([x, wp, dot.linear_te(x, wp, None, 16, 0, "avx2_s16s8", 4, 2)])
    with pytest.raises(qc.LoweringError, match="3x2 register tile does not divide the 4x2 tile"):
        schedule_dot(func, mr=3)
    plain, _ = dk.linear_kernel(None, (8, 32), np.ones((16, 32), np.int8), 0)
    with pytest.raises(qc.LoweringError, match="no block annotated 'qc.dot'"):
        schedule_dot(plain)
