"""`export_onnx`: write float, fake-quant or converted IR as an ONNX model in QDQ form.

ONNX states quantization with QuantizeLinear (QL) and DequantizeLinear (DQ) around float ops:

    activation fake_quant(x, s, z, qmin, qmax)   ->  DQ(clip(QL(x, s, z), qmin, qmax), s, z)   int8
    weight fake_quant(W, s, 0, qmin, qmax, g)    ->  DQ(Wq, s, axis | axis + block_size=g)
    quantize / dequantize                        ->  clip(QL(x, s, z)) / DQ(q, s, z)
    y = integer op(q...), requantize(y)          ->  QL(float op(DQ(q)...))   (onnx_export_lower)

Weights are stored quantized: an INT8 initializer, or INT4 (two values a byte) when the weight
is at most 4 bits wide and the opset is 21 or newer; 2- and 3-bit weights are INT4 holding
[-1, 1] or [-3, 3], since ONNX has no narrower type. Per-channel scales give DQ an `axis`,
group-wise scales `axis` and `block_size` (opset 21). A ragged last group is written as is:
the spec gives DQ ceil(K / block_size) scales along the axis, and onnxruntime runs it.
Activations are int8 at every width: a narrower grid is an int8 Clip after QL, exact because
clamp(round(x/s) + z, qmin, qmax) only narrows QL's saturation to [-128, 127].

Below opset 21 ONNX has neither INT4 nor blocked DQ: weights of at most 4 bits are stored as
INT8 with a warning (the same values, twice the bytes); group-wise weights are refused.

How, and why this way. Each step is done where it is simplest:
1. `onnx_export_lower` rewrites a copy of the IR in torch: integer ops become DQ(operands) ->
   float op, requantize a quantize of the float result, weight fake-quant a dequantize of
   stored integer weights. The result is still a runnable IR computing the same function
   (up to float rounding), so the export itself has nothing quantization-specific left to do.
2. `torch.onnx.export(dynamo=True)` translates it: torch's own translations for ATen ops,
   onnxscript functions (`custom_translation_table`) for the qc ops left, which read axis and
   block size off the scale's shape.
3. `onnx_export_finish` turns weights recorded as 4-bit into INT4 initializers with onnx_ir
   (torch has no int4 tensors to export) and tidies the Q/DQ nodes. Then
   `onnx.checker.check_model(full_check=True)` and a write through a temporary file.

Running the model in onnxruntime: its default session fuses QDQ into integer kernels. On x86
CPUs without VNNI those compute int8 x int8 products in saturating int16 pairs (onnxruntime's
documented u8s8 limitation), which is wrong for full-range 8-bit weights; the session option
`session.disable_quant_qdq = "1"` runs the QDQ graph as ONNX defines it. For fake-quant
exports the default session also rounds float biases to int32 (its bias quantization).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import warnings

import onnx
import onnx_ir
import onnxscript
import torch
import torch.fx

from qcompiler.errors import LoweringError, QCompilerError
from qcompiler.ir import example_inputs, op_name, widen_batch

from .onnx_export_finish import INT4_OPSET, finish
from .onnx_export_lower import lower_to_qdq

MIN_OPSET, MAX_OPSET = 18, 23


def export_onnx(ir_or_artifact, path, opset: int = 21) -> onnx.ModelProto:
    """Write the IR (float, fake-quant or converted; or an Artifact's IR) to `path` as ONNX.

    The batch dimension stays dynamic ("batch") when the IR's is. Returns the written model.
    Raises LoweringError for an op or a quantization that ONNX cannot express at `opset`
    (naming the node), QCompilerError for a path that cannot be written.
    """
    gm = getattr(ir_or_artifact, "ir", ir_or_artifact)
    if not isinstance(gm, torch.fx.GraphModule) or "qc" not in gm.meta:
        raise QCompilerError(f"export_onnx takes the IR (qcompiler.trace(...), art.ir) or an Artifact, "
                             f"got {type(ir_or_artifact).__name__}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise LoweringError(f"export_onnx: opset={opset!r} is not supported; choose {MIN_OPSET}..{MAX_OPSET} "
                            f"(INT4 weights and group-wise scales need {INT4_OPSET} or newer)")
    path = _check_path(path)
    _check_groups(gm, opset)
    qdq, weight_bits = lower_to_qdq(gm)  # 1. integer ops -> DQ + float ops, in torch
    _warn_int8_storage(weight_bits, opset)
    model = _torch_export(qdq, gm, opset)  # 2. torch.onnx + onnxscript for the qc ops
    finish(model, weight_bits, opset)  # 3. INT4 storage, tidy Q/DQ
    model.producer_name, model.producer_version = "qcompiler", _version()
    proto = onnx_ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise LoweringError(f"export_onnx produced an invalid ONNX model (a qcompiler bug): {e}") from e
    _write(proto, path)
    return proto


# ---------------------------------------------------------------- qc op translations


def _translations(opset: int) -> dict:
    """onnxscript functions for the qc ops that `lower_to_qdq` leaves, at `opset`."""
    op = getattr(onnxscript, f"opset{opset}")

    def fake_quant(x, scale, zero_point, quant_min, quant_max, group_size=0):
        s, z, attrs = _qparams(op, x, scale, zero_point, group_size, onnx_ir.DataType.INT8)
        q = _clip(op, op.QuantizeLinear(x, s, z, **attrs), quant_min, quant_max)
        return op.DequantizeLinear(q, s, z, **attrs)

    def quantize(x, scale, zero_point, quant_min, quant_max, group_size=0):
        s, z, attrs = _qparams(op, x, scale, zero_point, group_size, onnx_ir.DataType.INT8)
        return _clip(op, op.QuantizeLinear(x, s, z, **attrs), quant_min, quant_max)

    def dequantize(q, scale, zero_point, group_size=0):
        s, z, attrs = _qparams(op, q, scale, zero_point, group_size, q.dtype)
        return op.DequantizeLinear(q, s, z, **attrs)

    qc = torch.ops.qc
    return {qc.fake_quant.default: fake_quant, qc.quantize.default: quantize, qc.dequantize.default: dequantize}


def _qparams(op, x, scale, zero_point, group_size, dtype):
    """ONNX scale, zero point (as `dtype`) and attributes for qc's broadcasting `scale`.

    A qc scale broadcasts against x: one element is per tensor; one dimension longer than 1
    is per channel (DQ's `axis`); with `group_size`, it has x's rank and ceil(K/g) elements
    along the last dimension, which is ONNX's blocked layout (`axis`, `block_size`).
    """
    shape, rank = [int(d) for d in scale.shape], len(x.shape)
    if group_size:
        return scale, op.Cast(zero_point, to=dtype), {"axis": rank - 1, "block_size": group_size}
    long_dims = [i for i, d in enumerate(shape) if d != 1]
    if not long_dims:
        to, attrs = op.Constant(value=onnx.helper.make_tensor("scalar", onnx.TensorProto.INT64, [0], [])), {}
    elif len(long_dims) == 1:
        to, attrs = op.Constant(value_ints=[-1]), {"axis": rank - len(shape) + long_dims[0]}
    else:
        raise LoweringError(f"export_onnx: a scale of shape {shape} is neither per tensor, per channel nor per group")
    return op.Reshape(scale, to), op.Cast(op.Reshape(zero_point, to), to=dtype), attrs


def _clip(op, q, qmin: int, qmax: int):
    """Narrow QuantizeLinear's int8 saturation to the grid [qmin, qmax]."""
    if (qmin, qmax) == (-128, 127):
        return q
    bound = lambda v: op.Constant(value=onnx.helper.make_tensor("bound", onnx.TensorProto.INT8, [], [v]))  # noqa: E731
    return op.Clip(q, bound(qmin), bound(qmax))


# ---------------------------------------------------------------- torch.onnx.export


def _torch_export(qdq: torch.fx.GraphModule, ir_gm: torch.fx.GraphModule, opset: int) -> onnx_ir.Model:
    """Run torch's dynamo exporter on the QDQ graph; its failures become LoweringErrors."""
    args = example_inputs(ir_gm)
    dynamic = ir_gm.meta["qc"].get("dynamic_batch", False)
    if dynamic:  # torch.export specializes a batch of 1: trace at 2, as qcompiler.trace does
        args = widen_batch(args)
    for m in qdq.modules():  # modules from torch.export refuse .eval(); they are inference graphs
        m.training = False
    outputs = next(n for n in qdq.graph.nodes if n.op == "output").args[0]
    n_out = len(outputs) if isinstance(outputs, (list, tuple)) else 1
    with _quiet():
        try:
            program = torch.onnx.export(
                qdq, args, dynamo=True, opset_version=opset, optimize=True, verbose=False,
                custom_translation_table=_translations(opset),
                dynamic_shapes=tuple({0: "batch"} for _ in args) if dynamic else None,
                output_names=["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
        except Exception as e:  # torch.onnx raises many types; all mean "cannot export"
            raise _export_error(e, opset) from e
    return program.model


def _export_error(e: Exception, opset: int) -> QCompilerError:
    """Our own error if one is inside `e`; else a LoweringError naming the failing node."""
    cause = e
    while cause is not None:
        if isinstance(cause, QCompilerError):
            return cause
        cause = cause.__cause__ or cause.__context__
    m = re.search(r"translating node %(\w+) .*?target=([\w.:]+)", str(e))
    if m:
        target = m.group(2).removeprefix("torch.ops.").removesuffix(".default")
        err = LoweringError(f"export_onnx: node {m.group(1)} ({target}) has no ONNX translation in torch.onnx "
                            f"at opset {opset}; rewrite the model without it or register a translation")
        err.node = m.group(1)
        return err
    first = next((ln for ln in str(e).splitlines() if ln.strip()), "")[:300]
    return LoweringError(f"export_onnx: torch.onnx.export failed: {type(e).__name__}: {first}")


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines and its notes about packages we do not use."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _check_groups(gm: torch.fx.GraphModule, opset: int) -> None:
    """Group-wise scales need DequantizeLinear's block_size, which ONNX has from opset 21."""
    if opset >= INT4_OPSET:
        return
    for n in gm.graph.nodes:
        if _group_size(n):
            err = LoweringError(
                f"export_onnx: node {n.name} ({op_name(n)}) has group-wise scales (group {_group_size(n)}); "
                f"DequantizeLinear's block_size exists from opset {INT4_OPSET}: export with "
                f"opset={INT4_OPSET} or quantize per channel")
            err.node = n.name
            raise err


def _group_size(n: torch.fx.Node) -> int:
    """The group size of a qc node that has one (0 for any other node)."""
    pos = {"qc.dequantize": 3, "qc.quantize": 5, "qc.fake_quant": 5, "qc.linear_int_grouped": 5}.get(op_name(n))
    if pos is None:
        return 0
    return n.args[pos] if len(n.args) > pos else n.kwargs.get("group_size", 0)


def _warn_int8_storage(weight_bits: dict[str, int], opset: int) -> None:
    narrow = sorted(name for name, bits in weight_bits.items() if bits <= 4)
    if narrow and opset < INT4_OPSET:
        shown = ", ".join(narrow[:4]) + (", ..." if len(narrow) > 4 else "")
        warnings.warn(f"export_onnx: opset {opset} has no INT4; {len(narrow)} weights of at most 4 bits ({shown}) "
                      f"are stored as INT8 with the same values; export with opset>={INT4_OPSET} for INT4",
                      stacklevel=3)


# ---------------------------------------------------------------- files


def _check_path(path) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise QCompilerError(f"export_onnx: path must be a file name, got {type(path).__name__}") from None
    if os.path.isdir(path):
        raise QCompilerError(f"export_onnx: cannot write {path}: it is a folder; give a file name "
                             f"such as {os.path.join(path, 'model.onnx')}")
    if os.path.exists(path) and not os.path.isfile(path):  # a device, pipe or socket: never replace it
        raise QCompilerError(f"export_onnx: cannot write {path}: it exists and is not a regular file")
    path = os.path.realpath(path)  # through a symlink, as open() would, not over it
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise QCompilerError(f"export_onnx: cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise QCompilerError(f"export_onnx: cannot write {path}: folder {folder} is not writable")
    return path


def _write(proto: onnx.ModelProto, path: str) -> None:
    """Write through a temporary file in the same folder: a failed write leaves no half file."""
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except (OSError, ValueError) as e:  # ValueError: protobuf refuses models over 2 GB
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise QCompilerError(f"export_onnx: cannot write {path}: {e}") from e


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qcompiler")
    except PackageNotFoundError:
        return "unknown"
