"""Shared by the transforms that need data (smooth, rotate klt, gptq, mosf, tanq): run
calibration batches through the IR and hand chosen nodes' values to callbacks, and check
that a transform kept the float function.

`watch(gm, ctx, {node: fn})` runs `ctx.calib` (validated like `calibrate` does) through an
`fx.Interpreter`; activation fake-quants are bypassed, so statistics are those of the float
graph. `check_equivalent(before, after, ...)` runs both graphs on the first calibration
batch (or the example inputs) and raises `TransformError` with the max error and the first
node whose value differs when the outputs differ by more than `tol` (relative to the
outputs' largest magnitude).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from qcompiler.errors import CalibrationError, TransformError
from qcompiler.ir import example_inputs, op_name


def _calib_args(gm, ctx, what: str, batches: int = 0):
    from .calibrate import check_batch

    if ctx is None or ctx.calib is None:
        raise CalibrationError(
            f"{what} needs calibration batches: pass calib=[batch, ...] to qcompiler.compile or "
            "PassContext(calib=...); each batch is a tensor or tuple shaped like example_inputs")
    count = 0
    for i, batch in enumerate(ctx.calib):
        yield check_batch(batch, example_inputs(gm), i, gm.meta["qc"].get("dynamic_batch", True))
        count += 1
        if batches and count >= batches:
            return
    if count == 0:
        raise CalibrationError(f"{what}: the calibration data is empty: give at least one batch")


class _Watching(torch.fx.Interpreter):
    def __init__(self, gm, fns):
        super().__init__(gm)
        self.fns = fns

    def run_node(self, n):
        if op_name(n) == "qc.fake_quant" and n.meta.get("qc", {}).get("role", "").startswith("act"):
            out = self.env[n.args[0]]  # float statistics: activation quantizers bypassed
        else:
            out = super().run_node(n)
        fn = self.fns.get(n)
        if fn is not None:
            fn(out)
        return out


def watch(gm: torch.fx.GraphModule, ctx, fns: dict[torch.fx.Node, Callable], what: str, batches: int = 0) -> int:
    """Run the calibration batches, calling fns[node](value) for every watched node; returns
    the number of batches run."""
    interp, count = _Watching(gm, fns), 0
    with torch.no_grad():
        for args in _calib_args(gm, ctx, what, batches):
            interp.run(*args)
            count += 1
    return count


class _Stepping(torch.fx.Interpreter):
    """One calibration batch's interpreter, run a node at a time by `run_lockstep`;
    activation quantizers apply once observed (dynamic ones always)."""

    def run_node(self, n):
        qc_meta = n.meta.get("qc", {}) if op_name(n) == "qc.fake_quant" else {}
        if qc_meta.get("role") == "act" and not qc_meta.get("observed"):
            return self.env[n.args[0]]
        return super().run_node(n)


class _Float(torch.fx.Interpreter):
    """A calibration batch's interpreter with every quantizer bypassed (the float model)."""

    def run_node(self, n):
        if op_name(n) == "qc.fake_quant":
            return self.env[n.args[0]]
        return super().run_node(n)


def run_lockstep(gm: torch.fx.GraphModule, ctx, before: dict[torch.fx.Node, Callable], what: str,
                 batches: int = 0, float_twin: bool = False) -> int:
    """Run all calibration batches through the graph together, node by node; before a node
    in `before` runs, before[node](envs) sees every batch's values so far (one dict per
    batch) and may replace them, so later nodes see what earlier hooks changed (sequential
    layer-by-layer processing). With `float_twin`, a float copy of every batch (all
    quantizers bypassed) runs alongside and the hook is called as before[node](envs,
    float_envs). Values are dropped after their last use. Returns the number of batches."""
    kinds = (_Stepping, _Float) if float_twin else (_Stepping,)
    steppers = {kind: [] for kind in kinds}
    for args in _calib_args(gm, ctx, what, batches):
        for kind in kinds:
            st = kind(gm)
            st.args_iter = iter(args)
            steppers[kind].append(st)
    nodes = list(gm.graph.nodes)
    last_use = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    with torch.no_grad():
        for i, n in enumerate(nodes):
            if n in before:
                before[n](*[[st.env for st in steppers[kind]] for kind in kinds])
            for st in (st for kind in kinds for st in steppers[kind]):
                st.env[n] = st.run_node(n)
                for a in n.all_input_nodes:
                    if last_use[a] == i:
                        del st.env[a]
    return len(steppers[_Stepping])


def reference_args(gm, ctx) -> tuple:
    """The first calibration batch if there is one, else the example inputs."""
    if ctx is not None and ctx.calib is not None:
        for args in _calib_args(gm, ctx, "the float check"):
            return args
    return example_inputs(gm)


class _Record(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.values[n.name] = out
        return out


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def check_equivalent(before, after, args: tuple, tol: float, what: str, changed=()) -> float:
    """Raise TransformError unless `after` computes what `before` does on `args` (outputs
    within `tol` relative); `changed` names nodes whose values differ on purpose (a rotated
    stream), skipped when looking for the first differing node. Returns the relative error."""
    with torch.no_grad():
        ref, out = _flat(before(*args)), _flat(after(*args))
    err, scale = 0.0, 1e-12
    for r, o in zip(ref, out):
        if r.is_floating_point():
            err = max(err, float((o.double() - r.double()).abs().max()))
            scale = max(scale, float(r.double().abs().max()))
    rel = err / scale
    if rel <= tol:
        return rel
    rb, ra = _Record(before), _Record(after)
    with torch.no_grad():
        rb.run(*args)
        ra.run(*args)
    first = None
    for name, v in rb.values.items():
        w = ra.values.get(name)
        if name in changed or w is None or w.shape != v.shape:
            continue
        d = float((w.double() - v.double()).abs().max()) / max(float(v.double().abs().max()), 1e-12)
        if d > tol:
            first = name
            break
    e = TransformError(
        f"{what} changed the float function: max error {err:.3g} on the outputs ({rel:.3g} relative, "
        f"tolerance {tol:g}); first node whose value differs: {first or 'none found'}. The transform "
        "is wrong for this graph; please report it with `qcompiler opt` and a reproducer")
    e.node = first
    raise e
