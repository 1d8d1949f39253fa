"""TE kernels that read weights in their stored form (`backends.packing`) and unpack them in the
inner loop: integer linear (per channel and per group) and conv2d (grouped and depthwise
included). The weight-only linear with float activations is `kernels_weight_only`.

With w(n, k) the weight unpacked from its storage p (`weight_value`):

    packed_dot          acc[..., n] = sum_k (x[..., k] - zx) * w(n, k)                   int32
    grouped_linear      acc[..., n, g] = sum_{j<G} (x[..., gG+j] - zx) * w(n, gG+j)       int32
                        y[..., n] = sum_g float(acc[..., n, g]) * (s_w[n, g] * s_x) + b[n]
    conv2d_int          acc[b, o, y, x] = sum_{c,i,j} (xp[b, (o // O_g) C_g + c, y sh + i dh,
                        x sw + j dw] - zx) * w(o, (c KH + i) KW + j)   (xp: x padded with zx)
    depthwise_int       acc[b, y, x, c] = sum_{i,j} (xp[b, y sh + i dh, x sw + j dw, c] - zx) * w[i KW + j, c]
                        (NHWC, int8 weight, terms written out: for CPUs, `window_schedule`)

Every integer product and sum is exact in int32 ((x - zx) * w terms below 2^15 in magnitude, fewer than 2^16 of them),
so the integer kernels equal the `qc` reference ops bit for bit; the float one (grouped_linear's
combine) differs from torch only in the order of its float sums. A ragged last group reads
x at a clamped index against zero-padded weights, so its padding adds nothing.
Bias, requantization and clamps are Relax ops after these kernels; the kernels are
output-elementwise-fusable, so TVM's FuseOps/FuseTIR put those ops into the kernel's PrimFunc
as its epilogue (computed once per output element).

Schedules, applied by the converters before fusion: `split_blocks` splits the reduction of
the integer linear kernels along the packed blocks (the innermost loop then reads contiguous
bytes and LLVM vectorizes the integer sum; the block body, hence fusion, is unchanged).
conv2d_int is left to the default lowering. On targets with a dot-product kernel (`dot`) these
serve only what it does not take: dynamic shapes and grouped convolutions, depthwise ones by
`depthwise_int` (scheduled after fusion by `window_schedule`).
"""

from __future__ import annotations

import functools

import tvm
from tvm import te

from .packing import PACKED_BITS


