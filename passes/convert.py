"""`convert`: turn the calibrated fake-quant graph into integer ops.

1. Every quantized compute op becomes an integer op on int8 operands:
     linear(F(x), Fw(W), b)  ->  dequantize(linear_int(quantize(F(x)), zx, Wq, bq), sx*sw)
   with Wq = quantize(W) stored as int8 and bq = round(b / (sx*sw)) as int32 (conv2d and
   matmul alike; group-wise weights use `linear_int_grouped`, which returns float). The
   integer op keeps the layer's widths in node.meta["qc"] (`w_bits`, `a_bits`, `group_size`,
   `source`): the backend stores the weights at that width (4 and 2 bits packed).
   Weight-only layers (fake-quant(weight_only=true)) keep float activations:
     linear(x, Fw(W), b)  ->  linear_weight_only(x, Wq, sw, g, b)
2. Every activation fake-quant F(x) becomes dequantize(quantize(x)) (the same function).
3. Local rules, applied to a fixed point, make the graph integer-only between layers:
     fold-qdq:     quantize(dequantize(q, s, z), s, z)                    -> q
     requantize:   quantize(dequantize(acc, sa), so, zo)                  -> requantize(acc, M, sh, zo)
     clamp:        quantize(relu(dequantize(acc, sa)), so, zo)            -> requantize(..., qmin=zo)
                   (likewise hardtanh, relu6 and clamp: their bounds, quantized, narrow the clamp)
     hoist:        quantize(L(x))                                         -> L(quantize(x))
   (L a layout op: flatten, reshape, view, permute, transpose, (un)squeeze; or max-pooling,
   since quantization is monotonic)
   where M * 2^-sh ~= sa / so per channel (`qcompiler.ops.dyadic`).
Ops that were not quantized stay float. Linears behind a symmetric per-token run-time
quantizer (`fake-quant(a_granularity=token)`, `token-bits`) become quantize -> linear_int ->
dequantize with the run-time row scales (`convert_dynamic`).

Bias fit (`fit_bias_scales`, run by `calibrate` once the input scales sx are known, and again
here): a near-dead output channel (say a folded BatchNorm with gamma ~ 0) has a tiny max-abs
weight scale sw, and bq = b / (sx*sw) can exceed int32. Such a channel's weight scale is
raised to sw' = |b| / (sx * 2^30), so |bq| <= 2^30 (up to float32 rounding of sx*sw') and
the dot products keep the other 2^30 of int32 (int8 x int8 sums of up to ~33k terms). Its
weights are re-rounded on the coarser grid, mostly to 0: they were tiny next to the bias.
The raised scale is the weight fake-quant's own constant, so the fake-quant graph and the
integer graph compute the same thing; the layers and channels are warned about and reported
in the pass details (`bias_fit`).
"""

from __future__ import annotations

import warnings

import torch
import torch.fx

from qcompiler.errors import QuantSpecError
from qcompiler.ir import add_constant, cleanup, get_attr_tensor, op_name
from qcompiler.ops import dyadic
from qcompiler.pass_manager import Pass, PassResult, register

from .convert_dynamic import convert_token_linear, is_token_quantizer

Q = torch.ops.qc
_INT_ACC = {"qc.linear_int", "qc.conv2d_int", "qc.matmul_int"}
_LAYOUT = {"aten.flatten.using_ints", "aten.reshape", "aten.view", "aten.permute", "aten.transpose.int",
           "aten.unsqueeze", "aten.squeeze.dim", "aten.contiguous"}
# ops that commute with a per-tensor quantizer: layout ops, and max-pooling (q is monotonic)
_COMMUTING = _LAYOUT | {"aten.max_pool2d"}


def _err(node, msg) -> QuantSpecError:
    e = QuantSpecError(f"convert: node {node.name}: {msg}")
    e.node = node.name
    return e


def _is_act_fq(n) -> bool:
    return isinstance(n, torch.fx.Node) and op_name(n) == "qc.fake_quant" and n.meta.get("qc", {}).get("role") == "act"


