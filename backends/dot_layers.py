"""Layers built on the dot-product kernels of `dot`, beyond the plain linear.

- Group-wise linears (`emit_grouped_linear`): the kernel runs with the groups as its batch
  dimension (x as [G, M, group], one packed weight and compensation per group, `grouped_operands`)
  and the exact int32 sum of each group is combined in float32, in group order, as
  `qc.linear_int_grouped` adds them: y = sum_g float32(acc_g) * (ws[n, g] * sx).
- Convolutions with groups = 1 (`emit_conv2d`): the linear kernel over im2col rows of the
  input in NHWC (`im2col_te`: one row per output position, KH*KW*C wide, the zero point in the
  padding), the result permuted back to NCHW.

Each emitter returns None where the target or the operands call for the plain kernels.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from .dot import DotKernel, _dims, choose_linear, compensation, current_target, linear_te, pack_weight, tiles


def grouped_operands(w: np.ndarray, group: int, zx: int, kern: DotKernel, nr: int, bits: int):
    """(wp [G, ...], comp [G, N] or None) for a grouped linear: the weight [N, K] zero padded
    to G whole groups and split into G weights [N, group], each packed (`pack_weight`)."""
    n, k = w.shape
    groups = -(-k // group)
    full = np.zeros((n, groups * group), np.int8)
    full[:, :k] = w
    parts = [full[:, g * group:(g + 1) * group] for g in range(groups)]
    wp = np.stack([pack_weight(part, kern, nr, bits) for part in parts])
    comps = [compensation(part, zx, kern) for part in parts]
    return wp, None if comps[0] is None else np.stack(comps)


def emit_grouped_linear(bb, x, zx: int, sx: float, ws, group: int, w_value: np.ndarray | None, x_shape: list,
                        bits: int):
    """Emit linear_int_grouped's y = sum_g float32(acc_g) * (ws[n, g] * sx), in group order, with
    the exact int32 sums acc_g of each group on the target's dot-product kernel (the groups are
    the kernel's batch dimension: x as [G, M, group], one packed weight per group); None where
    the target or the operands call for the packed grouped kernel. The bias is left to the caller."""
    if w_value is None or len(x_shape) < 2 or not all(isinstance(d, int) for d in x_shape):
        return None
    kern = choose_linear(current_target(), w_value)
    if kern is None:
        return None
    (n, k), groups = w_value.shape, -(-w_value.shape[1] // group)
    m = int(np.prod(x_shape[:-1]))
    mr, nr = tiles(kern, m, n)
    wp, comp = grouped_operands(w_value, group, zx, kern, nr, bits)
    R = relax.op
    rows = bb.emit(R.reshape(x, [m, k]))
    if groups * group != k:  # the padded weights are 0: any x there adds nothing
        rows = bb.emit(R.nn.pad(rows, [0, 0, 0, groups * group - k]))
    xg = bb.emit(R.permute_dims(R.reshape(rows, [m, groups, group]), [1, 0, 2]))
    acc = bb.emit_te(linear_te, xg, relax.const(wp), None if comp is None else relax.const(comp), n, zx, kern.name,
                     mr, nr, bits, True)
    scale = bb.emit(R.reshape(R.multiply(R.permute_dims(ws, [1, 0]), relax.const(sx, "float32")), [groups, 1, n]))
    y = bb.emit(R.sum(R.multiply(R.astype(acc, "float32"), scale), axis=[0]))
    return bb.emit(R.reshape(y, [*x_shape[:-1], n]))


def im2col_te(x: te.Tensor, zx: int, kh: int, kw: int, stride, padding, dilation) -> te.Tensor:
    """cols[b*OH*OW + y*OW + x, (i*KW + j)*C + c] = x[b, y*sh + i*dh - ph, x*sw + j*dw - pw, c]
    for x [B, H, W, C] (NHWC: each tap copies C consecutive values), the zero point where that
    falls in the padding (so it adds nothing)."""
    nb, h, w, c = _dims(x.shape)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def body(r, q):
        b, y, xo = r // (oh * ow), (r // ow) % oh, r % ow
        i, j, ci = q // (kw * c), (q // c) % kw, q % c
        yy, xx = y * sh + i * dh - ph, xo * sw + j * dw - pw
        if not (ph or pw):
            return x[b, yy, xx, ci]
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        v = x[b, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0), ci]
        return tirx.if_then_else(inside, v, tirx.const(zx, x.dtype))

    return te.compute((nb * oh * ow, kh * kw * c), body, name="qc_im2col")


def emit_conv2d(bb, x, zx: int, w_value: np.ndarray | None, x_shape: list, stride, padding, dilation, bits: int):
    """Emit conv2d_int's acc [B, O, OH, OW] (groups = 1) as the target's dot-product linear kernel
    over the im2col rows of x in NHWC (`im2col_te`: one row per output position, KH*KW*C wide)
    and the weight as [O, KH*KW*C], stored at `bits`; None where the target or the operands
    call for the plain conv kernel. The permutes from and back to NCHW fuse into the kernels
    around (a conv after a conv reads the rows the first one wrote)."""
    if w_value is None or len(x_shape) != 4 or not all(isinstance(d, int) for d in x_shape):
        return None
    o, c, kh, kw = w_value.shape
    rows_w = np.ascontiguousarray(w_value.transpose(0, 2, 3, 1)).reshape(o, kh * kw * c)
    kern = choose_linear(current_target(), rows_w)
    if kern is None:
        return None
    R = relax.op
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (x_shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (x_shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    mr, nr = tiles(kern, x_shape[0] * oh * ow, o)
    comp = compensation(rows_w, zx, kern)
    cols = bb.emit_te(im2col_te, bb.emit(R.permute_dims(x, [0, 2, 3, 1])), zx, kh, kw, stride, padding, dilation)
    acc = bb.emit_te(linear_te, cols, relax.const(pack_weight(rows_w, kern, nr, bits)),
                     None if comp is None else relax.const(comp), o, zx, kern.name, mr, nr, bits)
    return bb.emit(R.permute_dims(R.reshape(acc, [x_shape[0], oh, ow, o]), [0, 3, 1, 2]))
