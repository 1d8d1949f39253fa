"""AArch64 tensor intrinsic for int8 dot products: SDOT (Armv8.2 dotprod).

`QC_SDOT`, 4 x 4: C[i] += sum_{k<4} int32(A[k]) * int32(B[i, k]) for 4 lanes, A int8 (one
activation row, broadcast to the 4 lanes) and B int8 [4, 4] (4 weight rows, k innermost): one
`sdot v.4s, v.16b, v.16b`, exact (four s8 x s8 products summed into each int32 lane, no
saturation). Same computation as TVM's ARM_DOT_4x4_i8_SDOT, registered here with the shared
description of `intrin_x86.dot_desc` (importing `tvm.s_tir.tensor_intrin` would parse every
GPU intrinsic TVM ships, minutes with torch loaded). LLVM 22 declares
`<4 x i32> @llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32>, <16 x i8>, <16 x i8>)`.
"""

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .intrin_x86 import TIR, dot_desc

QC_SDOT = "qc_aarch64_sdot_4x4"


@TIR.prim_func(s_tir=True)
def _sdot_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        a_i8 = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4),
                             dtype="int8x16")
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], "int32x4"), a_i8, B.vload([0, 0], "int8x16"), dtype="int32x4")


TensorIntrin.register(QC_SDOT, dot_desc(4, 4, "int8", "int8"), _sdot_impl, override=True)