@register("convert")
class Convert(Pass):
    """Replace fake-quant compute ops by integer ops (int8 operands, int32 accumulation,
    dyadic requantization between quantized layers); weights stored as int8."""

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        for n in gm.graph.nodes:
            if _is_act_fq(n) and not n.meta["qc"].get("observed"):
                raise _err(n, "activation quantizer has no range yet: run calibrate before convert")
        fitted = fit_bias_scales(gm)  # normally done by calibrate already; weights may have moved since
        converted = [n.name for n in list(gm.graph.nodes) if n.meta.get("qc", {}).get("quantized") and self._compute(gm, n)]
        for n in list(gm.graph.nodes):
            if _is_act_fq(n):
                self._split_fq(gm, n)
        rewrites = _apply_rules(gm)
        cleanup(gm)
        details = {"nodes": converted, **({"bias_fit": fitted} if fitted else {})}
        return PassResult(bool(converted), f"{len(converted)} integer ops, {rewrites} rewrites", details)

    # -- step 1
    def _compute(self, gm, node) -> bool:
        kind = node.meta["qc"]["kind"]
        if node.meta["qc"].get("weight_only"):
            return self._weight_only(gm, node)
        acts = [node.args[0], node.args[1]] if kind == "matmul" else [node.args[0]]
        if kind == "linear" and is_token_quantizer(acts[0]):  # run-time per-token scales
            meta = {k: v for k, v in node.meta["qc"].items() if k != "quantized"}
            return convert_token_linear(gm, node, meta, _int_weight)
        if not all(_is_act_fq(a) for a in acts):
            return False
        with gm.graph.inserting_before(node):
            qs = [gm.graph.call_function(Q.quantize.default, (a, *a.args[1:])) for a in acts]
        zs = [int(get_attr_tensor(gm, a.args[2])) for a in acts]
        ss = [float(get_attr_tensor(gm, a.args[1])) for a in acts]
        meta = {k: v for k, v in node.meta["qc"].items() if k != "quantized"}
        meta["source"] = node.name
        if kind == "matmul":
            with gm.graph.inserting_before(node):
                acc = gm.graph.call_function(Q.matmul_int.default, (qs[0], zs[0], qs[1], zs[1]))
            self._float_out(gm, node, acc, torch.tensor(ss[0] * ss[1], dtype=torch.float32), meta, axis=-1)
            return True
        wq_node, ws_node, group = _int_weight(gm, node)
        s_w = get_attr_tensor(gm, ws_node)
        bias_node = node.args[2] if len(node.args) > 2 else None
        bias = None if bias_node is None else get_attr_tensor(gm, bias_node).detach()
        if group:
            with gm.graph.inserting_before(node):
                out = gm.graph.call_function(
                    Q.linear_int_grouped.default, (qs[0], zs[0], ss[0], wq_node, ws_node, group, bias_node))
            out.meta["qc"] = {**meta, "compare": node.name}
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            return True
        acc_scale = (ss[0] * s_w.double().flatten()).float()
        bq_node = None
        if bias is not None:
            bq = torch.round(bias.double() / acc_scale.double())
            if bq.abs().max() >= 2**31:
                raise _err(node, "bias does not fit int32 at this input and weight scale")
            bq_node = add_constant(gm, f"{node.name}_bq", bq.to(torch.int32), node)
        with gm.graph.inserting_before(node):
            if kind == "linear":
                acc = gm.graph.call_function(Q.linear_int.default, (qs[0], zs[0], wq_node, bq_node))
            else:
                conv_args = list(node.args[3:]) + [[1, 1], [0, 0], [1, 1], 1][len(node.args) - 3:]
                acc = gm.graph.call_function(Q.conv2d_int.default, (qs[0], zs[0], wq_node, bq_node, *conv_args))
        axis = -1 if kind == "linear" else 1
        scale = acc_scale if kind == "linear" else acc_scale.reshape(-1, 1, 1)
        self._float_out(gm, node, acc, scale, meta, axis)
        return True

    def _weight_only(self, gm, node) -> bool:
        if node.meta["qc"]["kind"] != "linear":
            raise _err(node, "weight-only quantization has integer kernels for linear layers only")
        wq_node, ws_node, group = _int_weight(gm, node)
        bias_node = node.args[2] if len(node.args) > 2 else None
        with gm.graph.inserting_before(node):
            out = gm.graph.call_function(Q.linear_weight_only.default,
                                         (node.args[0], wq_node, ws_node, group, bias_node))
        meta = {k: v for k, v in node.meta["qc"].items() if k != "quantized"}
        out.meta["qc"] = {**meta, "source": node.name, "compare": node.name}
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        return True

    def _float_out(self, gm, node, acc, scale, meta, axis):
        acc.meta["qc"] = {**meta, "axis": axis}
        s = add_constant(gm, f"{node.name}_acc_scale", scale, node)
        z = add_constant(gm, f"{node.name}_acc_zp", torch.zeros_like(scale), node)
        with gm.graph.inserting_before(node):
            deq = gm.graph.call_function(Q.dequantize.default, (acc, s, z, 0))
        deq.meta["qc"] = {"source": node.name, "compare": node.name}
        node.replace_all_uses_with(deq)
        gm.graph.erase_node(node)

    # -- step 2
    def _split_fq(self, gm, fq):
        x, s, z, qmin, qmax, group = fq.args
        with gm.graph.inserting_before(fq):
            q = gm.graph.call_function(Q.quantize.default, (x, s, z, qmin, qmax, group))
            dq = gm.graph.call_function(Q.dequantize.default, (q, s, z, group))
        q.meta["qc"] = dict(fq.meta["qc"])
        fq.replace_all_uses_with(dq)
        gm.graph.erase_node(fq)


