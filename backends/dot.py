"""Integer dot products on the CPU's dot-product instructions: which kernel a target gets, the
weight layout it needs (prepared at compile time) and the TE compute the schedule tensorizes
(`dot_schedule`).

qc.linear_int computes acc[m, n] = sum_k (x[m, k] - zx) * w[n, k] + b[n] with int8 x and a
constant int8 weight w [N, K]. A kernel reads an activation operand a = act(x) and the weight
packed as wp[N/L, K/S, L, S] (zero padded), so that one intrinsic call adds S products into each
of L consecutive outputs. With a = x + c the sum is rewritten exactly as

    acc[m, n] = sum_k a[m, k] * w[n, k]  -  (c + zx) * sum_k w[n, k]      (+ b[n], a Relax add)
                \\_______ tensorized ______/   \\_ comp[n], at compile time _/

    kernel       target feature    a = act(x)            c      instruction(s)
    vnni         avx512vnni         x + 128 as uint8      128    vpdpbusd (u8 x s8, 4 per lane)
    avx2_u8s8    avx2, weights ok   x + 128 as uint8      128    vpmaddubsw + vpmaddwd(1)
    avx2_sign    avx2               |x| as uint8, mask    0      vpxor + vpmaddubsw + vpmaddwd(1)
    avx2_s16s8   avx2               x - zx as int16       -zx    vpmovsxbw + vpmaddwd
    sdot         dotprod (aarch64)  x as int8             0      sdot (s8 x s8, 4 per lane)

vpmaddubsw adds two u8 x s8 products in int16 with saturation: `avx2_u8s8` is chosen only when
the weight values prove it cannot saturate (`intrin_x86.u8s8_pairs_exact`). `avx2_sign` feeds
it |x| and the weight with its bits flipped where x < 0 (the sign trick,
`intrin_x86.QC_AVX2_SIGN`), exact for every int8 weight: its operands are two stages computed
once per activation, u = |x| (uint8) and m = -1 where x < 0 (int8), and since
|x| * (w ^ m) = x * w + min(x, 0), every output of a row also carries
neg[r] = sum_k min(x[r, k], 0), computed from x and subtracted with comp:

    acc[m, n] = sum_k |x| * (w[n, k] ^ m)  -  neg[m]  -  zx * sum_k w[n, k]

It is 4 ops per 32 products against avx2_u8s8's 3 and avx2_s16s8's ~5 (s16s8 stays for
reference and tests). qc.matmul_int (activation x activation, both with zero
points) uses `avx2_s16` on x86: both operands as int16 with their zero points removed, the
second one packed at run time by a stage of the same kernel. Targets without these features
keep the plain TE kernel (`lowering._dot_te`), which LLVM vectorizes.

Weights of 4 or 2 bits (`packing.PACKED_BITS`) take the same kernels: each L x S tile of the
packed int8 layout wp is stored as one block of `packing`'s sub-byte layout (offset binary),
and a stage of the kernel, `qc_dot_unpack`, expands a column of tiles at a time (into L1,
before its row tiles) with one shift, mask and subtraction per vector of weights: the
intrinsic reads int8 weights as for 8 bits (4-bit weights are in [-8, 7], which avx2_u8s8
takes exactly) while the model stores 4 or 2 bits per weight. Grouped linears and
convolutions on these kernels are in `dot_layers`.

Every kernel is a TE function whose dot block carries the annotation {"qc.dot": kernel,
"qc.mr": MR, "qc.nr": NR, "qc.batch": batch dims}: rows are padded to a multiple of MR and weight
blocks to a multiple of NR, the register tile (MR rows x NR*L outputs) the schedule uses. The
function stays output-elementwise-fusable, so TVM's FuseOps/FuseTIR bring the bias and the
requantizer into it before `dot_schedule` tiles and tensorizes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.ir.expr import Constant

from . import intrin_arm, intrin_x86, packing

ANNOTATION = "qc.dot"
MAX_K = 1 << 16  # int32 sums of |a * w| <= 255 * 128 stay exact below 2^16 terms


@dataclass(frozen=True)
class DotKernel:
    name: str
    intrin: str  # the registered TensorIntrin
    lanes: int  # L: outputs per intrinsic call
    kstep: int  # S: products per output per call
    act: str  # "u8": x + 128 as uint8, "s16": x - zero point as int16, "s8": x as is, "sign": |x| and a mask
    w_dtype: str  # dtype of the packed second operand
    features: tuple[str, ...]  # LLVM CPU features the target needs
    mr: int  # default register tile: rows
    nr: int  # default register tile: blocks of L outputs

    @property
    def act_dtype(self) -> str:
        return {"u8": "uint8", "s16": "int16", "s8": "int8", "sign": "uint8"}[self.act]

    def offset(self, zero_point: int) -> int:
        """c + zx in the compensation term: what act() adds to x - zx."""
        return {"u8": 128 + zero_point, "s16": 0, "s8": zero_point, "sign": zero_point}[self.act]


KERNELS = {k.name: k for k in (
    DotKernel("vnni", intrin_x86.QC_VNNI, 16, 4, "u8", "int8", ("avx512vnni",), 4, 2),
    DotKernel("avx2_u8s8", intrin_x86.QC_AVX2_U8S8, 8, 4, "u8", "int8", ("avx2",), 4, 2),
    DotKernel("avx2_sign", intrin_x86.QC_AVX2_SIGN, 8, 4, "sign", "int8", ("avx2",), 1, 8),
    DotKernel("avx2_s16s8", intrin_x86.QC_AVX2_S16S8, 8, 2, "s16", "int8", ("avx2",), 4, 2),
    DotKernel("avx2_s16", intrin_x86.QC_AVX2_S16, 8, 2, "s16", "int16", ("avx2",), 4, 2),
    DotKernel("sdot", intrin_arm.QC_SDOT, 4, 4, "s8", "int8", ("neon", "dotprod"), 4, 4),
)}


def _has(target, features) -> bool:
    from tvm.target.codegen import llvm_cpu_has_features

    return all(llvm_cpu_has_features(f, target) for f in features)


def _llvm(target) -> bool:
    return target is not None and target.kind.name == "llvm"


def available(target) -> bool:
    """Whether `target` (a tvm Target, or None) has one of the linear kernels' instruction sets."""
    return _llvm(target) and any(_has(target, KERNELS[name].features) for name in ("vnni", "avx2_sign", "sdot"))


