"""Kernels for Cortex-M: a memory-lean schedule, and SMLAD micro-kernels for int8 dot products.

1. `schedule_kernels` (s_tir.Schedule; a kernel without a reduction has its stages inlined into
   one loop nest; per PrimFunc with one reduction block, as FuseTIR left it: prologue
   (zero-point padding), the integer reduction, an elementwise epilogue):
   - the epilogue chain (bias, int64 requantizer, clamp, cast) is inlined into its last block,
     which, when it is elementwise over the reduction's output (not e.g. a fused pad, which is
     larger), is computed right after each output pixel / element (`reverse_compute_at`), so
     the int32 accumulators and int64 temporaries shrink to one pixel's channels;
   - a convolution whose input does not depend on the output channel (not depthwise) gets an
     im2col patch per output pixel: the output-channel loop moves innermost, the padded input
     is read into a (C/g)*KH*KW patch (`cache_read` + `compute_at`, the padding block inlined
     into it), and the reduction loops are fused, so each output channel is one contiguous
     dot product of the patch with its weight row (CMSIS-NN's structure);
   - the reduction's initialisation is split off (`decompose_reduction`).
   TVM's buffer compaction then sizes every temporary to the region one iteration uses.
2. `use_smlad(c_source)`: TVM 0.27's Python API has no TIR statement mutator, so the call of
   the micro-kernel is put in at the C level, by one rule on TVM's C output: a loop

       for (int32_t k = 0; k < N; ++k) { acc = (acc + ((((int32_t)A[a + k]) + ZA) * ((int32_t)B[b + k]))); }

   (indices the loop variable plus a base that does not contain it, so both operands are
   contiguous int8 arrays) becomes `acc = (acc + qc_dot_s8(&A[a], &B[b], N, ZA));`.
   `qc_dot_s8` (in qc_dsp.h) computes sum (A[i] + ZA) * B[i] with ACLE intrinsics: per 4
   bytes, `__sxtab16` widens bytes 0/2 and 1/3 to 16-bit lanes and adds ZA (an int16: exact),
   `__smlad` does two 16x16 multiplies and both adds; the tail runs in scalar code. All sums
   are exact int32, as in the reference. GCC and LLVM never emit SMLAD for the plain loop.
3. `use_smlad_u4(c_source)`: the same for int8 x packed-int4 loops (`qc_dot_s8_u4`, or
   `qc_dot_s8_u4_span` for a row shorter than 32 weights, whose one block is narrower), and
   the three-loop reductions of grouped linears (`qc_dot_s8_u4_clamp` for a ragged last group),
   each accepted only when TVM's index expressions, evaluated, give `packing.py`'s layout.
   The C of the micro-kernels is `mcu_templates.DSP_H` (qc_dsp.h).
"""

from __future__ import annotations

import re

import tvm
from tvm import s_tir, tirx

REDUCE = 2  # IterVar.iter_type of a reduction axis


def _mentions(region, var) -> bool:
    """True when a buffer region's bounds use `var`."""
    return any(v.same_as(var) for r in region.region for e in (r.min, r.extent)
               for v in tvm.tirx.analysis.undefined_vars(e))


