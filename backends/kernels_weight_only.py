"""The weight-only linear kernel: float activations x [T, K] times packed 4/2-bit weights
(`packing`: offset binary u = w + 2^(b-1)) with float scales s [N, groups] of G inputs each
(per channel: one group of the whole stored row), plus an optional bias.

The offset is taken out of the inner loop, and the group scale out of the group:

    y[t, n] = sum_g s[n, g] * (P[t, n, g] - 2^(b-1) * xs[t, g]) + b[n]
    P[t, n, g] = sum_{j<G} x[t, gG+j] * u(n, gG+j)        xs[t, g] = sum_{j<G} x[t, gG+j]

so the inner loop is unpack (mask, or shift and mask), int -> float and one fused multiply-add
per weight; xs is computed once per token, not per row. P is kept as V lanes summed over the
chunks of a group; A[t, n, v] = sum_g s[n, g] P[t, n, g, v] takes one vector multiply-add per
group (words: P's vectors added first, A of 8 lanes), and the lanes of A are added as a halving
tree (-> 1). Only float rounding differs from the `qc` reference (x @ (w * s).T + b): the order
of the sums, and the offset subtracted after summing.

Two layouts of a row's bytes (`plan`):
  words  32-byte chunks (two 16-byte blocks) read as eight uint32 words: vector m of a chunk is
         lane m of its 8 words (no byte shuffles), so weight (m, i) of the chunk is byte
         4i + m b // 8 of it, lane m % (8/b); x is permuted the same way once per call
         (`_word_order`). One token keeps lane m in place, word & ((2^b - 1) << m b) =
         u * 2^(m b) (the top lane shifted down, no mask), x divided by 2^(m b) as it is
         permuted (`_lane_scale`: a power of two, so each product x * u is unchanged): an
         and, an int -> float and an FMA per 8 weights. Token tiles shift and mask (one mask
         register; their unpacking is shared by the tile). Needs chunks that tile the groups
         (G = 64, 128 at 4 bits; 128 at 2 bits; per channel: rows of whole chunks); the
         converter passes the weights as uint32 words (the same bytes, little-endian).
  bytes  chunks of one 16-byte block (or of a group, if shorter), the L = 8/b lanes of each
         byte unpacked in turn: the other group sizes and row lengths.
Rows that do not split into whole 16-byte blocks, and 8-bit (or computed) weights, use
`plain_linear`. A ragged last group (e.g. K = 576 = 4*128 + 64) reads x = 0 past the end of
the row against the last stored chunk (its index clamped); x is also 0 in a row's zero padding
(w = 0 there but u = 2^(b-1)), so those terms add nothing to P or xs.

Schedules (`schedule`): per row (tile), the group loop accumulates A, P per group in registers.
One token: words: tiles of 4 rows (`row_tile`: 2 or 1 if 4 does not divide N), V = 16 lanes
(two FMA chains) a row, so 8 chains are in flight (x86: FMA latency 4 x 2 pipes); bytes: V =
whole blocks, one row. Several tokens: tiles of `tile` tokens (`token_tile`: 8, 4, 2) inside
the row loop, V = 8 lanes per token, so that each weight is unpacked once per tile (LLVM shares
the unrolled tokens' loads and unpacking) and the tile's FMA chains run in parallel. A, P and
the lane trees keep TVM's "global" scope: a CPU function's small global buffers go on the
stack (LLVM keeps them in registers), "local" ones into TVMBackendAllocWorkspace memory that
every row stores to (kept for the bytes layout's token tiles: measured 5-8% faster there).
On microcontroller targets (C kernels) nothing is vectorized (`_vectors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from . import packing
from .packing import PACKED_BITS, SPAN, lanes

TOKEN_TILE = 8  # tokens sharing each unpacked weight (the multi-token schedule)
TILE_LANES = 8  # lanes per token in that schedule (one 256-bit float vector)
WORD_LANES = 16  # lanes of P a row for one token in the words layout (two vectors)
WORD_CHUNK_BYTES = 32  # one 256-bit load of 8 uint32 words
ROW_TILE = 4  # rows a tile in the one-token words schedule (`row_tile`)


@dataclass(frozen=True)
class Plan:
    """A row: `stored` weights (whole 16-byte blocks), groups of `group` (per channel: the
    row), chunks of `chunk` weights, read as uint32 `words` or as bytes."""
    bits: int
    stored: int
    group: int
    groups: int
    chunk: int
    words: bool

    @property
    def per(self) -> int:
        return lanes(self.bits)


def plan(k: int, row_bytes: int, bits: int, group: int, groups: int, span: int) -> Plan | None:
    """The layout of a row of k weights stored in row_bytes, or None (then `plain_linear`)."""
    if bits not in PACKED_BITS or span != SPAN or (group and groups * group < k):
        return None
    stored = row_bytes * lanes(bits)
    g = group or stored
    word_chunk = WORD_CHUNK_BYTES * lanes(bits)
    if g % word_chunk == 0 and stored % word_chunk == 0:
        return Plan(bits, stored, g, groups, word_chunk, True)
    chunk = min(g, SPAN * lanes(bits))
    if g % chunk or chunk % SPAN or stored % chunk:
        return None
    return Plan(bits, stored, g, groups, chunk, False)


def kernel_rows(packed: np.ndarray, k: int, bits: int, group: int, groups: int) -> np.ndarray:
    """The packed rows (`packing.pack`) as the kernel reads them: the same bytes viewed as
    uint32 words (little-endian) for the words layout, else unchanged."""
    pl = plan(k, packed.shape[1], bits, group, groups, packing.span(k, bits))
    return packed.view(np.uint32) if pl is not None and pl.words else packed


def token_tile(tokens) -> int:
    """Tokens a weight is unpacked for at once: 8, 4 or 2 dividing a static token count, else 1."""
    if isinstance(tokens, int):
        for tile in (TOKEN_TILE, 4, 2):
            if tokens % tile == 0:
                return tile
    return 1


def row_tile(rows: int) -> int:
    """Rows of one tile of the one-token words schedule: 4, 2 or 1, dividing N."""
    return next(r for r in (ROW_TILE, 2, 1) if rows % r == 0)


def weight_only_linear(x: te.Tensor, p: te.Tensor, ws: te.Tensor, bias, bits: int, group: int, span: int,
                       tile: int = 1) -> te.Tensor:
    """y = x @ (w * s).T + b for x [T, K] and the packed rows p (uint8, or uint32 words when
    `plan` says so), laid out for `schedule` with token tiles of `tile` (1: one token)."""
    t_len, k_len = x.shape
    n_len = p.shape[0]
    row_bytes = int(p.shape[1]) * (4 if p.dtype == "uint32" else 1)
    pl = plan(int(k_len), row_bytes, bits, group, int(ws.shape[-1]), span)
    if pl is None:
        return plain_linear(x, p, ws, bias, bits, group, span)
    assert pl.words == (p.dtype == "uint32"), "the converter passes the words layout as uint32"
    v_len = TILE_LANES if tile > 1 else WORD_LANES if pl.words else pl.chunk
    g_len, chunk, width = pl.group, pl.chunk, pl.groups * pl.group  # width: whole groups
    last_chunk = pl.stored // chunk - 1
    order = _word_order(pl) if pl.words else (lambda kq: kq)
    in_place = pl.words and tile == 1  # masks, no shifts (token tiles: one mask, fewer registers)
    xv = x
    if pl.words or width > k_len:  # in the chunk's order, 0 past the row (and its padding)
        def xval(t, kq):
            k = order(kq)
            v = tvm.tirx.if_then_else(k < k_len, x[t, tvm.tirx.min(k, k_len - 1)], tvm.tirx.const(0, "float32"))
            return v / _lane_scale(pl, kq) if in_place else v
        xv = te.compute((t_len, width), xval, name="wo_x_words" if pl.words else "wo_x_padded")
    bb = te.reduce_axis((0, g_len // chunk), "bb")
    c = te.reduce_axis((0, chunk // v_len), "c")
    mask = (1 << bits) - 1

    def u(n, g, w_in):  # the lane value of weight w_in of chunk bb of group g
        ci = g * (g_len // chunk) + bb
        ci = tvm.tirx.min(ci, last_chunk) if width > pl.stored else ci  # x = 0 past the row
        if pl.words:
            word, m = p[n, ci * 8 + w_in % 8], w_in // 8
            if in_place:  # lane m in place: u * 2^(m b) (x divided by 2^(m b)); the top one shifted down
                top = word >> tvm.tirx.const(32 - bits, "uint32")
                in_lane = word & (tvm.tirx.const(mask, "uint32") << (m * bits).astype("uint32"))
                lane = tvm.tirx.Select(m == 32 // bits - 1, top, in_lane)
            else:
                lane = (word >> (m * bits).astype("uint32")) & tvm.tirx.const(mask, "uint32")
            return lane.astype("int32").astype("float32")
        q = ci * (chunk // SPAN) + w_in // SPAN  # 16-byte runs: lane q % L of block q // L
        byte = p[n, (q // pl.per) * SPAN + w_in % SPAN].astype("int32")
        return ((byte >> ((q % pl.per) * bits)) & mask).astype("float32")

    def part_body(t, n, g, v):
        w_in = c * v_len + v
        return te.sum(xv[t, g * g_len + bb * chunk + w_in] * u(n, g, w_in), axis=[bb, c])

    part = te.compute((t_len, n_len, pl.groups, v_len), part_body, name="wo_part")
    gr = te.reduce_axis((0, pl.groups), "gr")
    a_len = TILE_LANES if pl.words else v_len  # P's vectors added before the scale (words)

    def acc_body(t, n, v):
        ph = sum((part[t, n, gr, h * a_len + v] for h in range(1, v_len // a_len)), part[t, n, gr, v])
        return te.sum(ph * ws[n, gr], axis=gr)

    acc = te.compute((t_len, n_len, a_len), acc_body, name="wo_acc")
    xs = _group_sums(x, pl.groups, g_len)
    g2 = te.reduce_axis((0, pl.groups), "g2")
    corr = te.compute((t_len, n_len), lambda t, n: te.sum(ws[n, g2] * xs[t, g2], axis=g2), name="wo_offset")
    tree = acc
    while tree.shape[-1] > 1:  # halving tree of lane sums
        tree = _halve(tree, int(tree.shape[-1]) // 2)
    off = tvm.tirx.const(float(1 << (bits - 1)), "float32")

    def out(t, n):
        y = tree[t, n, 0] - off * corr[t, n]
        return y + bias[n] if bias is not None else y

    return te.compute((t_len, n_len), out, name="weight_only_dot")


def _word_order(pl: Plan):
    """kq -> k: the input at position kq of the words layout (chunk-local w = 8m + i is byte
    4i + m b // 8 of the chunk, lane m % L; a block's byte j, lane h is its weight h*16 + j)."""
    def order(kq):
        w = kq % pl.chunk
        m, i = w // 8, w % 8
        byte = 4 * i + (m * pl.bits) // 8
        return kq - w + (byte // SPAN) * (SPAN * pl.per) + (m % pl.per) * SPAN + byte % SPAN
    return order


def _lane_scale(pl: Plan, kq):
    """2^(m b) for the input at kq of the words layout, read against lane m of its word kept in
    place (u * 2^(m b)); 1 for the top lane (shifted down). x is divided by it: a power of two, so
    x * u is unchanged (the schedule unrolls a chunk: a constant)."""
    m = kq % pl.chunk // 8
    e = tvm.tirx.Select(m == 32 // pl.bits - 1, 0, m * pl.bits)
    return (tvm.tirx.const(1, "int32") << e.astype("int32")).astype("float32")


def _group_sums(x: te.Tensor, groups: int, g_len: int) -> te.Tensor:
    """xs[t, g] = sum_{j<G} x[t, gG+j] (0 past the row), as 8 lanes then their sum."""
    t_len, k_len = x.shape
    r = te.reduce_axis((0, g_len // 8), "r")

    def xk(t, k):
        if groups * g_len <= int(k_len):
            return x[t, k]
        return tvm.tirx.if_then_else(k < k_len, x[t, tvm.tirx.min(k, k_len - 1)], tvm.tirx.const(0, "float32"))

    lanes8 = te.compute((t_len, groups, 8), lambda t, g, l: te.sum(xk(t, g * g_len + r * 8 + l), axis=r),
                        name="wo_xsum8")
    lane = te.reduce_axis((0, 8), "lane")
    return te.compute((t_len, groups), lambda t, g: te.sum(lanes8[t, g, lane], axis=lane), name="wo_xsum")


def _halve(prev: te.Tensor, width: int) -> te.Tensor:
    return te.compute((*prev.shape[:-1], width), lambda t, n, v: prev[t, n, v] + prev[t, n, v + width],
                      name=f"wo_tree{width}")


def plain_linear(x: te.Tensor, p: te.Tensor, ws: te.Tensor, bias, bits: int, group: int, span: int) -> te.Tensor:
    """The direct form y[t, n] = sum_k x[t, k] * (float(w(n, k)) * s[n, k // G]) + b[n], for
    int8 storage and rows of no whole 16-byte blocks."""
    from .kernels_int import weight_value

    k = te.reduce_axis((0, x.shape[-1]), "k")

    def body(t, n):
        sc = ws[n, k // group] if group else ws[n, 0]
        return te.sum(x[t, k] * (weight_value(p, n, k, bits, span).astype("float32") * sc), axis=k)

    y = te.compute((x.shape[0], p.shape[0]), body, name="weight_only_plain")
    if bias is None:
        return y
    return te.compute(y.shape, lambda t, n: y[t, n] + bias[n], name="weight_only_bias")


def schedule(func: tvm.tirx.PrimFunc, tile: int, bits: int, span: int) -> tvm.tirx.PrimFunc:
    """Schedule `weight_only_linear`'s PrimFunc built with token tiles of `tile`."""
    sch = tvm.s_tir.Schedule(func)
    try:
        part = sch.get_sblock("wo_part")
    except tvm.s_tir.ScheduleError:
        return _schedule_plain(sch, func, bits, span)
    tiled = tile > 1
    vectorize = sch.vectorize if _vectors() else (lambda loop: None)
    run = 8 if _has_block(sch, "wo_x_words") else SPAN  # lanes of one unpacked vector
    acc, out = sch.get_sblock("wo_acc"), sch.get_sblock("weight_only_dot")
    t, n = sch.get_loops(out)
    n_len = int(sch.get(n).extent)
    rows = 1 if tiled or run != 8 else row_tile(n_len)
    if tiled:  # token tiles inside the row loop: (t, n, ti)
        t, ti = sch.split(t, [None, tile])
        sch.reorder(t, n, ti)
    if rows > 1:  # row tiles: (t, n, ri)
        n, ri = sch.split(n, [None, rows])
    # per row tile (and token tile): the group loop accumulating A, the lane tree, the offset term
    # (A, P and the trees on the stack, "global"; bytes with token tiles: workspace, "local", measured faster)
    scope = "local" if tiled and run != 8 else None
    trees = [sch.get_sblock(f"wo_tree{w}") for w in (32, 16, 8, 4, 2, 1) if _has_block(sch, f"wo_tree{w}")]
    for block in [*reversed(trees), acc]:
        sch.compute_at(block, n)
        if scope:
            sch.set_scope(block, 0, scope)
    sch.compute_at(sch.get_sblock("wo_offset"), n)
    a_len, groups = (int(iv.dom.extent) for iv in sch.get(acc).iter_vars[2:])
    v_len = int(sch.get(part).iter_vars[3].dom.extent)
    bb_len, c_len = (int(iv.dom.extent) for iv in sch.get(part).iter_vars[4:])
    a = _named(sch, acc, n, {"t": tile, "r": rows, "v": a_len, "gr": groups})
    if "gr" not in a:  # one group: a loop of one to compute P at
        sch.reorder(*_present(a, "t", "r", "v"))
        a["gr"] = sch.add_unit_loop(sch.get_loops(acc)[len(sch.get_loops(acc)) - len(a)])
    else:
        sch.reorder(*_present(a, "gr", "t", "r", "v"))
    gr = a["gr"]
    # per group: P's chunks (bb) outside, then rows, (c), tokens unrolled, lanes vectorized
    sch.compute_at(part, gr)
    if scope:
        sch.set_scope(part, 0, scope)
    pl = _named(sch, part, gr, {"t": tile, "r": rows, "v": v_len, "bb": bb_len, "c": c_len})
    sch.reorder(*_present(pl, "bb", "r", "c", "t", "v"))
    for loop in _present(pl, "r", "c", "t"):
        sch.unroll(loop)
    _lanes(sch, pl["v"], run, vectorize)
    red = _present(pl, "bb", "c")
    if red:
        sch.decompose_reduction(part, red[0])
    a = _named(sch, acc, gr, {"t": tile, "r": rows, "v": a_len})
    for loop in _present(a, "t", "r"):
        sch.unroll(loop)
    _lanes(sch, a["v"], run, vectorize)
    sch.decompose_reduction(acc, gr)
    for tree in trees[:-1]:
        vectorize(sch.get_loops(tree)[-1])
    if rows > 1:  # the rows' lane trees, offset terms and outputs unrolled (kept in registers)
        for block in [*trees, sch.get_sblock("wo_offset")]:
            loops = sch.get_loops(block)
            at = [i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(n))][0]
            sch.unroll(loops[at + 1])
        sch.unroll(ri)
    if run == 8:  # x in the words order: a chunk unrolled (its indices and lane scales constant)
        xw = sch.get_sblock("wo_x_words")
        *_, kq = sch.get_loops(xw)
        sch.unroll(sch.split(kq, [None, WORD_CHUNK_BYTES * lanes(bits)])[1])
    xs8 = sch.get_sblock("wo_xsum8")  # x's group sums: 8 lanes wide
    *_, l8, r = sch.get_loops(xs8)
    sch.reorder(r, l8)
    vectorize(l8)
    sch.decompose_reduction(xs8, r)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule_plain(sch, func, bits: int, span: int) -> tvm.tirx.PrimFunc:
    """The plain form: k = (block, lane, byte), the sum rfactored over the bytes of a block (16
    partial sums a row) and vectorized; rows of no whole number of blocks keep the loop nest."""
    per, span = (lanes(bits), span) if bits in PACKED_BITS else (1, SPAN)
    dot = sch.get_sblock("weight_only_plain")
    *_, kloop = sch.get_loops(dot)
    if span < 8 or int(sch.get(kloop).extent) % (span * per):
        return func
    _, _, j = sch.split(kloop, [None, per, span])
    rf = sch.rfactor(j, len(sch.get_loops(dot)) - 3)
    if _vectors():
        sch.vectorize(sch.get_loops(rf)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _lanes(sch, loop, run: int, vectorize) -> None:
    """Vectorize the lanes in unrolled runs of `run` (one unpacked vector each)."""
    if int(sch.get(loop).extent) <= run:
        vectorize(loop)
        return
    outer, inner = sch.split(loop, [None, run])
    sch.unroll(outer)
    vectorize(inner)


def _vectors() -> bool:
    """Whether to vectorize: not for microcontrollers (a thumb target), whose kernels TVM emits
    as C (`cortex_m`), where its vector types do not compile."""
    tgt = tvm.target.Target.current(allow_none=True)
    return tgt is None or (tgt.kind.name != "c" and not str(tgt.attrs.get("mtriple", "")).startswith("thumb"))


def _named(sch, block, loop, extents: dict) -> dict:
    """The loops of `block` nested inside `loop`, by the axis they iterate ({name: extent} in
    nesting order; compute_at leaves no loop for an extent of 1)."""
    loops = sch.get_loops(block)
    at = [i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(loop))][0]
    names = [nm for nm, ext in extents.items() if ext > 1]
    inner = loops[at + 1:]
    assert [int(sch.get(lp).extent) for lp in inner] == [extents[nm] for nm in names], (extents, inner)
    return dict(zip(names, inner))


def _present(loops: dict, *names) -> list:
    return [loops[nm] for nm in names if nm in loops]


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except tvm.s_tir.ScheduleError:
        return False
    return True