def choose_linear(target, w: np.ndarray | None) -> DotKernel | None:
    """The fastest exact kernel for a linear layer with constant weight `w` [N, K] on `target`
    (a tvm Target), or None for the plain TE kernel."""
    if not _llvm(target) or w is None or w.ndim != 2 or w.shape[1] >= MAX_K:
        return None
    for name in ("vnni", "avx2_u8s8", "avx2_sign", "sdot"):
        kern = KERNELS[name]
        if not _has(target, kern.features):
            continue
        if name == "avx2_u8s8" and not intrin_x86.u8s8_pairs_exact(w):
            continue  # vpmaddubsw could saturate on these weights
        return kern
    return None


def choose_matmul(target, k: int | None) -> DotKernel | None:
    """The kernel for an activation x activation product on `target`, or None."""
    if not _llvm(target) or not isinstance(k, int) or k >= MAX_K:
        return None
    kern = KERNELS["avx2_s16"]
    return kern if _has(target, kern.features) else None


def tiles(kern: DotKernel, m, n: int) -> tuple[int, int]:
    """Register tile (MR rows, NR blocks of L outputs) for m rows (int, or symbolic) and n
    outputs: the kernel's default, shrunk to the problem; one row gets twice the blocks (unless
    the default is one row already: avx2_sign's 1 x 8, which loads each |x| and sign mask once
    per 8 blocks, its operands' only broadcasts)."""
    mr, nr = kern.mr, kern.nr
    if isinstance(m, int):
        nr = nr * 2 if m == 1 and mr > 1 else nr
        mr = max(1, min(mr, m))
    return mr, max(1, min(nr, -(-n // kern.lanes)))


# --- compile-time weight preparation -------------------------------------------------------------

def packed_shape(n: int, k: int, kern: DotKernel, nr: int) -> tuple[int, int, int, int]:
    """(No, Ko, L, S) of the packed weight of an [n, k] weight; No is a multiple of nr."""
    return -(-n // (kern.lanes * nr)) * nr, -(-k // kern.kstep), kern.lanes, kern.kstep


def pack_weight(w: np.ndarray, kern: DotKernel, nr: int, bits: int = 8) -> np.ndarray:
    """w [N, K] -> wp [No, Ko, L, S] with wp[i, j, l, s] = w[i*L + l, j*S + s] (0 past the end);
    for 4 or 2 bits, each tile wp[i, j] (L*S weights, in order) is a row in `packing`'s sub-byte
    layout: uint8 [No, Ko, L*S*bits/8], which the kernel's `qc_dot_unpack` stage expands."""
    no, ko, L, S = packed_shape(*w.shape, kern, nr)
    full = np.zeros((no * L, ko * S), kern.w_dtype)
    full[:w.shape[0], :w.shape[1]] = w
    wp = np.ascontiguousarray(full.reshape(no, L, ko, S).transpose(0, 2, 1, 3))
    if bits not in packing.PACKED_BITS:
        return wp
    return packing.pack(wp.reshape(no * ko, L * S), bits).reshape(no, ko, -1)


def compensation(w: np.ndarray, zx: int, kern: DotKernel) -> np.ndarray | None:
    """comp[n] = -(c + zx) * sum_k w[n, k] in int32, or None when c + zx = 0."""
    offset = kern.offset(zx)
    if offset == 0:
        return None
    return (-offset * w.astype(np.int64).sum(axis=1)).astype(np.int32)  # |.| <= 255 * 128 * K < 2^31


# --- TE computes ---------------------------------------------------------------------------------

def _act(kern: DotKernel, v, zero_point: int):
    if kern.act == "u8":
        return (v.astype("int32") + 128).astype("uint8")
    if kern.act == "sign":
        return tirx.abs(v.astype("int32")).astype("uint8")
    if kern.act == "s16":
        v = v.astype("int16")
        return v - tirx.const(zero_point, "int16") if zero_point else v
    return v


def _dims(shape) -> list:
    return [int(d) if isinstance(d, tirx.IntImm) else d for d in shape]


def _pad_to(d, tile: int):
    return -(-d // tile) * tile if isinstance(d, int) else tirx.floordiv(d + tile - 1, tile) * tile


def _attrs(kern: DotKernel, mr: int, nr: int, batch: int) -> dict:
    return {ANNOTATION: kern.name, "qc.mr": mr, "qc.nr": nr, "qc.batch": batch}


def _sign_mask(v):
    """-1 where v < 0, else 0 (int8): the sign kernel's second operand."""
    return tirx.if_then_else(v < tirx.const(0, v.dtype), tirx.const(-1, "int8"), tirx.const(0, "int8"))


def _operand(t: te.Tensor, kern: DotKernel, z: int, mr: int, name: str, act=None, dtype=None) -> te.Tensor:
    """a[..., r, k] = act(t[..., r, k]) for t [..., M, K], rows padded to a multiple of mr and
    k to a multiple of S with zeros (reads are clamped in bounds). `act` (of `dtype`) replaces
    the kernel's own activation operand."""
    *outer, m, k = _dims(t.shape)
    zero = tirx.const(0, dtype or kern.act_dtype)
    pad_m, pad_k = not (isinstance(m, int) and m % mr == 0), k % kern.kstep != 0
    act = act or (lambda v: _act(kern, v, z))

    def body(*i):
        r, kk = i[-2], i[-1]
        v = act(t[(*i[:-2], tirx.min(r, m - 1) if pad_m else r, tirx.min(kk, k - 1) if pad_k else kk)])
        inside = [c for c, padded in ((r < m, pad_m), (kk < k, pad_k)) if padded]
        return tirx.if_then_else(tirx.all(*inside), v, zero) if inside else v

    return te.compute((*outer, _pad_to(m, mr), _pad_to(k, kern.kstep)), body, name=name)


def _dot_stage(a: te.Tensor, bp: te.Tensor, kern: DotKernel, mr: int, nr: int, b_batched: bool,
               mask: te.Tensor | None = None) -> te.Tensor:
    """acc[..., r, j, l] = sum_{o, s} a[..., r, o*S + s] * bp[(...,) j, o, l, s] in int32; with
    `mask` the weight is bp ^ mask[..., r, o*S + s] (the sign kernel)."""
    *outer, mp, _ = _dims(a.shape)
    no, ko = _dims(bp.shape)[-4:-2]
    ro, rs = te.reduce_axis((0, ko), "ko"), te.reduce_axis((0, kern.kstep), "ki")
    nb = len(outer)

    def body(*i):
        bi, r, j, l = i[:nb], i[nb], i[nb + 1], i[nb + 2]
        w = bp[(*bi, j, ro, l, rs)] if b_batched else bp[j, ro, l, rs]
        if mask is not None:
            w = tirx.bitwise_xor(w, mask[(*bi, r, ro * kern.kstep + rs)])
        return te.sum(a[(*bi, r, ro * kern.kstep + rs)].astype("int32") * w.astype("int32"), axis=[ro, rs])

    return te.compute((*outer, mp, no, kern.lanes), body, name="qc_dot", attrs=_attrs(kern, mr, nr, nb))


def _unpacked(acc: te.Tensor, n: int, m, L: int, comp=None, row=None) -> te.Tensor:
    """out[..., r, c] = acc[..., r, c // L, c % L] (+ comp[c], or comp[..., c] when comp has the
    batch dimensions too) (- row[..., r]) for r < m, c < n."""
    def body(*i):
        v = acc[(*i[:-1], tirx.floordiv(i[-1], L), tirx.floormod(i[-1], L))]
        if comp is not None:
            v = v + (comp[i[-1]] if len(comp.shape) == 1 else comp[(*i[:-2], i[-1])])
        return v - row[i[:-1]] if row is not None else v

    return te.compute((*_dims(acc.shape)[:-3], m, n), body, name="qc_dot_out")


def _unpack_stage(p: te.Tensor, shape: tuple, bits: int) -> te.Tensor:
    """wp[..., i, j, l, s] from the sub-byte tiles p [..., No, Ko, B] (`pack_weight`): weight
    t = l*S + s of tile (i, j) is lane t // B of byte t % B, in offset binary (`packing`, one
    block a tile)."""
    L, S = shape[-2:]
    B = _dims(p.shape)[-1]
    mask, offset = (1 << bits) - 1, 1 << (bits - 1)

    def body(*idx):
        t = idx[-2] * S + idx[-1]
        lane = (tirx.floordiv(t, B) * bits).astype("uint8")
        byte = p[(*idx[:-2], tirx.floormod(t, B))]
        u = tirx.bitwise_and(tirx.shift_right(byte, lane), tirx.const(mask, "uint8"))
        return u.astype("int8") - tirx.const(offset, "int8")

    return te.compute(shape, body, name="qc_dot_unpack")


def linear_te(x: te.Tensor, wp: te.Tensor, comp: te.Tensor | None, n: int, zx: int, kernel: str, mr: int, nr: int,
              bits: int = 8, batched: bool = False):
    """acc[..., n] = sum_k (x[..., k] - zx) * w[n, k] from x [..., M, K] int8, the packed
    weight wp (`pack_weight` with `bits`) and comp (`compensation`): int32 [..., M, N].
    Dimensions before M are loops around the kernel; with `batched`, x is [G, M, K] and wp,
    comp hold one weight per g (`grouped_operands`). `kernel` names a `KERNELS` entry."""
    kern = KERNELS[kernel]
    if bits in packing.PACKED_BITS:
        lead = _dims(wp.shape)[:1] if batched else []
        wp = _unpack_stage(wp, (*lead, *packed_shape(n, _dims(x.shape)[-1], kern, nr)), bits)
    a = _operand(x, kern, zx, mr, "qc_dot_act")
    if kern.act != "sign":
        return _unpacked(_dot_stage(a, wp, kern, mr, nr, b_batched=batched), n, _dims(x.shape)[-2], kern.lanes, comp)
    mask = _operand(x, kern, zx, mr, "qc_dot_mask", _sign_mask, "int8")
    acc = _dot_stage(a, wp, kern, mr, nr, b_batched=batched, mask=mask)
    k = te.reduce_axis((0, _dims(x.shape)[-1]), "k")
    neg = te.compute(x.shape[:-1], lambda *i: te.sum(tirx.min(x[(*i, k)].astype("int32"), 0), axis=k), name="qc_dot_neg")
    return _unpacked(acc, n, _dims(x.shape)[-2], kern.lanes, comp, neg)


def matmul_te(a: te.Tensor, b: te.Tensor, za: int, zb: int, kernel: str, mr: int, nr: int):
    """acc[..., i, j] = sum_k (a[..., i, k] - za) * (b[..., k, j] - zb) in int32, for a
    [..., M, K] and b [..., K, N] with equal batch dimensions; b is packed per call."""
    kern = KERNELS[kernel]
    *batch, k, n = _dims(b.shape)
    L, S = kern.lanes, kern.kstep
    zero = tirx.const(0, kern.act_dtype)

    def pack(*i):  # bp[..., j, o, l, s] = act(b[..., o*S + s, j*L + l])
        kk, nn = i[-3] * S + i[-1], i[-4] * L + i[-2]
        v = _act(kern, b[(*i[:-4], tirx.min(kk, k - 1), tirx.min(nn, n - 1))], zb)
        return tirx.if_then_else(tirx.all(kk < k, nn < n), v, zero)

    bp = te.compute((*batch, _pad_to(n, L * nr) // L, _pad_to(k, S) // S, L, S), pack, name="qc_dot_pack")
    acc = _dot_stage(_operand(a, kern, za, mr, "qc_dot_act"), bp, kern, mr, nr, b_batched=True)
    return _unpacked(acc, n, _dims(a.shape)[-2], L)


def emit_linear(bb, x, zx: int, w, w_value: np.ndarray | None, x_shape: list, bits: int = 8):
    """Emit acc = sum_k (x[..., k] - zx) * w[n, k] on the target's dot-product kernel into the
    Relax block builder `bb` (the bias stays a Relax add, fused as its epilogue); None when the
    target, an unknown weight value or the shapes call for the plain kernel. The weight's value
    is `w`'s own when it is a constant, else `w_value` (the layer's constant, `weights`), stored
    at `bits` (4 or 2: packed, `pack_weight`)."""
    wv = w.value.numpy() if isinstance(w, Constant) else w_value
    if len(x_shape) < 2 or not isinstance(x_shape[-1], int) or wv is None or wv.dtype != np.int8:
        return None
    kern = choose_linear(current_target(), wv)
    if kern is None:
        return None
    mr, nr = tiles(kern, x_shape[-2], wv.shape[0])
    comp = compensation(wv, zx, kern)
    return bb.emit_te(linear_te, x, relax.const(pack_weight(wv, kern, nr, bits)),
                      None if comp is None else relax.const(comp), wv.shape[0], zx, kern.name, mr, nr, bits)


def emit_matmul(bb, a, b, za: int, zb: int, a_shape: list, b_shape: list):
    """Emit matmul_int(a, za, b, zb) (a [..., M, K], b [..., K, N], equal batch dimensions) on
    the target's kernel into `bb`; None where the plain kernel serves."""
    n = b_shape[-1]
    kern = choose_matmul(current_target(), a_shape[-1])
    if kern is None or not isinstance(n, int):
        return None
    mr, nr = tiles(kern, a_shape[-2], n)
    return bb.emit_te(matmul_te, a, b, za, zb, kern.name, mr, nr)


def current_target():
    """The tvm Target the lowering builds for (`with target:` around `to_relax`), or None."""
    return tvm.target.Target.current(allow_none=True)
