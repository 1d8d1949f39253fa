"""Schedule of the `dot` kernels: register tiles, tensorized inner products, fused epilogue.

After FuseOps/FuseTIR a kernel's PrimFunc holds, in order: elementwise prologue blocks (if
any), the activation stage `qc_dot_act` (and `qc_dot_pack` for matmul, `qc_dot_unpack` for 4/2-bit
weights: computed per column of weight blocks, flat and vectorized), the dot block
annotated "qc.dot", its output `qc_dot_out` and the fused epilogue (bias, requantizer, clamp,
cast). `schedule_dot` turns that into

    for j in N / (NR*L):                      # a column of NR weight blocks stays in L1
      for i in M / MR:                        # all row tiles reuse it
        acc[MR, NR, L] = 0                    # registers
        for k in K / S:
          for r in MR, b in NR:  acc[r, b, :] += intrinsic(a[i*MR + r, k*S : k*S + S], wp[j*NR + b, k])
        out[i*MR : .., j*NR*L : ..] = epilogue(acc + comp)   # requantize straight from registers

with the epilogue inlined into one block computed per tile, prologue blocks inlined into the
activation stage, and batch dimensions (matmul) outermost with the operand stages computed per
batch. When K is longer than two chunks of PANEL_BYTES of the weight column, the k loop is cut
into such chunks taken outside the row tiles (for j: acc[all rows] = 0; for each chunk: for i:
for k in chunk: ...; then the epilogue per tile), so that a chunk of the weight column and of
the activations stays in L1 across the row tiles; the accumulators then live in memory between
chunks (on Zen 3: 16 tokens x K = 3072 about 10% faster, K = 768 on the 1x8 tile about 5%).
MR and NR come from the block's annotations (`dot.tiles`); `schedule_dot(func, mr, nr)` takes
other values that divide the padded sizes, which is how a tuner would search them. If
the fused form cannot be built (an unexpected block structure) the dot is tiled and
tensorized alone ("root"); the kernel is correct either way. `ScheduleDots` is the Relax pass
that schedules every such PrimFunc and marks it `tirx.is_scheduled` so MetaSchedule and dlight
leave it alone.
"""

from __future__ import annotations

import warnings

import tvm
from tvm import DataType, relax, s_tir, tirx

from qcompiler.errors import LoweringError

from .dot import ANNOTATION, KERNELS

PANEL_BYTES = 8192  # weight bytes of one K chunk of a column of tiles (`_k_chunk`)
UNPACK = "qc_dot_unpack"  # the stage expanding 4/2-bit weights (`dot._unpack_stage`)
IM2COL = "qc_im2col"  # the rows of a convolution (`dot_layers.im2col_te`)
SCHEDULE_ATTR = "qc.dot_schedule"  # "<kernel> <MR>x<NR> [k<chunk>] fused|root": what `schedule_dot` did


def _attr(func, key):
    return func.attrs is not None and bool(func.attrs.get(key, False))


