"""IR -> TVM Relax: `torch.export` of the converted IR, then TVM's ExportedProgram importer
with a converter for every `qc` op.

Each converter emits Relax ops that compute exactly what the op's torch reference does:
int8 operands widened to int32, zero points subtracted, int32 matmul/conv accumulation,
and the dyadic requantizer in int64 ((acc * m + 2^(sh-1)) >> sh, clamp, narrow to int8).
Float quantize/dequantize use the same IEEE operations in the same order as the reference
(divide, round-half-even via `nearbyint`, add, clip), so they agree bit for bit.
TVM's default pipeline for the target then fuses each accumulation with its requantize.
"""

from __future__ import annotations

import math
import warnings

import tvm
from tvm import relax, te
from tvm.relax.frontend.torch import from_exported_program

import torch

from qcompiler.errors import LoweringError

R = relax.op


def _emit(imp, expr):
    return imp.block_builder.emit(expr)


def _args(node, imp):
    """Positional operands in schema order, kwargs and schema defaults filled in."""
    args = list(imp.retrieve_args(node))
    for a in node.target._schema.arguments[len(args):]:
        args.append(imp._retrieve_args(node.kwargs[a.name]) if a.name in node.kwargs else a.default_value)
    return args


def _static_shape(node) -> list[int]:
    return [int(d) for d in node.meta["val"].shape]


def _int32_minus(imp, x, zp: int):
    x32 = _emit(imp, R.astype(x, "int32"))
    return _emit(imp, R.subtract(x32, relax.const(zp, "int32"))) if zp else x32


def _quantize(imp, x, s, z, qmin, qmax):
    v = _emit(imp, R.round(R.divide(x, s)))
    v = _emit(imp, R.clip(R.add(v, z), qmin, qmax))
    return _emit(imp, R.astype(v, "int8"))


def _dequantize(imp, q, s, z):
    return _emit(imp, R.multiply(R.subtract(R.astype(q, "float32"), z), s))


def _no_groups(node, group):
    if group:
        raise LoweringError(
            f"{node.target}: group-wise quantize/dequantize at run time ({node.name}) has no "
            "lowering; group scales are only supported on constant weights (folded by convert)"
        )


def convert_fake_quant(node, imp):
    x, s, z, qmin, qmax, group = _args(node, imp)
    _no_groups(node, group)
    return _dequantize(imp, _quantize(imp, x, s, z, qmin, qmax), s, z)


def convert_quantize(node, imp):
    x, s, z, qmin, qmax, group = _args(node, imp)
    _no_groups(node, group)
    return _quantize(imp, x, s, z, qmin, qmax)


def convert_dequantize(node, imp):
    q, s, z, group = _args(node, imp)
    _no_groups(node, group)
    return _dequantize(imp, q, s, z)


def _dot_te(a, b, za: int, zb: int):
    """acc[..., i, j] = sum_k (a[..., i, k] - za) * (b[..., j, k] - zb) in int32: both operands
    read along k, so the inner loop is contiguous and vectorizes."""
    k = te.reduce_axis((0, a.shape[-1]), "k")
    widen = lambda t, idx, z: t[idx].astype("int32") - z if z else t[idx].astype("int32")  # noqa: E731
    return te.compute(
        (*a.shape[:-1], b.shape[-2]),
        lambda *i: te.sum(widen(a, (*i[:-1], k), za) * widen(b, (*i[:-2], i[-1], k), zb), axis=k),
        name="dot_int",
    )


def convert_linear_int(node, imp):
    x, zx, w, b = _args(node, imp)
    shape = _static_shape(node.args[0])
    rows = math.prod(shape[:-1])
    n = _static_shape(node.args[2])[0]
    x2 = _emit(imp, R.reshape(x, [rows, shape[-1]]))
    acc = imp.block_builder.emit_te(_dot_te, x2, w, zx, 0)
    if b is not None:
        acc = _emit(imp, R.add(acc, b))
    return _emit(imp, R.reshape(acc, [*shape[:-1], n]))


def convert_matmul_int(node, imp):
    a, za, b, zb = _args(node, imp)
    sa, sb = _static_shape(node.args[0]), _static_shape(node.args[2])
    batch = list(torch.broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2])))
    a = _emit(imp, R.broadcast_to(a, [*batch, *sa[-2:]])) if list(sa[:-2]) != batch else a
    b = _emit(imp, R.broadcast_to(b, [*batch, *sb[-2:]])) if list(sb[:-2]) != batch else b
    bt = _emit(imp, R.permute_dims(b, [*range(len(batch)), len(batch) + 1, len(batch)]))
    return imp.block_builder.emit_te(_dot_te, a, bt, za, zb)


