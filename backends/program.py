"""A compiled model as a flat program, for backends that run without the Relax VM.

`extract(ir, example_inputs, target)` lowers the IR to Relax (`lowering.to_relax`), runs the
target's default Relax pipeline up to and including StaticPlanBlockMemory (legalize, fuse,
call_tir -> destination passing, storage reuse), and reads the `main` function it leaves:

    inputs    main's parameters, in order
    constants every relax constant (weights, biases, requantizer multipliers, scalars)
    buffers   one per planned storage (`R.memory.alloc_storage`, shared by the tensors Relax
              placed in it) or unplanned allocation (`R.builtin.alloc_tensor`, e.g. outputs)
    tensors   every tensor main touches: a shape and dtype at a byte offset of an input, a
              constant or a buffer; reshapes are views of the same bytes (no copies)
    calls     the kernels (PrimFuncs) in execution order with their argument tensors, outputs
              last (destination passing)
    outputs   the tensors main returns, flattened

Every shape is static (the example shapes). The kernels are the module's PrimFuncs with a
`global_symbol`, built by `build_kernels` with `tvm.tirx.build` for the target; `workspace`
bounds the scratch memory each kernel requests at run time (its allocations after TVM's TIR
pipeline). Nothing here is specific to C or to one device: the arm driver (`cdriver.py`)
and other runners read the same description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import tvm
import tvm_ffi
from tvm import relax
from tvm.tirx import PrimFunc

from qcompiler.errors import LoweringError, QCompilerError

from .dot_schedule import dot_pipeline
from .lowering import to_relax
from .targets import get_target, tvm_target

LAST_PASS = "StaticPlanBlockMemory"  # main is read right after Relax's storage planner
INPUT, CONST, BUFFER = "input", "const", "buffer"


def nbytes(shape, dtype: str) -> int:
    """Bytes of a dense tensor (sub-byte element types packed, rounded up to a whole byte)."""
    t = tvm_ffi.dtype(dtype)
    return -(-math.prod(shape) * t.bits * t.lanes // 8)


@dataclass(frozen=True)
class Tensor:
    shape: tuple[int, ...]
    dtype: str
    home: str  # INPUT, CONST or BUFFER
    index: int  # which input, constant or buffer holds the bytes
    offset: int = 0  # byte offset into it
    label: str = ""  # the Relax variable it came from (for comments and errors)

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


@dataclass(frozen=True)
class KernelCall:
    kernel: str  # the PrimFunc's global_symbol
    args: tuple[int, ...]  # indices into Program.tensors, in the PrimFunc's parameter order


@dataclass
class Program:
    inputs: list[int]  # tensor indices
    outputs: list[int]
    tensors: list[Tensor]
    buffers: list[int]  # byte size of each buffer
    constants: list[np.ndarray]
    calls: list[KernelCall]
    kernels: tvm.IRModule  # the PrimFuncs called, global_symbol attached
    workspace: dict[str, int] = field(default_factory=dict)  # kernel -> scratch bytes bound

    def signature(self) -> dict:
        """Shapes and dtypes of the inputs and outputs (what a runner needs), as JSON data."""
        spec = lambda i: {"shape": list(self.tensors[i].shape), "dtype": self.tensors[i].dtype}  # noqa: E731
        return {"inputs": [spec(i) for i in self.inputs], "outputs": [spec(i) for i in self.outputs]}

    def summary(self) -> str:
        return (f"{len(self.calls)} kernel calls ({len(self.kernels.functions)} kernels), "
                f"{len(self.constants)} constants ({sum(c.nbytes for c in self.constants)} bytes), "
                f"{len(self.buffers)} buffers ({sum(self.buffers)} bytes), "
                f"workspace {max(self.workspace.values(), default=0)} bytes")


def lower_main(mod: tvm.IRModule, target: tvm.target.Target, pipeline=None) -> tvm.IRModule:
    """The module as the target's default Relax pipeline (or `pipeline`) leaves it after
    StaticPlanBlockMemory (the passes after it, which prepare the VM, are skipped)."""
    seen = {}

    @tvm.instrument.pass_instrument
    class StopAfter:
        def should_run(self, _mod, _info):
            return "mod" not in seen

        def run_after_pass(self, after, info):
            if info.name == LAST_PASS:
                seen["mod"] = after

    outer = tvm.transform.PassContext.current()  # keep the caller's options (config, opt level)
    with tvm.transform.PassContext(opt_level=outer.opt_level, required_pass=list(outer.required_pass),
                                   disabled_pass=list(outer.disabled_pass), config=dict(outer.config),
                                   instruments=[*outer.instruments, StopAfter()]):
        (pipeline or dot_pipeline(target))(mod)  # the default pipeline plus the dot-product schedules
    if "mod" not in seen:
        raise LoweringError(f"the default Relax pipeline of {target.kind.name} has no {LAST_PASS} pass: "
                            "this backend reads main right after it")
    return seen["mod"]


class _Reader:
    """Walks the bindings of main and fills a Program."""

    def __init__(self, mod: tvm.IRModule):
        self.mod = mod
        self.tensors: list[Tensor] = []
        self.buffers: list[int] = []
        self.constants: list[np.ndarray] = []
        self.const_ids: dict = {}
        self.calls: list[KernelCall] = []
        self.env: dict = {}  # relax Var -> tensor index, storage ("storage", buffer), or tuple

    def add(self, t: Tensor) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1

    def new_buffer(self, size: int) -> int:
        self.buffers.append(int(size))
        return len(self.buffers) - 1

    def constant(self, c) -> int:
        if c in self.const_ids:  # relax expressions hash and compare by identity
            return self.const_ids[c]
        try:
            data = c.value.numpy()
        except Exception as e:
            raise LoweringError(f"a constant of type {c.ty} has no host copy: {e}") from e
        self.constants.append(np.ascontiguousarray(data))
        index = self.add(Tensor(tuple(data.shape), str(c.value.dtype), CONST, len(self.constants) - 1,
                                label=f"const{len(self.constants) - 1}"))
        self.const_ids[c] = index
        return index

    def value(self, e, where: str):
        """The tensor index (or tuple of them) an argument or returned expression denotes."""
        if isinstance(e, relax.Var):
            if e not in self.env:
                raise LoweringError(f"{where}: {e.name} is not defined before it is used")
            return self.env[e]
        if isinstance(e, tvm.ir.expr.Constant) and isinstance(getattr(e, "value", None), tvm.runtime.Tensor):
            return self.constant(e)
        if isinstance(e, relax.Tuple):
            return tuple(self.value(f, where) for f in e.fields)
        if isinstance(e, relax.TupleGetItem):
            return self.value(e.tuple_value, where)[e.index]
        raise LoweringError(f"{where}: {type(e).__name__} {e} is not a tensor this backend can pass")

    def bind(self, var, e):
        name = var.name
        if isinstance(e, tvm.ir.Call) and isinstance(e.op, tvm.ir.GlobalVar):
            self.kernel_call(e)
            self.env[var] = None
        elif isinstance(e, tvm.ir.Call) and isinstance(e.op, tvm.ir.Op):
            self.env[var] = self.op_call(name, e)
        else:
            self.env[var] = self.value(e, f"binding {name}")

    def kernel_call(self, e):
        gv = e.op
        if not isinstance(self.mod[gv], PrimFunc):
            raise LoweringError(f"main calls {gv.name_hint}, a Relax function: only PrimFunc kernels are supported")
        args = []
        for a in e.args:
            v = self.value(a, f"argument of {gv.name_hint}")
            if not isinstance(v, int):
                raise LoweringError(f"{gv.name_hint} takes a non-tensor argument ({a}): not supported")
            args.append(v)
        self.calls.append(KernelCall(gv.name_hint, tuple(args)))

    def op_call(self, name: str, e):
        op = e.op.name
        if op == "relax.memory.alloc_storage":
            return ("storage", self.new_buffer(_ints(e.args[0])[0]))
        if op == "relax.memory.alloc_tensor":
            storage = self.value(e.args[0], f"alloc_tensor {name}")
            shape, dtype = tuple(_ints(e.args[2])), str(e.args[3].value)
            return self.add(Tensor(shape, dtype, BUFFER, storage[1], int(e.args[1].value), name))
        if op == "relax.builtin.alloc_tensor":
            shape, dtype = tuple(_ints(e.args[0])), str(e.args[1].value)
            return self.add(Tensor(shape, dtype, BUFFER, self.new_buffer(nbytes(shape, dtype)), 0, name))
        if op == "relax.reshape":
            src = self.tensors[self.value(e.args[0], f"reshape {name}")]
            shape = tuple(_ints(e.args[1]))
            if math.prod(shape) != math.prod(src.shape):
                raise LoweringError(f"reshape {name}: {src.shape} -> {shape} changes the size")
            return self.add(Tensor(shape, src.dtype, src.home, src.index, src.offset, name))
        raise LoweringError(f"binding {name}: the Relax op {op} has no flat-program form (only kernel calls, "
                            "storage/tensor allocation and reshape are supported after lowering)")

    def outputs(self, e) -> list[int]:
        v = self.value(e, "main's result")
        flat = []

        def walk(x):
            if isinstance(x, tuple):
                for y in x:
                    walk(y)
            elif isinstance(x, int):
                flat.append(x)
            else:
                raise LoweringError("main returns something that is not a tensor")

        walk(v)
        return flat


def _ints(e) -> list[int]:
    """A static ShapeExpr as ints."""
    values = e.values if isinstance(e, relax.ShapeExpr) else None
    if values is None or not all(isinstance(d, tvm.tirx.IntImm) for d in values):
        raise LoweringError(f"shape {e} is not static: this backend compiles for the example shapes only")
    return [int(d) for d in values]


def read_main(mod: tvm.IRModule) -> _Reader:
    main = mod["main"]
    r = _Reader(mod)
    for i, p in enumerate(main.params):
        if not isinstance(p.ty, relax.TensorType):
            raise LoweringError(f"input {i} ({p.name}) is not a tensor")
        r.env[p] = r.add(Tensor(tuple(_ints(p.ty.shape)), str(p.ty.dtype), INPUT, i, 0, p.name))
    for block in main.body.blocks:
        for b in block.bindings:
            r.bind(b.var, b.value)  # a MatchCast of a static shape only renames
    r.outs = r.outputs(main.body.body)
    r.ins = [r.env[p] for p in main.params]
    return r


def workspace_bytes(kernels: tvm.IRModule, target: tvm.target.Target) -> dict[str, int]:
    """Per kernel, an upper bound of the scratch memory it requests from the runtime: the
    bytes of its allocations after TVM's TIR pipeline (small ones end up on the stack), plus
    64 bytes of alignment per buffer it declared."""
    from tvm.s_tir.analysis import calculate_allocated_bytes

    pipeline = tvm.tirx.get_default_tir_pipeline(target)[0]
    with target:
        lowered = pipeline(tvm.tirx.transform.BindTarget(target.with_host(target))(kernels))
    sizes = calculate_allocated_bytes(lowered)
    out = {}
    for gv, f in kernels.functions.items():
        body = f.body
        declared = len(body.block.alloc_buffers) if hasattr(body, "block") else 0
        out[gv.name_hint] = int(sum(sizes.get(gv.name_hint, {}).values())) + 64 * (declared + 8)
    return out


def extract(gm: torch.fx.GraphModule, example_inputs: tuple, target: str, tdict: dict | None = None,
            pipeline=None, tune=None) -> Program:
    """The IR as a flat Program for `target` (its TVM target replaced by `tdict`, its Relax
    pipeline by `pipeline(tvm_target)` if given, or its kernels tuned with `tune`, a
    `tuning.Tune`, and built with their best schedules), specialized to the example shapes."""
    info = get_target(target)
    tgt = tvm.target.Target(tdict or tvm_target(info))
    try:
        with tgt:  # the converters choose dot-product kernels by the target's features
            mod = to_relax(gm, example_inputs)
            if tune is not None:
                from .tuning import tuned_pipeline

                tuned, _ = tuned_pipeline(mod, target, tune)
                pipeline = lambda _tgt: tuned  # noqa: E731
            lowered = lower_main(mod, tgt, pipeline and pipeline(tgt))
    except QCompilerError:
        raise
    except Exception as e:
        raise LoweringError(f"TVM could not lower the model for {target}: {type(e).__name__}: {e}") from e
    r = read_main(lowered)
    called = {c.kernel for c in r.calls}
    kernels = tvm.IRModule({gv: f for gv, f in lowered.functions.items()
                            if isinstance(f, PrimFunc) and gv.name_hint in called})
    kernels = relax.transform.AttachGlobalSymbol()(kernels)
    return Program(r.ins, r.outs, r.tensors, r.buffers, r.constants, r.calls, kernels,
                   workspace_bytes(kernels, tgt))


def build_kernels(program: Program, target: str):
    """The kernels compiled for `target` (a TVM runtime module; `write_to_file` gives an object)."""
    tgt = tvm.target.Target(tvm_target(get_target(target)))
    try:
        return tvm.tirx.build(program.kernels, target=tgt)
    except Exception as e:
        raise LoweringError(f"TVM could not compile the kernels for {target}: {type(e).__name__}: {e}") from e
