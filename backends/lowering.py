"""IR -> TVM Relax: `torch.export` of the converted IR, then TVM's ExportedProgram importer
with a converter for every `qc` op.

Each converter emits Relax ops that compute exactly what the op's torch reference does:
int8 operands widened to int32, zero points subtracted, int32 matmul/conv accumulation,
and the dyadic requantizer in int64 ((acc * m + 2^(sh-1)) >> sh, clamp, narrow to int8).
Layer weights are stored as the layer's width says (`weights`, `packing`: 4 and 2 bits
packed along K at compile time) and read by the TE kernels of `kernels_int` and
`kernels_weight_only`, which unpack them in the inner loop; int8 linear layers use `_dot_te`.
Float quantize/dequantize use the same IEEE operations in the same order as the reference
(divide, round-half-even via `nearbyint`, add, clip), so they agree bit for bit.
TVM's default pipeline for the target then fuses each accumulation with its requantize.
"""

from __future__ import annotations

import functools
import math
import warnings

import tvm
from tvm import relax, te
from tvm.relax.frontend.torch import from_exported_program

import torch

from qcompiler.errors import LoweringError
from qcompiler.ir import widen_batch

from . import dot, dot_layers, kernels_int, kernels_weight_only, packing, weights as weight_table
from .packing import PACKED_BITS
from .hadamard import convert_hadamard

R = relax.op


def _emit(imp, expr):
    return imp.block_builder.emit(expr)


def _args(node, imp):
    """Positional operands in schema order, kwargs and schema defaults filled in."""
    args = list(imp.retrieve_args(node))
    for a in node.target._schema.arguments[len(args):]:
        args.append(imp._retrieve_args(node.kwargs[a.name]) if a.name in node.kwargs else a.default_value)
    return args


def _shape(imp, expr) -> list:
    """The shape of a Relax tensor expression: ints where static, PrimExprs where symbolic."""
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in imp.shape_of(expr).values]


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


def _dot_te(a, b, za: int, zb: int, b_batched: bool):
    """acc[..., i, j] = sum_k (a[..., i, k] - za) * (b[..., j, k] - zb) in int32 (b is 2-D
    [N, K] unless `b_batched`): both operands are read along k, so the inner loop is
    contiguous and vectorizes."""
    k = te.reduce_axis((0, a.shape[-1]), "k")

    def widen(t, idx, z):
        v = t[idx].astype("int32")
        return v - z if z else v

    def body(*i):
        b_idx = (*i[:-2], i[-1], k) if b_batched else (i[-1], k)
        return te.sum(widen(a, (*i[:-1], k), za) * widen(b, b_idx, zb), axis=k)

    return te.compute((*a.shape[:-1], b.shape[-2]), body, name="dot_int")


def convert_linear_int(node, imp, weights=None):
    x, zx, w, b = _args(node, imp)
    lw = weights.get(node.args[2]) if weights else None
    # the target's dot-product kernel (`dot`; 4/2-bit weights unpacked inside it), else the
    # packed kernel (sub-byte weights unpacked in the loop) or the plain int8 one
    bits = lw.bits if lw is not None and lw.bits in PACKED_BITS else 8
    acc = dot.emit_linear(imp.block_builder, x, zx, w, lw.values if lw else None, _shape(imp, x), bits)
    if acc is None and bits in PACKED_BITS:
        stored, bits, span = _weight_rows(imp, weights, node, 2, w)
        acc = imp.block_builder.emit_te(kernels_int.packed_dot, x, stored, zx, bits, span)
        _reschedule(imp.block_builder, acc, kernels_int.split_blocks, "packed_dot_int", _shape(imp, x)[-1], bits, span)
    elif acc is None:
        acc = imp.block_builder.emit_te(_dot_te, x, w, zx, 0, False)
    return _emit(imp, R.add(acc, b)) if b is not None else acc


def _same_dim(d, e) -> bool:
    if isinstance(d, int) or isinstance(e, int):
        return d == e
    return d.same_as(e)


def _broadcast_batch(imp, t, batch: list):
    shape = _shape(imp, t)
    if len(shape) - 2 == len(batch) and all(_same_dim(d, e) for d, e in zip(shape, batch)):
        return t
    return _emit(imp, R.broadcast_to(t, [*batch, *shape[-2:]]))


def convert_matmul_int(node, imp):
    a, za, b, zb = _args(node, imp)
    sa, sb = _shape(imp, a)[:-2], _shape(imp, b)[:-2]
    width = max(len(sa), len(sb))
    sa, sb = [1] * (width - len(sa)) + sa, [1] * (width - len(sb)) + sb
    batch = [db if (isinstance(da, int) and da == 1) else da for da, db in zip(sa, sb)]
    a, b = _broadcast_batch(imp, a, batch), _broadcast_batch(imp, b, batch)
    acc = dot.emit_matmul(imp.block_builder, a, b, za, zb, _shape(imp, a), _shape(imp, b))
    if acc is not None:
        return acc
    bt = _emit(imp, R.permute_dims(b, [*range(width), width + 1, width]))
    return imp.block_builder.emit_te(_dot_te, a, bt, za, zb, True)


