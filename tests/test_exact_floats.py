"""Float constants in the generated C (cortex-m*) and OpenCL C (mali) are exact: every literal
equals the constant TVM meant, and a model whose input scale is 6/255 (7 printed digits: 1 ulp
low) quantizes exactly as its IR on PoCL and on the emulated Cortex-M4."""

import re
import shutil
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
import tvm
from tvm.script import tirx as T

import qcompiler as qc
from qcompiler.backends import exact_floats
from qcompiler.errors import LoweringError


def f32(v: float) -> float:
    """v rounded to float32 (nearest even)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


CONSTANTS = [f32(6 / 255), f32(-3.4028234663852886e38), f32(0.1), f32(1e-40), f32(0.5)]  # 0.5 prints exactly
LITERAL = re.compile(r"(?<![\w.])-?(?:0x[0-9a-f]+(?:\.[0-9a-f]*)?p[-+]?\d+|\d+\.\d+e[-+]\d+)(f?)")


@T.prim_func
def serial(a: T.Buffer((64,), "float32"), b: T.Buffer((320,), "float32"), d: T.Buffer((64,), "float64")):
    for i in range(64):
        b[i] = a[i] * T.float32(6 / 255)
        b[i + 64] = T.max(a[i], T.float32(-3.4028234663852886e38))
        b[i + 128] = a[i] * T.float32(0.1)
        b[i + 192] = a[i] * T.float32(1e-40)
        b[i + 256] = a[i] * T.float32(0.5)
        d[i] = T.Cast("float64", a[i]) * T.float64(6 / 255)


@T.prim_func
def threads(a: T.Buffer((64,), "float32"), b: T.Buffer((320,), "float32"), d: T.Buffer((64,), "float64")):
    for i in T.thread_binding(64, "threadIdx.x"):
        b[i] = a[i] * T.float32(6 / 255)
        b[i + 64] = T.max(a[i], T.float32(-3.4028234663852886e38))
        b[i + 128] = a[i] * T.float32(0.1)
        b[i + 192] = a[i] * T.float32(1e-40)
        b[i + 256] = a[i] * T.float32(0.5)
        d[i] = T.Cast("float64", a[i]) * T.float64(6 / 255)


def literals(source: str) -> list[tuple[Fraction, str]]:
    """Every float literal of the source (exact value, "f" or "" suffix)."""
    out = []
    for m in LITERAL.finditer(source):
        text = m.group(0).removesuffix("f")
        value = Fraction(float.fromhex(text)) if "0x" in text else Fraction(text)
        out.append((value, m.group(1)))
    return out


def c_source(pipeline: str) -> str:
    return tvm.tirx.build(serial, target=tvm.target.Target({"kind": "c"}), pipeline=pipeline).inspect_source()


def opencl_source() -> str:
    from qcompiler.backends.mali_dot import opencl_prelude
    from qcompiler.backends.mali_kernels import compile_kernels

    target = tvm.target.Target({"kind": "opencl", "device": "mali"})
    with opencl_prelude():  # the mali build's code generation: its pipeline and source hook
        return compile_kernels(tvm.IRModule({"threads": threads}), target)[1]


def test_c_and_opencl_literals_are_the_exact_constants():
    """Every float literal of the C and OpenCL kernels is exactly a float32 constant of the
    function (f suffix) or the float64 6/255 (none); TVM's own printing is not (2.352941e-02f)."""
    want32 = {Fraction(v) for v in CONSTANTS}
    for source in (exact_floats.hex_literals(c_source(exact_floats.PIPELINE)), opencl_source()):
        found = literals(source)
        assert {v for v, f in found if f} == want32
        assert {v for v, f in found if not f} == {Fraction(6 / 255)}
        assert "0x1.818182p-6f" in source and "(-0x1.fffffep+127f)" in source and "5.000000e-01f" in source
    default = literals(c_source("default"))  # the check above would catch TVM's 7 digits
    assert Fraction(f32(6 / 255)) not in {v for v, _ in default} and Fraction("2.352941e-02") in {v for v, _ in default}


