"""x86 tensor intrinsics for int8 dot products, registered with `TensorIntrin.register`.

Every intrinsic has the same description: C[i] += A[k] * B[i, k] in int32 for a tile of
`lanes` outputs by `k` reduction steps, with A one activation row (broadcast over the
lanes) and B `lanes` weight rows stored k-innermost. The implementations:

- `QC_AVX2_U8S8`, 8 x 4 (A uint8, B int8): `vpmaddubsw` multiplies u8 x s8 and adds
  adjacent products into int16 *with signed saturation*, then `vpmaddwd` with ones adds the
  int16 pairs into int32. Exact only while every pair sum a0*b0 + a1*b1 fits in int16:
  with a in [0, 255] that holds iff, for each pair, the positive weights sum to <= 128 and
  the negative ones to >= -128 (`u8s8_pairs_exact`), e.g. whenever |b| <= 64.
- `QC_AVX2_S16S8`, 8 x 2 (A int16, B int8): B sign-extended to int16 (`vpmovsxbw`), then
  `vpmaddwd` multiplies int16 x int16 and adds pairs into int32, exact for |a| <= 255 and any
  int8 b: the kernel for full-range 8-bit weights (activations x - zx in int16).
- `QC_AVX2_S16`, 8 x 2 (A int16, B int16): the same with B already int16, for activation x
  activation products with both zero points removed (operands up to 9 bits).
- `QC_AVX2_SIGN`, 8 x 4 (U uint8, M int8, B int8), the sign trick: C[i] += U[k] * (B[i, k] ^ M[k])
  with U = |x| (<= 128, one byte) and M = -1 where x < 0, else 0, prepared once per activation
  (`dot.linear_te`). For x < 0 the weight's one's complement ~b = -b - 1 gives
  |x| * ~b = x * b + x, so the sum is x . b + sum_{x < 0} x, a term of the row alone that the
  kernel subtracts. `vpxor` then `vpmaddubsw` (u8 x s8 pairs in int16) then `vpmaddwd` with ones
  and `vpaddd`: every product lies in [-16384, 16256], every pair in [-32768, 32512], so nothing
  saturates, for any int8 x and b (-128 included). 4 ops per 32 products (vpxor takes the weight
  from memory), and U, M cost two broadcast loads per row and k-step, shared by the tile's blocks.
  (A sign-trick variant on `vpsignb`, |x| times vpsignb(w, x), was measured and dropped: exact
  only without -128 weights, and 1.2x the time of the vpxor form on Zen 3, where vpsignb issues
  at 2 per cycle in contention with the multiplies.)
- `QC_VNNI`, 16 x 4 (A uint8, B int8): AVX-512 VNNI `vpdpbusd`, four u8 x s8 products
  summed into each int32 lane without saturation. TVM 0.27's own VNNI_DOT_16x4_INTRIN
  passes int32 x 16 operands, the signature of LLVM before 21; LLVM 21+ (the wheel has 22)
  declares `<16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)`,
  so this one passes 64 x i8.
"""

from __future__ import annotations

import numpy as np
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.script.parser._core import parse, utils

QC_AVX2_U8S8 = "qc_avx2_u8s8_8x4"
QC_AVX2_S16S8 = "qc_avx2_s16s8_8x2"
QC_AVX2_S16 = "qc_avx2_s16_8x2"
QC_AVX2_SIGN = "qc_avx2_sign_8x4"
QC_VNNI = "qc_avx512_vnni_16x4"


class TIR:
    """`@TIR.prim_func(s_tir=True)` parses like `@T.prim_func(s_tir=True)` without that
    decorator's `inspect.stack()`, which takes about a second per function once torch is
    imported (the parser reads the decorator's name and keywords from the source). Uses the
    parser's own entry (`tvm.script.parser._core.parse`)."""

    @staticmethod
    def prim_func(s_tir: bool = True):
        def parse_func(func):
            return parse(func, utils.inspect_function_capture(func), s_tir=s_tir)

        parse_func.dispatch_token = "tirx"
        return parse_func


def dot_desc(lanes: int, k: int, a_dtype: str, b_dtype: str):
    """C[i] += int32(A[k]) * int32(B[i, k]) for i < lanes, k < k: what every intrinsic computes."""

    @TIR.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (k,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, k), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, k):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