def _weight_rows(imp, weights, node, pos: int, w, pad_to: int = 0):
    """(stored weight, bits, block span): the layer's constant weight as rows along the
    reduction axis, packed at compile time for 4 and 2 bits (`packing`); a weight computed at
    run time (no constant) is read as int8 rows."""
    shape = _shape(imp, w)
    k = math.prod(shape[1:])
    lw = weights.get(node.args[pos]) if weights else None
    if lw is not None:
        return relax.const(lw.packed(pad_to)), lw.bits, packing.span(max(k, pad_to), lw.bits)
    rows = _emit(imp, R.reshape(w, [shape[0], k]))
    if pad_to > k:
        rows = _emit(imp, R.nn.pad(rows, [0, 0, 0, pad_to - k]))
    return rows, 8, 1


def _pair(v) -> list[int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(e) for e in (v * 2 if len(v) == 1 else v)]


def convert_conv2d_int(node, imp, weights=None):
    x, zx, w, b, stride, padding, dilation, groups = _args(node, imp)
    lw = weights.get(node.args[2]) if weights else None
    acc = None
    xs = _shape(imp, x)
    if int(groups) == 1 and lw is not None:  # the target's dot-product kernel over im2col rows
        acc = dot_layers.emit_conv2d(imp.block_builder, x, zx, lw.values, xs, _pair(stride), _pair(padding),
                              _pair(dilation), lw.bits if lw.bits in PACKED_BITS else 8)
    elif (lw is not None and int(groups) == xs[1] == lw.values.shape[0] and all(isinstance(d, int) for d in xs)
          and dot.available(dot.current_target())):  # depthwise: NHWC, vectorized along the channels
        kh, kw = lw.values.shape[2:]
        taps = relax.const(lw.values.reshape(lw.values.shape[0], kh * kw).T.astype("int8"))  # [KH*KW, C]: its tiny weight as int8
        nhwc = imp.block_builder.emit_te(kernels_int.depthwise_int, _emit(imp, R.permute_dims(x, [0, 2, 3, 1])), taps,
                                         zx, kh, kw, _pair(stride), _pair(padding), _pair(dilation))
        acc = _emit(imp, R.permute_dims(nhwc, [0, 3, 1, 2]))  # fused away: the dot kernels' rows are NHWC too
    if acc is None:
        stored, bits, span = _weight_rows(imp, weights, node, 2, w)
        acc = imp.block_builder.emit_te(kernels_int.conv2d_int, x, stored, zx, bits, span, _shape(imp, w),
                                        _pair(stride), _pair(padding), _pair(dilation), int(groups))
    if b is None:
        return acc
    return _emit(imp, R.add(acc, R.reshape(b, [1, -1, 1, 1])))


def convert_linear_int_grouped(node, imp, weights=None):
    x, zx, sx, w, ws, group, b = _args(node, imp)
    lw = weights.get(node.args[3]) if weights else None
    y = dot_layers.emit_grouped_linear(imp.block_builder, x, zx, float(sx), ws, group, lw.values if lw else None,
                                _shape(imp, x), lw.bits if lw else 8)
    if y is not None:  # the target's dot-product kernel per group, combined in float32
        return _emit(imp, R.add(y, b)) if b is not None else y
    groups = _shape(imp, ws)[-1]
    stored, bits, span = _weight_rows(imp, weights, node, 3, w, pad_to=groups * group)
    y = imp.block_builder.emit_te(kernels_int.grouped_linear, x, stored, ws, b, zx, float(sx), bits, group, span)
    _reschedule(imp.block_builder, y, kernels_int.split_blocks, "group_dot_int", group, bits, span)
    return y


def convert_linear_weight_only(node, imp, weights=None):
    x, w, ws, group, b = _args(node, imp)
    stored, bits, span = _weight_rows(imp, weights, node, 1, w)
    shape = _shape(imp, x)  # the kernel takes x as rows [tokens, K]
    if isinstance(stored, tvm.ir.expr.Constant):  # packed bytes, maybe read as uint32 words
        stored = relax.const(kernels_weight_only.kernel_rows(stored.value.numpy(), shape[-1], bits, group,
                                                             _shape(imp, ws)[-1]))
    tokens = functools.reduce(lambda a, d: a * d, shape[:-1], 1)
    rows = _emit(imp, R.reshape(x, [tokens, shape[-1]])) if len(shape) != 2 else x
    tile = kernels_weight_only.token_tile(tokens)
    y = imp.block_builder.emit_te(kernels_weight_only.weight_only_linear, rows, stored, ws, b, bits, group, span, tile)
    _reschedule(imp.block_builder, y, kernels_weight_only.schedule, tile, bits, span)
    return _emit(imp, R.reshape(y, [*shape[:-1], _shape(imp, y)[-1]])) if len(shape) != 2 else y


