"""Vectorized row sums for the float kernels no other schedule touches (layer_norm, softmax,
and the quantize/dequantize stages fused with them; also the K sums of float matmuls, so fp32
builds vectorize their dot products) on CPU targets. Tuned builds (`tuning`) give these
kernels to MetaSchedule first; the pass takes those it did not tune.

TVM's default CPU pipeline compiles these PrimFuncs as written: each sum over a row is one
chain of float adds (LLVM may not reorder float adds), so a layer_norm over 256 channels waits
on 2 x 256 dependent adds per row (about 10 us of a 16-token transformer block on Zen 3).
`ScheduleRowSums` splits every such sum (a single reduction axis, innermost, whose length is
a multiple of LANES) into LANES interleaved partial sums (`rfactor`), vectorized across the
partials, and then adds the LANES partials. This changes the order of the float additions, as
torch's own vectorized kernels do; `verify` checks float ops to a relative tolerance for this
reason. Max reductions (softmax) are left as they are: they are exact in any order but cheap.
Functions already scheduled (`tirx.is_scheduled`: the int8 dots) are left alone.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

LANES = 8  # one 256-bit float vector
MIN_LENGTH = 4 * LANES  # shorter rows gain nothing from the split


def _is_sum(block) -> bool:
    """The block stores buf[..] = buf[..] + value, in float32."""
    body = block.body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return False
    acc = getattr(body.value.a, "source", None)  # a load of the accumulator (TVM 0.27: TensorLoad.source)
    return acc is not None and acc.same_as(body.buffer) and str(body.buffer.dtype) == "float32"


def _row_sum_blocks(sch: s_tir.Schedule) -> list:
    """Top-level blocks that sum over one innermost reduction axis of a static length that
    LANES divides."""
    found = []
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        b = sch.get(block)
        kinds = [iv.iter_type for iv in b.iter_vars]
        if kinds.count(tirx.IterVar.CommReduce) != 1 or kinds[-1] != tirx.IterVar.CommReduce or not _is_sum(b):
            continue
        loops = sch.get_loops(block)
        extent = sch.get(loops[-1]).extent
        if isinstance(extent, tirx.IntImm) and int(extent) % LANES == 0 and int(extent) >= MIN_LENGTH:
            found.append(block)
    return found


def schedule_row_sums(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """func with its row sums split into vectorized partial sums, or None if it has none."""
    sch = s_tir.Schedule(func)
    blocks = _row_sum_blocks(sch)
    if not blocks:
        return None
    for block in blocks:
        *_, k = sch.get_loops(block)
        ko, ki = sch.split(k, [None, LANES])
        partial = sch.rfactor(ki, factor_axis=len(sch.get(block).iter_vars) - 1)
        *_, kouter, lane = sch.get_loops(partial)  # the partials' block keeps the split's order
        sch.vectorize(lane)
        init = sch.decompose_reduction(partial, kouter)  # zero the partials once, before the row
        sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="qc.ScheduleRowSums")
def ScheduleRowSums(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named like TVM's)
    """Apply `schedule_row_sums` to every PrimFunc not already scheduled."""
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and not (func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)):
            done = schedule_row_sums(func)
            if done is not None:
                updates[gv] = done
    for gv, func in updates.items():
        mod[gv] = func
    return mod