def convert_conv2d_int(node, imp):
    x, zx, w, b, stride, padding, dilation, groups = _args(node, imp)
    acc = _emit(imp, R.nn.conv2d(
        _int32_minus(imp, x, zx), _emit(imp, R.astype(w, "int32")),
        strides=stride, padding=padding, dilation=dilation, groups=groups, out_dtype="int32"))
    if b is None:
        return acc
    return _emit(imp, R.add(acc, R.reshape(b, [1, -1, 1, 1])))


def convert_linear_int_grouped(node, imp):
    x, zx, sx, w, ws, group, b = _args(node, imp)
    shape = _static_shape(node.args[0])
    n, k = _static_shape(node.args[3])
    groups = -(-k // group)
    pad = groups * group - k
    rows = 1
    for d in shape[:-1]:
        rows *= d
    x32 = _emit(imp, R.reshape(_int32_minus(imp, x, zx), [rows, k]))
    w32 = _emit(imp, R.astype(w, "int32"))
    if pad:
        x32 = _emit(imp, R.nn.pad(x32, [0, 0, 0, pad]))
        w32 = _emit(imp, R.nn.pad(w32, [0, 0, 0, pad]))
    xg = _emit(imp, R.permute_dims(R.reshape(x32, [rows, groups, group]), [1, 0, 2]))  # G, M, g
    wg = _emit(imp, R.permute_dims(R.reshape(w32, [n, groups, group]), [1, 2, 0]))  # G, g, N
    acc = _emit(imp, R.permute_dims(R.matmul(xg, wg, out_dtype="int32"), [1, 2, 0]))  # M, N, G
    scale = _emit(imp, R.multiply(ws, relax.const(sx, "float32")))
    y = _emit(imp, R.sum(R.multiply(R.astype(acc, "float32"), scale), axis=[-1]))
    if b is not None:
        y = _emit(imp, R.add(y, b))
    return _emit(imp, R.reshape(y, [*shape[:-1], n]))


def convert_requantize(node, imp):
    acc, m, sh, zo, qmin, qmax, axis = _args(node, imp)
    rank = len(_static_shape(node.args[0]))
    channels = _static_shape(node.args[1])[0]
    if channels > 1 and axis % rank != rank - 1:
        bshape = [1] * rank
        bshape[axis % rank] = channels
        m, sh = _emit(imp, R.reshape(m, bshape)), _emit(imp, R.reshape(sh, bshape))
    m64, sh64 = _emit(imp, R.astype(m, "int64")), _emit(imp, R.astype(sh, "int64"))
    half = _emit(imp, R.left_shift(relax.const(1, "int64"), R.subtract(sh64, relax.const(1, "int64"))))
    prod = _emit(imp, R.add(R.multiply(R.astype(acc, "int64"), m64), half))
    v = _emit(imp, R.add(R.right_shift(prod, sh64), relax.const(zo, "int64")))
    v = _emit(imp, R.clip(v, qmin, qmax))
    return _emit(imp, R.astype(v, "int8"))


CONVERT_MAP = {
    "fake_quant.default": convert_fake_quant,
    "quantize.default": convert_quantize,
    "dequantize.default": convert_dequantize,
    "linear_int.default": convert_linear_int,
    "linear_int_grouped.default": convert_linear_int_grouped,
    "conv2d_int.default": convert_conv2d_int,
    "matmul_int.default": convert_matmul_int,
    "requantize.default": convert_requantize,
}


def to_relax(gm: torch.fx.GraphModule, example_inputs: tuple) -> tvm.IRModule:
    """Export the IR at the example shapes and import it into a Relax IRModule."""
    try:
        ep = torch.export.export(gm, example_inputs)
    except Exception as e:
        raise LoweringError(f"the IR does not export at the example shapes: {type(e).__name__}: {e}") from e
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices from its decompositions
            warnings.filterwarnings("ignore", category=FutureWarning)
            return from_exported_program(ep, custom_convert_map=CONVERT_MAP)
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(_unsupported_message(gm, e)) from e


def _unsupported_message(gm, e: Exception) -> str:
    text = str(e)
    missing = {name.strip(" '\"") for line in text.splitlines() if "Unsupported function types" in line
               for name in line.split("Unsupported function types")[-1].strip(" :[]").split(",")}
    if missing:
        where = [f"{n.target.__name__} (node {n.name})" for n in gm.graph.nodes
                 if n.op == "call_function" and getattr(n.target, "__name__", "") in missing]
        names = ", ".join(where or sorted(missing))
        return (f"the TVM backend cannot lower these ops: {names}. Keep the layers that use "
                "them out of the model, or rewrite them with supported ATen ops (linear, conv2d, "
                "matmul, elementwise, softmax, layer_norm, ...)")
    return f"lowering to TVM Relax failed: {type(e).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"