BIAS_LIMIT = 2**30  # |bq| bound: half of int32, the other half is for the dot products


def fit_bias_scales(gm: torch.fx.GraphModule) -> dict[str, list[int]]:
    """Raise the weight scale of every output channel whose int32 bias b / (sx*sw) would
    exceed BIAS_LIMIT to |b| / (sx * BIAS_LIMIT), in place on the weight fake-quant's scale
    constant (a per-tensor weight scale is raised as far as its neediest channel asks).
    Layers with a calibrated per-tensor input quantizer and a constant bias, not per-group. Returns {layer: [channels raised]} and warns naming them."""
    fitted = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("qc", {})
        if not meta.get("quantized") or meta.get("weight_only") or meta.get("kind") not in ("linear", "conv2d"):
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        if not (_is_act_fq(x) and x.meta["qc"].get("observed") and op_name(w) == "qc.fake_quant"
                and isinstance(b, torch.fx.Node) and b.op == "get_attr" and not w.args[5]):
            continue
        s_x = get_attr_tensor(gm, x.args[1])
        if s_x.numel() != 1:
            continue
        s_w = get_attr_tensor(gm, w.args[1])
        per_channel = get_attr_tensor(gm, b).detach().double().abs().flatten() / (float(s_x) * BIAS_LIMIT)
        channels = (per_channel > s_w.double().flatten()).nonzero().flatten().tolist()
        # a per-tensor weight scale is raised for the channel that needs the most
        need = per_channel.reshape(s_w.shape) if s_w.numel() == per_channel.numel() else per_channel.max().reshape(s_w.shape)
        low = need > s_w.double()
        if bool(low.any()):
            up = need.float()  # float32 may round below `need`: one ulp up keeps |bq| <= ~BIAS_LIMIT
            up = torch.where(up.double() < need, torch.nextafter(up, torch.tensor(float("inf"))), up)
            with torch.no_grad():  # the scale may be a trained (QAT) parameter
                s_w.copy_(torch.where(low, up, s_w))
            fitted[node.name] = channels
    if fitted:
        total = sum(map(len, fitted.values()))
        layers = ", ".join(f"{k} ({len(v)})" for k, v in fitted.items())
        warnings.warn(f"bias fit: raised the weight scale of {total} near-dead output channels so their "
                      f"int32 bias fits (|b/(sx*sw)| <= 2^30): {layers}", stacklevel=2)
    return fitted


def _int_weight(gm, node):
    """The integer weight of a compute node whose weight operand is a fake-quant: a new int8
    constant Wq = quantize(W) (values on the layer's grid), its scale node and group size."""
    w_node, ws_node, wz_node, wqmin, wqmax, group = node.args[1].args
    w, s_w = get_attr_tensor(gm, w_node).detach(), get_attr_tensor(gm, ws_node)
    wq = Q.quantize(w, s_w, get_attr_tensor(gm, wz_node), wqmin, wqmax, group)
    return add_constant(gm, f"{node.name}_wq", wq, node), ws_node, group


# ---------------------------------------------------------------- rules


