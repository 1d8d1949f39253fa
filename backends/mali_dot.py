"""Int8 linear kernels on Arm's integer dot product (`cl_arm_integer_dot_product_int8`), with a
portable fallback, for the `mali` target.

An int8 linear layer's kernel (the `dot_int` block of `lowering._dot_te`, bias and requantizer
fused after it) computes acc[i, n] = sum_k (int32(x[i, k]) - zx) * int32(w[n, k]). For
K % 4 == 0, `schedule_dot4` gives it one work-item per output: k in steps of 4, each step one
call

    acc = qc_dot4_zp(vload4(x + i*K + k), vload4(w + n*K + k), acc, -zx)
        = acc + dot(x4, w4) + (-zx) * dot(w4, (1, 1, 1, 1))          (exact in int32)

(a tensor intrinsic per zero point, `TensorIntrin.register`), then the fused epilogue
(requantize, clamp, cast) on the accumulator in registers. `PRELUDE` defines the helper at the
top of the OpenCL source (put there by TVM's `tvm_callback_opencl_postproc` hook while
`opencl_prelude()` is active, so the library `export` embeds it too; the hook sees each
kernel's source separately, so the prelude is guarded against repetition):

    device reports cl_arm_integer_dot_product_int8  ->  dot(a, b) = arm_dot(a, b)
    otherwise (PoCL, older Mali)                     ->  four int multiplies and adds

The choice is made by the device's OpenCL compiler (the extension's macro), so one source
serves every device. PoCL has no such extension: here the portable form runs, and the
`arm_dot` form is compiled and run with `-D QC_EMULATE_ARM_DOT`, which declares the extension
macro and defines `arm_dot` as the extension specifies it (the surrounding code path is thus
checked, not the driver's builtin; `-D QC_ARM_DOT_PROBE` makes the stand-in return 0, which
shows in the outputs that this path is the one compiled). A fused prologue (the previous layer's requantizer, which
FuseOps puts in front of the dot) becomes its own elementwise kernel writing the int8 operand
to a global scratch buffer. Kernels that do not fit (K % 4 != 0, two zero points, batched
activation x activation products with two zero points) keep dlight's schedules.
"""

from __future__ import annotations

import contextlib

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from .exact_floats import hex_literals
from .intrin_x86 import TIR

EXTENSION = "cl_arm_integer_dot_product_int8"
RULE = "ArmDot4"
HELPER = "qc_dot4_zp"
THREADS = 64  # work-items per group along the output columns

PRELUDE = f"""/* qcompiler mali_dot.py: 4-lane int8 dot products, on {EXTENSION} when the device has it */
#ifndef QC_DOT4_PRELUDE
#define QC_DOT4_PRELUDE
#ifdef QC_EMULATE_ARM_DOT
#define {EXTENSION} 1
#ifdef QC_ARM_DOT_PROBE
int arm_dot(char4 a, char4 b) {{ return 0; }} /* tests: shows that this path is the one compiled */
#else
int arm_dot(char4 a, char4 b) {{ return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }}
#endif
#endif
#if defined({EXTENSION}) && !defined(QC_PORTABLE_DOT)
#ifndef QC_EMULATE_ARM_DOT
#pragma OPENCL EXTENSION {EXTENSION} : enable
#endif
#define QC_DOT4(a, b) arm_dot((a), (b))
#else
#define QC_DOT4(a, b) ((int)(a).x * (int)(b).x + (int)(a).y * (int)(b).y + (int)(a).z * (int)(b).z \\
                       + (int)(a).w * (int)(b).w)
#endif
int {HELPER}(char4 a, char4 b, int acc, int c) {{ return acc + QC_DOT4(a, b) + c * QC_DOT4(b, (char4)(1)); }}
#endif
"""

_INTRINSICS: dict[int, str] = {}


def intrinsic(c: int) -> str:
    """The tensor intrinsic C[0] += (int32(A[k]) + c) * int32(B[k]) over k < 4 (c = -zero point)."""
    if c in _INTRINSICS:
        return _INTRINSICS[c]

    has_zero_point = c != 0  # a Python bool: the parser keeps one branch, the form the block has

    @TIR.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, acc: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4,), "int8", offset_factor=1)
        C = T.match_buffer(acc, (1,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:1], A[0:4], B[0:4])
            T.writes(C[0:1])
            for k in range(4):
                with T.sblock("update"):
                    vk = T.axis.remap("R", [k])
                    if has_zero_point:
                        C[0] = C[0] + (T.Cast("int32", A[vk]) + c) * T.Cast("int32", B[vk])
                    else:
                        C[0] = C[0] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vk])

    @TIR.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, acc: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4,), "int8", offset_factor=1)
        C = T.match_buffer(acc, (1,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:1], A[0:4], B[0:4])
            T.writes(C[0:1])
            C[0] = T.call_pure_extern("int32", HELPER, A.vload([0], "int8x4"), B.vload([0], "int8x4"), C[0], c)

    name = f"qc_mali_dot4_{'m' if c < 0 else ''}{abs(c)}"
    s_tir.TensorIntrin.register(name, desc, impl, override=True)
    _INTRINSICS[c] = name
    return name


