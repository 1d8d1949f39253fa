"""`hawq`: per-layer weight widths from second-order sensitivity under a size, BOPs or latency
budget (HAWQ-V2, Dong et al. 2020; the integer-program form of HAWQ-V3, Yao et al. 2021).

For every weight-carrying layer l (linear, conv2d) and candidate width b:

    S[l, b] = tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2

where tr(H_l)/n_l is the average Hessian trace of the loss w.r.t. the layer's n_l weights,
estimated with Hutchinson's method on the calibration data (`hawq_trace`: the loss compares
the model's output with the float model's own output, so no labels are needed; by default one
Hessian-vector product per layer and sample, without cross terms; `estimator=joint` takes one
for all layers, L times cheaper but too noisy for models with many layers), and Q_b is
`fake-quant`'s weight quantizer at b bits (same granularity). The widths minimize sum S under
one budget, exactly (`hawq_alloc`: `scipy.optimize.milp`), on costs from `hawq_cost`:

    budget_kb       weights at b bits + float32 scales, KiB
    budget_bops     b x a_bits x MACs at the example shapes
    budget_latency  measured per (layer, b) on the target: host ms (timed), arm instructions
                    (counted under QEMU); cached beside the tuning database

The choice is written as `node.meta["qc"]["w_bits"]` on each layer (and `a_bits` = b with
`acts=true`, where layers reading the same tensor, which share one activation quantizer, get
one width); `fake-quant` honours them. Details go to `gm.meta["qc"]["hawq"]`: per layer the
trace estimate, its standard error, samples and how H v was computed, the sensitivities and
costs; the chosen bits, cost and size; and the Pareto frontier of (cost, sensitivity).

Run after `fold-batchnorm` (the folded weights are what gets quantized) and before
`fake-quant`: `fold-batchnorm,hawq(budget_kb=40),fake-quant(a=8),calibrate,convert`.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
import torch.fx

from qcompiler.errors import BudgetError, QuantSpecError
from qcompiler.pass_manager import Pass, PassResult, register
from qcompiler.spec import check_bits

from . import hawq_alloc, hawq_cost
from .hawq_trace import ModelHVP, hutchinson
from .stats import _calib_args

BUDGETS = ("budget_kb", "budget_bops", "budget_latency")


@register("hawq")
class Hawq(Pass):
    """HAWQ-V2 mixed precision: per-layer weight widths from Hessian-trace sensitivity, chosen
    by an integer program under one budget (budget_kb | budget_bops | budget_latency: ms on
    host, instructions on arm); writes w_bits (a_bits with acts=true) for fake-quant."""

    budget_kb: float = 0.0
    budget_bops: float = 0.0
    budget_latency: float = 0.0
    bits: tuple[int, ...] = (2, 4, 8)
    a_bits: int = 8
    acts: bool = False
    granularity: Literal["channel", "group"] = "channel"
    group: int = 128
    loss: Literal["auto", "kl", "mse"] = "auto"
    hvp: Literal["auto", "double-backward", "finite-difference"] = "auto"
    estimator: Literal["layer", "joint"] = "layer"
    tol: float = 0.2
    min_samples: int = 8
    max_samples: int = 100
    batches: int = 0
    seed: int = 0
    frontier: int = 16
    skip: tuple[str, ...] = ()
    target: str = ""

    def __post_init__(self):
        given = [b for b in BUDGETS if getattr(self, b) != 0]
        if not given:
            raise QuantSpecError("hawq needs a budget: give one of budget_kb=<KiB of weights>, "
                                 "budget_bops=<bit operations>, budget_latency=<ms on host | instructions on arm>")
        if len(given) > 1:
            raise QuantSpecError(f"hawq takes one budget, got {' and '.join(given)}: keep one of them")
        if getattr(self, given[0]) < 0:
            raise QuantSpecError(f"hawq {given[0]}={getattr(self, given[0])}: a budget must be positive")
        if not self.bits:
            raise QuantSpecError("hawq bits= is empty: give candidate widths, e.g. bits=2;4;8")
        for b in self.bits:
            check_bits(b, "hawq bits")
        if len(set(self.bits)) != len(self.bits):
            raise QuantSpecError(f"hawq bits={';'.join(map(str, self.bits))} repeats a width: give each once")
        check_bits(self.a_bits, "hawq a_bits")
        if self.tol <= 0 or self.min_samples < 2 or self.max_samples < self.min_samples:
            raise QuantSpecError(f"{self}: need tol > 0 and 2 <= min_samples <= max_samples")
        if self.frontier < 2 or (self.granularity == "group" and self.group <= 0):
            raise QuantSpecError(f"{self}: frontier must be >= 2 and a group size positive")

    @property
    def budget(self) -> tuple[str, float]:
        return next((b, getattr(self, b)) for b in BUDGETS if getattr(self, b))

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        done = [n.name for n in gm.graph.nodes if n.meta.get("qc", {}).get("quantized")]
        if done:
            raise QuantSpecError(f"hawq runs before fake-quant (it chooses the widths fake-quant uses); "
                                 f"{', '.join(done)} are quantized already")
        layers = hawq_cost.find_layers(gm, self.skip)
        if not layers:
            raise QuantSpecError("hawq found no linear or conv2d layer with a constant weight to give a width")
        group = self.group if self.granularity == "group" else 0
        target = self.target or getattr(ctx, "target", "host") or "host"
        kind, budget = self.budget
        cost, unit = self._costs(layers, group, target, kind)  # latency: fails early on other targets
        traces, method_note = self._traces(gm, ctx, layers)
        bits = sorted(self.bits)
        err = np.array([[hawq_cost.quant_error(l, b, group) for b in bits] for l in layers])
        # H is positive semidefinite (Gauss-Newton): a noisy estimate below zero counts as zero
        sens = np.array([[max(traces[l.name].mean, 0.0)] for l in layers]) * err
        units = self._units(layers)
        u_sens = np.array([sens[u].sum(0) for u in units])
        u_cost = np.array([cost[u].sum(0) for u in units])
        lowest = hawq_alloc.min_cost(u_cost)
        choice = hawq_alloc.solve(u_sens, u_cost, budget)
        if choice is None:
            raise BudgetError(f"hawq {kind}={budget:g} is infeasible: the smallest achievable is {lowest:.6g} {unit} "
                              f"(every layer at its cheapest width of {';'.join(map(str, bits))}); the largest useful "
                              f"one is {hawq_alloc.max_cost(u_cost):.6g}")
        chosen = {}
        for u, idx in zip(units, choice.index):
            for i in u:
                chosen[layers[i].name] = bits[idx]
        front = hawq_alloc.frontier(u_sens, u_cost, self.frontier)
        size = [[hawq_cost.size_bytes(l, b, group) / 1024 for b in bits] for l in layers]
        info = self._annotate(layers, bits, chosen, traces, sens, cost, size)
        size_kb = sum(size[i][bits.index(chosen[l.name])] for i, l in enumerate(layers))
        record = {
            "budget": {"kind": kind, "value": budget, "unit": unit, "smallest": lowest, "target": target},
            "bits": chosen, "cost": choice.cost, "sensitivity": choice.sensitivity, "size_kb": size_kb,
            "layers": info, "candidates": bits, "hvp": method_note,
            "frontier": [{"cost": c.cost, "sensitivity": c.sensitivity,
                          "bits": {layers[i].name: bits[idx] for u, idx in zip(units, c.index) for i in u}}
                         for c in front],
        }
        gm.meta.setdefault("qc", {})["hawq"] = record
        counts = {b: list(chosen.values()).count(b) for b in bits}
        mix = ", ".join(f"{n} x {b}-bit" for b, n in counts.items() if n)
        return PassResult(True, f"{len(layers)} layers: {mix}; {kind} {choice.cost:.6g} of {budget:g} {unit}, "
                                f"{size_kb:.2f} KiB of weights; frontier of {len(front)} points", record)

    def _costs(self, layers, group, target, kind):
        if kind == "budget_kb":
            return np.array([[hawq_cost.size_bytes(l, b, group) / 1024 for b in sorted(self.bits)] for l in layers]), "KiB"
        if kind == "budget_bops":
            return np.array([[hawq_cost.bops(l, b, self._a(b)) for b in sorted(self.bits)] for l in layers]), "BOPs"
        from qcompiler.backends.layer_costs import unit

        unit(target)  # a target without measured latencies fails before the Hessian work
        table = [[0.0] * len(self.bits) for _ in layers]
        for bi, b in enumerate(sorted(self.bits)):  # a_bits per width: measured per (layer, b)
            col, u = hawq_cost.latency_table(layers, (b,), self._a(b), group, target)
            for li, row in enumerate(col):
                table[li][bi] = row[0]
        return np.array(table), u

    def _a(self, b: int) -> int:
        return b if self.acts else self.a_bits

    def _traces(self, gm, ctx, layers):
        batches = list(_calib_args(gm, ctx, str(self), self.batches))
        out = hawq_trace_output(gm, batches[0])
        loss = self.loss if self.loss != "auto" else ("kl" if out.dim() >= 2 and out.shape[-1] > 1 else "mse")
        targets = [l.node.args[1].target for l in layers]
        hvp = ModelHVP(gm, targets, batches, loss, self.hvp)
        est = hutchinson(hvp, hvp.weights, self.tol, self.min_samples, self.max_samples, self.seed,
                         per_layer=self.estimator == "layer")
        method = hvp.method  # the method that produced the samples (a fallback switches before the first)
        for e in est.values():
            e.method = method
        note = f"{method} ({loss} loss to the float outputs)"
        if hvp.fallback_reason:
            note += f"; double backward unavailable: {hvp.fallback_reason}"
            warnings.warn(f"hawq: double backward is not available for this model ({hvp.fallback_reason}); "
                          "Hessian-vector products from finite differences of gradients for every layer",
                          stacklevel=2)
        by_name = {l.name: est[t] for l, t in zip(layers, targets)}
        slow = [f"{n} ({e.relative_error:.0%})" for n, e in by_name.items() if not e.converged]
        if slow:
            warnings.warn(f"hawq: the Hessian trace estimate did not reach tol={self.tol:g} (relative standard error) "
                          f"in max_samples={self.max_samples} for {', '.join(slow)}; using the mean of those "
                          f"{self.max_samples} samples (raise max_samples or tol to change this)", stacklevel=2)
        return by_name, note

    def _units(self, layers) -> list[list[int]]:
        """Layers that get one width together: with acts=true, those reading the same tensor
        (one shared activation quantizer); else each layer alone."""
        if not self.acts:
            return [[i] for i in range(len(layers))]
        by_input: dict = {}
        for i, l in enumerate(layers):
            by_input.setdefault(l.node.args[0], []).append(i)
        return list(by_input.values())

    def _annotate(self, layers, bits, chosen, traces, sens, cost, size) -> dict:
        info = {}
        for i, l in enumerate(layers):
            t = traces[l.name]
            ann = l.node.meta.setdefault("qc", {})
            ann["w_bits"] = chosen[l.name]
            if self.acts:
                ann["a_bits"] = chosen[l.name]
            info[l.name] = {
                "kind": l.kind, "params": l.weight.numel(), "trace": t.mean, "std_error": t.std_error,
                "samples": t.samples, "converged": t.converged, "method": t.method,
                "sensitivity": dict(zip(bits, map(float, sens[i]))), "cost": dict(zip(bits, map(float, cost[i]))),
                "size_kb": dict(zip(bits, size[i])), "bits": chosen[l.name],
            }
            ann["hawq"] = {k: info[l.name][k] for k in ("trace", "std_error", "samples", "converged", "method")}
        return info


def hawq_trace_output(gm, batch) -> torch.Tensor:
    from .hawq_trace import _first_output

    with torch.no_grad():
        return _first_output(gm(*batch))