def schedule_func(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc, str]:
    """The MCU schedule of one kernel, and what was done ("" when it was left as it was)."""
    sch = s_tir.Schedule(func)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    reds = [b for b in blocks if any(iv.iter_type == REDUCE for iv in sch.get(b).iter_vars)]
    if not reds and len(blocks) > 1:  # elementwise / layout chains (quantize, slices, pads): one loop nest
        inlined = 0
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
                inlined += 1
            except Exception:  # e.g. a block read by two consumers: it stays
                pass
        return (sch.mod["main"], f"{inlined} stages inlined") if inlined else (func, "")
    if len(reds) != 1:
        return func, ""
    red = reds[0]
    at = [sch.get(b).name_hint for b in blocks].index(sch.get(red).name_hint)
    after = blocks[at + 1:]
    for b in after[:-1]:
        sch.compute_inline(b)
    block = sch.get(red)
    loops = sch.get_loops(red)
    n_spatial = sum(iv.iter_type != REDUCE for iv in block.iter_vars)
    if [iv.iter_type != REDUCE for iv in block.iter_vars] != [True] * n_spatial + [False] * (len(block.iter_vars) - n_spatial):
        return func, ""
    spatial, reduce = list(loops[:n_spatial]), list(loops[n_spatial:])
    done = ["epilogue per output"]
    if len(reduce) > len(block.iter_vars) - n_spatial:  # one reduction axis split into loops (packed)
        reduce = [sch.fuse(*reduce)]
        done.append("reduction loops fused")
    pixel = spatial[-1]
    if len(reduce) == 3 and len(block.reads) >= 2:
        data, weight = block.reads[-2], block.reads[-1]  # the update's reads: acc, input, weights
        oc = [i for i, iv in enumerate(block.iter_vars) if iv.iter_type != REDUCE
              and _mentions(weight, iv.var) and not _mentions(data, iv.var)]
        if len(oc) == 1:
            order = [lp for i, lp in enumerate(spatial) if i != oc[0]] + [spatial[oc[0]]]
            sch.reorder(*order, *reduce)
            pixel = order[-2]
            index = [i for i, r in enumerate(block.reads) if r.source.same_as(data.source)][0]
            patch = sch.cache_read(red, index, "global")
            sch.compute_at(patch, pixel)
            for producer in sch.get_producers(patch):
                if sch.get(producer).name_hint.startswith("pad"):
                    sch.compute_inline(producer)
            sch.fuse(*reduce)
            done.append("im2col patch per pixel")
    spatial_extents = [int(iv.dom.extent) for iv in block.iter_vars if iv.iter_type != REDUCE]
    if after and [int(iv.dom.extent) for iv in sch.get(after[-1]).iter_vars] == spatial_extents:
        sch.reverse_compute_at(after[-1], pixel)  # only an elementwise epilogue (a fused pad is larger)
    else:
        done[0] = "epilogue inlined"
    sch.decompose_reduction(red, sch.get_loops(red)[len(spatial)])
    return sch.mod["main"], ", ".join(done)


def schedule_kernels(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, str]]:
    """Every kernel scheduled for the MCU where its structure allows; {kernel: what was done or why not}."""
    funcs, notes = {}, {}
    for gv, func in mod.functions.items():
        try:
            new, note = schedule_func(func)
        except Exception as e:  # an unexpected block structure: the unscheduled kernel is correct
            new, note = func, f"unscheduled ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        funcs[gv] = new.with_attr("global_symbol", gv.name_hint) if new is not func else func
        notes[gv.name_hint] = note
    return tvm.IRModule(funcs), notes


_DOT = re.compile(
    r"for \(int32_t (?P<k>\w+) = 0; (?P=k) < (?P<n>\d+); \+\+(?P=k)\) \{\n"
    r"\s*(?P<acc>\w+\[[^\]\n]*\]) = \((?P=acc) \+ "
    r"(?:\(\(\(\(int32_t\)(?P<a>\w+|\(\(int8_t\*\)\w+\))\[(?P<ai>[^\]\n]+)\]\) \+ (?P<za>-?\d+)\)"
    r"|\(\(\(int32_t\)(?P<a0>\w+|\(\(int8_t\*\)\w+\))\[(?P<ai0>[^\]\n]+)\]\))"
    r" \* \(\(int32_t\)(?P<b>\w+|\(\(int8_t\*\)\w+\))\[(?P<bi>[^\]\n]+)\]\)\)\);\n"
    r"\s*\}")


def _base(index: str, k: str) -> str | None:
    """The base of `index` when it is `k` or `(base + k)`, with no other use of k; else None."""
    if index == k:
        return "0"
    m = re.fullmatch(rf"\((.+) \+ {k}\)", index)
    if m and not re.search(rf"\b{k}\b", m.group(1)):
        return m.group(1)
    return None


