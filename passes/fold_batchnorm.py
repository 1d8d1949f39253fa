"""`fold-batchnorm`: fold inference-mode batch normalization into the conv/linear before it.

    BN(conv(x, W, b)) = conv(x, W * a, (b - mu) * a + beta),   a = gamma / sqrt(var + eps)

with `a` applied per output channel. Folding before quantization lets the quantizer see the
weights the device will hold, and keeps conv -> ReLU chains integer after `convert`.
A BatchNorm is folded only when it normalizes the output channels of a conv2d (or of a linear
on 2-D input) whose weight is a constant read by that op alone and whose output feeds only
the BatchNorm; anything else stays as is (and is reported in the result).
"""

from __future__ import annotations

import torch
import torch.fx

from qcompiler.ir import add_constant, cleanup, get_attr_tensor, op_name
from qcompiler.pass_manager import Pass, PassResult, register


def _const(gm, n):
    if n is None:
        return None
    if isinstance(n, torch.fx.Node) and n.op == "get_attr":
        return get_attr_tensor(gm, n).detach()
    raise ValueError("not a constant")


@register("fold-batchnorm")
class FoldBatchNorm(Pass):
    """Fold inference-mode BatchNorm into the preceding conv2d or linear layer."""

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        folded, kept = [], []
        for bn in list(gm.graph.nodes):
            if op_name(bn) != "aten.batch_norm":
                continue
            reason = self._fold(gm, bn)
            (kept.append(f"{bn.name}: {reason}") if reason else folded.append(bn.name))
        cleanup(gm)
        return PassResult(bool(folded), f"folded {len(folded)} batch norms",
                          {"folded": folded, "kept": kept})

    def _fold(self, gm, bn) -> str | None:
        """Fold `bn` into its producer; returns why not, or None when folded."""
        x, gamma, beta, mean, var, training, _, eps = bn.args[:8]
        if training:
            return "batch norm in training mode"
        layer = x
        if op_name(layer) not in ("aten.conv2d", "aten.linear") or len(layer.users) != 1:
            return "input is not a conv2d/linear used only by this batch norm"
        if op_name(layer) == "aten.linear" and layer.meta.get("val") is not None and layer.meta["val"].dim() != 2:
            return "linear output is not 2-D (channels are not dim 1)"
        w_node = layer.args[1]
        if not isinstance(w_node, torch.fx.Node) or w_node.op != "get_attr" or len(w_node.users) != 1:
            return "weight is not a constant read only by this layer"
        try:
            w = _const(gm, w_node)
            b = _const(gm, layer.args[2] if len(layer.args) > 2 else None)
            g, bt, mu, v = (_const(gm, t) for t in (gamma, beta, mean, var))
        except ValueError:
            return "statistics or parameters are computed at run time"
        a = (g if g is not None else torch.ones_like(v)) / torch.sqrt(v + eps)
        w_new = w * a.reshape(-1, *([1] * (w.dim() - 1)))
        b_new = ((b if b is not None else torch.zeros_like(mu)) - mu) * a
        b_new = b_new + (bt if bt is not None else 0)
        wn = add_constant(gm, f"{layer.name}_folded_weight", w_new, layer)
        bnode = add_constant(gm, f"{layer.name}_folded_bias", b_new, layer)
        args = list(layer.args) + [None] * (3 - len(layer.args))
        args[1], args[2] = wn, bnode
        layer.args = tuple(args)
        bn.replace_all_uses_with(layer)
        gm.graph.erase_node(bn)
        return None
