"""Lower the IR to QDQ form, the way ONNX states quantized models, before export.

ONNX writes a quantized tensor as an integer tensor and the DequantizeLinear that reads it;
compute stays float. `lower_to_qdq` rewrites a copy of the IR into that form, in which only
float ATen ops, `qc.quantize`, `qc.dequantize` and activation `qc.fake_quant` are left:

    weight fake-quant    fake_quant(W, s, 0, qmin, qmax, g)  ->  dequantize(Wq, s, 0, g)
                         with Wq = quantize(W, s, 0, qmin, qmax, g) stored as a constant
    linear_int           acc = linear_int(xq, zx, Wq, bq)   ->  y = linear(dequantize(xq, sx, zx),
                         dequantize(Wq, sw), dequantize(bq, sa))          so that y = acc * sa
    conv2d_int           the same with conv2d
    matmul_int           y = matmul(dequantize(a, s_a, z_a), dequantize(b, s_b, z_b))
    linear_int_grouped   y = linear(dequantize(xq, sx, zx), dequantize(Wq, sw, group=g), b)
    linear_weight_only   y = linear(x, dequantize(Wq, sw, group=g), b)
    dequantize(acc, sa)  ->  y
    requantize(acc, m, sh, zo, lo, hi)  ->  quantize(y, so, zo, lo, hi),  so = meta["out_scale"]

sx (s_a, s_b) is the scale of the quantizer that produced the int8 operand, found through
layout ops and max-pooling, which keep values on its grid. sa is the accumulator scale that
its readers use: `dequantize`'s scale, or m * 2^-sh * so for `requantize`; then sw = sa / sx.

The float form equals the integer one up to float32 rounding of the sums, with one exception:
where that rounding (or a tie, which `requantize` rounds half up and QuantizeLinear half to
even) puts a value on the other side of a rounding boundary of the next quantizer, that value
moves by one step of the quantizer's grid.
"""

from __future__ import annotations

import torch
import torch.fx

from qcompiler.errors import LoweringError
from qcompiler.ir import add_constant, cleanup, copy_ir, get_attr_tensor, op_name

Q = torch.ops.qc
# ops that keep an int8 tensor on the grid of the quantizer that produced it
_ON_GRID = {"aten.flatten.using_ints", "aten.reshape", "aten.view", "aten.permute", "aten.transpose.int",
            "aten.unsqueeze", "aten.squeeze.dim", "aten.contiguous", "aten.max_pool2d"}
_ACCUMULATING = {"qc.linear_int", "qc.conv2d_int", "qc.matmul_int"}
# qc ops this module lowers, and the ones the exporter translates
_LOWERED = _ACCUMULATING | {"qc.linear_int_grouped", "qc.linear_weight_only", "qc.requantize"}
EXPORTABLE_QC = {"qc.quantize", "qc.dequantize", "qc.fake_quant"}


def lower_to_qdq(ir: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[str, int]]:
    """A copy of `ir` in QDQ form, and {constant name: bits} for the integer weights in it."""
    check_ops(ir)
    gm = copy_ir(ir)
    lowering = _Lowering(gm)
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or not n.users:
            continue
        name = op_name(n)
        if name == "qc.fake_quant" and _is_constant(n.args[0]):
            lowering.weight_fake_quant(n)
        elif name in _ACCUMULATING:
            lowering.accumulating(n)
        elif name in ("qc.linear_int_grouped", "qc.linear_weight_only"):
            lowering.grouped(n)
        elif name == "qc.requantize":  # `accumulating` rewrote every requantize of an integer op
            raise _err(n, "requantize of a tensor that no integer op produced")
    cleanup(gm)
    return gm, lowering.weight_bits


def check_ops(gm: torch.fx.GraphModule) -> None:
    """Refuse ops from namespaces ONNX knows nothing of, naming the op and the node.

    ATen ops without a translation in torch.onnx are reported by the exporter itself.
    """
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        ns = n.target.namespace
        if ns == "qc" and op_name(n) not in EXPORTABLE_QC | _LOWERED:
            raise _err(n, "this qc op has no ONNX mapping")
        if ns not in ("aten", "prims", "qc"):
            raise _err(n, "this op has no ONNX mapping: export handles ATen ops that torch.onnx "
                          "translates and the qc quantization and integer ops")


