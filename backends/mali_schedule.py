"""GPU schedules for every kernel of the `mali` target: dlight's GPU rules, made robust.

`mali_pipeline(target)` is TVM's generic GPU Relax pipeline (library dispatch, legalize,
FuseOps/FuseTIR, dataflow lowering, StaticPlanBlockMemory, ...) with its
`dlight.ApplyDefaultSchedule` replaced by `ScheduleForGPU`, which for each fused PrimFunc:

 1. normalizes it: a reduction that `kernels_int.split_blocks` split into (block, lane, byte)
    loops for the CPU (so LLVM vectorizes the packed bytes) binds its reduction axis to
    k0*L*S + k1*S + k2, which dlight's Matmul rule cannot re-layout; the consecutive loops
    that feed a block's only reduction axis are fused back into one loop (the block's body,
    and so the int4 unpacking `(w >> 4*lane) & 15` read from the packed bytes, is unchanged);
 2. applies the first of dlight's GPU rules Matmul, GEMV, Reduction, GeneralReduction,
    Fallback that schedules it; a rule that raises is skipped like one that declines (dlight's
    own pass stops the whole build there), and so is a schedule that pads the reduction axis
    (Matmul pads K to its tile with zero operands: wrong for (x - zx) * w and for packed int4
    weights, where a zero byte means -8; `_reduce_extent`); Reduction and GeneralReduction
    spread one output over a work-group, which for fewer than 64 terms (a 3x3 conv over one
    channel) costs more than it saves: there Fallback is preferred when it applies;
 3. marks it `tirx.is_scheduled` and records the rule in `qc.gpu_rule`.

Before the dlight rules, an int8 linear kernel tries `mali_dot.schedule_dot4` (4-lane dot
products, `cl_arm_integer_dot_product_int8` where the device has it; rule "ArmDot4").

Work-groups stay within the target's `max_num_threads` (Mali: 256): most rules size their
thread blocks by it; a schedule with larger groups (dlight's Matmul uses 8x8 or 16x16 tiles
whatever the limit) is refused and the next rule takes the kernel. A kernel
that arrives already scheduled (`tirx.is_scheduled`) must bind GPU threads: a CPU schedule
(e.g. the weight-only kernel's vectorized rfactor) is rejected with its name.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from qcompiler.errors import LoweringError

RULE_ATTR = "qc.gpu_rule"
SHORT_REDUCTION = 64  # reductions shorter than this: one work-item per output (Fallback) if possible


def rules():
    from tvm.s_tir import dlight as dl

    return [("Matmul", dl.gpu.Matmul()), ("GEMV", dl.gpu.GEMV()), ("Reduction", dl.gpu.Reduction()),
            ("GeneralReduction", dl.gpu.GeneralReduction()), ("Fallback", dl.gpu.Fallback())]


def normalize(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Fuse the consecutive innermost loops that together bind a block's single reduction axis."""
    sch = s_tir.Schedule(func)
    changed = False
    for block in _blocks(sch):
        iters = sch.get(block).iter_vars
        reduce = [i for i, v in enumerate(iters) if v.iter_type == tirx.IterVar.CommReduce]
        loops = sch.get_loops(block)
        if len(reduce) != 1 or len(loops) < 2:
            continue
        realize = _realize(sch, block)
        if realize is None:
            continue
        expr = realize.iter_values[reduce[0]]
        used = [lp for lp in loops if _uses(expr, sch.get(lp).loop_var)]
        if len(used) < 2 or not all(sch.get(a).loop_var.same_as(sch.get(b).loop_var)
                                    for a, b in zip(loops[-len(used):], used)):
            continue  # only loops that are innermost and all feed the reduction axis
        sch.fuse(*used)
        changed = True
    return sch.mod["main"] if changed else func


def _blocks(sch):
    out = []

    def visit(block):
        for child in sch.get_child_blocks(block):
            out.append(child)
            visit(child)

    visit(sch.get_sblock("root"))
    return out


def _realize(sch, block):
    parent = sch.get(sch.get_loops(block)[-1]).body
    return parent if isinstance(parent, s_tir.SBlockRealize) else None


def _threads(func: tirx.PrimFunc) -> int:
    """The largest work-group of `func`: per block, the product of its threadIdx loop extents."""
    sch = s_tir.Schedule(func)
    most = 1
    for block in _blocks(sch):
        extents = {}
        for loop in sch.get_loops(block):
            f = sch.get(loop)
            tag = f.thread_binding.thread_tag if f.thread_binding is not None else ""
            if tag.startswith("threadIdx") and isinstance(f.extent, tirx.IntImm):
                extents[tag] = int(f.extent)
        n = 1
        for e in extents.values():
            n *= e
        most = max(most, n)
    return most


def _lowering_error(func: tirx.PrimFunc, target) -> str | None:
    """Why TVM's TIR pipeline rejects the scheduled `func` (e.g. a cross-thread reduction whose
    combiner it cannot match), or None if it lowers."""
    pipeline = tvm.tirx.get_default_tir_pipeline(target)[0]
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    try:
        pipeline(tvm.tirx.transform.BindTarget(target.with_host(target.host or target))(mod))
    except Exception as e:  # noqa: BLE001 - reported by the caller when no rule lowers
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    return None