def use_smlad(src: str, min_length: int = 8) -> tuple[str, int]:
    """Replace every contiguous int8 dot-product loop of TVM's C output by `qc_dot_s8`."""
    count = 0

    def swap(m):
        nonlocal count
        name_a, index_a = (m["a"], m["ai"]) if m["a"] else (m["a0"], m["ai0"])
        a, b = _base(index_a, m["k"]), _base(m["bi"], m["k"])
        acc_uses_k = re.search(rf"\b{m['k']}\b", m["acc"])
        if a is None or b is None or acc_uses_k or int(m["n"]) < min_length or not _int8(src, name_a, m["b"]):
            return m.group(0)
        count += 1
        return (f"{m['acc']} = ({m['acc']} + qc_dot_s8(&{name_a}[{a}], &{m['b']}[{b}], {m['n']}, "
                f"{m['za'] or 0}));  /* SMLAD micro-kernel */")

    return _DOT.sub(swap, src), count


_LOOP = re.compile(r"for \(int(?:32|64)_t (?P<k>\w+) = (?:\(int64_t\))?0; (?P=k) < (?:\(int64_t\))?(?P<n>\d+); "
                   r"\+\+(?P=k)\) \{\n\s*(?P<stmt>[^\n]+;)\n\s*\}")


def strip_atoms(text: str) -> str:
    """Parentheses around an identifier, a number or an array element removed (they change nothing)."""
    while True:
        stripped = _strip_once(text)
        if stripped == text:
            return text
        text = stripped


