"""Learned clip ratios of run-time quantizers (`qat(lr_clip=..)`).

A run-time quantizer (`dynamic_quant`: activations per token, the KV cache) takes its scale
from the tensor it quantizes, so LSQ has no step size to learn there; what it has is its clip
ratio c, the fraction of the extremes its range keeps (`calibrate(token_clip=true)` searches
c on a grid, layer by layer). QAT can learn c end to end instead: while training, c is a
trained scalar of the IR, entering the scale as

    symmetric:   s = max|x| * c / qmax         (the IR's constant form: max|x| / (qmax / c))
    asymmetric:  lo = min(min x, 0) * c,  hi = max(max x, 0) * c,  then s and z from them

so the LSQ gradient of s (`qat_fq`: round(x/s) - x/s inside the grid, the grid's end outside
it) reaches c. Each c is kept in [CLIP_MIN, 1] after every step. When training ends the graph
returns to the constant form `calibrate` writes, holding the learned c (also recorded as the
quantizer's meta "clip"), which is what `convert` and the backends read. The two forms of the
symmetric scale round differently in the last bit of s, so the deployed model can differ from
the last training step's by a code where x/s lands on a rounding boundary.
"""

from __future__ import annotations

import torch
import torch.fx

from qcompiler.ir import op_name

from .calibrate import ClipSearch, set_clip_ratio

A = torch.ops.aten
CLIP_MIN = 0.05  # the smallest clip ratio training may reach


class ClipRatios:
    """Makes every clippable run-time quantizer's clip ratio a trained parameter of `gm`
    (see the module docstring); `restore()` writes the learned ratios back as constants."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.params: dict[str, torch.nn.Parameter] = {}  # attribute name -> c
        self._edits: list[tuple] = []  # (fq, attribute, get_attr node, symmetric, nodes to rewrite)
        for fq in [n for n in gm.graph.nodes if ClipSearch.applies(n, kv=True)]:
            self._learn(fq)
        gm.recompile()

    def _learn(self, fq: torch.fx.Node) -> None:
        g = self.gm.graph
        div = fq.args[1].args[0]  # s = clamp_min(div(amax | hi - lo, qmax / c | qmax - qmin), 1e-8)
        symmetric = bool(fq.meta["qc"].get("symmetric"))
        c0 = float(fq.args[4]) / div.args[1] if symmetric else float(fq.meta["qc"].get("clip", 1.0))
        name = f"{fq.name}_clip_ratio"
        param = torch.nn.Parameter(torch.tensor(min(max(c0, CLIP_MIN), 1.0)))
        self.gm.register_parameter(name, param)
        self.params[name] = param
        with g.inserting_before(next(n for n in g.nodes if n.op != "placeholder")):
            c = g.get_attr(name)  # ahead of every use (an asymmetric quantizer's bounds come before div)
        if symmetric:
            with g.inserting_before(div):
                m = g.call_function(A.mul.Tensor, (div.args[0], c))
            div.update_arg(0, m)
            div.update_arg(1, float(fq.args[4]))
            self._edits.append((fq, name, c, True, (div, m)))
            return
        muls = []
        for bound in div.args[0].args[:2]:  # rng = sub(hi, lo); each bound mul(.., c) or not yet clipped
            if op_name(bound) == "aten.mul.Tensor" and isinstance(bound.args[1], float):
                bound.update_arg(1, c)
                muls.append(bound)
                continue
            with g.inserting_after(bound):
                m = g.call_function(A.mul.Tensor, (bound, c))
            if "val" in bound.meta:
                m.meta["val"] = bound.meta["val"]
            bound.replace_all_uses_with(m, delete_user_cb=lambda u, m=m: u is not m)
            muls.append(m)
        self._edits.append((fq, name, c, False, tuple(muls)))

    def group(self, lr: float) -> list[dict]:
        """The optimizer parameter group of the clip ratios (none if there are none)."""
        return [{"params": list(self.params.values()), "lr": lr, "name": "clip_ratios"}] if self.params else []

    @torch.no_grad()
    def after_step(self) -> None:
        for p in self.params.values():
            p.clamp_(CLIP_MIN, 1.0)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.params.items()}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            p.copy_(tensors[name])

    def ratios(self) -> dict[str, float]:
        """The learned clip ratio of each quantizer, by the quantizer's node name."""
        return {fq.name: float(self.params[name].detach()) for fq, name, *_ in self._edits}

    def restore(self) -> dict[str, float]:
        """The constant form back, holding the learned ratios; returns them by quantizer."""
        learned = self.ratios()
        g = self.gm.graph
        for fq, name, c_node, symmetric, nodes in self._edits:
            c = learned[fq.name]
            if symmetric:  # max|x| back in div's first place, then its constant qmax / c
                div, m = nodes
                div.update_arg(0, m.args[0])
                g.erase_node(m)
            else:  # the extremes' multipliers back to constants, then set to c
                for m in nodes:
                    m.update_arg(1, 1.0)
            set_clip_ratio(fq, c)
            g.erase_node(c_node)
            delattr(self.gm, name)
        self.gm.recompile()
        self._edits, self.params = [], {}
        return learned
