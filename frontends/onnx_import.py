"""The ONNX frontend: an ONNX model (opsets 13 to 21) -> the IR.

    ir = load_onnx("model.onnx")                      # or a ModelProto, or the file's bytes

Pipeline: read (external data included) -> validate (onnx.checker, opset range, supported
ops and types) -> `OnnxModule` (the graph as torch code, constants folded, `onnx_graph.py`)
-> one eager run on the example inputs -> `qcompiler.frontends.pytorch.trace`, so the IR is
exactly what `qc.trace` gives for a PyTorch model: ATen ops, initializers as buffers, dynamic
batch where the graph allows it. Each ATen node keeps the ONNX node it comes from in
`node.meta["onnx"] = {"name", "op_type"}`. A QDQ model's QuantizeLinear/DequantizeLinear
become `qc.fake_quant` with their scales kept (`onnx_qdq.py`); its quantized Conv / Gemm /
MatMul are annotated for `convert`.

Example inputs default to the graph's declared input shapes (random normal floats, zero
integers). A symbolic leading (batch) dimension defaults to 1; any other symbolic or unknown
dimension needs `example_inputs`. Every failure is an `OnnxImportError` (a QCompilerError)
naming the file, node, op or input at fault.
"""

from __future__ import annotations

import math
import os

import onnx
import onnx.external_data_helper
import torch
import torch.fx
import torch.fx.traceback as fx_traceback

from qcompiler.errors import QCompilerError
from qcompiler.ir import as_tuple, cleanup, op_name, placeholders

from . import onnx_ops, onnx_ops_nn, onnx_ops_shape, onnx_qdq  # noqa: F401  (fill CONVERTERS)
from .onnx_graph import OnnxModule, build_module
from .onnx_values import CONVERTERS, DTYPES, MAX_ELEMENTS, OnnxImportError, dtype_of
from .pytorch import trace

OPSETS = (13, 21)  # the default-domain opsets the frontend reads
SUPPORTED_ONNX_OPS: tuple[str, ...] = tuple(sorted(CONVERTERS))
_DEFAULT_DOMAINS = ("", "ai.onnx")

__all__ = ["OPSETS", "OnnxImportError", "SUPPORTED_ONNX_OPS", "load_onnx"]


def load_onnx(path_or_model, example_inputs=None, *, dynamic_batch: bool = True) -> torch.fx.GraphModule:
    """Import an ONNX model (a path, a `onnx.ModelProto` or the file's bytes) into the IR.

    example_inputs: a tensor or tuple of tensors, one per graph input; needed when an input
        has a symbolic dimension other than a leading batch dimension (which defaults to 1).
    dynamic_batch: keep dimension 0 of the inputs dynamic where the graph allows it (as
        `qc.trace` does); False gives an IR fixed to the example shapes, and traces faster.
    """
    try:
        return _load(path_or_model, example_inputs, dynamic_batch)
    except QCompilerError:
        raise
    except Exception as e:  # a safety net: every deliberate error above is an OnnxImportError
        raise OnnxImportError(f"internal error while importing the model: {type(e).__name__}: {e}") from e


def _load(path_or_model, example_inputs, dynamic_batch) -> torch.fx.GraphModule:
    # read: file, bytes or proto; external data loaded and checked
    model = read_model(path_or_model)
    # validate: checker, opset range, supported ops and input types
    opset = check_model(model)
    # build: the graph as torch code, constants folded
    module = build_module(model, opset)
    examples = _example_inputs(model, module.input_names, example_inputs)
    # run once: registers the constants' buffers; errors name their ONNX node
    expected = _run(module, examples)
    # trace: the same IR `qc.trace` gives, ONNX node names carried in node.meta
    dynamic = dynamic_batch and _try_dynamic(model, module, examples)
    gm = _trace(module, examples, expected, dynamic)
    gm.meta["qc"]["onnx"] = {"opset": opset, "inputs": list(module.input_names),
                             "outputs": list(module.output_names), "producer": model.producer_name}
    return gm


# ---------------------------------------------------------------- reading


