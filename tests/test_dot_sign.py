"""The sign-trick int8 kernel (`avx2_sign`: vpxor + vpmaddubsw): bit-exact against the integer reference on the host at the int16 limits of the
pair sums, the dispatch that gives full-range 8-bit weights `avx2_sign`, its assembly, and
qc.compile using it."""

import warnings

import numpy as np
import pytest
import torch
import tvm
from tvm.target.codegen import llvm_cpu_has_features

import qcompiler as qc
from qcompiler.backends import dot, dot_kernels as dk
from qcompiler.backends.dot_schedule import fused_kernels, scheduled_dots
from qcompiler.backends.lowering import to_relax
from qcompiler.backends.targets import get_target, tvm_target

HOST = tvm_target(get_target("host"))
ZNVER3 = {"kind": "llvm", "mcpu": "znver3"}
needs_avx2 = pytest.mark.skipif(not llvm_cpu_has_features("avx2", tvm.target.Target(HOST)),
                                reason="the host CPU has no AVX2")


def _run(kernel, x, w, zx, b=None, requantize=False):
    func, consts = dk.linear_kernel(kernel, x.shape, w, zx, b, requantize=requantize)
    assert str(func.attrs["qc.dot_schedule"]).startswith(kernel) and str(func.attrs["qc.dot_schedule"]).endswith("fused")
    lib = dk.build(func, HOST)
    ref = dk.reference_linear(x, zx, w, b)
    if requantize:
        ref = dk.reference_requantize(ref)
    out = tvm.runtime.tensor(np.zeros(ref.shape, ref.dtype))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (x, *consts)], out)
    return out.numpy(), ref


def _extremes(rng, x_shape, n, w_min):
    """Random int8 operands (weights in [w_min, -w_min], or the full range for w_min = -128) with
    the cases at the int16 limits planted: rows of x at -128 and 127 (and alternating), weight
    rows at the two ends, alternating, and a row of zeros."""
    k = x_shape[-1]
    x = rng.integers(-128, 128, x_shape).astype(np.int8)
    rows = x.reshape(-1, k)
    rows[0], rows[-1] = -128, 127
    if len(rows) > 2:
        rows[1] = np.where(np.arange(k) % 2, -128, 127)
    w_max = -w_min if w_min > -128 else 127
    w = rng.integers(w_min, w_max + 1, (n, k)).astype(np.int8)
    w[0], w[1], w[2], w[3] = w_max, w_min, np.where(np.arange(k) % 2, w_min, w_max), 0
    return x, w, rng.integers(-5000, 5000, n).astype(np.int32)


@needs_avx2
@pytest.mark.parametrize("x_shape,n,zx,requantize", [
    ((16, 64), 40, 3, False),
    ((1, 70), 33, -128, False),  # one token (GEMV tile), ragged K and N
    ((16, 77), 21, 127, True),  # ragged K and N, requantized
    ((2, 13, 70), 33, -7, False),  # a batch dimension, ragged rows
])
def test_sign_kernel_bit_exact_full_range(x_shape, n, zx, requantize):
    """avx2_sign equals the int64 reference for any int8 weights, -128 included, with x at -128
    and 127 (|x| * ~w reaches -32768 in a pair: x = -128, w = 127), zero points at both ends,
    ragged shapes, 1 and 16 tokens."""
    rng = np.random.default_rng(sum(x_shape) * n)
    x, w, b = _extremes(rng, x_shape, n, -128)
    got, ref = _run("avx2_sign", x, w, zx, b, requantize)
    np.testing.assert_array_equal(got, ref)


@needs_avx2
def test_sign_kernel_pair_limits():
    """The four corners of a vpmaddubsw pair (x = -128 or 127 against w = 127 or -128 in both
    slots) and the zero weight row that only carries the row term, exactly."""
    x = np.array([[-128] * 8, [127] * 8, [-128, 127] * 4, [0] * 8], np.int8)
    w = np.array([[127] * 8, [-128] * 8, [-127] * 8, [0] * 8, [127, -128] * 4, [1, -1] * 4, [-128, 127] * 4, [5] * 8],
                 np.int8)
    got, ref = _run("avx2_sign", x, w, 0)
    np.testing.assert_array_equal(got, ref)


@needs_avx2
@pytest.mark.parametrize("kernel,k,schedule", [("avx2_sign", 2100, "1x3 k300"), ("avx2_s16s8", 3072, "4x2 k512"),
                                               ("avx2_u8s8", 2100, "4x2 k420")])
def test_k_chunked_schedule_bit_exact(kernel, k, schedule):
    """Long rows are scheduled in K chunks (accumulators kept in memory between chunks, the
    chunk a divisor of K near PANEL_BYTES of weights): still equal to the reference, requantized
    too (20 outputs: ragged last blocks)."""
    rng = np.random.default_rng(k)
    x, w, b = _extremes(rng, (8, k), 20, -64 if kernel == "avx2_u8s8" else -128)
    func, consts = dk.linear_kernel(kernel, x.shape, w, -3, b, requantize=True)
    assert str(func.attrs["qc.dot_schedule"]) == f"{kernel} {schedule} fused"
    got, ref = _run(kernel, x, w, -3, b, requantize=True)
    np.testing.assert_array_equal(got, ref)


def test_dispatch_gives_full_range_weights_the_sign_kernel():
    """On AVX2 without VNNI: weights that cannot saturate vpmaddubsw keep avx2_u8s8; any other
    int8 weights, -128 included (ONNX QDQ imports), get avx2_sign; never s16s8."""
    t = tvm.target.Target(ZNVER3)
    small, sym = np.full((8, 16), 64, np.int8), np.full((8, 16), 127, np.int8)
    with_min = sym.copy()
    with_min[3, 5] = -128
    assert [dot.choose_linear(t, w).name for w in (small, sym, with_min)] == ["avx2_u8s8", "avx2_sign", "avx2_sign"]


def test_sign_kernel_assembly():
    """Compile-only (znver3): the sign kernel uses vpxor, vpmaddubsw and vpmaddwd, no vpsignb
    (|x| and the sign mask are operands prepared once per activation) and not the int16
    widening of s16s8."""
    w = np.random.default_rng(0).integers(-127, 128, (48, 64)).astype(np.int8)
    func, _ = dk.linear_kernel("avx2_sign", (16, 64), w, 5)
    asm = dk.build(func, ZNVER3).inspect_source("s")
    assert all(i in asm for i in ("vpxor", "vpmaddubsw", "vpmaddwd"))
    assert not any(i in asm for i in ("vpsignb", "vpmovsxbw"))


@needs_avx2
@pytest.mark.parametrize("tokens", [1, 16])
def test_compile_w8a8_linear_uses_the_sign_kernel(tokens):
    """qc.compile(w8a8) of a linear layer on the host schedules avx2_sign with the epilogue fused,
    and the output equals the IR's exactly."""
    torch.manual_seed(tokens)
    layer, x = torch.nn.Linear(72, 40).eval(), torch.randn(tokens, 72)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = qc.compile(layer, (x,), calib=[torch.randn(32, 72)])
    tgt = tvm.target.Target(HOST)
    with tgt:
        kernels = scheduled_dots(fused_kernels(to_relax(art.ir, (x,)), tgt))
    if llvm_cpu_has_features("avx512vnni", tgt):
        pytest.skip("the host has avx512_vnni: the VNNI kernel is chosen")
    assert list(kernels.values()) == ["avx2_sign 1x5 fused"]  # one row by 5 blocks of 8 outputs
    for _ in range(3):
        xs = torch.randn(tokens, 72) * 3
        assert torch.equal(art(xs), art.ir(xs))