def test_literal_forms_and_bad_markers():
    """Hex literals: float32 rounded to nearest even, float64 unsuffixed, negatives parenthesized,
    subnormals exact; a marker left malformed and an out-of-range constant are LoweringErrors."""
    assert exact_floats.literal(exact_floats.constant_bits(6 / 255, "float32"), "float32") == "0x1.818182p-6f"
    assert exact_floats.literal(exact_floats.constant_bits(6 / 255, "float64"), "float64") == "0x1.8181818181818p-6"
    assert exact_floats.literal(exact_floats.constant_bits(-2.0, "float32"), "float32") == "(-0x1p+1f)"
    tiny = exact_floats.literal(exact_floats.constant_bits(1e-45, "float32"), "float32")
    assert float.fromhex(tiny[:-1]) == f32(1e-45) > 0
    assert exact_floats.printed_exactly(0.5, "float32") and not exact_floats.printed_exactly(6 / 255, "float32")
    with pytest.raises(LoweringError, match="marker was left"):
        exact_floats.hex_literals("y = x * qc_exact_f32_zz();")
    with pytest.raises(LoweringError, match="outside the float32 range"):
        exact_floats.constant_bits(1e39, "float32")


def flipping_inputs(scale: float) -> torch.Tensor:
    """Inputs whose round(x / scale) changes when the scale is read from its 7-digit decimal."""
    s = np.float32(scale)
    low = np.float32(format(scale, ".6e"))
    assert low != s  # the decimal TVM would print is not the constant
    mid = ((np.arange(255) + 0.5) * s).astype(np.float32)
    x = np.concatenate([np.nextafter(mid, np.float32(k)) for k in (-1e9, 1e9)] + [mid])
    flips = x[np.round(x / s) != np.round(x / low)]
    assert len(flips) >= 8
    return torch.from_numpy(flips[:8].reshape(1, 8).copy())


needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                               reason="gcc-arm-none-eabi / qemu-system-arm not installed")


def linear_at_6_over_255(target: str):
    """A linear layer at W8A8 whose input scale is 6/255 (calibrated on [0, 6]), compiled for `target`."""
    if target == "mali":
        pytest.importorskip("pyopencl")
        from qcompiler.backends.mali_runner import opencl_device

        try:
            opencl_device()
        except LoweringError as e:
            pytest.skip(f"no OpenCL device: {e}")
    if target not in _compiled:
        torch.manual_seed(0)
        calib = [torch.linspace(0, 6, 16).reshape(2, 8)]
        _compiled[target] = qc.compile(torch.nn.Linear(8, 4).eval(), calib[0][:1], target=target, quant="w8a8",
                                       calib=calib)
    return _compiled[target]


_compiled = {}


@pytest.mark.parametrize("target", ["mali", pytest.param("cortex-m4", marks=needs_arm)])
def test_input_scale_6_over_255_quantizes_as_the_ir(target):
    """A linear layer whose input scale is 6/255 gives exactly the IR's outputs on inputs where
    the 1-ulp-low decimal scale would round to the next level."""
    art = linear_at_6_over_255(target)
    scales = [t for n, t in art.ir.named_buffers() if n.endswith("a_scale")]
    assert [float(s) for s in scales] == [f32(6 / 255)]
    x = flipping_inputs(float(scales[0]))
    assert torch.equal(art(x), art.ir(x))


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="aarch64-linux-gnu-gcc not installed")
def test_exported_mali_library_embeds_the_exact_literal(tmp_path):
    """The board export (model.so and kernels.cl) carries the same exact literal as the runner's
    kernels, not TVM's decimal."""
    art = linear_at_6_over_255("mali")
    art.export(str(tmp_path))
    for source in (art.library.source, (tmp_path / "kernels.cl").read_text()):
        assert "0x1.818182p-6f" in source and "2.352941e-02f" not in source
    assert b"0x1.818182p-6f" in (tmp_path / "model.so").read_bytes()