@TIR.prim_func(s_tir=True)
def _avx2_u8s8_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
    B = T.match_buffer(b, (8, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (8,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        a_u8 = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8),
                             dtype="uint8x32")
        pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                        a_u8, B.vload([0, 0], "int8x32"), dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.broadcast(T.int16(1), 16),
            dtype="int32x8")


def sign_desc(lanes: int, k: int):
    """C[i] += int32(U[k]) * int32(B[i, k] ^ M[k]): the sign-trick kernel's computation."""

    @TIR.prim_func(s_tir=True)
    def desc(u: T.handle, m: T.handle, b: T.handle, c: T.handle) -> None:
        U = T.match_buffer(u, (k,), "uint8", offset_factor=1)
        M = T.match_buffer(m, (k,), "int8", offset_factor=1)
        B = T.match_buffer(b, (lanes, k), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], U[0:k], B[0:lanes, 0:k], M[0:k])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, k):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.cast(U[vk], "int32") * T.cast(T.bitwise_xor(B[vi, vk], M[vk]), "int32")

    return desc


@TIR.prim_func(s_tir=True)
def _avx2_sign_impl(u: T.handle, m: T.handle, b: T.handle, c: T.handle) -> None:
    U = T.match_buffer(u, (4,), "uint8", offset_factor=1)
    M = T.match_buffer(m, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (8, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (8,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:8], U[0:4], B[0:8, 0:4], M[0:4])
        T.writes(C[0:8])
        u_u8 = T.reinterpret(T.broadcast(T.reinterpret(U.vload([0], "uint8x4"), dtype="int32"), 8),
                             dtype="uint8x32")
        m_s8 = T.reinterpret(T.broadcast(T.reinterpret(M.vload([0], "int8x4"), dtype="int32"), 8),
                             dtype="int8x32")
        pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                        u_u8, T.bitwise_xor(B.vload([0, 0], "int8x32"), m_s8), dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.broadcast(T.int16(1), 16),
            dtype="int32x8")


def _avx2_s16_impl(b_dtype: str):
    """vpmaddwd on A int16 [2] broadcast and B [8, 2] of `b_dtype` widened to int16 (a
    `vpmovsxbw` for int8; nothing for int16)."""
    b_vec = f"{b_dtype}x16"

    @TIR.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "int16", offset_factor=1)
        B = T.match_buffer(b, (8, 2), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (8,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            a_i16 = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 8),
                                  dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a_i16,
                T.Cast("int16x16", B.vload([0, 0], b_vec)), dtype="int32x8")

    return impl


@TIR.prim_func(s_tir=True)
def _vnni_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
    B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (16,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_u8 = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                             dtype="uint8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], "int32x16"), a_u8, B.vload([0, 0], "int8x64"), dtype="int32x16")


TensorIntrin.register(QC_AVX2_U8S8, dot_desc(8, 4, "uint8", "int8"), _avx2_u8s8_impl, override=True)
TensorIntrin.register(QC_AVX2_S16S8, dot_desc(8, 2, "int16", "int8"), _avx2_s16_impl("int8"), override=True)
TensorIntrin.register(QC_AVX2_S16, dot_desc(8, 2, "int16", "int16"), _avx2_s16_impl("int16"), override=True)
TensorIntrin.register(QC_AVX2_SIGN, sign_desc(8, 4), _avx2_sign_impl, override=True)
TensorIntrin.register(QC_VNNI, dot_desc(16, 4, "uint8", "int8"), _vnni_impl, override=True)


def u8s8_pairs_exact(w: np.ndarray) -> bool:
    """True iff `vpmaddubsw` cannot saturate for weights `w` [N, K] and any activations in
    [0, 255]: for every even k, 255 * (w[n,k]+ + w[n,k+1]+) <= 32767 and
    255 * (w[n,k]- + w[n,k+1]-) <= 32768 (x+ = max(x, 0), x- = max(-x, 0)). The pairs are
    those of the packed layout (`dot.pack_weight` keeps k in order, S = 4)."""
    w = np.asarray(w, dtype=np.int64)
    if w.shape[-1] % 2:
        w = np.concatenate([w, np.zeros((*w.shape[:-1], 1), np.int64)], axis=-1)
    pairs = w.reshape(*w.shape[:-1], -1, 2)
    pos, neg = np.maximum(pairs, 0).sum(-1), np.maximum(-pairs, 0).sum(-1)
    return bool((255 * pos <= 32767).all() and (255 * neg <= 32768).all())
