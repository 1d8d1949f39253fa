"""OpenCL kernels and their launch table, from a Program's PrimFuncs.

`compile_kernels(kernels, target)` runs `tvm.tirx.build` for the `opencl -device=mali` target
with a pass instrument that keeps the module as it is right after `tirx.SplitHostDevice`.
There every PrimFunc is a host function whose body only declares buffers and launches
device kernels:

    T.call_ffi_kernel("<f>_kernel", buf0.data, buf1.data, ..., e0, e1, ..., launch_params=[
                      "blockIdx.y", "blockIdx.x", "threadIdx.y", "threadIdx.x"])

The pointer arguments are data of the function's parameters; the trailing extents give the
work-group count per blockIdx axis and the work-group shape per threadIdx axis (x, y, z are
OpenCL dimensions 0, 1, 2: TVM's OpenCL codegen reads `get_group_id(d)` / `get_local_id(d)`),
so global size = groups * local size per dimension. The device module of the build holds the
OpenCL C of all kernels (`inspect_source`). The result is plain data (`Launch`, source text):
the runner needs neither TVM nor its OpenCL runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.tirx import PrimFunc

from qcompiler.errors import LoweringError

from .exact_floats import PIPELINE

SPLIT = "tirx.SplitHostDevice"
AXES = {"x": 0, "y": 1, "z": 2}


@dataclass(frozen=True)
class Launch:
    """One OpenCL kernel launch of a PrimFunc."""

    kernel: str  # the OpenCL kernel's name
    args: tuple  # per kernel argument: ("param", i) the PrimFunc's i-th tensor, ("scratch", j) its j-th
    # global scratch buffer (`Program`-level: MaliProgram.scratch[func][j] bytes), or (dtype, value) a scalar
    global_size: tuple[int, int, int]
    local_size: tuple[int, int, int]

    @property
    def group_size(self) -> int:
        return self.local_size[0] * self.local_size[1] * self.local_size[2]

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "args": [list(a) for a in self.args],
                "global_size": list(self.global_size), "local_size": list(self.local_size)}

    @staticmethod
    def from_json(d: dict) -> "Launch":
        return Launch(d["kernel"], tuple(tuple(a) for a in d["args"]), tuple(d["global_size"]), tuple(d["local_size"]))


def compile_kernels(kernels: tvm.IRModule, target: tvm.target.Target):
    """(runtime module, OpenCL C source, {PrimFunc name: [Launch]}, {PrimFunc name: scratch
    buffer bytes}) for `kernels`."""
    seen = {}

    @tvm.instrument.pass_instrument
    class AfterSplit:
        def run_after_pass(self, mod, info):
            if info.name == SPLIT:
                seen["mod"] = mod

    outer = tvm.transform.PassContext.current()
    try:
        with tvm.transform.PassContext(opt_level=outer.opt_level, config=dict(outer.config),
                                       instruments=[*outer.instruments, AfterSplit()]):
            lib = tvm.tirx.build(kernels, target=target, pipeline=PIPELINE)  # exact float constants
    except Exception as e:
        raise LoweringError(f"TVM could not compile the OpenCL kernels for {target.kind.name} "
                            f"-device={target.attrs.get('device', '')}: {type(e).__name__}: {e}") from e
    if "mod" not in seen:
        raise LoweringError(f"TVM's TIR pipeline for {target.kind.name} has no {SPLIT} pass: the mali backend "
                            "reads the kernel launches right after it")
    devices = [m for m in lib.imports if m.kind == "opencl"]
    if len(devices) != 1:
        raise LoweringError(f"the build holds {len(devices)} OpenCL device modules, expected one")
    source = devices[0].inspect_source()
    split = seen["mod"]
    launches, scratch = {}, {}
    for gv in kernels.functions:
        name = gv.name_hint
        scratch[name] = []
        launches[name] = host_launches(split[name], name, scratch[name])
    return lib, source, launches, scratch


def host_launches(func: PrimFunc, name: str, scratch: list[int] | None = None) -> list[Launch]:
    """The kernel launches of one host function after SplitHostDevice, in order. Global
    buffers the host allocates between kernels (e.g. per-group partial sums) are appended to
    `scratch` as byte sizes and passed as ("scratch", j)."""
    data = {p: ("param", i) for i, p in enumerate(func.params)}  # buffer var -> what it views
    scratch = [] if scratch is None else scratch
    calls = []

    def walk(s):
        if isinstance(s, tvm.tirx.SeqStmt):
            for t in s.seq:
                walk(t)
        elif isinstance(s, tvm.tirx.Evaluate):
            v = s.value
            if isinstance(v, tvm.ir.Call) and v.op.name == "tirx.call_ffi_kernel":
                calls.append(_launch(v, data, name))
            elif not isinstance(v, tvm.tirx.IntImm):
                raise LoweringError(f"kernel {name}: the host side computes {v}; only kernel launches are supported")
        elif isinstance(s, tvm.tirx.DeclBuffer):  # `b_1 = decl_buffer(data=b.data)`: b_1 views b
            src = _viewed(s.data)
            if src is not None and src in data:
                data[s.buffer] = data[src]
        elif isinstance(s, tvm.tirx.AllocBuffer) and s.buffer.scope() in ("global", ""):
            from .program import nbytes

            shape = [int(d) for d in s.buffer.shape]
            data[s.buffer] = ("scratch", len(scratch))
            scratch.append(nbytes(shape, str(s.buffer.dtype)))
        elif isinstance(s, tvm.tirx.AttrStmt):
            if getattr(s, "body", None) is not None:
                walk(s.body)
        else:
            raise LoweringError(f"kernel {name}: the host side holds a {type(s).__name__} ({str(s)[:200]}); the "
                                "mali runner launches kernels only (no host loops or device allocations)")

    walk(func.body)
    if not calls:
        raise LoweringError(f"kernel {name} launches no OpenCL kernel: it was not scheduled for the GPU")
    return calls


def _launch(call, data: dict, name: str) -> Launch:
    params = [str(p) for p in call.attrs.launch_params]
    kernel = call.args[0].value
    rest = list(call.args[1:])
    if len(rest) < len(params):
        raise LoweringError(f"kernel {kernel}: fewer launch extents than launch parameters {params}")
    values, extents = rest[:len(rest) - len(params)], rest[len(rest) - len(params):]
    groups, local = [1, 1, 1], [1, 1, 1]
    for p, e in zip(params, extents):
        if not isinstance(e, tvm.tirx.IntImm):
            raise LoweringError(f"kernel {kernel}: launch extent {p} = {e} is not a constant (shapes must be static)")
        kind, _, axis = p.partition(".")
        if kind == "blockIdx" and axis in AXES:
            groups[AXES[axis]] = int(e.value)
        elif kind == "threadIdx" and axis in AXES:
            local[AXES[axis]] = int(e.value)
        else:
            raise LoweringError(f"kernel {kernel}: launch parameter {p} is not supported by the mali runner "
                                "(only blockIdx/threadIdx x, y, z)")
    args = []
    for a in values:
        if _viewed(a) in data:
            args.append(data[_viewed(a)])
        elif isinstance(a, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
            args.append((str(a.dtype), a.value))
        else:
            raise LoweringError(f"kernel {kernel} (in {name}): argument {a} is neither a tensor of the function "
                                "nor a constant")
    return Launch(kernel, tuple(args), tuple(g * t for g, t in zip(groups, local)), tuple(local))


def _viewed(e):
    """The buffer var of `buffer_data(b)` (how a kernel argument names a buffer's pointer), else None."""
    if isinstance(e, tvm.ir.Call) and e.op.name == "tirx.buffer_data" and len(e.args) == 1:
        return e.args[0]
    return None