def grid_bits(qmin: int, qmax: int) -> int:
    """The fewest bits of a signed integer that hold [qmin, qmax]."""
    bits = 2
    while not (-(2 ** (bits - 1)) <= qmin and qmax <= 2 ** (bits - 1) - 1):
        bits += 1
    return bits


def _err(node: torch.fx.Node, msg: str) -> LoweringError:
    e = LoweringError(f"export_onnx: node {node.name} ({op_name(node)}): {msg}")
    e.node = node.name
    return e


def _is_constant(n) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "get_attr"


class _Lowering:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.weight_bits: dict[str, int] = {}

    def tensor(self, node: torch.fx.Node) -> torch.Tensor:
        return get_attr_tensor(self.gm, node)

    def const(self, hint: str, value: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
        return add_constant(self.gm, hint, value, before)

    def scalar(self, hint: str, value: float, before: torch.fx.Node) -> torch.fx.Node:
        return self.const(hint, torch.tensor(value, dtype=torch.float32), before)

    def call(self, before: torch.fx.Node, target, *args) -> torch.fx.Node:
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.call_function(target, args)

    def weight(self, node: torch.fx.Node, w_node: torch.fx.Node, bits: int) -> torch.fx.Node:
        """Record the width of integer weights `w_node`, after checking that its values fit."""
        wq = self.tensor(w_node)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if wq.numel() and not (lo <= int(wq.min()) and int(wq.max()) <= hi):
            raise _err(node, f"weights {w_node.target} are marked {bits}-bit but hold values "
                             f"in [{int(wq.min())}, {int(wq.max())}]")
        self.weight_bits[w_node.target] = bits
        return w_node

    # -- fake-quant IR

    def weight_fake_quant(self, n):
        w_node, s, z, qmin, qmax, *rest = n.args
        group = rest[0] if rest else 0
        zero = self.tensor(z)
        wq = Q.quantize(self.tensor(w_node).detach(), self.tensor(s), zero, qmin, qmax, group)
        bits = n.meta.get("qc", {}).get("bits") or grid_bits(qmin, qmax)
        if bool(zero.abs().max() != 0):  # an offset grid does not fit its width's signed range
            bits = 8
        wq_node = self.weight(n, self.const(f"{w_node.target}_q", wq, n), bits)
        n.replace_all_uses_with(self.call(n, Q.dequantize.default, wq_node, s, z, group))

    # -- converted IR

    def accumulating(self, acc):
        """linear_int / conv2d_int / matmul_int -> the float op on dequantized operands."""
        name = op_name(acc)
        if name == "qc.matmul_int":
            (a, za), (b, zb) = (acc.args[0], acc.args[1]), (acc.args[2], acc.args[3])
            (sa, _), (sb, _) = grids = self._grid(acc, a, za), self._grid(acc, b, zb)
            product = float(self.tensor(sa)) * float(self.tensor(sb))
            read = self._acc_scale(acc).double()
            if not torch.allclose(read, torch.full_like(read, product), rtol=1e-5):
                raise _err(acc, f"its readers scale it by {read.tolist()}, not by the product "
                                f"{product:.6g} of its operands' scales")
            fa, fb = (self.call(acc, Q.dequantize.default, t, *g, 0) for t, g in zip((a, b), grids))
            return self._replace_readers(acc, self.call(acc, torch.ops.aten.matmul.default, fa, fb))
        xq, zx, w_node, b_node, *conv_args = acc.args
        s_acc = self._acc_scale(acc)
        s_x, z_x = self._grid(acc, xq, zx)
        x_f = self.call(acc, Q.dequantize.default, xq, s_x, z_x, 0)
        wq = self.tensor(w_node)
        s_w = (s_acc.double() / float(self.tensor(s_x))).float().reshape((-1,) + (1,) * (wq.dim() - 1))
        bits = acc.meta.get("qc", {}).get("w_bits", 8)
        w_f = self.call(acc, Q.dequantize.default, self.weight(acc, w_node, bits),
                        self.const(f"{w_node.target}_scale", s_w, acc),
                        self.const(f"{w_node.target}_zp", torch.zeros_like(s_w), acc), 0)
        b_f = None
        if b_node is not None:
            b_f = self.call(acc, Q.dequantize.default, b_node, self.const(f"{b_node.target}_scale", s_acc, acc),
                            self.const(f"{b_node.target}_zp", torch.zeros_like(s_acc), acc), 0)
        if name == "qc.linear_int":
            y = self.call(acc, torch.ops.aten.linear.default, x_f, w_f, b_f)
        else:
            y = self.call(acc, torch.ops.aten.conv2d.default, x_f, w_f, b_f, *conv_args)
        self._replace_readers(acc, y)

    def grouped(self, n):
        """linear_int_grouped -> linear on dequantized input and group-wise dequantized weights;
        linear_weight_only -> linear on its float input and the dequantized weights."""
        if op_name(n) == "qc.linear_weight_only":
            x_f, w_node, ws, group, bias = n.args
        else:
            xq, zx, sx, w_node, ws, group, bias = n.args
            x_f = self.call(n, Q.dequantize.default, xq, self.scalar(f"{n.name}_x_scale", sx, n),
                            self.scalar(f"{n.name}_x_zp", float(zx), n), 0)
        w_zp = self.const(f"{w_node.target}_zp", torch.zeros_like(self.tensor(ws)), n)
        bits = n.meta.get("qc", {}).get("w_bits", 8)
        w_f = self.call(n, Q.dequantize.default, self.weight(n, w_node, bits), ws, w_zp, group)
        n.replace_all_uses_with(self.call(n, torch.ops.aten.linear.default, x_f, w_f, bias))

    def _acc_scale(self, acc) -> torch.Tensor:
        """The accumulator's scale, flat: one value per output channel, or one."""
        for u in acc.users:
            if op_name(u) == "qc.dequantize":
                return self.tensor(u.args[1]).detach().float().flatten()
        for u in acc.users:
            if op_name(u) == "qc.requantize":
                m, sh = self.tensor(u.args[1]).double().flatten(), self.tensor(u.args[2]).double().flatten()
                return (m * torch.pow(2.0, -sh) * float(u.meta["qc"]["out_scale"])).float()
        raise _err(acc, "no dequantize or requantize reads this accumulator, so its scale is unknown")

    def _grid(self, reader, operand, zp: int) -> tuple[torch.fx.Node, torch.fx.Node]:
        """(scale, zero point) constants of the quantizer that produced the int8 `operand`."""
        src = operand
        while isinstance(src, torch.fx.Node) and op_name(src) in _ON_GRID:
            src = src.args[0]
        name = op_name(src) if isinstance(src, torch.fx.Node) else None
        if name == "qc.quantize" and self.tensor(src.args[1]).numel() == 1:
            s, z = src.args[1], src.args[2]
            if float(self.tensor(z)) != zp:
                raise _err(reader, f"operand zero point {zp} differs from that of its quantizer {src.name}")
            return s, z
        if name == "qc.requantize":
            s_out, z_out = src.meta["qc"]["out_scale"], src.meta["qc"]["out_zp"]
            if z_out != zp:
                raise _err(reader, f"operand zero point {zp} differs from that of its requantizer {src.name}")
            return (self.scalar(f"{src.name}_scale", s_out, reader),
                    self.scalar(f"{src.name}_zp", float(z_out), reader))
        raise _err(reader, f"the int8 operand {getattr(operand, 'name', operand)} comes from no per-tensor "
                           "quantize or requantize, so its scale is unknown")

    def _replace_readers(self, acc, y):
        """dequantize(acc) -> y; requantize(acc) -> quantize(y) on the requantizer's grid."""
        for u in list(acc.users):
            name = op_name(u)
            if name == "qc.dequantize":
                u.replace_all_uses_with(y)
            elif name == "qc.requantize":
                _, _, _, zo, lo, hi, _ = u.args
                s = self.scalar(f"{u.name}_scale", u.meta["qc"]["out_scale"], u)
                z = self.scalar(f"{u.name}_zp", float(zo), u)
                u.replace_all_uses_with(self.call(u, Q.quantize.default, y, s, z, lo, hi, 0))
            else:
                raise _err(u, f"reads the int32 accumulator {acc.name}; only dequantize and requantize can")
