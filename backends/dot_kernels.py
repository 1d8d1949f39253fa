"""Standalone int8 dot kernels (one PrimFunc each), for tests, benchmarks and tuners.

`linear_kernel(kernel, x_shape, w, zx, bias)` gives the PrimFunc computing
acc = linear_int(x, zx, w, bias) [int32], scheduled exactly as inside a compiled model
(`dot_schedule.schedule_dot`: the bias add is its fused epilogue), with the constant arguments
it takes after x (packed weight, compensation if any, bias: prepared as the lowering prepares
them); kernel None is the plain TE kernel the lowering falls back to (`lowering._dot_te`). `matmul_kernel` is the same for matmul_int. `reference_*` compute the IR's
integer results in numpy (int64, exact). `requantize=True` appends the dyadic requantizer
epilogue (int8 output), as the fused kernels of a model have it.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx

from . import dot
from .dot_schedule import schedule_dot
from .lowering import _dot_te

# requantize epilogue used by `requantize=True`: q = clamp(((acc * M + 2^(SH-1)) >> SH) + Z)
RQ_M, RQ_SH, RQ_Z = 1 << 30, 40, 3


def _requantize(acc: te.Tensor) -> te.Tensor:
    def body(*i):
        v = (acc[i].astype("int64") * RQ_M + (1 << (RQ_SH - 1))) >> RQ_SH
        return tirx.max(tirx.min(v + RQ_Z, 127), -128).astype("int8")

    return te.compute(acc.shape, body, name="requantize")


def reference_requantize(acc: np.ndarray) -> np.ndarray:
    v = (acc.astype(np.int64) * RQ_M + (1 << (RQ_SH - 1))) >> RQ_SH
    return np.clip(v + RQ_Z, -128, 127).astype(np.int8)


def linear_kernel(kernel: str | None, x_shape: tuple, w: np.ndarray, zx: int, bias: np.ndarray | None = None,
                  requantize: bool = False, mr: int | None = None, nr: int | None = None, bits: int = 8):
    """(PrimFunc named "main", [constant arguments after x]) for acc = linear_int(x, zx, w, bias),
    the weight stored at `bits` (4 or 2: packed, unpacked by the kernel)."""
    n = w.shape[0]
    bias = np.zeros(n, np.int32) if bias is None else bias.astype(np.int32)
    x = te.placeholder(x_shape, "int8", "x")
    if kernel is None:
        wt, bt = te.placeholder(w.shape, "int8", "w"), te.placeholder((n,), "int32", "bias")
        acc0 = _dot_te(x, wt, zx, 0, False)
        acc = te.compute(acc0.shape, lambda *i: acc0[i] + bt[i[-1]], name="add_bias")
        out = _requantize(acc) if requantize else acc
        return te.create_prim_func([x, wt, bt, out]), [w.astype(np.int8), bias]
    kern = dot.KERNELS[kernel]
    tm, tn = dot.tiles(kern, x_shape[-2], n)
    tm, tn = mr or tm, nr or tn
    wp, comp = dot.pack_weight(w, kern, tn, bits), dot.compensation(w, zx, kern)
    wt, bt = te.placeholder(wp.shape, str(wp.dtype), "wp"), te.placeholder((n,), "int32", "bias")
    ct = None if comp is None else te.placeholder(comp.shape, "int32", "comp")
    acc0 = dot.linear_te(x, wt, ct, n, zx, kernel, tm, tn, bits)
    acc = te.compute(acc0.shape, lambda *i: acc0[i] + bt[i[-1]], name="add_bias")
    out = _requantize(acc) if requantize else acc
    params = [x, wt, *([ct] if ct is not None else []), bt, out]
    func, _ = schedule_dot(te.create_prim_func(params))
    return func, [wp, *([comp] if comp is not None else []), bias]


def matmul_kernel(kernel: str | None, a_shape: tuple, b_shape: tuple, za: int, zb: int):
    """PrimFunc "main"(a, b, out) for acc = matmul_int(a, za, b, zb), a [..., M, K], b [..., K, N]."""
    a, b = te.placeholder(a_shape, "int8", "a"), te.placeholder(b_shape, "int8", "b")
    if kernel is None:
        nb = len(b_shape) - 2
        bt = te.compute((*b_shape[:-2], b_shape[-1], b_shape[-2]), lambda *i: b[(*i[:nb], i[-1], i[-2])], name="bt")
        return te.create_prim_func([a, b, _dot_te(a, bt, za, zb, True)])
    kern = dot.KERNELS[kernel]
    mr, nr = dot.tiles(kern, a_shape[-2], b_shape[-1])
    func, _ = schedule_dot(te.create_prim_func([a, b, dot.matmul_te(a, b, za, zb, kernel, mr, nr)]))
    return func


def reference_linear(x: np.ndarray, zx: int, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    acc = (x.astype(np.int64) - zx) @ w.astype(np.int64).T
    return (acc if bias is None else acc + bias.astype(np.int64)).astype(np.int32)


def reference_matmul(a: np.ndarray, za: int, b: np.ndarray, zb: int) -> np.ndarray:
    return ((a.astype(np.int64) - za) @ (b.astype(np.int64) - zb)).astype(np.int32)


def build(func, target: dict, name: str = "main"):
    """Compile one kernel for `target` (a target dict) with `tvm.tirx.build`; the function's
    global symbol is `name`."""
    func = func.with_attr("global_symbol", name)
    return tvm.tirx.build(tvm.IRModule({name: func}), target=tvm.target.Target(target))


def arm_run(func, inputs: list[np.ndarray], constants: list[np.ndarray], out_shape: tuple, out_dtype: str,
            target: str = "arm", count: bool = False):
    """Run one kernel (arguments: inputs, then constants, then the output) on the `arm` target
    under qemu through the arm runner (`arm.link`: the generated C driver). Returns the output
    as numpy, and with `count` also the executed-instruction counts (`icount`)."""
    import torch

    from . import arm, icount
    from .program import BUFFER, CONST, INPUT, KernelCall, Program, Tensor, nbytes, workspace_bytes
    from .targets import get_target, tvm_target

    tgt = tvm.target.Target(tvm_target(get_target(target)))
    name = "qc_kernel"
    kernels = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    tensors = [Tensor(tuple(x.shape), str(x.dtype), INPUT, i) for i, x in enumerate(inputs)]
    tensors += [Tensor(tuple(c.shape), str(c.dtype), CONST, i) for i, c in enumerate(constants)]
    tensors.append(Tensor(tuple(out_shape), out_dtype, BUFFER, 0))
    program = Program(list(range(len(inputs))), [len(tensors) - 1], tensors, [nbytes(out_shape, out_dtype)],
                      list(constants), [KernelCall(name, tuple(range(len(tensors))))], kernels,
                      workspace_bytes(kernels, tgt))
    binary = arm.link(program, _object_bytes(kernels, tgt), target)
    args = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    if not count:
        return arm.run(binary, args)[0].numpy()
    with icount.Counter() as counter:
        done = arm.execute(binary, args, qemu_args=counter.qemu_args)
        counts = counter.read(done.stdout)
    return arm.decode_outputs(binary.signature, done.stdout)[0].numpy(), counts


def _object_bytes(kernels: tvm.IRModule, tgt) -> bytes:
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qc-dot-") as work:
        path = os.path.join(work, "kernels.o")
        tvm.tirx.build(kernels, target=tgt).write_to_file(path)
        with open(path, "rb") as f:
            return f.read()