def weight_value(p: te.Tensor, row, k, bits: int, span: int):
    """w[row, k] as int32, read from int8 storage or unpacked from a packed byte (blocks of
    `span` bytes, `packing`)."""
    if bits not in PACKED_BITS:
        return p[row, k].astype("int32")
    block = span * (8 // bits)
    byte = p[row, (k // block) * span + k % span].astype("int32")
    shift = (((k % block) // span) * bits).astype("int32")
    return ((byte >> shift) & ((1 << bits) - 1)) - (1 << (bits - 1))


def _minus(v, z: int):
    return v - z if z else v


def packed_dot(x: te.Tensor, p: te.Tensor, zx: int, bits: int, span: int) -> te.Tensor:
    """acc[..., n] = sum_k (x[..., k] - zx) * w(n, k) in int32."""
    k = te.reduce_axis((0, x.shape[-1]), "k")

    def body(*i):
        xv = _minus(x[(*i[:-1], k)].astype("int32"), zx)
        return te.sum(xv * weight_value(p, i[-1], k, bits, span), axis=k)

    return te.compute((*x.shape[:-1], p.shape[0]), body, name="packed_dot_int")


def grouped_linear(x: te.Tensor, p: te.Tensor, ws: te.Tensor, bias, zx: int, sx: float, bits: int,
                   group: int, span: int) -> te.Tensor:
    """Exact int32 sums per group of `group` inputs, combined in float32 with the group scales."""
    k_len, groups = int(x.shape[-1]), int(ws.shape[-1])
    ragged = groups * group != k_len
    j = te.reduce_axis((0, group), "j")

    def partial(*i):
        kk = i[-1] * group + j
        xk = tvm.tirx.min(kk, k_len - 1) if ragged else kk  # the padded weights are 0 there
        xv = _minus(x[(*i[:-2], xk)].astype("int32"), zx)
        return te.sum(xv * weight_value(p, i[-2], kk, bits, span), axis=j)

    acc = te.compute((*x.shape[:-1], p.shape[0], groups), partial, name="group_dot_int")
    g = te.reduce_axis((0, groups), "g")
    sxc = tvm.tirx.const(sx, "float32")
    y = te.compute(acc.shape[:-1], lambda *i: te.sum(
        acc[(*i, g)].astype("float32") * (ws[i[-1], g] * sxc), axis=g), name="group_combine")
    if bias is None:
        return y
    return te.compute(y.shape, lambda *i: y[i] + bias[i[-1]], name="group_bias")


def depthwise_int(x: te.Tensor, w: te.Tensor, zx: int, kh: int, kw: int, stride, padding, dilation) -> te.Tensor:
    """Depthwise convolution (one input channel per output channel) in NHWC, channels innermost,
    with the int8 weight w [KH*KW, C]: acc[b, y, x, c] = sum_{i,j} (xp[b, y sh + i dh,
    x sw + j dw, c] - zx) w[i KW + j, c], the KH*KW terms written out (no reduction loop), so the
    block is elementwise over the output and vectorizes along the channels, whatever the stride.
    With padding, xp (x padded with zx) is a stage of its own, `pad_zp`."""
    n, h, wd, c = (int(d) for d in x.shape)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = x
    if ph or pw:
        zpad, clamp = tvm.tirx.const(zx, x.dtype), tvm.tirx.max

        def padded(b, yy, xx, ci):  # the read clamped in bounds: both sides of the select are evaluated
            inside = tvm.tirx.all(yy >= ph, yy < h + ph, xx >= pw, xx < wd + pw)
            v = x[b, clamp(tvm.tirx.min(yy - ph, h - 1), 0), clamp(tvm.tirx.min(xx - pw, wd - 1), 0), ci]
            return tvm.tirx.if_then_else(inside, v, zpad)

        xp = te.compute((n, h + 2 * ph, wd + 2 * pw, c), padded, name="pad_zp")

    def body(b, y, xo, ci):
        terms = [_minus(xp[b, y * sh + i * dh, xo * sw + j * dw, ci].astype("int32"), zx)
                 * w[i * kw + j, ci].astype("int32") for i in range(kh) for j in range(kw)]
        return functools.reduce(lambda a, t: a + t, terms)

    return te.compute((n, oh, ow, c), body, name="depthwise_int")


def conv2d_int(x: te.Tensor, p: te.Tensor, zx: int, bits: int, span: int, wshape, stride, padding,
               dilation, groups: int) -> te.Tensor:
    """NCHW integer convolution reading the packed weight rows [O, C/g*KH*KW]."""
    n, c, h, w = x.shape
    o, cg, kh, kw = wshape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = x
    if ph or pw:  # padding holds the zero point: it contributes 0 after the subtraction
        zpad = tvm.tirx.const(zx, x.dtype)
        xp = te.compute((n, c, h + 2 * ph, w + 2 * pw), lambda b, ci, yy, xx: tvm.tirx.if_then_else(
            tvm.tirx.all(yy >= ph, yy < h + ph, xx >= pw, xx < w + pw), x[b, ci, yy - ph, xx - pw], zpad),
            name="pad_zp")
    rc, ry, rx = te.reduce_axis((0, cg), "rc"), te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    per_group = o // groups

    def body(b, oc, yy, xx):
        ci = (oc // per_group) * cg + rc if groups > 1 else rc
        xv = _minus(xp[b, ci, yy * sh + ry * dh, xx * sw + rx * dw].astype("int32"), zx)
        return te.sum(xv * weight_value(p, oc, (rc * kh + ry) * kw + rx, bits, span), axis=[rc, ry, rx])

    return te.compute((n, o, oh, ow), body, name="conv2d_int")


def split_blocks(func: tvm.tirx.PrimFunc, block: str, k: int, bits: int, span: int) -> tvm.tirx.PrimFunc:
    """Split the innermost (reduction) loop of `block` into (block, lane, byte) so that the
    innermost loop walks the contiguous bytes of a packed block (LLVM then vectorizes the
    integer sum); only when k is a whole number of blocks. The block's body is unchanged, so
    FuseOps still fuses the epilogue (bias, requantize, clamp) into it."""
    per, span = _blocks(bits, span)
    if span < 8 or k % (span * per):
        return func
    sch = tvm.s_tir.Schedule(func)
    *_, kloop = sch.get_loops(sch.get_sblock(block))
    sch.split(kloop, [None, per, span])
    return sch.mod["main"]


def _blocks(bits: int, span: int) -> tuple[int, int]:
    """(weights per byte, bytes per block) to schedule by: int8 storage as blocks of 16."""
    return (8 // bits, span) if bits in PACKED_BITS else (1, 16)