def read_model(src) -> onnx.ModelProto:
    if isinstance(src, onnx.ModelProto):
        model, base = src, None
    elif isinstance(src, (bytes, bytearray)):
        model, base = _parse(bytes(src), "the given bytes"), None
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise OnnxImportError(f"ONNX file {path!r} does not exist")
        with open(path, "rb") as f:
            model, base = _parse(f.read(), path), os.path.dirname(os.path.abspath(path))
    else:
        raise OnnxImportError(f"load_onnx takes a path, an onnx.ModelProto or bytes, not {type(src).__name__}")
    _load_external(model, base)
    return model


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError, and friends
        raise OnnxImportError(f"{what} is not a valid ONNX file (truncated or corrupt): {type(e).__name__}: {e}") from e
    if not model.HasField("graph"):
        raise OnnxImportError(f"{what} is not a valid ONNX file (truncated or corrupt): it holds no graph")
    return model


def _load_external(model: onnx.ModelProto, base: str | None) -> None:
    tensors = [t for t in onnx.external_data_helper._get_all_tensors(model)
               if onnx.external_data_helper.uses_external_data(t)]
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if base is None:
            raise OnnxImportError(f"initializer {t.name!r} keeps its data in external file {location!r}; "
                                  "pass the model's path so the file can be found")
        full = os.path.normpath(os.path.join(base, location))
        if not location or os.path.isabs(location) or not full.startswith(os.path.normpath(base) + os.sep):
            raise OnnxImportError(f"initializer {t.name!r}: external data location {location!r} must be a "
                                  "relative path inside the model's folder")
        if not os.path.isfile(full):
            raise OnnxImportError(f"initializer {t.name!r}: external data file {location!r} is missing "
                                  f"(looked in {base})")
    if tensors:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, base)
        except Exception as e:
            raise OnnxImportError(f"cannot read the model's external data: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------- validation


def check_model(model: onnx.ModelProto) -> int:
    """Run onnx.checker and the frontend's own checks; returns the default-domain opset."""
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxImportError(f"the model fails onnx.checker: {first}") from e
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions:
        raise OnnxImportError("the model imports no default-domain ('ai.onnx') opset")
    opset = versions[0]
    lo, hi = OPSETS
    if not lo <= opset <= hi:
        raise OnnxImportError(
            f"the model uses opset {opset}; the ONNX frontend reads opsets {lo} to {hi}. Convert it first, e.g. "
            f"onnx.version_converter.convert_version(model, {min(max(opset, lo), hi)})"
        )
    unsupported = [(i, n) for i, n in enumerate(model.graph.node)
                   if n.domain not in _DEFAULT_DOMAINS or n.op_type not in CONVERTERS]
    if unsupported:
        i, node = unsupported[0]
        domain = f" of domain {node.domain!r}" if node.domain not in _DEFAULT_DOMAINS else ""
        name = node.name or f"#{i}"
        others = sorted({n.op_type for _, n in unsupported} - {node.op_type})
        also = f" (the model also uses {', '.join(others)})" if others else ""
        err = OnnxImportError(
            f"ONNX op {node.op_type!r}{domain} (node {name!r}, opset {opset}) is not supported{also}. "
            f"Supported ops: {', '.join(SUPPORTED_ONNX_OPS)}"
        )
        err.node, err.op_type = name, node.op_type
        raise err
    if model.graph.sparse_initializer:
        raise OnnxImportError("sparse initializers are not supported")
    for v in model.graph.input:
        if v.type.WhichOneof("value") != "tensor_type":
            raise OnnxImportError(f"graph input {v.name!r} is not a tensor; only tensor inputs are supported")
        dtype_of(v.type.tensor_type.elem_type, f"graph input {v.name!r}")
    return opset


# ---------------------------------------------------------------- example inputs


def _declared(model, names):
    by_name = {v.name: v for v in model.graph.input}
    out = []
    for name in names:
        t = by_name[name].type.tensor_type
        dims = None if not t.HasField("shape") else [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out.append((name, DTYPES[t.elem_type], dims))
    return out


def _example_inputs(model, names, given) -> tuple:
    declared = _declared(model, names)
    if given is not None:
        try:
            given = as_tuple(given)
        except QCompilerError as e:
            raise OnnxImportError(str(e)) from e
        if len(given) != len(declared):
            raise OnnxImportError(f"the model takes {len(declared)} inputs ({', '.join(names)}), "
                                  f"example_inputs has {len(given)}")
        for (name, dtype, dims), x in zip(declared, given):
            if not isinstance(x, torch.Tensor):
                raise OnnxImportError(f"example input for {name!r} is a {type(x).__name__}, not a tensor")
            if x.dtype != dtype or (dims is not None and (x.dim() != len(dims) or any(
                    d is not None and d != s for i, (d, s) in enumerate(zip(dims, x.shape)) if i > 0))):
                raise OnnxImportError(f"example input for {name!r} is {x.dtype}{list(x.shape)}; the model declares "
                                      f"{dtype}{['?' if d is None else d for d in dims or []]} (only dim 0 may differ)")
        return given
    gen = torch.Generator().manual_seed(0)
    examples = []
    for name, dtype, dims in declared:
        if dims is None:
            raise OnnxImportError(f"graph input {name!r} has no declared shape: pass example_inputs")
        if any(d is None for d in dims[1:]):
            raise OnnxImportError(
                f"graph input {name!r} has symbolic dimensions {['?' if d is None else d for d in dims]}; only a "
                "leading batch dimension can default (to 1): pass example_inputs with the shapes to compile for"
            )
        shape = [1 if d is None else d for d in dims]
        if any(d < 0 or d > MAX_ELEMENTS for d in shape) or math.prod(shape) > MAX_ELEMENTS:
            raise OnnxImportError(f"graph input {name!r} declares the shape {shape}, which cannot be allocated: "
                                  "pass example_inputs")
        if dtype.is_floating_point:
            examples.append(torch.randn(shape, generator=gen, dtype=dtype))
        else:
            examples.append(torch.zeros(shape, dtype=dtype))
    return tuple(examples)


# ---------------------------------------------------------------- tracing


def _same(a, b) -> bool:
    a = (a,) if isinstance(a, torch.Tensor) else tuple(a)
    b = (b,) if isinstance(b, torch.Tensor) else tuple(b)
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-6, equal_nan=True)
        for x, y in zip(a, b))


