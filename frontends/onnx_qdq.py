"""QuantizeLinear / DequantizeLinear: an already-quantized (QDQ) ONNX model in `qc` ops.

ONNX:  Q(x) = saturate(round_half_even(x / s) + z)    DQ(q) = (q - z) * s
with s, z per tensor, per channel along `axis`, or per block of `block_size` along `axis`.

The IR quantizes on the signed int8 grid. A uint8 tensor q_u with zero point z_u is the
same real values as q = q_u - 128 with z = z_u - 128, so uint8 becomes int8 by that shift
(exact: (q_u - z_u) * s = (q - z) * s, and the clamp to [0, 255] becomes [-128, 127]).

- activation pair  DQ(Q(x, s, z), s, z)  ->  qc.fake_quant(x, s, z', -128, 127)
  meta["qc"] = {role: act, bits: 8, symmetric: z == 0, observed: True, range, imported: True}:
  the scales of the file are kept, `calibrate` is not needed before `convert`.
- weight  DQ(W_int, s, z) feeding Conv / Gemm / MatMul weights  ->  a float weight buffer
  W = (W_int - z) * s and qc.fake_quant(W, s, z', -128, 127) (per channel: s shaped to
  broadcast, [O,1,1,1] for conv, [N,1] for linear, transposed with the weight when a
  Gemm/MatMul weight is laid out [K, N]).
- anything else (a lone Q or DQ, int16/int32 data, blocks) runs as the ONNX formula.
After tracing, `annotate_quantized` marks aten.linear / aten.conv2d / aten.matmul whose
inputs are such fake-quants as quantized, so the `convert` pass turns them into integer ops.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.fx.traceback as fx_traceback

from qcompiler.ir import get_attr_tensor, op_name

from .onnx_values import Const, QValue, QWeight, concrete, op

WEIGHT_INPUTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
_INT_RANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-32768, 32767)}
_ZP_DTYPES = {2: torch.uint8, 3: torch.int8, 5: torch.int16}  # ONNX output_dtype -> torch


def _along(t: torch.Tensor, x: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """A scale / zero point shaped to broadcast against `x` (per tensor, channel or block)."""
    if t.dim() == 0 or (t.numel() == 1 and not block):
        return t.reshape(())
    axis = axis % x.dim()
    if block:
        return t.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _signed(q_dtype: torch.dtype, z: torch.Tensor) -> torch.Tensor:
    """The int8-grid zero point (float32) of a uint8 / int8 zero point."""
    return z.float() - (128.0 if q_dtype == torch.uint8 else 0.0)


def _fake_quant(x, s, z, meta: dict):
    with fx_traceback.annotate({"qc": meta}):
        return torch.ops.qc.fake_quant(x, s, z, -128, 127, 0)


# ---------------------------------------------------------------- weights


def plan_weight(n, ins: list, uses: list) -> QWeight | None:
    """A DequantizeLinear of an int8/uint8 initializer read only as a weight: a QWeight."""
    if n.op_type != "DequantizeLinear" or not uses or not all(WEIGHT_INPUTS.get(o) == i for o, i in uses):
        return None
    q, s, z = (list(ins) + [None, None])[:3]
    if not (isinstance(q, Const) and isinstance(s, Const) and (z is None or isinstance(z, Const))):
        return None
    q, s = q.value, s.value
    z = z.value if z is not None else torch.zeros((), dtype=q.dtype)
    if q.dtype not in (torch.int8, torch.uint8) or s.dtype != torch.float32 or n.attr("block_size", 0) or q.dim() == 0:
        return None
    axis = n.attr("axis", 1)
    if not -q.dim() <= axis < q.dim() or s.numel() not in (1, q.shape[axis]) or z.numel() != s.numel():
        return None
    if s.numel() > 1 and s.dim() != 1:
        return None
    zs = _signed(q.dtype, z)
    q8 = (q.int() - (128 if q.dtype == torch.uint8 else 0)).to(torch.int8)
    return QWeight(q8, s.float(), zs, axis % q.dim(), n.proto.input[0], n.name)


def weight(n, v, transpose: bool = False) -> torch.Tensor:
    """A weight input (QWeight, constant or run-time tensor), transposed (2-D) if asked;
    constants are transposed at load time, so the IR reads them with one get_attr."""
    if isinstance(v, QWeight):
        return weight_tensor(n, v, transpose)
    if isinstance(v, Const):
        return n.derived(v, "T", lambda: v.value.t()) if transpose else n.t(v)
    t = n.t(v)
    return t.t() if transpose else t


def weight_tensor(n, qw: QWeight, transpose: bool = False) -> torch.Tensor:
    with concrete():  # load-time values, also while tracing
        w, s, z, meta = _weight_params(n, qw, transpose)
    with fx_traceback.annotate({"onnx": {"name": qw.node, "op_type": "DequantizeLinear"}}):
        return _fake_quant(w, s, z, meta)


def _weight_params(n, qw: QWeight, transpose: bool):
    q, axis = qw.q, qw.axis
    if transpose:
        q, axis = q.t(), 1 - axis
    shape = [1] * q.dim()
    if qw.scale.numel() > 1:
        shape[axis] = qw.scale.numel()
    tag = "T" if transpose else ""
    s, z = qw.scale.reshape(shape), qw.zero_point.reshape(shape)
    meta = {"role": "weight", "bits": 8, "group_size": 0, "symmetric": bool((qw.zero_point == 0).all()),
            "imported": True, **({"axis": axis} if qw.scale.numel() > 1 else {})}
    return (n.derived(qw, "w" + tag, lambda: (q.float() - z) * s), n.derived(qw, "scale" + tag, lambda: s),
            n.derived(qw, "zp" + tag, lambda: z), meta)


# ---------------------------------------------------------------- converters


@op("QuantizeLinear", raw=True)
def quantize_linear(n, x, scale, zero_point=None):
    if zero_point is not None:
        dtype = zero_point.value.dtype if isinstance(zero_point, Const) else n.t(zero_point).dtype
    else:
        code = n.attr("output_dtype", 0)
        if code and code not in _ZP_DTYPES:
            raise n.error(f"output_dtype {code} is not supported; supported: uint8, int8, int16")
        dtype = _ZP_DTYPES.get(code, torch.uint8)
    if dtype not in _INT_RANGE:
        raise n.error(f"quantizing to {dtype} is not supported; supported: uint8, int8, int16")
    return QValue(x, scale, zero_point, n.attr("axis", 1), n.attr("block_size", 0), dtype)


def materialize(n, v: QValue) -> torch.Tensor:
    """The integer tensor of a QuantizeLinear (ONNX formula, round half to even)."""
    x, s = n.t(v.x), n.t(v.scale)
    z = n.t(v.zero_point) if v.zero_point is not None else torch.zeros((), dtype=v.dtype)
    lo, hi = _INT_RANGE[v.dtype]
    q = torch.round(x / _along(s, x, v.axis, v.block_size)) + _along(z, x, v.axis, v.block_size).to(x.dtype)
    return q.clamp(lo, hi).to(v.dtype)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a is b:
        return True
    with concrete():
        return isinstance(a, Const) and isinstance(b, Const) and a.value.shape == b.value.shape and torch.equal(a.value, b.value)


@op("DequantizeLinear", raw=True)
def dequantize_linear(n, q, scale, zero_point=None):
    axis, block = n.attr("axis", 1), n.attr("block_size", 0)
    if (isinstance(q, QValue) and q.dtype in (torch.int8, torch.uint8) and isinstance(scale, Const)
            and _same(q.scale, scale) and _same(q.zero_point, zero_point) and q.block_size == block == 0
            and (q.axis == axis or scale.value.numel() == 1) and scale.value.dtype == torch.float32):
        return _activation(n, q, scale, zero_point)
    qt, s = n.t(q), n.t(scale)
    z = n.t(zero_point) if zero_point is not None else torch.zeros((), dtype=qt.dtype)
    if qt.dim() == 0 and (s.numel() > 1 or block):
        raise n.error("a scalar input takes a scalar scale")
    return (qt.to(torch.float32) - _along(z, qt, axis, block).to(torch.float32)) * _along(s, qt, axis, block)


def _activation(n, q: QValue, scale: Const, zero_point):
    x = n.t(q.x)
    with concrete():
        params = _act_params(n, q, scale, zero_point, x.dim())
    return _fake_quant(x, *params)


def _act_params(n, q: QValue, scale: Const, zero_point, rank: int):
    s = scale.value
    z = zero_point.value if zero_point is not None else torch.zeros_like(s, dtype=q.dtype)
    axis = q.axis % max(rank, 1)
    shape = [1] * rank
    if s.numel() > 1:
        shape[axis] = s.numel()
    else:
        shape = []
    zs = _signed(q.dtype, z)
    tag = "q" if s.numel() == 1 else f"q{rank}_{axis}"
    s_buf = n.derived(scale, tag, lambda: s.float().reshape(shape))
    z_buf = n.derived(zero_point if zero_point is not None else scale, tag if zero_point is not None else "z" + tag,
                      lambda: zs.reshape(shape))
    meta = {"role": "act", "bits": 8, "symmetric": bool((zs == 0).all()), "observed": True, "imported": True}
    if s.numel() == 1:
        meta["range"] = (round(float((-128 - zs) * s), 6), round(float((127 - zs) * s), 6))
    return s_buf, z_buf, meta


# ---------------------------------------------------------------- after tracing

_KINDS = {"aten.linear": "linear", "aten.conv2d": "conv2d", "aten.matmul": "matmul"}


def _act_ok(gm, a) -> bool:
    if not (isinstance(a, torch.fx.Node) and op_name(a) == "qc.fake_quant" and a.meta.get("qc", {}).get("role") == "act"):
        return False
    s = a.args[1]
    return s.op == "get_attr" and get_attr_tensor(gm, s).numel() == 1 and tuple(a.args[3:5]) == (-128, 127)


def _weight_ok(gm, node, w) -> str | None:
    """The granularity of a weight fake-quant `convert` can use ("tensor"/"channel"), or None."""
    if not (isinstance(w, torch.fx.Node) and op_name(w) == "qc.fake_quant" and w.meta.get("qc", {}).get("role") == "weight"):
        return None
    if w.args[0].op != "get_attr" or not (len(node.args) < 3 or node.args[2] is None or node.args[2].op == "get_attr"):
        return None
    axis = w.meta["qc"].get("axis")
    if not w.meta["qc"]["symmetric"] or axis not in (None, 0):
        return None  # convert needs zero weight zero points, one scale per output channel
    return "tensor" if axis is None else "channel"


def annotate_quantized(gm: torch.fx.GraphModule) -> list[str]:
    """Mark compute ops whose inputs are imported fake-quants as quantized (for `convert`)."""
    done = []
    for node in gm.graph.nodes:
        kind = _KINDS.get(op_name(node)) if node.op == "call_function" else None
        if kind is None:
            continue
        if kind == "matmul":
            if _act_ok(gm, node.args[0]) and _act_ok(gm, node.args[1]):
                node.meta["qc"] = {"quantized": True, "kind": kind, "a_bits": 8}
                done.append(node.name)
            continue
        gran = _weight_ok(gm, node, node.args[1])
        if gran and _act_ok(gm, node.args[0]):
            node.args[1].meta["qc"]["source"] = node.name
            node.meta["qc"] = {"quantized": True, "kind": kind, "a_bits": 8, "w_bits": 8,
                               "granularity": gran, "group_size": 0}
            done.append(node.name)
    return done