def _reduce_extent(func: tirx.PrimFunc) -> int:
    """The largest reduction (product of a block's reduction extents) in `func`. dlight's
    Matmul rule pads the reduction axis to its tile with zero operands, which is exact only
    when the product of zeros is zero; the integer kernels compute (x - zx) * w and, for
    packed weights, ((byte >> s) & 15) - 8: a zero byte is the weight -8. A schedule whose
    reduction is longer than the kernel's is therefore refused (the next rule takes it)."""
    sch = s_tir.Schedule(func)
    best = 0
    for block in _blocks(sch):
        n = 1
        for v in sch.get(block).iter_vars:
            if v.iter_type == tirx.IterVar.CommReduce:
                n *= int(v.dom.extent) if isinstance(v.dom.extent, tirx.IntImm) else 1
        best = max(best, n)
    return best


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr, []))


def schedule(func: tirx.PrimFunc, target: tvm.target.Target, name: str) -> tirx.PrimFunc:
    """`func` scheduled by the first dlight GPU rule that takes it."""
    errors, deferred = [], None
    for candidate in (func, normalize(func)):
        for rule_name, rule in rules():
            try:
                space = rule.apply(candidate, target, False)
            except Exception as e:  # noqa: BLE001 - a rule that cannot handle the kernel
                errors.append(f"{rule_name}: {type(e).__name__}: {str(e).splitlines()[-1][:200]}")
                continue
            if space is None:
                continue
            sch = space[0] if isinstance(space, list) else space
            if _reduce_extent(sch.mod["main"]) > _reduce_extent(candidate):
                errors.append(f"{rule_name}: pads the reduction axis")  # see `_reduce_extent`
                continue
            threads, limit = _threads(sch.mod["main"]), int(target.attrs["max_num_threads"])
            if threads > limit:
                errors.append(f"{rule_name}: {threads} work-items per group, over the limit of {limit}")
                continue
            why = _lowering_error(sch.mod["main"], target)
            if why:
                errors.append(f"{rule_name}: {why}")
                continue
            done = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(RULE_ATTR, rule_name)
            if rule_name in ("Reduction", "GeneralReduction") and _reduce_extent(candidate) < SHORT_REDUCTION:
                deferred = deferred or done  # a work-group per output for a few terms: Fallback if it can
                continue
            return done
    if deferred is not None:
        return deferred
    raise LoweringError(f"kernel {name}: no GPU schedule applies (dlight's Matmul, GEMV, Reduction, "
                        f"GeneralReduction, Fallback): {'; '.join(errors) or 'every rule declined'}. The mali "
                        "target supports the integer recipes (w8a8, w4a8, ...); weight-only ones (w4, w4g128) "
                        "are not scheduled for GPUs yet")


@tvm.transform.module_pass(opt_level=0, name="qc.ScheduleForGPU")
class ScheduleForGPU:
    """Schedule every unscheduled PrimFunc with dlight's GPU rules (see the module docstring);
    with `dot`, int8 linear kernels first try the 4-lane dot-product schedule (`mali_dot`)."""

    def __init__(self, dot: bool = True):
        self.dot = dot

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=False)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
                if "threadIdx" not in str(func) and "blockIdx" not in str(func):
                    raise LoweringError(f"kernel {gv.name_hint} carries a CPU schedule (no GPU thread bindings); "
                                        "the mali target supports the integer recipes (w8a8, w4a8, ...), not the "
                                        "weight-only kernels scheduled at conversion")
                continue
            if self.dot:
                from .mali_dot import RULE, schedule_dot4

                done = schedule_dot4(func, target)
                if done is not None and _lowering_error(done, target) is None:
                    updates[gv] = done.with_attr("tirx.is_scheduled", True).with_attr(RULE_ATTR, RULE)
                    continue
            updates[gv] = schedule(func, target, gv.name_hint)
        for gv, func in updates.items():
            mod[gv] = func
        return mod


def mali_pipeline(target: tvm.target.Target, dot: bool = True) -> tvm.transform.Pass:
    """TVM's generic GPU pipeline with `ScheduleForGPU(dot)` in place of dlight's ApplyDefaultSchedule."""
    from tvm.relax.backend.gpu_generic import pipeline as stages

    legalize = [p for p in stages.legalize_passes(target) if p.info.name != "ApplyDefaultSchedule"]
    passes = (stages.library_dispatch_passes(target) + legalize + [ScheduleForGPU(dot)]
              + stages.dataflow_lower_passes(target) + stages.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0, name="qc.MaliPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def gpu_rules(mod: tvm.IRModule) -> dict[str, str]:
    """PrimFunc name -> the rule that scheduled it ("MetaSchedule" for a database schedule)."""
    return {gv.name_hint: str(f.attrs[RULE_ATTR]) if f.attrs is not None and RULE_ATTR in f.attrs else "MetaSchedule"
            for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