def _run(module: OnnxModule, examples: tuple, fake: bool = False):
    """Run the module (on fake tensors if `fake`: shapes only, nothing computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with torch.no_grad():
            if not fake:
                return module(*examples)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                return module(*(mode.from_tensor(x) for x in examples))
    except QCompilerError:
        raise
    except Exception as e:
        raise OnnxImportError(f"the graph does not run on its example inputs: {type(e).__name__}: {e}") from e


def _try_dynamic(model, module: OnnxModule, examples: tuple) -> bool:
    """Whether to try a dynamic batch: yes if the model declares a symbolic batch size;
    if it declares a fixed one, only when the graph also runs at batch 2 (the size `trace`
    uses for a batch of 1), checked on fake tensors."""
    declared = _declared(model, module.input_names)
    if all(dims and dims[0] is None for _, _, dims in declared):
        return True
    if not all(x.dim() and x.shape[0] == 1 for x in examples):
        return True
    try:
        _run(module, tuple(x.expand(2, *x.shape[1:]).contiguous() for x in examples), fake=True)
    except QCompilerError:
        return False
    return True


def _trace(module: OnnxModule, examples: tuple, expected, dynamic: bool) -> torch.fx.GraphModule:
    """Trace with a dynamic batch if asked; if that IR disagrees with the graph at the
    example batch (a graph that hard-codes its batch size), trace with static shapes."""
    gm = _export(module, examples, dynamic)
    if dynamic:
        if gm.meta["qc"]["dynamic_batch"]:
            try:
                with torch.no_grad():
                    ok = _same(gm(*examples), expected)
            except Exception:
                ok = False
        else:  # torch.export specialized the batch, at the size it traced with
            ok = all(tuple(p.meta["val"].shape) == tuple(x.shape) for p, x in zip(placeholders(gm), examples))
        if not ok:
            gm = _export(module, examples, False)
    _move_annotations(gm)
    onnx_qdq.annotate_quantized(gm)
    cleanup(gm)
    return gm


def _export(module, examples, dynamic):
    with fx_traceback.preserve_node_meta():
        return trace(module, examples, dynamic_batch=dynamic)


def _move_annotations(gm: torch.fx.GraphModule) -> None:
    """node.meta["custom"] -> node.meta["onnx"] / ["qc"]; qc.fake_quant gets its group_size
    argument back (torch.export drops arguments equal to their default)."""
    for node in gm.graph.nodes:
        custom = node.meta.pop("custom", None) or {}
        if "onnx" in custom:
            node.meta["onnx"] = dict(custom["onnx"])
        if "qc" in custom and op_name(node) == "qc.fake_quant":
            node.meta["qc"] = dict(custom["qc"])
        if node.op == "call_function" and op_name(node) == "qc.fake_quant" and len(node.args) == 5:
            node.args = (*node.args, 0)
    gm.recompile()
