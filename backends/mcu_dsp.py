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


def _packed_layout(k: str, n: int, xi: str, wi: str, sh: str) -> bool:
    """True when, for every k < n and several values of the other index variables, x is read
    at x0 + k and weight k comes from byte w0 + (k >> 5) * 16 + (k & 15), nibble (k & 31) >> 4:
    the layout of kernels_int.py (checked by evaluating TVM's index expressions)."""
    want_byte = [(i >> 5) * 16 + (i & 15) for i in range(n)]
    want_shift = [((i & 31) >> 4) * 4 for i in range(n)]
    for value in (0, 1, 3, 64):
        env = {name: value for name in re.findall(r"[A-Za-z_]\w*", xi + wi + sh)}
        x, w, shift = _values(xi, k, n, env), _values(wi, k, n, env), _values(sh, k, n, env)
        if None in (x, w, shift):
            return False
        if [v - x[0] for v in x] != list(range(n)) or [v - w[0] for v in w] != want_byte or shift != want_shift:
            return False
    return True


def use_smlad_u4(src: str, min_length: int = 32) -> tuple[str, int]:
    """Replace every int8 x packed-int4 dot loop of TVM's C output by `qc_dot_s8_u4`. The loop's
    statement, with casts to int32/int64 dropped (the sums are exact int32 either way) and
    parentheses around atoms removed, must be the unpack-multiply-accumulate, and its index
    expressions must give `kernels_int.py`'s packed layout for every k of the loop."""
    count = 0

    def swap(m):
        nonlocal count
        k, n = m["k"], int(m["n"])
        d = _U4.fullmatch(strip_atoms(m["stmt"].replace("(int64_t)", "").replace("(int32_t)", "")))
        if (d is None or n < min_length or re.search(rf"\b{k}\b", d["acc"]) or not _int8(src, d["x"])
                or not _packed_layout(k, n, d["xi"], d["wi"], d["sh"])):
            return m.group(0)
        count += 1
        at0 = lambda e: re.sub(rf"\b{k}\b", "0", e)  # noqa: E731
        return (f"{d['acc']} = ({d['acc']} + qc_dot_s8_u4(&{d['x']}[{at0(d['xi'])}], "
                f"(const uint8_t *)&{d['w']}[{at0(d['wi'])}], {n}, {d['za']}));  /* SMLAD micro-kernel, packed 4-bit */")

    return _LOOP.sub(swap, src), count


def _int8(src: str, *names: str) -> bool:
    """True when every name is an int8_t cast or declared as an int8_t pointer or array in the source."""
    names = [n for n in names if not n.startswith("((int8_t*)")]
    return all(re.search(rf"int8_t\s*\*\s*{n}\b|int8_t {n}\[", src) and not re.search(rf"uint8_t\s*\*\s*{n}\b", src)
               for n in names)


