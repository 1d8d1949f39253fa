"""Node-by-node verification of generated code against the IR's reference ops.

End to end, an ulp of difference in a float op (layer_norm, softmax, ...) can move a value
across a rounding boundary of the next `quantize`, and the one-step difference then travels
on. To check every lowering on the model's real data, `verify_nodes` rewrites the IR so that
every op reads its operands from new inputs instead of from the ops before it, feeds those
inputs with the reference values of the IR run in torch, compiles that graph once for the
target and compares every op's output with the reference: integer tensors must be equal,
float tensors within `rtol` relative to their largest magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from qcompiler.ir import op_name

from .targets import get_backend


@dataclass
class NodeCheck:
    node: str
    op: str
    dtype: str
    max_abs_diff: float
    max_rel_diff: float
    ok: bool


class _Record(torch.fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.values = getattr(self, "values", {})
        self.values[n] = out
        return out


def isolated_graph(ir: torch.fx.GraphModule, values: dict) -> tuple[torch.fx.GraphModule, list[torch.fx.Node], list[torch.fx.Node]]:
    """A graph computing every tensor op of `ir` from its own inputs (`values`: the reference
    value of every node; non-tensor values such as sizes are inlined as constants).

    Returns (graph module, original nodes feeding its inputs, original nodes of its outputs).
    """
    g = torch.fx.Graph()
    feeds: dict[torch.fx.Node, torch.fx.Node] = {}
    consts: dict[torch.fx.Node, torch.fx.Node] = {}
    outs, checked = [], []

    def operand(a):
        if not isinstance(a, torch.fx.Node):
            return a
        if a.op == "get_attr":
            if a not in consts:
                consts[a] = g.get_attr(a.target)
            return consts[a]
        if not isinstance(values.get(a), torch.Tensor):
            return values[a]
        if a not in feeds:
            feeds[a] = g.placeholder(f"in_{a.name}")
        return feeds[a]

    for n in ir.graph.nodes:
        if n.op != "call_function" or not isinstance(values.get(n), torch.Tensor):
            continue
        args = torch.fx.node.map_aggregate(n.args, operand)
        kwargs = torch.fx.node.map_aggregate(n.kwargs, operand)
        outs.append(g.call_function(n.target, args, kwargs))
        if "qc" in n.meta:  # per-layer widths: the lowering stores weights at their width
            outs[-1].meta["qc"] = dict(n.meta["qc"])
        checked.append(n)
    g.output(tuple(outs))
    return torch.fx.GraphModule(ir, g), list(feeds), checked


def verify_nodes(ir: torch.fx.GraphModule, inputs: tuple, target: str = "host", rtol: float = 1e-5) -> list[NodeCheck]:
    """Compile every op of `ir` in isolation for `target` and compare with the reference."""
    rec = _Record(ir)
    with torch.no_grad():
        rec.run(*inputs)
    gm, feeds, checked = isolated_graph(ir, rec.values)
    feed_values = tuple(rec.values[f] for f in feeds)
    backend = get_backend(target)
    backend.preflight()
    got = backend.runner(backend.build(gm, feed_values, target))(*feed_values)
    results = []
    for n, out in zip(checked, got):
        ref = rec.values[n]
        diff = (out.double() - ref.double()).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(ref.double().abs().max()) if ref.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else max_abs
        exact = not ref.dtype.is_floating_point
        ok = (max_abs == 0) if exact else (max_rel <= rtol)
        results.append(NodeCheck(n.name, op_name(n), str(ref.dtype).removeprefix("torch."), max_abs, max_rel, ok))
    return results