def _zero_point_term(block) -> int | None:
    """c in (int32(x) + c) * int32(w) of the dot block's update, 0 without a zero point, None
    if the update has another form."""
    value = block.body.value if isinstance(block.body, tirx.BufferStore) else None
    if value is None or not isinstance(value, tirx.Add) or not isinstance(value.b, tirx.Mul):
        return None
    lhs = value.b.a
    if not isinstance(value.b.b, tirx.Cast):
        return None  # a zero point on the second operand too (activation x activation)
    if isinstance(lhs, tirx.Cast):
        return 0
    if isinstance(lhs, (tirx.Add, tirx.Sub)) and isinstance(lhs.b, tirx.IntImm):
        return int(lhs.b.value) if isinstance(lhs, tirx.Add) else -int(lhs.b.value)
    return None


def schedule_dot4(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """`func` scheduled on 4-lane dot products (see the module docstring), or None if it does not fit."""
    try:
        sch = s_tir.Schedule(func)
        dot = sch.get_sblock("dot_int")
    except Exception:  # noqa: BLE001 - no such block: not an int8 linear kernel
        return None
    stmt = sch.get(dot)
    loops = sch.get_loops(dot)
    operands = [r for r in stmt.reads if str(r.source.dtype) == "int8"]
    if len(loops) < 3 or len(operands) != 2:
        return None  # not int8 x int8
    c = _zero_point_term(stmt)
    k_extent = sch.get(loops[-1]).extent
    if c is None or not isinstance(k_extent, tirx.IntImm) or int(k_extent) % 4:
        return None
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        at = [sch.get(b).name_hint for b in blocks].index("dot_int")
        prologue, epilogue = blocks[:at], blocks[at + 1:]
        for b in prologue[:-1]:  # e.g. the previous layer's requantizer: one elementwise kernel
            sch.compute_inline(b)
        if prologue:
            _elementwise_kernel(sch, prologue[-1], target)
        for b in epilogue[:-1]:  # bias, requantize, clamp, cast: computed from the accumulator
            sch.compute_inline(b)
        *rows, n, k = loops
        i = sch.fuse(*rows) if len(rows) > 1 else rows[0]  # batch and token dimensions: one axis
        threads = min(THREADS, int(target.attrs["max_num_threads"]), int(sch.get(n).extent))
        bx, tx = sch.split(n, [None, threads])
        sch.bind(i, "blockIdx.y")
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        ko, ki = sch.split(k, [None, 4])
        if epilogue:
            sch.reverse_compute_at(epilogue[-1], tx)
            sch.set_scope(dot, 0, "local")
        else:
            sch.reverse_compute_at(sch.cache_write(dot, 0, "local"), tx)
        sch.decompose_reduction(dot, ko)
        sch.tensorize(ki, intrinsic(c))
    except Exception:  # noqa: BLE001 - a structure this schedule does not expect: dlight takes it
        return None
    return sch.mod["main"]


def _elementwise_kernel(sch, block, target) -> None:
    """A prologue block as its own kernel: all its loops fused, one work-item per element."""
    fused = sch.fuse(*sch.get_loops(block))
    bx, tx = sch.split(fused, [None, min(THREADS, int(target.attrs["max_num_threads"]))])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


NO_CONTRACTION = "#pragma OPENCL FP_CONTRACT OFF\n"  # a * b + c rounds twice, as in the reference ops


def _postproc(code, _target):
    code = hex_literals(code)  # float constants as exact hexadecimal literals (`exact_floats`)
    return NO_CONTRACTION + (PRELUDE + code if f"{HELPER}(" in code else code)


@contextlib.contextmanager
def opencl_prelude():
    """While active, TVM's OpenCL codegen puts `PRELUDE` in front of sources that call the helper,
    turns off floating-point contraction (OpenCL C allows fusing a * b + c into one rounding by
    default), and writes float constants as exact hexadecimal literals (`exact_floats.hex_literals`)."""
    import tvm_ffi

    name = "tvm_callback_opencl_postproc"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, _postproc, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
        else:
            tvm_ffi.register_global_func(name, lambda code, _t: code, override=True)
