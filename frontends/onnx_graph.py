"""`OnnxModule`: an ONNX graph run as torch code, the module the ONNX frontend traces.

Construction walks the nodes in order once:
  - initializers become `Const`s;
  - a DequantizeLinear of an integer initializer that only feeds weight inputs
    (Conv, ConvTranspose, Gemm, MatMul) becomes a `QWeight` (`onnx_qdq.plan_weight`);
  - a node whose inputs are all constants is evaluated now (constant folding, with the same
    converter that would run it at run time), its outputs become `Const`s;
  - every other node becomes a step of `forward`.
`forward` runs the steps, each inside `torch.fx.traceback.annotate({"onnx": {name, op_type}})`
so that `torch.export` records which ONNX node every ATen node comes from. Constants read by
run-time nodes are the module's buffers; tensors derived from them at load time (a weight
transposed for aten.linear, a scale shaped to broadcast) become buffers on first use, i.e. in
the eager run `load_onnx` makes before tracing.
"""

from __future__ import annotations

import keyword
import re
from collections import defaultdict

import onnx
import torch
import torch.fx.traceback as fx_traceback

from .onnx_qdq import plan_weight
from .onnx_values import (
    CONVERTERS, MAX_ELEMENTS, Const, Dims, Node, OnnxImportError, QValue, concrete, is_const, run_converter,
    tensor_from_proto,
)


class _Runtime:
    """Placeholder, at construction, for a value only known at run time."""


RUNTIME = _Runtime()


class OnnxModule(torch.nn.Module):
    """Executes one ONNX graph with torch ops; see the module docstring."""

    def __init__(self, model: onnx.ModelProto, opset: int):
        super().__init__()
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in inits]
        self.output_names = [o.name for o in graph.output]
        self._buffers_of: dict[tuple, str] = {}
        env: dict[str, object] = {name: RUNTIME for name in self.input_names}
        for t in graph.initializer:
            env[t.name] = Const(tensor_from_proto(t, f"initializer {t.name!r}"), t.name)
        uses = defaultdict(list)
        for node in graph.node:
            for i, name in enumerate(node.input):
                uses[name].append((node.op_type, i))
        for name in self.output_names:
            uses[name].append(("<output>", 0))
        self.steps: list[tuple[Node, object, list[str], list[str]]] = []
        for index, proto in enumerate(graph.node):
            n = Node(proto, opset, index)
            ins = [self._lookup(env, name, n) for name in proto.input]
            weight = plan_weight(n, ins, uses[proto.output[0]] if proto.output else [])
            if weight is not None:
                env[proto.output[0]] = weight
            elif all(is_const(v) for v in ins):
                outs = self._fold(n, ins)
                for name, v in zip(proto.output, outs):
                    env[name] = v
            else:
                n.module = self
                self.steps.append((n, CONVERTERS[proto.op_type], list(proto.input), list(proto.output)))
                for name in proto.output:
                    env[name] = RUNTIME
        missing = [o for o in self.output_names if o not in env]
        if missing:
            raise OnnxImportError(f"graph output {missing[0]!r} is not produced by any node, input or initializer")
        self._consts = {k: v for k, v in env.items() if not isinstance(v, _Runtime)}
        for _, _, ins, _ in self.steps:  # constants read by run-time nodes become buffers now
            for name in ins:
                if isinstance(self._consts.get(name), Const):
                    self.buffer(self._consts[name])
        self._out = Node(onnx.helper.make_node("Identity", [], [], name="<graph outputs>"), opset, -1)
        self._out.module = self

    @staticmethod
    def _lookup(env, name, n):
        if not name:
            return None
        if name not in env:
            raise n.error(f"input {name!r} is not a graph input, an initializer or an earlier node's output "
                          "(the graph must be topologically sorted)")
        return env[name]

    def _fold(self, n: Node, ins: list) -> list:
        """Evaluate a node on constant inputs now; its outputs become constants."""
        with torch.no_grad():
            outs = _call(n, ins)
        folded = []
        for i, v in enumerate(outs):
            if isinstance(v, (Dims, QValue)):
                v = _guarded(n, lambda: n.t(v))
            if isinstance(v, torch.Tensor):
                if v.numel() > MAX_ELEMENTS:
                    raise n.error(f"output {i} would hold {v.numel()} elements; the limit is {MAX_ELEMENTS}")
                if any(isinstance(c, Const) and c.value.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
                       for c in ins):
                    v = v.clone()  # a view of an input constant (Identity, Reshape): one buffer each
                v = Const(v.detach(), (n.proto.output[i] if i < n.n_out else "") or n.name)
            folded.append(v)
        return folded

    # -- constants as buffers
    def buffer(self, c: Const) -> torch.Tensor:
        return self._register(("", id(c)), c.hint, lambda: c.value, copy=False)

    def derived(self, owner, tag: str, make) -> torch.Tensor:
        return self._register((tag, id(owner)), f"{owner.hint}_{tag}", make)

    def _register(self, key, hint, make, copy=True):
        """The buffer for `key`, created from `make()` on first use (a copy unless `copy` is
        False: derived tensors may be views of a constant, and passes update some buffers,
        e.g. scales, in place)."""
        name = self._buffers_of.get(key)
        if name is None and torch.compiler.is_exporting():
            with concrete():  # first needed inside a trace (a path the eager run did not take):
                return make()  # a constant torch.export lifts, not a buffer
        if name is None:
            base = re.sub(r"\W", "_", hint).strip("_") or "const"
            base = base if not base[0].isdigit() else f"c_{base}"
            name, i = base, 0
            while hasattr(self, name):
                i += 1
                name = f"{base}_{i}"
            with concrete():  # real values, even during a fake-tensor run or a trace
                value = make().detach()
                value = value.clone().contiguous() if copy else value.contiguous()
            self.register_buffer(name, value)
            self._buffers_of[key] = name
        return getattr(self, name)

    def run(self, *args):
        env = dict(self._consts)
        env.update(zip(self.input_names, args))
        for n, _, ins, outs in self.steps:
            with fx_traceback.annotate({"onnx": {"name": n.name, "op_type": n.op_type}}):
                results = _call(n, [env[name] if name else None for name in ins])
            for name, v in zip(outs, results):
                if name:
                    env[name] = v
        outs = tuple(self._out.t(env[name]) for name in self.output_names)
        return outs[0] if len(outs) == 1 else outs