@pytest.mark.parametrize("target", ["mali", pytest.param("cortex-m4", marks=needs_arm)])
def test_group_scales_are_summed_in_the_order_of_the_reference(target):
    """A W4A8 linear with 20 weight groups: the float32 combination of the per-group sums (one
    multiply and one add per group, in group order, no fused multiply-add) equals the IR's on
    every output (torch's vectorized sum over the groups differed on 69 of the 160)."""
    if target == "mali":
        linear_at_6_over_255("mali")  # skips without an OpenCL device
    torch.manual_seed(0)
    x = torch.randn(16, 640)
    art = qc.compile(torch.nn.Linear(640, 10).eval(), (x,), target=target,
                     pipeline="fake-quant(w=4,a=8,granularity=group,group=32),calibrate,convert",
                     calib=[torch.randn(16, 640) for _ in range(2)])
    assert any(str(n.target).startswith("qc.linear_int_grouped") for n in art.ir.graph.nodes)
    assert torch.equal(art(x), art.ir(x))


def test_host_kernels_round_products_before_sums_as_the_reference():
    """TVM's LLVM code generator fuses a * b + c into a multiply-add (one rounding); after
    `FenceProducts` each product is rounded before the sum, as torch's separate ops round it,
    so the kernel equals numpy's float32 a * b + c bit for bit; the product in a reduction
    update (a float dot product) keeps its multiply-add. The pass is in the host pipeline."""
    from tvm import te
    from tvm.target.codegen import llvm_cpu_has_features

    from qcompiler.backends.dot_schedule import pipeline_parts
    from qcompiler.backends.targets import get_target, tvm_target

    host = tvm.target.Target(tvm_target(get_target("host")))
    assert exact_floats.FenceProducts in pipeline_parts(host)[1]
    a, b, c = (te.placeholder((4096,), "float32", n) for n in "abc")
    k = te.reduce_axis((0, 4096), "k")
    func = te.create_prim_func([a, b, c, te.compute((4096,), lambda i: a[i] * b[i] + c[i], name="d"),
                                te.compute((1,), lambda i: te.sum(a[k] * b[k], axis=k), name="dot")])
    fenced = exact_floats.FenceProducts(tvm.IRModule({"main": func}))["main"]
    assert fenced.script().count("llvm.arithmetic.fence") == 1  # the elementwise product only
    rng = np.random.default_rng(0)
    x, y, z = (rng.standard_normal(4096).astype(np.float32) for _ in range(3))
    outs = {}
    for name, f in (("plain", func), ("fenced", fenced)):
        args = [tvm.runtime.tensor(v) for v in (x, y, z, np.zeros(4096, np.float32), np.zeros(1, np.float32))]
        tvm.tirx.build(f, target=host)(*args)
        outs[name] = args[3].numpy()
    assert np.array_equal(outs["fenced"], x * y + z)
    if llvm_cpu_has_features("fma", host):  # the plain build does fuse, so this test can fail
        assert not np.array_equal(outs["plain"], x * y + z)


def test_inlined_float_values_round_as_written():
    """`injective_schedule` inlines elementwise blocks; each float value is fenced first
    (`fence_stored_values`), so TVM's simplifier cannot fold x + 1.5 - 1.5 into x across the
    blocks: the kernel equals numpy's float32 ops, one rounding each, bit for bit."""
    from tvm import te, tirx

    from qcompiler.backends.injective_schedule import schedule_injective

    c = {v: tirx.const(v, "float32") for v in (0.3, 0.7, 1.5, 2.0)}
    x = te.placeholder((4096,), "float32", "x")
    a = te.compute((4096,), lambda i: x[i] * c[0.3], name="a")
    b = te.compute((4096,), lambda i: a[i] / c[0.7] + c[1.5], name="b")
    y = te.compute((4096,), lambda i: (b[i] - c[1.5]) * c[2.0], name="y")
    func = schedule_injective(te.create_prim_func([x, y]))
    assert func.script().count('T.sblock("') == 2  # the root and one block: a and b inlined
    xs = (np.random.default_rng(0).standard_normal(4096) * 1e-3).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(4096, np.float32))
    tvm.tirx.build(func, target=tvm.target.Target({"kind": "llvm"}))(tvm.runtime.tensor(xs), out)
    f = np.float32
    assert np.array_equal(out.numpy(), ((xs * f(0.3) / f(0.7) + f(1.5)) - f(1.5)) * f(2.0))