HEADER = r"""/* qcompiler: ACLE micro-kernels for the int8 dot products of kernels.c (backends/mcu_dsp.py). */
#ifndef QC_DSP_H
#define QC_DSP_H
#include <stdint.h>
#include <string.h>
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
#include <arm_acle.h>
#endif

#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
/* SXTB16 / SXTAB16 of the bytes 1 and 3 (the ROR #8 form; GCC's ACLE has no rotate argument) */
static inline int16x2_t qc_sxtb16_ror8(uint32_t x) {
  int16x2_t r;
  __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
  return r;
}
static inline int16x2_t qc_sxtab16_ror8(int16x2_t z, uint32_t x) {
  int16x2_t r;
  __asm__("sxtab16 %0, %1, %2, ror #8" : "=r"(r) : "r"(z), "r"(x));
  return r;
}

/* 4 products: acc + (a0+za)b0 + (a1+za)b1 + (a2+za)b2 + (a3+za)b3 */
static inline int32_t qc_smlad4(uint32_t wa, uint32_t wb, int16x2_t z, int32_t acc) {
  acc = __smlad(__sxtab16(z, (int8x4_t)wa), __sxtb16((int8x4_t)wb), acc);
  return __smlad(qc_sxtab16_ror8(z, wa), qc_sxtb16_ror8(wb), acc);
}
#endif

/* sum over i < n of (a[i] + za) * b[i], exactly (int32, as the reference) */
static inline int32_t qc_dot_s8(const int8_t *a, const int8_t *b, int32_t n, int32_t za) {
  int32_t acc = 0, i = 0;
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
  const int16x2_t z = (int16x2_t)(((uint32_t)(uint16_t)za << 16) | (uint16_t)za);
  for (; i + 8 <= n; i += 8) {  /* two words a step: Cortex-M4/M7 load unaligned words */
    uint32_t wa0, wa1, wb0, wb1;
    memcpy(&wa0, a + i, 4);
    memcpy(&wa1, a + i + 4, 4);
    memcpy(&wb0, b + i, 4);
    memcpy(&wb1, b + i + 4, 4);
    acc = qc_smlad4(wa0, wb0, z, acc);
    acc = qc_smlad4(wa1, wb1, z, acc);
  }
  for (; i + 4 <= n; i += 4) {
    uint32_t wa, wb;
    memcpy(&wa, a + i, 4);
    memcpy(&wb, b + i, 4);
    acc = qc_smlad4(wa, wb, z, acc);
  }
#endif
  for (; i < n; i++) acc += ((int32_t)a[i] + za) * (int32_t)b[i];
  return acc;
}

/* sum over k < n of (x[k] + za) * (w4[k] - 8) for 4-bit weights packed as kernels_int.py stores
 * them: weight k in byte (k >> 5) * 16 + (k & 15), low nibble when (k & 31) < 16, else high */
static inline int32_t qc_dot_s8_u4(const int8_t *x, const uint8_t *w, int32_t n, int32_t za) {
  int32_t acc = 0, k = 0;
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
  const int16x2_t z = (int16x2_t)(((uint32_t)(uint16_t)za << 16) | (uint16_t)za);
  const int16x2_t m8 = (int16x2_t)0xFFF8FFF8u;  /* -8 in both lanes: offset binary -> signed */
  const int32_t blocks = n >> 5, half = (n & 31) >> 4;
  for (int32_t blk = 0; blk < blocks + half; blk++) {  /* 32 weights in 16 bytes; the last may be half */
    const int8_t *xb = x + 32 * blk;
    const uint8_t *wb = w + 16 * blk;
    for (int32_t j = 0; j < 16; j += 4) {
      uint32_t ww, xl;
      memcpy(&ww, wb + j, 4);
      memcpy(&xl, xb + j, 4);
      uint32_t lo = ww & 0x0F0F0F0Fu;
      acc = __smlad(__sxtab16(z, (int8x4_t)xl), __sxtab16(m8, (int8x4_t)lo), acc);
      acc = __smlad(qc_sxtab16_ror8(z, xl), qc_sxtab16_ror8(m8, lo), acc);
      if (blk < blocks) {  /* the high nibbles pair with x[16..31] of the block */
        uint32_t xh, hi = (ww >> 4) & 0x0F0F0F0Fu;
        memcpy(&xh, xb + 16 + j, 4);
        acc = __smlad(__sxtab16(z, (int8x4_t)xh), __sxtab16(m8, (int8x4_t)hi), acc);
        acc = __smlad(qc_sxtab16_ror8(z, xh), qc_sxtab16_ror8(m8, hi), acc);
      }
    }
  }
  k = 32 * blocks + 16 * half;
#endif
  for (int32_t r = n - k; r > 0; r--, k++)
    acc += ((int32_t)x[k] + za) * ((int32_t)((w[(k >> 5) * 16 + (k & 15)] >> (((k & 31) >> 4) * 4)) & 15) - 8);
  return acc;
}
#endif
"""


def header() -> str:
    return HEADER
