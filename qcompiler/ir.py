"""The IR: an ATen-level `torch.fx.GraphModule` from `torch.export`, plus its text form.

Frontends (`qcompiler.frontends`) produce it. Facts about the graph that are not
ops live in `gm.meta["qc"]` (the example inputs) and per node in `node.meta["qc"]`:

    role          "weight" | "act" for `qc.fake_quant` nodes; "int" for converted compute
    bits, symmetric, granularity ("tensor" | "channel" | "group"), group_size
    observed      True once `calibrate` has set an activation quantizer's range
    source        name of the float op a quantizer or integer op belongs to
    imported      True on quantizers read from a QDQ ONNX model (their scales are kept);
                  `axis` on imported weight quantizers
    node.meta["onnx"] = {"name", "op_type"}: the ONNX node an op comes from (ONNX frontend);
    gm.meta["qc"]["onnx"] = {"opset", "inputs", "outputs", "producer"}

`print_ir` gives a stable text form (symbolic sizes renamed s0, s1, ... in order of
appearance, floats printed to 6 significant digits) for dumps, golden tests and bug reports.
`propagate_shapes` re-derives every node's `meta["val"]` after a rewrite; it is the
verifier's check that the graph still traces.
"""

from __future__ import annotations

import copy
import re
import warnings

import torch
import torch.fx

from .errors import TraceError, VerificationError
from . import ops  # noqa: F401  (registers the qc ops before any graph is built)

_DTYPE = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64", torch.bool: "bool",
}


def as_tuple(example_inputs) -> tuple:
    """Example inputs as a tuple (a single tensor is accepted)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TraceError(
            f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
        )
    return example_inputs


def widen_batch(args: tuple) -> tuple:
    """Inputs with a batch (dim 0) of 1 repeated to 2: torch.export specializes sizes 0 and 1,
    so a symbolic batch must be traced at 2 or more."""
    return tuple(a.repeat(2, *([1] * (a.dim() - 1))) if a.dim() and a.shape[0] == 1 else a for a in args)


def copy_ir(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of the IR (meta included)."""
    with warnings.catch_warnings():  # torch's pytree spec pickling warns about its own LeafSpec
        warnings.filterwarnings("ignore", category=FutureWarning)
        return copy.deepcopy(gm)


def example_inputs(gm: torch.fx.GraphModule) -> tuple:
    return gm.meta["qc"]["example_inputs"]


def placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def propagate_shapes(gm: torch.fx.GraphModule) -> None:
    """Recompute `meta["val"]` of every node with fake tensors (symbolic batch kept)."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    vals = [n.meta.get("val") for n in placeholders(gm)]
    mode = detect_fake_mode(vals) if all(v is not None for v in vals) else None
    try:
        if mode is not None:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)
        else:  # a graph rebuilt from a file has no fake inputs: use the concrete examples
            from torch._subclasses.fake_tensor import FakeTensorMode

            FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs(gm))
    except Exception as e:
        raise VerificationError(f"the IR no longer traces: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------- text form


class _Printer:
    def __init__(self):
        self.syms: dict[str, str] = {}

    def size(self, s) -> str:
        text = str(s)
        if isinstance(s, int):
            return text
        return re.sub(r"s\d+", lambda m: self.syms.setdefault(m.group(0), f"s{len(self.syms)}"), text)

    def type_of(self, val) -> str:
        if isinstance(val, torch.Tensor):
            return f"{_DTYPE.get(val.dtype, str(val.dtype))}[{', '.join(self.size(d) for d in val.shape)}]"
        if isinstance(val, (tuple, list)):
            return "(" + ", ".join(self.type_of(v) for v in val) + ")"
        return ""

    def arg(self, a) -> str:
        if isinstance(a, torch.fx.Node):
            return f"%{a.name}"
        if isinstance(a, float):
            return f"{a:.6g}"
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(self.arg(x) for x in a) + "]"
        if isinstance(a, torch.dtype):
            return _DTYPE.get(a, str(a))
        return repr(a) if isinstance(a, str) else str(a)

    def meta(self, node) -> str:
        qc = node.meta.get("qc")
        if not qc:
            return ""
        items = ", ".join(f"{k}={self.arg(v)}" for k, v in sorted(qc.items()))
        return f"  {{{items}}}"


def op_name(node: torch.fx.Node) -> str:
    """`aten.linear`, `qc.fake_quant`, ... (overload `.default` dropped)."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.namespace, t._schema.name.split("::")[-1]
        return f"{ns}.{name}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
    return getattr(t, "__name__", str(t))