def build_module(model: onnx.ModelProto, opset: int) -> OnnxModule:
    """An OnnxModule whose `forward` takes one named argument per graph input (torch.export
    needs a fixed signature; the IR's placeholders get the ONNX input names)."""
    module = OnnxModule(model, opset)
    names = []
    for name in module.input_names:
        arg = re.sub(r"\W", "_", name)
        if not arg.isidentifier() or keyword.iskeyword(arg) or arg in names or arg == "self":
            arg = f"input_{len(names)}_{arg}".replace("__", "_")
        names.append(arg if arg.isidentifier() else f"input_{len(names)}")
    args = ", ".join(names)
    namespace: dict = {}
    exec(f"def forward(self, {args}):\n    return self.run({args})\n", namespace)  # noqa: S102
    module.__class__ = type("OnnxModule", (OnnxModule,), {"forward": namespace["forward"]})
    return module


MAX_STATIC = 64  # largest value computed from shapes that stays a Python value (Dims)


def _shape_only(ins: list) -> bool:
    return any(isinstance(v, Dims) for v in ins) and all(v is None or isinstance(v, (Dims, Const)) for v in ins)


def static_eval(n: Node, ins: list, specialize: bool = False) -> list | None:
    """Shape arithmetic on known values: a node whose inputs are constants and shapes made
    of plain ints is computed now, on real tensors; its small results (rank <= 1, at most
    MAX_STATIC elements) stay Python values (Dims), so later Reshape / Expand / Pad / Range
    nodes see them as static. Sizes that are SymInts count only with `specialize` (which
    fixes them to their traced value: the graph then has a static batch). Returns None when
    this does not apply."""
    if not _shape_only(ins):
        return None
    if not specialize and any(isinstance(v, Dims) and not all(type(d) in (int, float, bool) for d in v.items) for v in ins):
        return None  # SymInts: the converters' own shape rules keep those symbolic
    ins = [Dims(tuple(int(d) if isinstance(d, torch.SymInt) else d for d in v.items), v.scalar, v.dtype)
           if isinstance(v, Dims) else v for v in ins]
    module, n.module = n.module, None  # read constants' values, register nothing
    try:
        with concrete():
            args = [Const(n.t(v)) if isinstance(v, Dims) else v for v in ins]
            outs = run_converter(CONVERTERS[n.op_type], n, args)
            result = []
            for v in outs:
                if isinstance(v, torch.Tensor) and v.dim() <= 1 and v.numel() <= MAX_STATIC:
                    v = Dims(tuple(v.tolist()) if v.dim() else (v.item(),), scalar=v.dim() == 0, dtype=v.dtype)
                if not isinstance(v, Dims):
                    return None
                result.append(v)
            return result
    finally:
        n.module = module


def _guarded(n: Node, fn):
    """fn(); any failure becomes an OnnxImportError naming the node."""
    try:
        return fn()
    except OnnxImportError:
        raise
    except Exception as e:
        raise n.error(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e


def _call(n: Node, ins: list) -> list:
    """Run a node's converter; any failure becomes an OnnxImportError naming the node."""
    try:
        outs = static_eval(n, ins) if n.module is not None else None
        if outs is None:
            outs = run_converter(CONVERTERS[n.op_type], n, ins)
            if n.module is not None and _shape_only(ins) and not all(isinstance(v, Dims) for v in outs):
                outs = static_eval(n, ins, specialize=True) or outs  # no symbolic rule: fix the sizes
    except OnnxImportError:
        raise
    except Exception as e:
        raise n.error(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    if any(n.proto.output[len(outs):]):
        raise n.error(f"output {len(outs)} is not supported (the converter gives {len(outs)} outputs)")
    return outs