def find_dot(sch: s_tir.Schedule):
    """The annotated dot block among the top-level blocks of sch's function, or None."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if ANNOTATION in sch.get(block).annotations:
            return block
    return None


def _params(sch, dot, mr, nr):
    ann = sch.get(dot).annotations
    kern = KERNELS[str(ann[ANNOTATION])]
    mr0, nr0, nb = int(ann["qc.mr"]), int(ann["qc.nr"]), int(ann["qc.batch"])
    mr, nr = mr or mr0, nr or nr0
    if mr < 1 or nr < 1 or mr0 % mr or nr0 % nr:
        raise LoweringError(f"{kern.name} kernel: a {mr}x{nr} register tile does not divide the {mr0}x{nr0} "
                            f"tile its operands are padded to; use divisors of {mr0} and {nr0}, or build the "
                            "kernel with other tiles (`dot.tiles`)")
    return kern, mr, nr, nb


def _tensorize_tile(sch, dot, kern) -> None:
    """Loops (.., r, b, l, k, s) of the dot under one tile: k outermost, intrinsic on (l, s)."""
    dm, dno, dl, dko, dki = sch.get_loops(dot)[-5:]
    sch.reorder(dko, dm, dno, dl, dki)
    _tensorize_loops(sch, dot, kern, dko, dl, dm, dno)


def _tensorize_loops(sch, dot, kern, init_at, lanes, rows, blocks) -> None:
    """Zero the accumulators above `init_at`, the intrinsic on `lanes`, the tile unrolled."""
    init = sch.decompose_reduction(dot, init_at)
    sch.tensorize(lanes, kern.intrin)
    sch.unroll(rows)
    sch.unroll(blocks)
    sch.vectorize(sch.get_loops(init)[-1])


def _k_chunk(ko, kern, nr: int) -> int:
    """K-steps per chunk: the largest divisor of ko (the K-steps of a row) between a quarter of
    and the number whose weights of NR blocks fill PANEL_BYTES, when ko is more than twice
    that; 0 (no chunks) otherwise."""
    top = PANEL_BYTES // (nr * kern.lanes * kern.kstep * DataType(kern.w_dtype).bits // 8)
    if not isinstance(ko, tirx.IntImm) or int(ko) <= 2 * top:
        return 0
    return next((d for d in range(top, top // 4 - 1, -1) if int(ko) % d == 0), 0)


def _vectorize_inner(sch, block, width: int) -> None:
    """Vectorize the innermost loop of `block` in chunks of `width` when they divide it."""
    loop = sch.get_loops(block)[-1]
    extent = sch.get(loop).extent
    if isinstance(extent, tirx.IntImm) and int(extent) % width == 0 and int(extent) >= width:
        sch.vectorize(sch.split(loop, [None, width])[-1])


def _vectorize_tiles(sch, block, width: int) -> None:
    """The two inner loops of `block` (a tile's L x S weights) fused, then vectorized in chunks
    of `width` (the bytes of the tile's packed block: each chunk one shift of the same bytes)."""
    loop = sch.fuse(*sch.get_loops(block)[-2:])
    sch.vectorize(sch.split(loop, [None, width])[-1])


def _fused(sch, dot, kern, mr, nr, nb) -> int:
    """Tile, fuse and tensorize (see the module docstring); returns the K-steps per chunk (0: none)."""
    top = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in top]
    at = names.index(sch.get(dot).name_hint)
    stages = [b for b in sch.get_producers(dot)]
    prologue = [b for b in top[:at] if sch.get(b).name_hint not in {sch.get(s).name_hint for s in stages}]
    for b in prologue:  # elementwise ops feeding the operands: computed inside the operand stage,
        if any(sch.get(c).name_hint == IM2COL for c in sch.get_consumers(b)):  # except im2col, which reads
            _try(_vectorize_inner, sch, b, 16)  # each input KH*KW times: computed once, a stage of its own
        else:
            _try(sch.compute_inline, b)
    for b in top[at + 1:-1]:  # bias, requantizer, ...: inlined into one epilogue block
        if not _reduces(sch, b):  # a row sum (the sign kernel's `qc_dot_neg`) stays a loop of its own
            sch.compute_inline(b)
    last = top[-1]
    *batch, m, n = sch.get_loops(last)
    if len(batch) != nb:
        raise ValueError(f"the output block has {len(batch)} batch loops, the dot {nb}")
    mo, mi = sch.split(m, [None, mr])
    jo, ji = sch.split(n, [None, nr * kern.lanes])
    sch.reorder(jo, mo, mi, ji)
    rows = sch.get(mo).extent
    one_tile = isinstance(rows, tirx.IntImm) and int(rows) == 1  # nothing to share a chunk with
    kc = 0 if one_tile else _k_chunk(sch.get(sch.get_loops(dot)[-2]).extent, kern, nr)
    sch.compute_at(dot, jo if kc else mo, preserve_unit_loops=True)
    for stage in stages:  # operands per batch, next to their use
        if sch.get(stage).name_hint == UNPACK:  # a column's weights, unpacked into L1 before its row tiles
            sch.compute_at(stage, jo, preserve_unit_loops=True)
            _try(_vectorize_tiles, sch, stage, int(sch.get(stage).reads[0].source.shape[-1]))
            continue
        if batch:
            sch.compute_at(stage, batch[-1], preserve_unit_loops=True)
        _try(_vectorize_inner, sch, stage, 32 // (2 if kern.act_dtype == "int16" else 1))
    if kc:  # a column of tiles per chunk of K: its weights and activations stay in L1
        dm, dno, dl, dko, dki = sch.get_loops(dot)[-5:]
        dmo, dmi = sch.split(dm, [None, mr])
        dkc, dkin = sch.split(dko, [None, kc])
        sch.reorder(dkc, dmo, dkin, dmi, dno, dl, dki)
        _tensorize_loops(sch, dot, kern, dkc, dl, dmi, dno)
    else:
        _tensorize_tile(sch, dot, kern)
    _try(_vectorize_inner, sch, last, kern.lanes)  # a ragged last tile has a predicate: stays scalar
    return kc


def _reduces(sch, block) -> bool:
    return any(int(v.iter_type) == tirx.IterVar.CommReduce for v in sch.get(block).iter_vars)


def _try(f, *args) -> None:
    """Apply an optional schedule step; the kernel is correct without it."""
    try:
        f(*args)
    except RuntimeError:
        pass


def _root(sch, dot, kern, mr, nr, nb) -> None:
    loops = sch.get_loops(dot)
    batch, m, no = loops[:nb], loops[nb], loops[nb + 1]
    mo, mi = sch.split(m, [None, mr])
    jo, ji = sch.split(no, [None, nr])
    sch.reorder(*batch, jo, mo, mi, ji)
    _tensorize_tile(sch, dot, kern)


def schedule_dot(func: tirx.PrimFunc, mr: int | None = None, nr: int | None = None) -> tuple[tirx.PrimFunc, str]:
    """Schedule the dot kernel in `func` (tiles MR x NR from its annotations unless given);
    returns the scheduled function and "fused" or "root"."""
    base = s_tir.Schedule(func)
    dot = find_dot(base)
    if dot is None:
        raise LoweringError(f"no block annotated {ANNOTATION!r} in this function: schedule_dot takes the "
                            "kernels of `dot.linear_te` / `dot.matmul_te` (after fusion or alone)")
    kern, mr, nr, nb = _params(base, dot, mr, nr)
    errors = []
    for how, build in (("fused", _fused), ("root", _root)):
        sch = base.copy()
        try:
            chunk = build(sch, find_dot(sch), kern, mr, nr, nb)
        except Exception as e:  # noqa: BLE001 (TVM raises several types; the next form is tried)
            errors.append(f"{how}: {type(e).__name__}: {str(e).strip().splitlines()[-1:] or ''}")
            continue
        tile = f"{kern.name} {mr}x{nr}" + (f" k{chunk * kern.kstep}" if chunk else "")
        return sch.mod["main"].with_attr(SCHEDULE_ATTR, f"{tile} {how}"), how
    raise LoweringError(f"could not tensorize the {kern.name} kernel ({'; '.join(errors)})")


@tvm.transform.module_pass(opt_level=0, name="qc.ScheduleDots")
def ScheduleDots(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named like TVM's)
    """Schedule every PrimFunc holding a qc.dot block and mark it tirx.is_scheduled."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or _attr(func, "tirx.is_scheduled"):
            continue
        if find_dot(s_tir.Schedule(func)) is None:
            continue
        try:
            scheduled, _ = schedule_dot(func)
        except LoweringError as e:  # still correct, only slow: say so
            warnings.warn(f"{gv.name_hint}: int8 dot kernel left unscheduled ({e})", stacklevel=2)
            continue
        updates[gv] = scheduled.with_attr("tirx.is_scheduled", True)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def pipeline_parts(target: tvm.target.Target) -> tuple[list, list]:
    """The passes of `dot_pipeline` for an LLVM target, in two parts: the kernels (library
    dispatch, legalize, fusion, then the hand schedules that mark what they schedule
    `tirx.is_scheduled`: `ScheduleDots` and, on CPUs with vector units (not the thumb
    microcontrollers), `window_schedule.ScheduleDepthwise` and `injective_schedule.ScheduleInjective`),
    and the rest (on those CPUs `reduction_schedule.ScheduleRowSums` for the float sums left
    unscheduled and `exact_floats.FenceProducts`: float products not fused into a multiply-add,
    as the reference rounds them; then lowering and finalization). A tuned build runs
    MetaSchedule between the two, so it tunes the float kernels with sums and the row-sum
    schedule takes only those it did not tune."""
    from tvm.relax.backend.cpu_generic import pipeline as stages  # (its package omits dataflow_lower_passes)

    from .exact_floats import FenceProducts
    from .injective_schedule import ScheduleInjective
    from .reduction_schedule import ScheduleRowSums
    from .window_schedule import ScheduleDepthwise

    thumb = str(target.attrs.get("mtriple", "")).startswith("thumb")  # microcontrollers: C, built without contraction
    vector = [] if thumb else [ScheduleDepthwise, ScheduleInjective]
    return (stages.library_dispatch_passes(target) + stages.legalize_passes(target) + [ScheduleDots, *vector],
            ([] if thumb else [ScheduleRowSums, FenceProducts])
            + stages.dataflow_lower_passes(target) + stages.finalize_passes(target))


def dot_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The target's default Relax pipeline (`relax.get_default_pipeline` for LLVM CPU targets)
    with the hand schedules of `pipeline_parts` right after fusion; other targets get their
    default pipeline."""
    if target.kind.name != "llvm":
        return relax.get_default_pipeline(target)
    kernels, rest = pipeline_parts(target)

    @tvm.transform.module_pass(opt_level=0, name="qc.DotPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(kernels + rest)(mod)

    return _pipeline


def scheduled_dots(mod: tvm.IRModule) -> dict[str, str]:
    """PrimFunc name -> its `SCHEDULE_ATTR` for every function `ScheduleDots` scheduled."""
    return {gv.name_hint: str(f.attrs[SCHEDULE_ATTR]) for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and SCHEDULE_ATTR in f.attrs}


def fused_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """`mod` after the first part of `pipeline_parts` (library dispatch, legalize, fusion, the
    hand schedules): the kernels as they will be compiled, for inspection."""
    with target:
        return tvm.transform.Sequential(pipeline_parts(target)[0])(mod)