def print_ir(gm: torch.fx.GraphModule) -> str:
    """The stable text form of the IR."""
    p = _Printer()
    lines = []
    ins = [f"%{n.name}: {p.type_of(n.meta.get('val'))}" for n in placeholders(gm)]
    lines.append(f"graph({', '.join(ins)}) {{")
    for n in gm.graph.nodes:
        ty = p.type_of(n.meta.get("val"))
        ty = f" : {ty}" if ty else ""
        if n.op == "get_attr":
            t = _attr(gm, n.target)
            ty = f" : {p.type_of(t)}" if isinstance(t, torch.Tensor) else ty
            lines.append(f"  %{n.name} = param {n.target}{ty}")
        elif n.op == "call_function":
            args = [p.arg(a) for a in n.args] + [f"{k}={p.arg(v)}" for k, v in n.kwargs.items()]
            lines.append(f"  %{n.name} = {op_name(n)}({', '.join(args)}){ty}{p.meta(n)}")
        elif n.op == "output":
            lines.append(f"  return {p.arg(n.args[0])}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def get_attr_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    return _attr(gm, node.target)


# ---------------------------------------------------------------- verifier

_INT8_ARGS = {  # integer op -> positions of its int8 tensor operands
    "qc.linear_int": (0, 2), "qc.linear_int_grouped": (0, 3), "qc.conv2d_int": (0, 2),
    "qc.matmul_int": (0, 2), "qc.dequantize": (), "qc.linear_weight_only": (1,),
}


def verify(gm: torch.fx.GraphModule) -> None:
    """Raise VerificationError unless shapes trace and every `qc` op is well formed."""
    propagate_shapes(gm)
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = op_name(n)
        if name in ("qc.fake_quant", "qc.quantize"):
            qmin, qmax = n.args[3], n.args[4]
            if not -128 <= qmin < qmax <= 127:
                raise _bad(n, f"integer range [{qmin}, {qmax}] does not fit int8")
            scale = n.args[1]
            if scale.op == "get_attr":
                s = get_attr_tensor(gm, scale)
                if not bool(torch.isfinite(s).all() and (s > 0).all()):
                    raise _bad(n, f"scale {scale.target} has values that are not positive and finite")
        for pos in _INT8_ARGS.get(name, ()):
            val = n.args[pos].meta.get("val") if isinstance(n.args[pos], torch.fx.Node) else None
            if val is not None and val.dtype != torch.int8:
                raise _bad(n, f"operand {pos} is {val.dtype}, expected int8")


def _bad(node: torch.fx.Node, why: str) -> VerificationError:
    err = VerificationError(f"malformed {op_name(node)} at node {node.name}: {why}")
    err.node = node.name
    return err


# ---------------------------------------------------------------- rewriting helpers


def add_constant(gm: torch.fx.GraphModule, hint: str, value: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
    """Register `value` as a buffer of `gm` under a fresh name and return a get_attr node."""
    base = re.sub(r"\W", "_", hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def cleanup(gm: torch.fx.GraphModule) -> None:
    """Remove dead nodes and buffers/parameters no node reads any more (nor names as the
    float weight behind a rounded one, `meta["qc"]["float_weight"]`); recompile."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used |= {n.meta["qc"]["float_weight"] for n in gm.graph.nodes if "float_weight" in n.meta.get("qc", {})}
    for name, _ in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            owner = _attr(gm, owner_path) if owner_path else gm
            if leaf in owner._buffers:
                del owner._buffers[leaf]
            elif leaf in owner._parameters:
                del owner._parameters[leaf]
    gm.recompile()
