"""Float arithmetic in generated code that rounds as the reference does: exact float constants
in the C and OpenCL C that TVM generates (cortex-m*, mali targets), and no fused multiply-add
in the LLVM CPU kernels (host, arm; `FenceProducts`, at the end of this docstring).

TVM 0.27's source code generators (CodeGenC, and CodeGenOpenCL through it) print a float
constant with `std::scientific` at its default precision, 7 significant digits: the float32
6/255 = 0x1.818182p-6 comes out as `2.352941e-02f`, which the C compiler reads as the float
1 ulp below it (a float32 needs 9 digits to survive the round trip, a float64 17; float64
constants get the same 7). One ulp in a scale flips roundings downstream, so kernels from
the `c` and `opencl` targets drifted from the reference where LLVM's, which hold the constant
as an IR constant, are exact. The fix has two steps around TVM's code generator:

1. `exact_float_constants` (a TIR pass, the last one before code generation, in both the host
   and the device finalization of the pipeline `PIPELINE`): in every function for a `c` or
   `opencl` target each float32/float64 `FloatImm` whose 7-digit decimal is not exactly its
   value becomes a call of a marker with no arguments, `qc_exact_f32_<bits>()`, bits = the
   IEEE-754 pattern in hex. For float32 that is the double TVM holds rounded to nearest even,
   as LLVM's code generator rounds it. (0, 1, 0.5, 255, ... print exactly and stay decimal.)
2. `hex_literals(source)`: each marker call becomes the C99 / OpenCL C hexadecimal literal of
   those bits (`0x1.818182p-6f`, `(-0x1.fffffep+127f)`), which the compiler reads exactly;
   the C generator's forward declarations of the markers are dropped. The literal is a
   compile-time constant, as the decimal was, so the kernels' speed is unchanged.

Use: `tvm.tirx.build(mod, target, pipeline=PIPELINE)` or `tvm.compile(..., tir_pipeline=
PIPELINE)`, then `hex_literals` on the C source (cortex_m.py) or on the OpenCL source in
TVM's `tvm_callback_opencl_postproc` hook (mali_dot.opencl_prelude: the runner's kernels and
the library that `mali_deploy` exports both pass through it). Nothing fails silently: a
malformed marker is a `LoweringError`, and source built with `PIPELINE` but not passed through
`hex_literals` calls undefined functions, which the compiler rejects. Half-precision constants
are not rewritten (7 digits round-trip a float16).

No contraction (LLVM targets): TVM's LLVM code generator allows fusing a * b + c into one
fused multiply-add (one rounding instead of two), and does wherever the product feeds the sum
in one expression. The reference (torch ops, one rounding per op) rounds twice, so after the
schedules inline a dequantize (x - z) * s into a residual add, a value on a rounding boundary
of the next quantize could land one step away (EfficientNet-Lite0: 1 input in 17 had its
logits off by one output step). `FenceProducts` (a Relax-level module pass over the PrimFuncs,
before lowering) wraps each float product that an add or subtract reads in
`llvm.arithmetic.fence`, which LLVM does not fuse across and which costs no instruction. The
float sums of reductions (matmul and layer_norm accumulations, `acc = acc + a * b`: their
order differs from torch's anyway, checked to a tolerance) keep their fused multiply-adds.
The C and OpenCL targets get the same by compiler flags (`mcu_project`, `mali_dot`).
"""

from __future__ import annotations

import re
import struct
from fractions import Fraction

import tvm
import tvm_ffi
from tvm import tirx

from qcompiler.errors import LoweringError

PIPELINE = "qc_exact_floats"  # TVM's default TIR pipeline + exact_float_constants (registered below)
SOURCE_KINDS = ("c", "opencl")  # targets whose code generator prints float constants as decimals
MARKER = "qc_exact_f"
_BITS = {"float32": (32, "<f", "<I", "f"), "float64": (64, "<d", "<Q", "")}  # width, pack formats, C suffix
_CALL = re.compile(r"\bqc_exact_f(32|64)_([0-9a-f]+)\(\)")
_DECL = re.compile(  # CodeGenC's forward declaration of an extern function
    r'^(?:#ifdef __cplusplus\nextern "C"\n#endif\n)?TVM_DLL (?:float|double) qc_exact_f(?:32|64)_[0-9a-f]+\(\);\n',
    re.MULTILINE)


def constant_bits(value: float, dtype: str) -> int:
    """The IEEE-754 bit pattern of the constant `value` of `dtype` (float32: the double rounded to
    nearest even, as LLVM rounds it)."""
    _, fmt, ufmt, _ = _BITS[dtype]
    try:
        return struct.unpack(ufmt, struct.pack(fmt, value))[0]
    except OverflowError:
        raise LoweringError(f"the constant {value!r} is outside the {dtype} range") from None


def printed_exactly(value: float, dtype: str) -> bool:
    """Whether TVM's decimal of the constant (`%.6e` of the double it holds: 7 significant
    digits) is exactly the value of the constant."""
    _, fmt, ufmt, _ = _BITS[dtype]
    meant = struct.unpack(fmt, struct.pack(ufmt, constant_bits(value, dtype)))[0]
    return Fraction(format(value, ".6e")) == Fraction(meant)


