"""Schedule of the elementwise and layout kernels no other schedule touches, on CPU targets.

After FuseOps/FuseTIR, the ops between two int8 kernels (the dot kernels' NHWC rows permuted
to NCHW, dequantize, activation, quantize, the permute to NHWC and the im2col rows of the next
convolution; or a model's float output) are one PrimFunc of spatial blocks. TVM's default CPU
pipeline compiles such a function as written: every block a full loop nest over a buffer of
its own (the dequantize of a 64-channel 56x56 conv output: six 800 KB buffers, 0.47 ms).
`ScheduleInjective`, for a function whose blocks are all spatial (no reduction):

- inlines every block into its consumers, except the last block, the blocks a window stage
  reads (`qc_im2col`, `pad_zp`: inlined there, a quantize would be computed once per window
  tap instead of once per element) and the blocks a consumer reads more than once per element
  (a butterfly stage of `qc.hadamard` reads two: inlined, the expression of a chain of them
  would double with every stage), which stay stages;
- vectorizes the innermost loop of each remaining stage (`window_schedule.vectorize_rows`);
- marks the function `tirx.is_scheduled`.

Inlining moves where a value is computed, not how: each float value a block stores is first
put behind `llvm.arithmetic.fence` (`exact_floats.fence_stored_values`), so neither TVM's
simplifier (measured: it folds x + 1.5 - 1.5 across inlined blocks into x) nor LLVM combines
it with its consumer, and the results are unchanged bit for bit.
"""

from __future__ import annotations

import warnings

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from .exact_floats import fence_stored_values
from .window_schedule import vectorize_rows

WINDOWS = ("qc_im2col", "pad_zp")  # stages that read each input element several times


def _spatial(sch, block) -> bool:
    return all(int(v.iter_type) == tirx.IterVar.DataPar for v in sch.get(block).iter_vars)


def _loads(sch, consumer, buffer) -> int:
    """How many times the body of `consumer` reads `buffer`."""
    found = []
    tvm_ffi.structural_walk(sch.get(consumer).body, (tvm.ir.expr.TensorLoad,
                                                      lambda load: found.append(load.source.same_as(buffer))))
    return sum(found)


def _stays(sch, block) -> bool:
    """The block stays a stage: a window stage or a consumer reading it more than once needs it."""
    buffer = sch.get(block).writes[0].source
    return any(sch.get(c).name_hint in WINDOWS or _loads(sch, c, buffer) > 1 for c in sch.get_consumers(block))


def schedule_injective(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """func scheduled as the module docstring says, or None if it is a single block or has a
    reduction."""
    sch = s_tir.Schedule(func)
    top = list(sch.get_child_blocks(sch.get_sblock("root")))
    if len(top) < 2 or not all(_spatial(sch, b) for b in top):
        return None
    sch = s_tir.Schedule(fence_stored_values(func))  # each inlined float value rounds as written
    top = list(sch.get_child_blocks(sch.get_sblock("root")))
    stages = [top[-1]]
    for block in top[:-1]:
        if _stays(sch, block):
            stages.append(block)
        else:
            sch.compute_inline(block)
    for block in stages:
        vectorize_rows(sch, block)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


@tvm.transform.module_pass(opt_level=0, name="qc.ScheduleInjective")
def ScheduleInjective(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named like TVM's)
    """Apply `schedule_injective` to every PrimFunc not already scheduled."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)):
            continue
        try:
            done = schedule_injective(func)
        except (tvm.TVMError, RuntimeError) as e:  # a block that cannot be inlined: correct as it is, only slower
            warnings.warn(f"{gv.name_hint}: elementwise kernel left unscheduled ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1:]})", stacklevel=2)
            continue
        if done is not None:
            updates[gv] = done
    for gv, func in updates.items():
        mod[gv] = func
    return mod
