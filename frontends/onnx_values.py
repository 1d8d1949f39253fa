"""Values and the converter table of the ONNX frontend.

An ONNX graph is imported by running it as torch code (`onnx_graph.OnnxModule`), one
converter per ONNX op type (`CONVERTERS`, filled by `onnx_ops*.py` and `onnx_qdq.py`).
While it runs, an ONNX value is one of:

    torch.Tensor   computed at run time from the graph inputs
    Const          known at load time: an initializer, a Constant, or the folded result of
                   a node whose inputs are all constants. Used as a tensor it reads a buffer
                   of the module (a `get_attr` in the IR); where an op needs a static
                   argument (a shape, axes, pads) it is read as Python numbers.
    Dims           a 1-D int64 shape (or a 0-d element of one) computed from the sizes of
                   run-time tensors: `Shape` and the integer ops that follow it. Kept as
                   Python ints / SymInts so a dynamic batch size survives `Reshape(x, shape)`.
                   (Any small value computed from shapes and constants alone is kept this
                   way too, with its dtype: see `onnx_graph.static_eval`.)
    QValue         the integer output of a QuantizeLinear, kept symbolic so that the
                   DequantizeLinear after it becomes one `qc.fake_quant`.
    QWeight        a DequantizeLinear of an integer initializer that feeds a weight input:
                   a float weight plus its scale and zero point (`onnx_qdq.py`).

A converter is `fn(n, *inputs)` with `n` the `Node` context (attributes, opset, node name,
tensor helpers); it returns one value or a tuple of values (one per ONNX output).
Converters read constants' values (`n.ints`, `n.floats`, `n.attr`, or inside `concrete()`)
as real tensors even while torch.export traces with fake tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from qcompiler.errors import OnnxImportError


@contextmanager
def concrete():
    """Compute on real tensors (constants' values) even inside torch.export's tracing."""
    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        yield


# ONNX element types the frontend claims, and their torch dtypes
DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.BOOL: torch.bool,
}


def dtype_of(elem_type: int, what: str) -> torch.dtype:
    if elem_type not in DTYPES:
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else elem_type
        claimed = ", ".join(onnx.TensorProto.DataType.Name(t) for t in DTYPES)
        raise OnnxImportError(f"{what} has element type {name}, which is not supported; supported types: {claimed}")
    return DTYPES[elem_type]


def tensor_from_proto(t: onnx.TensorProto, what: str) -> torch.Tensor:
    dtype = dtype_of(t.data_type, what)
    try:
        arr = onnx.numpy_helper.to_array(t)
    except Exception as e:
        raise OnnxImportError(f"{what}: cannot read tensor data: {type(e).__name__}: {e}") from e
    return torch.from_numpy(np.array(arr, copy=True)).to(dtype)


@dataclass(eq=False)
class Const:
    value: torch.Tensor
    hint: str = "const"  # name used for its buffer


@dataclass(eq=False)
class Dims:
    items: tuple  # ints and SymInts (or, for known small non-shape values, floats / bools)
    scalar: bool = False  # a 0-d element of a shape
    dtype: torch.dtype = torch.int64


def is_shape(v) -> bool:
    """A Dims holding integers (a shape or part of one)."""
    return isinstance(v, Dims) and v.dtype in (torch.int64, torch.int32)


@dataclass(eq=False)
class QValue:
    x: object  # the float input (Tensor or Const)
    scale: object
    zero_point: object
    axis: int
    block_size: int
    dtype: torch.dtype


@dataclass(eq=False)
class QWeight:
    q: torch.Tensor  # integer initializer
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int
    hint: str  # name for its buffers
    node: str  # the DequantizeLinear node


MAX_ELEMENTS = 1 << 28  # largest tensor an op may create from a shape (1 GiB of float32)


def check_size(n: "Node", shape) -> None:
    """Refuse shapes that are negative or too large to allocate, before allocating."""
    total = 1
    for d in shape:
        if isinstance(d, int) and d < 0:
            raise n.error(f"shape {list(shape)} has a negative dimension")
        total *= d if isinstance(d, int) else 1
    if total > MAX_ELEMENTS or any(isinstance(d, int) and d > MAX_ELEMENTS for d in shape):
        raise n.error(f"the output would hold {total} elements; the limit is {MAX_ELEMENTS}")


def is_const(v) -> bool:
    return v is None or isinstance(v, Const)


# ---------------------------------------------------------------- the converter table


@dataclass
class Converter:
    fn: Callable
    raw: bool  # inputs passed as values (Const, Dims, ...) instead of tensors
    static: dict[int, str] = field(default_factory=dict)  # input index -> "ints" | "floats"


CONVERTERS: dict[str, Converter] = {}


def op(*names: str, raw: bool = False, static: dict[int, str] | None = None):
    """Register a converter for the ONNX op types `names`."""

    def register(fn):
        for name in names:
            CONVERTERS[name] = Converter(fn, raw, static or {})
        return fn

    return register


class Node:
    """What a converter sees of its ONNX node: attributes, opset, name, tensor helpers."""

    def __init__(self, proto: onnx.NodeProto, opset: int, index: int):
        self.proto = proto
        self.op_type = proto.op_type
        self.name = proto.name or f"{proto.op_type}_{index}"
        self.opset = opset
        self.n_out = len(proto.output)
        self.attrs = {a.name: a for a in proto.attribute}
        self.module = None  # the OnnxModule at run time; None while folding constants

    def attr(self, name: str, default=None):
        a = self.attrs.get(name)
        if a is None:
            return default
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise self.error(f"attribute {name!r} holds a subgraph, which is not supported")
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            return v.decode(errors="replace")
        if isinstance(v, onnx.TensorProto):
            with concrete():
                return tensor_from_proto(v, f"attribute {name!r} of node {self.name!r}")
        if isinstance(v, (onnx.SparseTensorProto, onnx.TypeProto)) or (isinstance(v, list) and v and not isinstance(v[0], (int, float))):
            raise self.error(f"attribute {name!r} has a type that is not supported")
        return list(v) if not isinstance(v, (int, float)) else v

    def error(self, why: str) -> OnnxImportError:
        err = OnnxImportError(f"ONNX node {self.name!r} ({self.op_type}, opset {self.opset}): {why}")
        err.node = self.name
        return err

    # -- value helpers
    def t(self, v):
        """`v` as a torch tensor (constants through the module's buffers)."""
        if v is None or isinstance(v, torch.Tensor):
            return v
        if isinstance(v, Const):
            return self.module.buffer(v) if self.module is not None else v.value
        if isinstance(v, Dims):
            t = torch.tensor(list(v.items), dtype=v.dtype)
            return t.reshape(()) if v.scalar else t
        if isinstance(v, QValue):
            from .onnx_qdq import materialize

            return materialize(self, v)
        if isinstance(v, QWeight):
            from .onnx_qdq import weight_tensor

            return weight_tensor(self, v)
        raise self.error(f"unexpected value {type(v).__name__}")

    def ints(self, v, what: str = "input") -> list:
        """A static integer list (from a constant or from tensor sizes)."""
        if v is None:
            return None
        if is_shape(v):
            return list(v.items)
        if isinstance(v, Const) and not v.value.dtype.is_floating_point:
            with concrete():
                return [int(x) for x in v.value.flatten().tolist()]
        if isinstance(v, (Const, Dims)):
            raise self.error(f"{what} must hold integers, not {v.dtype if isinstance(v, Dims) else v.value.dtype}")
        raise self.error(f"{what} must be a constant (or computed from tensor shapes); here it is computed "
                         "from run-time data, which the IR cannot express")

    def floats(self, v, what: str = "input") -> list:
        if isinstance(v, Const):
            with concrete():
                return [float(x) for x in v.value.flatten().tolist()]
        if isinstance(v, Dims) and all(isinstance(x, (int, float)) for x in v.items):
            return [float(x) for x in v.items]
        if v is None:
            return None
        raise self.error(f"{what} must be a constant; here it is computed from run-time data")

    def derived(self, owner, tag: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`make()`, a tensor derived at load time from a constant `owner` (Const, QWeight),
        stored once as its own buffer, so the IR reads it with a get_attr."""
        if self.module is None:
            return make()
        return self.module.derived(owner, tag, make)


def run_converter(conv: Converter, n: Node, inputs: list):
    """Call a converter; returns a list of output values."""
    if not conv.raw:
        args = []
        for i, v in enumerate(inputs):
            kind = conv.static.get(i)
            if kind == "ints":
                args.append(n.ints(v, f"input {i} of {n.op_type}"))
            elif kind == "floats":
                args.append(n.floats(v, f"input {i} of {n.op_type}"))
            else:
                args.append(n.t(v))
        inputs = args
    out = conv.fn(n, *inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]