def literal(bits: int, dtype: str) -> str:
    """The C99 / OpenCL C hexadecimal literal of a bit pattern; negative ones in parentheses."""
    _, fmt, ufmt, suffix = _BITS[dtype]
    value = struct.unpack(fmt, struct.pack(ufmt, bits))[0]
    if value != value or value in (float("inf"), float("-inf")):
        raise LoweringError(f"the {dtype} constant with bits {bits:#x} is not finite; it has no hexadecimal literal")
    mantissa, _, exponent = value.hex().partition("p")
    text = f"{mantissa.rstrip('0').rstrip('.')}p{exponent}{suffix}"
    return f"({text})" if text.startswith("-") else text  # so a `-` before it never makes `--`


def _exact(imm):
    dtype = str(imm.ty.dtype)
    value = imm.value
    if dtype not in _BITS or value != value or abs(value) == float("inf") or printed_exactly(value, dtype):
        return imm  # not float32/64, TVM's own inf/nan spelling, or a decimal that is already exact
    return tirx.call_pure_extern(dtype, f"{MARKER}{_BITS[dtype][0]}_{constant_bits(value, dtype):x}")


@tvm.transform.module_pass(opt_level=0, name="qc.ExactFloatConstants")
def exact_float_constants(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Float constants of c/opencl functions as exact markers (see the module docstring)."""
    updates = {}
    for gv, func in mod.functions_items():
        target = func.attrs.get("target") if isinstance(func, tirx.PrimFunc) and func.attrs is not None else None
        if target is not None and target.kind.name in SOURCE_KINDS:
            new = tvm_ffi.structural_map(func, (tirx.FloatImm, _exact))
            if not new.same_as(func):
                updates[gv] = new
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def hex_literals(source: str) -> str:
    """The source with every marker call as its exact hexadecimal literal and the markers'
    forward declarations removed."""
    source = _DECL.sub("", source)
    source = _CALL.sub(lambda m: literal(int(m.group(2), 16), f"float{m.group(1)}"), source)
    if MARKER in source:
        at = source.index(MARKER)
        raise LoweringError(f"a float constant marker was left in the generated source: "
                            f"{source[max(0, at - 80):at + 80]!r}")
    return source


def _pipeline():
    """TVM's default TIR pipeline, with `exact_float_constants` after both finalization stages."""
    lower, host, device = tvm.tirx.get_tir_pipeline("default")

    def then_exact(stage):
        return lambda: tvm.transform.Sequential([stage(), exact_float_constants])

    return lower, then_exact(host), then_exact(device)


tvm.tirx.compilation_pipeline.register_tir_pipeline(PIPELINE, _pipeline)


FENCE = "llvm.arithmetic.fence"


def _is_float(expr) -> bool:
    return str(expr.ty.dtype).startswith("float")


def _fenced_operands(expr):
    """An add or subtract with its float product operands fenced (LLVM fuses neither)."""
    if not _is_float(expr):
        return expr
    a, b = (tirx.call_llvm_pure_intrin(str(o.ty.dtype), FENCE, o) if isinstance(o, tirx.Mul) else o
            for o in (expr.a, expr.b))
    return expr if a.same_as(expr.a) and b.same_as(expr.b) else type(expr)(a, b)


def _accumulates(store) -> bool:
    """The store is a reduction update, buf[i] = buf[i] + ... (either operand)."""
    value = store.value
    return isinstance(value, tirx.Add) and any(
        isinstance(o, tvm.ir.expr.TensorLoad) and o.source.same_as(store.buffer) for o in (value.a, value.b))


def _store(store):
    if not _is_float(store.value) or _accumulates(store):
        return store
    value = tvm_ffi.structural_map(store.value, ((tirx.Add, tirx.Sub), _fenced_operands))
    return store if value.same_as(store.value) else tirx.BufferStore(store.buffer, value, store.indices)


@tvm.transform.module_pass(opt_level=0, name="qc.FenceProducts")
def FenceProducts(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named like TVM's)
    """Every float product read by an add or subtract, outside reduction updates, behind
    `llvm.arithmetic.fence` (see the module docstring); `dot_schedule.pipeline_parts` runs it
    for LLVM targets only."""
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            new = tvm_ffi.structural_map(func, (tirx.BufferStore, _store))
            if not new.same_as(func):
                updates[gv] = new
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def _fence_value(store):
    if not _is_float(store.value):
        return store
    fenced = tirx.call_llvm_pure_intrin(str(store.value.ty.dtype), FENCE, store.value)
    return tirx.BufferStore(store.buffer, fenced, store.indices)


def fence_stored_values(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """func with every float value a block stores behind `llvm.arithmetic.fence`: inlined into a
    consumer, the value is still computed as written. Without it TVM's simplifier rewrites the
    combined float expression as if it were exact (x + 1.5 - 1.5 becomes x, a rounding lost)."""
    return tvm_ffi.structural_map(func, (tirx.BufferStore, _fence_value))