def _reschedule(bb, var, schedule, *args) -> None:
    """Replace the PrimFunc that `var`'s call_tir calls by schedule(func, *args)."""
    gvar = bb.lookup_binding(var).args[0]
    bb.update_func(gvar, schedule(bb.get()[gvar], *args))


def convert_requantize(node, imp):
    acc, m, sh, zo, qmin, qmax, axis = _args(node, imp)
    rank = len(_shape(imp, acc))
    channels = _shape(imp, m)[0]
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


def _reduce(reduce):
    """aten.amax / amin (run-time quantizer ranges, `dynamic_quant`): a Relax max / min."""
    def convert(node, imp):
        x, dims, keepdim = _args(node, imp)
        return _emit(imp, reduce(x, axis=list(dims) or None, keepdims=bool(keepdim)))
    return convert


def convert_gelu(node, imp):
    """aten.gelu (exact form) as x * 0.5 * (1 + erf(x / sqrt(2))) with TVM's fast_erf, a rational
    approximation (absolute error under 5e-7) that vectorizes: the importer's erf becomes a
    scalar libm call per element (164 of a transformer block's 505 us at d=256, 16 tokens)."""
    x = _args(node, imp)[0]
    if node.kwargs.get("approximate", "none") != "none":
        return _emit(imp, R.nn.gelu_tanh(x))
    half = relax.const(0.5, "float32")
    erf = _fast_erf(imp, R.multiply(x, relax.const(1 / math.sqrt(2), "float32")))
    return _emit(imp, R.multiply(x, R.add(half, R.multiply(half, erf))))


def convert_erf(node, imp):
    return _fast_erf(imp, _args(node, imp)[0])


def _fast_erf(imp, x):
    from tvm import topi

    return _emit(imp, imp.block_builder.call_te(topi.fast_erf, _emit(imp, x), primfunc_name_hint="fast_erf"))


def convert_full(node, imp):
    """aten.full at static sizes (e.g. a causal mask) as a constant: TVM 0.27 cannot legalize
    R.full (topi.full is handed the dtype as a PrimType, not a string)."""
    size, val = node.args[0], node.meta.get("val")
    if val is None or not all(isinstance(d, int) for d in size):
        raise LoweringError(f"aten.full ({node.name}) at symbolic sizes {size} has no lowering")
    return relax.const(torch.full([int(d) for d in size], node.args[1], dtype=val.dtype).numpy())


CONVERT_MAP = {
    "full.default": convert_full,
    "gelu.default": convert_gelu,
    "erf.default": convert_erf,
    "amax.default": _reduce(R.max),
    "amin.default": _reduce(R.min),
    "fake_quant.default": convert_fake_quant,
    "quantize.default": convert_quantize,
    "dequantize.default": convert_dequantize,
    "linear_int.default": convert_linear_int,
    "linear_int_grouped.default": convert_linear_int_grouped,
    "conv2d_int.default": convert_conv2d_int,
    "matmul_int.default": convert_matmul_int,
    "requantize.default": convert_requantize,
    "linear_weight_only.default": convert_linear_weight_only,
    "hadamard.default": convert_hadamard,
}
# converters that store the layer's weight constant in its packed form (see `weights`)
_READS_WEIGHTS = {"linear_int.default", "linear_int_grouped.default", "conv2d_int.default",
                  "linear_weight_only.default"}


def to_relax(gm: torch.fx.GraphModule, example_inputs: tuple, dynamic_batch: bool = False,
             bare_single_output: bool = False) -> tvm.IRModule:
    """Export the IR at the example shapes (or with a symbolic batch dimension) and import it
    into a Relax IRModule. Its main returns a tuple of the outputs, or with `bare_single_output`
    a lone output as it is (the host VM then skips building and indexing a one-element tuple,
    a few microseconds of every call)."""
    table = weight_table.collect(gm)  # per-layer widths, checked; torch.export drops node.meta
    dyn = None
    if dynamic_batch:  # torch.export specializes a size of 1: export at batch 2 at least
        example_inputs = widen_batch(example_inputs)
        batch = torch.export.Dim("batch", min=1)
        dyn = tuple({0: batch} for _ in example_inputs)
    try:
        ep = torch.export.export(gm, example_inputs, dynamic_shapes=dyn)
    except Exception as e:
        raise LoweringError(f"the IR does not export at the example shapes: {type(e).__name__}: {e}") from e
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices from its decompositions
            warnings.filterwarnings("ignore", category=FutureWarning)
            ep = ep.run_decompositions()  # done here so that its placeholders are the ones converted
            table.bind(ep)
            convert_map = {name: functools.partial(f, weights=table) if name in _READS_WEIGHTS else f
                           for name, f in CONVERT_MAP.items()}
            return from_exported_program(ep, custom_convert_map=convert_map, run_ep_decomposition=False,
                                         unwrap_unit_return_tuple=bare_single_output)
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