def _fold_qdq(gm, n):
    dq = n.args[0]
    if op_name(dq) != "qc.dequantize" or dq.args[1] is not n.args[1] or dq.args[2] is not n.args[2]:
        return None
    src = dq.args[0]
    while op_name(src) in _COMMUTING:  # these keep values on the same integer grid
        src = src.args[0]
    if op_name(src) not in ("qc.quantize", "qc.requantize"):
        return None
    lo, hi = (src.args[3], src.args[4]) if op_name(src) == "qc.quantize" else (src.args[4], src.args[5])
    return dq.args[0] if (n.args[3] <= lo and hi <= n.args[4]) else None


def _clamp_bounds(act) -> tuple[float | None, float | None] | None:
    """(lo, hi) of a clamping activation node, None if `act` is not one."""
    name, a = op_name(act), act.args
    if name in ("aten.relu", "aten.relu_"):
        return 0.0, None
    if name in ("aten.relu6", "aten.relu6_"):
        return 0.0, 6.0
    if name in ("aten.hardtanh", "aten.hardtanh_"):
        return (a[1] if len(a) > 1 else -1.0), (a[2] if len(a) > 2 else 1.0)
    if name == "aten.clamp":
        return (a[1] if len(a) > 1 else act.kwargs.get("min")), (a[2] if len(a) > 2 else act.kwargs.get("max"))
    return None


def _requantize(gm, n):
    x = n.args[0]
    bounds = _clamp_bounds(x)
    dq = x.args[0] if bounds else x
    if op_name(dq) != "qc.dequantize" or op_name(dq.args[0]) not in _INT_ACC:
        return None
    acc = dq.args[0]
    _, s_out, z_out, qmin, qmax, group = n.args
    if group or s_out.op != "get_attr" or dq.args[1].op != "get_attr":  # run-time (per-token) scales: no dyadic form
        return None
    s_t, z_t = get_attr_tensor(gm, s_out), get_attr_tensor(gm, z_out)
    so, zo = float(s_t), int(z_t)
    real = get_attr_tensor(gm, dq.args[1]).double().flatten() / so
    try:
        mult, shift = dyadic(real)
    except ValueError as e:
        raise _err(acc, str(e)) from e
    lo, hi = qmin, qmax
    if bounds:  # quantize is monotonic: quantize(clamp(y, a, b)) = clamp(quantize(y), q(a), q(b))
        qa = lambda v: int(Q.quantize(torch.tensor(float(v)), s_t, z_t, qmin, qmax))  # noqa: E731
        lo = qa(bounds[0]) if bounds[0] is not None else qmin
        hi = qa(bounds[1]) if bounds[1] is not None else qmax
    m = add_constant(gm, f"{acc.name}_requant_mult", mult, n)
    sh = add_constant(gm, f"{acc.name}_requant_shift", shift, n)
    with gm.graph.inserting_before(n):
        rq = gm.graph.call_function(Q.requantize.default, (acc, m, sh, zo, lo, hi, acc.meta["qc"]["axis"]))
    rq.meta["qc"] = {"source": acc.meta["qc"]["source"], "compare": x.name if bounds else dq.meta["qc"]["compare"],
                     "out_scale": so, "out_zp": zo, **({"activation": op_name(x)} if bounds else {})}
    return rq


def _hoist(gm, n):
    """quantize(L(x)) -> L(quantize(x)) for L a layout op or max-pooling."""
    x = n.args[0]
    if op_name(x) not in _COMMUTING or n.args[5] or not isinstance(x.args[0], torch.fx.Node):
        return None
    if n.args[1].op != "get_attr":  # per-row run-time scales need the rows as they are
        return None
    with gm.graph.inserting_before(n):
        q = gm.graph.call_function(Q.quantize.default, (x.args[0], *n.args[1:]))
        moved = gm.graph.call_function(x.target, (q, *x.args[1:]), dict(x.kwargs))
    q.meta["qc"] = dict(n.meta.get("qc", {}))
    return moved


RULES = [("fold-qdq", _fold_qdq), ("requantize", _requantize), ("hoist-quantize", _hoist)]


def _apply_rules(gm) -> int:
    """Apply RULES to quantize nodes until none fires; returns the number of rewrites."""
    count, changed = 0, True
    while changed:
        changed = False
        for n in list(gm.graph.nodes):
            if n.op != "call_function" or op_name(n) != "qc.quantize" or not n.users:
                continue
            for _, rule in RULES:
                new = rule(gm, n)
                if new is not None:
                    n.replace_all_uses_with(new)
                    gm.graph.erase_node(n)
                    count, changed = count + 1, True
                    break
        gm.graph.eliminate_dead_code()
    return count
