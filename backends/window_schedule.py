"""Schedule of the depthwise convolution kernels (`kernels_int.depthwise_int`) after fusion.

The depthwise kernel runs in NHWC (channels innermost), between Relax permutes from and back
to the graph's NCHW. FuseOps puts it into one PrimFunc with the quantize before it and the
requantize after it and, in a MobileNet/EfficientNet block, with the layouts of the dot-kernel
convolutions around it: the expand conv's output rows [B*H*W, C] before (its permute to NCHW and
the depthwise's permute to NHWC compose to a plain read) and the project conv's im2col rows
after. Compiled as written, every block is a full-size loop over a materialized buffer; left
to a default schedule that inlines every elementwise block, the quantize (a divide and a
rounding per element) would be inlined into the window reads and computed KH*KW times per
input element (a 3x3 depthwise conv of 672 channels at 14x14 took 17 ms instead of under
1 ms). `ScheduleDepthwise`:

- inlines the prologue (the quantize chain) into the padding stage, which reads each input
  element once (without padding, into the chain's last block: one stage, materialized once);
- inlines the conv (its KH*KW terms written out, no reduction) and the epilogue into the
  last block, so each output is computed, requantized and stored in one pass; when that block
  writes NCHW (a float output, another kernel's input), the conv stays an NHWC stage of its own
  (each tap a whole vector of channels), and the epilogue reads it transposed;
- vectorizes the innermost loops (the channels in NHWC stages and rows; the columns of an
  NCHW output), in the widest chunk of 16, 8 or 4 that divides them, or with the next loop
  fused when none does (a row of 14 left to LLVM ran 20x slower than vectorized);
- marks the function `tirx.is_scheduled`.

The arithmetic is unchanged (inlining moves where a value is computed, not how), so the
kernel equals the IR bit for bit.
"""

from __future__ import annotations

import warnings

import tvm
from tvm import s_tir, tirx

CONV, PAD = "depthwise_int", "pad_zp"


def _width(loop_extent) -> int:
    return next((w for w in (16, 8, 4) if isinstance(loop_extent, tirx.IntImm) and int(loop_extent) % w == 0), 0)


def vectorize_rows(sch, block) -> None:
    """The innermost loop of `block` (contiguous in memory: channels, or an NCHW row) vectorized
    in the widest chunk of 16, 8 or 4 lanes that divides it; else the two innermost loops fused
    and vectorized so (rows of 14 or 7: the lanes then span rows); else left scalar."""
    loops = sch.get_loops(block)
    width = _width(sch.get(loops[-1]).extent)
    if width:
        sch.vectorize(sch.split(loops[-1], [None, width])[-1])
        return
    if len(loops) >= 2:
        fused = sch.fuse(*loops[-2:])
        width = _width(sch.get(fused).extent)
        if width:
            sch.vectorize(sch.split(fused, [None, width])[-1])


def schedule_depthwise(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """func scheduled as the module docstring says, or None if it holds no depthwise conv."""
    sch = s_tir.Schedule(func)
    top = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in top]
    if CONV not in names:
        return None
    at = names.index(CONV)
    first = names.index(PAD) if PAD in names[:at] else at - 1  # the stage the conv reads
    for b in top[:max(first, 0)]:  # the quantize chain, computed once per input element in that stage
        sch.compute_inline(b)
    conv_shape = [int(d) for d in sch.get(top[at]).writes[0].source.shape]  # [B, OH, OW, C]
    out_shape = [int(d) for d in sch.get(top[-1]).writes[0].source.shape]
    channels_last = out_shape[-1] == conv_shape[-1] and out_shape != [conv_shape[i] for i in (0, 3, 1, 2)]
    for b in top[at if channels_last else at + 1:-1]:  # the conv and its epilogue, into the output block
        sch.compute_inline(b)  # (an NCHW output: the conv stays a stage, so its taps read whole channel vectors)
    stages = [names[first]] if first >= 0 else []
    for name in dict.fromkeys(stages + ([] if channels_last else [CONV]) + [names[-1]]):
        vectorize_rows(sch, sch.get_sblock(name))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


@tvm.transform.module_pass(opt_level=0, name="qc.ScheduleDepthwise")
def ScheduleDepthwise(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (a pass, named like TVM's)
    """Apply `schedule_depthwise` to every PrimFunc not already scheduled."""
    updates = {}
    for gv, func in mod.functions.items():
        scheduled = func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)
        if isinstance(func, tirx.PrimFunc) and not scheduled:
            try:
                done = schedule_depthwise(func)
            except (tvm.TVMError, RuntimeError) as e:  # an unexpected block structure: correct as it is, only slower
                warnings.warn(f"{gv.name_hint}: depthwise conv left unscheduled ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1:]})", stacklevel=2)
                done = None
            if done is not None:
                updates[gv] = done
    for gv, func in updates.items():
        mod[gv] = func
    return mod