def _strip_once(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        m = re.match(r"\((-?\w+)", text[i:]) if text[i] == "(" else None
        if m:
            j = i + len(m.group(0))
            if j < len(text) and text[j] == "[":
                depth = 0
                while j < len(text):
                    depth += (text[j] == "[") - (text[j] == "]")
                    j += 1
                    if depth == 0:
                        break
            if j < len(text) and text[j] == ")":
                out.append(_strip_once(text[i + 1:j]))
                i = j + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


_U4 = re.compile(
    r"(?P<acc>\w+\[[^\]]*\]) = (?P<o>\()?\((?P=acc) \+ \(\((?P<x>\w+)\[(?P<xi>[^\]]+)\] \+ (?P<za>-?\d+)\) \* "
    r"\(\(\((?P<w>\w+)\[(?P<wi>[^\]]+)\] >> (?P<sh>.+)\) & 15\) - 8\)\)\)(?(o)\));")
_ARITH = re.compile(r"[\w\s+\-*/%&>()]+")


def _values(expr: str, k: str, n: int, env: dict) -> list[int] | None:
    """The integer C expression at k = 0..n-1 (other names from env), or None if it is not one."""
    if not _ARITH.fullmatch(expr) or ">>=" in expr:
        return None
    names = set(re.findall(r"[A-Za-z_]\w*", expr)) - {k}
    code = compile(expr.replace("/", "//"), "<index>", "eval")
    try:
        return [eval(code, {"__builtins__": {}}, {**{v: env.get(v, 0) for v in names}, k: i}) for i in range(n)]
    except Exception:
        return None


def _packed_layout(k: str, n: int, xi: str, wi: str, sh: str) -> int | None:
    """The block span S (bytes) when, for every k < n and several values of the other index
    variables, x is read at x0 + k and weight k comes from byte w0 + (k // 2S) * S + k % S,
    nibble (k % 2S) // S: the layout of `packing.py` (S = 16, or less for a row shorter than
    32 weights), checked by evaluating TVM's index expressions; else None."""
    spans = []
    for value in (0, 1, 3, 64):
        env = {name: value for name in re.findall(r"[A-Za-z_]\w*", xi + wi + sh)}
        x, w, shift = _values(xi, k, n, env), _values(wi, k, n, env), _values(sh, k, n, env)
        if None in (x, w, shift) or [v - x[0] for v in x] != list(range(n)):
            return None
        spans.append(next((s for s in range(1, 17) if [v - w[0] for v in w] == [(i // (2 * s)) * s + i % s for i in range(n)]
                           and shift == [((i % (2 * s)) // s) * 4 for i in range(n)]), None))
    return spans[0] if spans[0] and len(set(spans)) == 1 else None


def use_smlad_u4(src: str, min_length: int = 8) -> tuple[str, int]:
    """Replace every int8 x packed-int4 dot loop of TVM's C output by `qc_dot_s8_u4` (blocks of
    16 bytes) or `qc_dot_s8_u4_span` (the one shorter block of a row under 32 weights, e.g. a
    first conv's 3x3 taps). The loop's statement, with casts to int32/int64 dropped (the sums
    are exact int32 either way) and parentheses around atoms removed, must be the
    unpack-multiply-accumulate, and its index expressions must give `packing.py`'s layout for
    every k of the loop."""
    count = 0

    def swap(m):
        nonlocal count
        k, n = m["k"], int(m["n"])
        d = _U4.fullmatch(strip_atoms(m["stmt"].replace("(int64_t)", "").replace("(int32_t)", "")))
        if d is None or n < min_length or re.search(rf"\b{k}\b", d["acc"]) or not _int8(src, d["x"]):
            return m.group(0)
        span = _packed_layout(k, n, d["xi"], d["wi"], d["sh"])
        if span is None:
            return m.group(0)
        count += 1
        at0 = lambda e: re.sub(rf"\b{k}\b", "0", e)  # noqa: E731
        call, arg = ("qc_dot_s8_u4", "") if span == 16 else ("qc_dot_s8_u4_span", f" {span},")
        return (f"{d['acc']} = ({d['acc']} + {call}(&{d['x']}[{at0(d['xi'])}], "
                f"(const uint8_t *)&{d['w']}[{at0(d['wi'])}], {n},{arg} {d['za']}));  /* SMLAD micro-kernel, packed 4-bit */")

    src, nested = use_smlad_u4_nested(src)
    return _LOOP.sub(swap, src), count + nested


_FOR = r"\s*for \(int(?:32|64)_t (?P<{0}>\w+) = (?:\(int64_t\))?0; (?P={0}) < (?:\(int64_t\))?(?P<{1}>\d+); \+\+(?P={0})\) \{{\n"
_NEST = re.compile(  # TVM's split reduction of a grouped int4 linear: three loops, zero-init on the first step
    r"(?P<ind>[ ]*)" + _FOR.format("k0", "n0")[3:] + _FOR.format("k1", "n1") + _FOR.format("k2", "n2") +
    r"(?P<cse>(?:\s*int(?:32|64)_t \w+ = [^\n]+;\n)*)"
    r"\s*if \((?P<cond>[^\n]+)\) \{\n\s*(?P<init>\w+\[[^\n]+\]) = 0;\n\s*\}\n"
    r"(?P<cse2>(?:\s*int(?:32|64)_t \w+ = [^\n]+;\n)*)"
    r"\s*(?P<stmt>[^\n]+;)\n\s*\}\n\s*\}\n\s*\}")
_MIN = re.compile(r"\((?P<a>.+) < (?P<b>\d+) \? (?P=a) : (?P=b)\)")  # min(a, b) as TVM prints it, atoms stripped


def _eval(expr: str, env: dict):
    if not _ARITH.fullmatch(expr.replace("==", "-")) or ">>=" in expr:
        return None
    try:
        return eval(compile(expr.replace("/", "//"), "<index>", "eval"), {"__builtins__": {}},
                    {**{v: 0 for v in re.findall(r"[A-Za-z_]\w*", expr)}, **env})
    except Exception:
        return None


def use_smlad_u4_nested(src: str, min_length: int = 32) -> tuple[str, int]:
    """Replace the three-loop int8 x packed-int4 reductions of grouped linears (the group's K
    split in blocks, nibbles and bytes, the accumulator zeroed on the first step) by one
    `qc_dot_s8_u4` call: the common-subexpression locals are inlined, the statement must be
    the unpack-multiply-accumulate, the zeroing must happen on the first step only, and the
    index expressions, evaluated over the whole nest in order, must give the packed layout
    (activation x0 + k, weight byte w0 + (k >> 5) * 16 + (k & 15), nibble (k & 31) >> 4).
    A ragged last group reads the activation at min(x0 + k, last) (`grouped_linear` clamps
    it): that call is `qc_dot_s8_u4_clamp`, which reads x[last] for the steps past it."""
    count = 0

    def swap(m):
        nonlocal count
        ks, ns = (m["k0"], m["k1"], m["k2"]), (int(m["n0"]), int(m["n1"]), int(m["n2"]))
        plain = lambda e: strip_atoms(e.replace("(int64_t)", "").replace("(int32_t)", ""))  # noqa: E731
        stmt, cond, init = m["stmt"], m["cond"], m["init"]
        for name, expr in reversed(re.findall(r"int(?:32|64)_t (\w+) = ([^\n]+);", m["cse"] + m["cse2"])):
            stmt, cond, init = (re.sub(rf"\b{name}\b", f"({expr})", e) for e in (stmt, cond, init))
        d = _U4.fullmatch(plain(stmt))
        n = ns[0] * ns[1] * ns[2]
        if d is None or n < min_length or any(re.search(rf"\b{k}\b", d["acc"]) for k in ks) \
                or plain(init) != d["acc"] or not _int8(src, d["x"]):
            return m.group(0)
        d = d.groupdict()
        clamp = _MIN.fullmatch(d["xi"])
        if clamp:  # the layout is checked on the unclamped index
            d["xi"] = clamp["a"]
        steps = [dict(zip(ks, (a, b, c))) for a in range(ns[0]) for b in range(ns[1]) for c in range(ns[2])]
        for other in (0, 1, 3):
            values = []
            for env in steps:
                env = {**{v: other for v in re.findall(r"[A-Za-z_]\w*", d["xi"] + d["wi"])}, **env}
                values.append(tuple(_eval(e, env) for e in (d["xi"], d["wi"], d["sh"], cond.replace("(int64_t)", ""))))
            if any(None in v for v in values):
                return m.group(0)
            x0, w0 = values[0][0], values[0][1]
            for k, (x, w, sh, first) in enumerate(values):
                layout = (x - x0, w - w0, sh, bool(first))
                if layout != (k, (k >> 5) * 16 + (k & 15), ((k & 31) >> 4) * 4, k == 0):
                    return m.group(0)
        count += 1
        at0 = lambda e: strip_atoms(re.sub(rf"\b({'|'.join(ks)})\b", "0", e))  # noqa: E731
        w = f"(const uint8_t *)&{d['w']}[{at0(d['wi'])}]"
        if clamp:
            return (f"{m['ind']}{d['acc']} = qc_dot_s8_u4_clamp({d['x']}, (int32_t)({at0(d['xi'])}), {clamp['b']}, {w}, "
                    f"{n}, {d['za']});  /* SMLAD micro-kernel, packed 4-bit, grouped, ragged */")
        return (f"{m['ind']}{d['acc']} = qc_dot_s8_u4(&{d['x']}[{at0(d['xi'])}], {w}, {n}, {d['za']});"
                "  /* SMLAD micro-kernel, packed 4-bit, grouped */")

    return _NEST.sub(swap, src), count


def _int8(src: str, *names: str) -> bool:
    """True when every name is an int8_t cast or declared as an int8_t pointer or array in the source."""
    names = [n for n in names if not n.startswith("((int8_t*)")]
    return all(re.search(rf"int8_t\s*\*\s*{n}\b|int8_t {n}\[", src) and not re.search(rf"uint8_t\s*\*\s*{n}\b", src)
               for n in names)


def header() -> str:
    """qc_dsp.h: the micro-kernels the rewritten loops call (`mcu_templates.DSP_H`)."""
    from .mcu_templates import DSP_H

    return DSP_H
