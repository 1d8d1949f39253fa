"""64-bit constants stored in 32, 16 or 8 bits in flash when their values allow (Cortex-M projects).

TVM lowers `qc.requantize` to int64 arithmetic, so each output channel of every layer carries
three int64 constants (multiplier, rounding term 2^(shift-1), shift): 24 bytes per channel in
flash, in W8A8 and W4A8 builds alike (about 400 KB of EfficientNet-Lite0). Their values fit
int32 (multipliers are below 2^31, shifts below 32: int8). This rewrite stores such a
constant in the fewest of 8, 16, 32 bits and makes the kernels read it so, widened at once:

    int64_t* p = ((int64_t*)(...data));    ...  x * p[i]
 -> int32_t* p_i32 = ((int32_t*)(...data)); ... x * (int64_t)p_i32[i]

(a cast binds looser than a subscript, so every load is widened before any arithmetic: the
same values in the same int64 operations, bit-exact). It is applied to a kernel parameter
only when every call passes an int64 constant there whose values fit int32, the parameter's
pointer is only ever subscripted in the kernel's C, and each constant so narrowed is read
through narrowed parameters only (a kernel shared by several layers narrows all of them or
none).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import numpy as np

from .cdriver import KERNEL_SYMBOL
from .program import CONST, Program

_FUNC = re.compile(r"^TVM_DLL int32_t (\w+)\(void\* self_handle, void\* args, int32_t num_args, void\* result\) \{",
                   re.M)
_POS = re.compile(r"int32_t (\w+)_type_index = \(\(\(TVMFFIAny\*\)args\)\[(\d+)\]\.type_index\);")
_DECL = r"  int64_t\* {0} = \(\(int64_t\*\)\(\(int64_t\*\)\(\(\(DLTensor\*\){0}_handle\)\[0\]\.data\)\)\);"


def _bodies(src: str) -> dict[str, tuple[int, int]]:
    """C function name -> (start, end) of its definition in kernels.c."""
    starts = [(m.group(1), m.start()) for m in _FUNC.finditer(src)]
    return {name: (a, starts[i + 1][1] if i + 1 < len(starts) else len(src)) for i, (name, a) in enumerate(starts)}


def _narrowable_params(body: str) -> dict[int, str]:
    """Argument position -> parameter name, for int64 parameters only ever subscripted."""
    out = {}
    for name, pos in _POS.findall(body):
        decl = re.search(_DECL.format(name), body)
        if not decl:
            continue
        rest = body[:decl.start()] + body[decl.end():]
        uses = [m.end() for m in re.finditer(rf"(?<![\w&]){name}\b(?!_)", rest)]
        if uses and all(rest[u:u + 1] == "[" for u in uses) and not re.search(rf"&\s*{name}\[", rest):
            out[int(pos)] = name
    return out


def _fits(program: Program, a: int) -> bool:
    t = program.tensors[a]
    if t.home != CONST or t.dtype != "int64" or t.offset:
        return False
    c = program.constants[t.index]
    return c.dtype == np.int64 and c.size * 8 == t.nbytes and (c.size == 0 or (
        int(c.min()) >= -(1 << 31) and int(c.max()) < (1 << 31)))


def narrow_constants(program: Program, src: str) -> tuple[Program, str, int]:
    """The program with its narrowable int64 constants stored as int8, int16 or int32 (the
    fewest bits their values need, the same for all constants a kernel parameter receives)
    and kernels.c reading them so; and how many constants were narrowed."""
    bodies = _bodies(src)
    params = {}  # (kernel, position) -> C parameter name
    for kernel in dict.fromkeys(c.kernel for c in program.calls):
        span = bodies.get(KERNEL_SYMBOL.format(kernel))
        if span:
            for pos, name in _narrowable_params(src[span[0]:span[1]]).items():
                params[(kernel, pos)] = name
    slots, uses = defaultdict(set), defaultdict(set)
    for call in program.calls:
        for pos, a in enumerate(call.args):
            slots[(call.kernel, pos)].add(a)
            uses[a].add((call.kernel, pos))
    by_constant = defaultdict(set)
    for a, t in enumerate(program.tensors):
        if t.home == CONST:
            by_constant[t.index].add(a)
    ok = {s for s in params if all(_fits(program, a) for a in slots[s])}
    while True:  # a constant narrows only if every tensor on it is read through narrowed slots only
        tensors = {a for s in ok for a in slots[s] if uses[a] <= ok}
        tensors = {a for a in tensors if by_constant[program.tensors[a].index] <= tensors}
        kept = {s for s in ok if slots[s] <= tensors}
        if kept == ok:
            break
        ok = kept
    if not ok:
        return program, src, 0
    # the narrowest of int8 / int16 / int32 per constant, made equal across each kernel parameter
    const_of = lambda a: program.tensors[a].index  # noqa: E731
    width = {const_of(a): _bits(program.constants[const_of(a)]) for s in ok for a in slots[s]}
    while True:
        slot_width = {s: max(width[const_of(a)] for a in slots[s]) for s in ok}
        new = dict(width)
        for s in ok:
            for a in slots[s]:
                new[const_of(a)] = max(new[const_of(a)], slot_width[s])
        if new == width:
            break
        width = new
    edits = defaultdict(list)
    for kernel, pos in ok:
        edits[KERNEL_SYMBOL.format(kernel)].append((params[(kernel, pos)], slot_width[(kernel, pos)]))
    out, at = [], 0
    for func, (a, b) in sorted(bodies.items(), key=lambda kv: kv[1][0]):
        if func not in edits:
            continue
        body = src[a:b]
        for name, bits in edits[func]:
            ctype, new_name = f"int{bits}_t", f"{name}_i{bits}"
            decl = f"  {ctype}* {new_name} = (({ctype}*)(((DLTensor*){name}_handle)[0].data));"
            body = re.sub(_DECL.format(name), decl, body)
            body = re.sub(rf"(?<![\w&]){name}\[", f"(int64_t){new_name}[", body)
        out += [src[at:a], body]
        at = b
    src = "".join(out) + src[at:]
    tensors = list(program.tensors)
    constants = list(program.constants)
    for i, bits in width.items():
        constants[i] = program.constants[i].astype(f"int{bits}")
        for a in by_constant[i]:
            tensors[a] = dataclasses.replace(tensors[a], dtype=f"int{bits}")
    return dataclasses.replace(program, tensors=tensors, constants=constants), src, len(width)


def _bits(c: np.ndarray) -> int:
    """The fewest of 8, 16, 32 bits holding every value of c (signed)."""
    lo, hi = (int(c.min()), int(c.max())) if c.size else (0, 0)
    return next(b for b in (8, 16, 32) if -(1 << (b - 1)) <= lo and hi < (1 << (b - 1)))
