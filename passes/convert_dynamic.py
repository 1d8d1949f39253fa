"""`convert` for linears whose input quantizer computes its scale at run time, per token.

A symmetric per-row quantizer (`dynamic_quant`, role "act_dynamic", reducing over the last
dim; `token_bits` gives the rows different widths through their scales) in front of a linear
with per-channel weights becomes integer compute with a float epilogue:

    linear(F(x), Fw(W), b)  ->  dequantize(linear_int(quantize(x, s, 0), 0, Wq, None), s * sw, 0) + b

with s [..., T, 1] the run-time row scales (the quantizer's own ATen nodes), Wq int8 and sw
[N] the weight's per-channel scales: acc[..., t, n] = sum_k q[..., t, k] Wq[n, k] exactly in
int32, y = acc * (s[t] sw[n]) + b in float32. Rows quantized at fewer bits are int8 values in
a narrower range, so one kernel serves every width. The bias stays float (its integer form
would need the run-time scale). Asymmetric per-token quantizers (a zero point per row) and
group-wise weights keep their float simulation.
"""

from __future__ import annotations

import torch
import torch.fx

from qcompiler.ir import add_constant, get_attr_tensor, op_name

Q = torch.ops.qc
A = torch.ops.aten


def is_token_quantizer(n) -> bool:
    """A symmetric per-row run-time quantizer (zero point 0, one scale per row)."""
    if not (isinstance(n, torch.fx.Node) and op_name(n) == "qc.fake_quant"):
        return False
    m = n.meta.get("qc", {})
    return (m.get("role") == "act_dynamic" and m.get("symmetric") and m.get("dims") == [-1]
            and not n.args[5])


def convert_token_linear(gm: torch.fx.GraphModule, node: torch.fx.Node, meta: dict, int_weight) -> bool:
    """Rewrite one linear as above; False (left alone) unless its input is a token quantizer
    and its weight a per-channel fake-quant. `int_weight` is convert's `_int_weight`."""
    fq = node.args[0]
    w_fq = node.args[1]
    if not (is_token_quantizer(fq) and op_name(w_fq) == "qc.fake_quant" and not w_fq.args[5]):
        return False
    x, s, z, qmin, qmax, _ = fq.args
    wq_node, ws_node, _ = int_weight(gm, node)
    sw = add_constant(gm, f"{node.name}_w_scale_row", get_attr_tensor(gm, ws_node).detach().flatten().clone(), node)
    zero = add_constant(gm, f"{node.name}_acc_zp", torch.tensor(0.0), node)
    bias = node.args[2] if len(node.args) > 2 else None
    g = gm.graph
    q_args = (x, s, z, qmin, qmax, 0)
    shared = [u for u in x.users if u.target == Q.quantize.default and u.args == q_args]  # q/k/v share one
    with g.inserting_before(node):
        q = shared[0] if shared else g.call_function(Q.quantize.default, q_args)
        acc = g.call_function(Q.linear_int.default, (q, 0, wq_node, None))
        scale = g.call_function(A.mul.Tensor, (s, sw))  # [..., T, 1] * [N]: s_x[t] * s_w[n]
        out = g.call_function(Q.dequantize.default, (acc, scale, zero, 0))
        if bias is not None:
            out = g.call_function(A.add.Tensor, (out, bias))
    q.meta["qc"] = dict(fq.meta["qc"])
    acc.meta["qc"] = {**meta, "source": node.name, "axis": -1, "a_scale": "token"}
    out.meta["qc"] = {"source": node.name, "compare": node.name}
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return True
