"""Lowering of `qc.hadamard` to TVM: the fast Walsh-Hadamard transform as TE stages.

For a block size n = m * p (`qcompiler.hadamard`), the input is viewed as [rows, m, p]; then
log2(p) butterfly stages t[i] -> (t[i] + t[i+h] | t[i-h] - t[i]), one mix over the small
factor y[c] = sum_a H_m[a, c] * t[a] (a reduction in order a = 0..m-1, entries +-1, so
every product is exact), and one multiply by float32(1/sqrt(n)). These are the operations
of `qcompiler.hadamard.hadamard_reference` in the same order, so outputs agree bit for bit
as long as the compiler does not reassociate float additions (LLVM does not by default).
"""

from __future__ import annotations

import math

from tvm import relax, te, tirx

from qcompiler.errors import LoweringError
from qcompiler.hadamard import factor, small_matrix


def _butterfly(t, h: int):
    def stage(r, a, i):
        first = tirx.floormod(tirx.floordiv(i, h), 2) == 0
        return te.if_then_else(first, t[r, a, i] + t[r, a, i + h], t[r, a, i - h] - t[r, a, i])

    return stage


def _hadamard_te(x, hm, m: int, p: int, scale: float):
    t = x
    h = 1
    while h < p:
        t = te.compute(t.shape, _butterfly(t, h), name=f"fwht_{h}")
        h *= 2
    if m > 1:
        k = te.reduce_axis((0, m), "k")
        mixed = t
        t = te.compute(t.shape, lambda r, c, d: te.sum(hm[k, c] * mixed[r, k, d], axis=k), name="hadamard_mix")
    s = tirx.const(scale, "float32")
    return te.compute(t.shape, lambda r, a, i: t[r, a, i] * s, name="hadamard_scale")


def convert_hadamard(node, imp):
    """Relax for `qc.hadamard(x, size)`: reshape to [rows, m, p], TE transform, reshape back."""
    x, size = list(imp.retrieve_args(node))[:2]
    fm = factor(int(size))
    if fm is None:
        raise LoweringError(f"qc.hadamard at node {node.name}: no Hadamard matrix of order {size}")
    m, p = fm
    shape = [int(d) if isinstance(d, tirx.IntImm) else d for d in imp.shape_of(x).values]
    if isinstance(shape[-1], int) and shape[-1] % size:
        raise LoweringError(f"qc.hadamard at node {node.name}: last dim {shape[-1]} is not a multiple of {size}")
    rows = shape[-1] // size
    for d in shape[:-1]:
        rows = rows * d
    bb = imp.block_builder
    x3 = bb.emit(relax.op.reshape(x, [rows, m, p]))
    hm = relax.const(small_matrix(m).float().numpy(), "float32")
    y = bb.emit_te(_hadamard_te, x3, hm, m, p, 1.0 / math.sqrt(size))
    return bb.emit(relax.op.reshape(y, shape))
