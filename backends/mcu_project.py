"""The self-contained C project a Cortex-M build is: what `art.export(folder)` writes and what
the runner builds with its own Makefile.

    model.h        `int qc_model_run(const <in> *in0, ..., <out> *out0, ...)` plus the sizes
    model.c        AOT executor: a DLTensor per tensor over one static arena (`mcu_plan`),
                   the kernels called in order, outputs copied out; no malloc
    kernels.c      the TVM-generated kernels (`c` target, argument checks disabled)
    weights.c      the constants as const arrays in flash (4/2-bit weights stay packed); arrays
                   that do not fit the primary flash region are marked QC_BIG_WEIGHTS and placed
                   by board.ld in the board's big region (the MPS2 boards' 16 MiB PSRAM)
    qc_runtime.c/h error setter and the workspace allocator (a window of the arena per call)
    qc_dsp.h       ACLE micro-kernels called from kernels.c (`mcu_dsp`)
    main.c         QEMU harness: semihosting, reads input.bin, writes output.bin
    bare.c         the smallest firmware around the model (what `size` measures)
    startup.c      vector table, reset handler (FPU on, .data copied, .bss zeroed)
    board.ld       linker script of the board (flash and RAM regions; .got with .data)
    measure.ld     the same with unbounded regions, for bare.elf (sizes are measured, not run)
    Makefile       `make` builds model.elf and bare.elf, `make run` runs under QEMU
    include/       the DLPack / TVM FFI headers kernels.c includes
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from .cdriver import ALIGN, KERNEL_SYMBOL, _c_array, _dl_dtype
from .mcu_plan import Plan
from .mcu_templates import (BARE_C, LD, MAIN_C, MAKEFILE, MODEL_C_HEAD, MODEL_H, README, RUNTIME_C, RUNTIME_H,
                            STARTUP)
from .program import BUFFER, CONST, INPUT, Program

CTYPES = {"float32": "float", "int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "int32": "int32_t",
          "int64": "int64_t", "float64": "double"}


@dataclass(frozen=True)
class Board:
    """A QEMU board and the core's compiler flags."""

    machine: str  # qemu-system-arm -M
    cflags: tuple[str, ...]
    flash: tuple[int, int]  # origin, bytes (the code memory QEMU maps)
    ram: tuple[int, int]
    # a larger memory QEMU also loads from the ELF, for weight arrays that do not fit `flash`
    # (read-only data there is counted as flash): origin, bytes, name; None = no such region
    big: tuple[int, int, str] | None = None


BOARDS = {
    "cortex-m4": Board("mps2-an386", ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
                       (0x00000000, 4 << 20), (0x20000000, 4 << 20), (0x21000000, 16 << 20, "PSRAM")),
    "cortex-m7": Board("mps2-an500", ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16"),
                       (0x00000000, 4 << 20), (0x20000000, 4 << 20), (0x60000000, 16 << 20, "PSRAM")),
    # (QEMU 7.2's `info mtree`: SSRAM1 4 MiB at 0 (mirrored at 4 MiB), SSRAM2/3 4 MiB at 0x20000000,
# PSRAM 16 MiB at 0x21000000 on AN386, at 0x60000000 on AN500.)
# AN547: code in the 512 KiB ITCM at 0, data in the 512 KiB DTCM (QEMU's map of the FPGA image)
    "cortex-m55": Board("mps3-an547", ("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"),
                        (0x00000000, 512 << 10), (0x20000000, 512 << 10)),
}
# bare.elf is linked for measurement only, in regions larger than any part, so a model over the
# board's limits still links and the report can say by how much
MEASURE = Board("none", (), (0x00000000, 256 << 20), (0x20000000, 256 << 20), (0x40000000, 256 << 20, "BIG"))
BIG_SECTION = ".qc_weights"  # the input section of QC_BIG_WEIGHTS arrays
HARNESS_BYTES = 16 << 10  # left free in the primary flash for the QEMU harness's stdio (~12 KiB measured)
STACK_BYTES = 16384  # reserved at the top of RAM by board.ld (the measured peak is reported)
# -ffp-contract=off: no fused multiply-add, so float ops round like the reference
OPT = ("-O2", "-ffp-contract=off", "-ffunction-sections", "-fdata-sections", "-fstack-usage")


def _ctype(dtype: str) -> str:
    if dtype not in CTYPES:
        from qcompiler.errors import LoweringError

        raise LoweringError(f"model inputs/outputs of type {dtype} have no C type here; supported: {', '.join(CTYPES)}")
    return CTYPES[dtype]


def _signature(p: Program) -> str:
    ins = [f"const {_ctype(p.tensors[i].dtype)} *in{k}" for k, i in enumerate(p.inputs)]
    outs = [f"{_ctype(p.tensors[i].dtype)} *out{k}" for k, i in enumerate(p.outputs)]
    return f"int qc_model_run({', '.join(ins + outs)})"


def model_h(p: Program, plan: Plan, target: str) -> str:
    sizes = []
    for kind, idx in (("IN", p.inputs), ("OUT", p.outputs)):
        for k, i in enumerate(idx):
            t = p.tensors[i]
            sizes.append(f"#define QC_MODEL_{kind}{k}_ELEMS {math.prod(t.shape)}  /* {t.dtype}{list(t.shape)} */")
            sizes.append(f"#define QC_MODEL_{kind}{k}_BYTES {t.nbytes}")
    return MODEL_H.format(target=target, summary=p.summary(), sizes="\n".join(sizes), arena=plan.arena_bytes,
                           signature=_signature(p))


def _extern(array_src: str) -> str:
    m = re.match(r"static const (\w+) (\w+)\[(\d+)\]", array_src)
    return f"extern const {m.group(1)} {m.group(2)}[{m.group(3)}];"


def shared_constants(p: Program) -> list[int]:
    """Per constant, the first constant with the same dtype, shape and bytes: those are stored
    once (the patches of a split prefix all read the same weights)."""
    first: dict[tuple, int] = {}
    return [first.setdefault((c.dtype.str, c.shape, c.tobytes()), i) for i, c in enumerate(p.constants)]


WEIGHTS_HEAD = f"""/* Generated by qcompiler: the model's constants (flash). */
#include <stdint.h>

/* Arrays marked QC_BIG_WEIGHTS do not fit the primary flash region: board.ld places section
 * {BIG_SECTION} in the board's larger memory. On a part with external flash, define it as that memory's section. */
#ifndef QC_BIG_WEIGHTS
#define QC_BIG_WEIGHTS __attribute__((section("{BIG_SECTION}")))
#endif
"""


def weights_c(p: Program, big=frozenset()) -> tuple[str, list[str]]:
    """weights.c and the extern declarations of its arrays (each distinct constant once); the
    constants numbered in `big` are marked QC_BIG_WEIGHTS (placed in the board's big region)."""
    same = shared_constants(p)
    arrays = {i: _c_array(f"qc_c{i}", c).removeprefix("static ") for i, c in enumerate(p.constants) if same[i] == i}
    body = "\n".join(("QC_BIG_WEIGHTS " if i in big else "") + a for i, a in arrays.items())
    return WEIGHTS_HEAD + f"\n{body}\n", [_extern("static " + a) for a in arrays.values()]


def place_weights(p: Program, flash_bytes: int, room: int) -> frozenset:
    """The constants to move out of a primary flash region of `room` bytes when the image's
    read-only bytes are `flash_bytes`: the largest distinct arrays first, until the rest fits."""
    same = shared_constants(p)
    move, left = [], flash_bytes
    for i in sorted((i for i in range(len(p.constants)) if same[i] == i), key=lambda i: -p.constants[i].nbytes):
        if left <= room:
            break
        move.append(i)
        left -= p.constants[i].nbytes
    return frozenset(move)


def kernels_read_shapes(kernels_src: str) -> bool:
    """Whether any kernel indexes a DLTensor's shape or strides (with static shapes and
    argument checks off TVM's C code only loads them into unused locals)."""
    return re.search(r"_(shape|strides)\[", kernels_src) is not None


def model_c(p: Program, plan: Plan, shapes: bool = True) -> str:
    """The AOT executor: a DLTensor per tensor (shape arrays only if the kernels read them),
    every call's arguments in one const table and the calls as a table run by a loop, so
    the executor's code does not grow with the model (all of it is flash)."""
    _, externs = weights_c(p)
    same = shared_constants(p)
    out = [MODEL_C_HEAD, "/* constants (weights.c) */", *externs, "",
           f"static uint8_t arena[QC_MODEL_ARENA_BYTES] __attribute__((aligned({ALIGN})));", "", "/* tensors */"]
    for i, t in enumerate(p.tensors):
        shape = "NULL"
        if t.shape and shapes:
            out.append(f"static const int64_t shape{i}[] = {{{', '.join(map(str, t.shape))}}};")
            shape = f"(int64_t *)shape{i}"
        if t.home == CONST:
            data = f"(void *)((const uint8_t *)qc_c{same[t.index]} + {t.offset})"
        elif t.home == BUFFER:
            data = f"arena + {plan.tensor_offset(i)}"
        else:
            data = "NULL"  # set to the caller's input at run time
        const = "" if t.home == INPUT else "const "  # in flash: only the inputs' data pointers change
        out.append(f"static {const}DLTensor t{i} = {{{data}, {{kDLCPU, 0}}, {len(t.shape)}, {_dl_dtype(t.dtype)}, "
                   f"{shape}, NULL, 0}};  /* {t.label}{list(t.shape)} */")
    names = list(dict.fromkeys(c.kernel for c in p.calls))
    out.append("\n/* kernels (kernels.c) */")
    out += [f"int32_t {KERNEL_SYMBOL.format(n)}(void *, void *, int32_t, void *);" for n in names]
    out.append("\n/* every call's arguments, in call order */\nstatic const TVMFFIAny args[] = {")
    rows, first = [], 0
    for n, c in enumerate(p.calls):
        out.append(f"  {', '.join(f'ARG(t{a})' for a in c.args)},  /* call {n} */")
        rows.append(f"  {{{KERNEL_SYMBOL.format(c.kernel)}, {first}, {len(c.args)}, {plan.workspace_offset(n)}, "
                    f"{plan.workspace[n]}}},  /* {n} */")
        first += len(c.args)
    if first >= 1 << 16:
        from qcompiler.errors import LoweringError

        raise LoweringError(f"the program passes {first} kernel arguments; the executor's table holds 65535")
    out += ["};", "", "/* the calls in order: kernel, first argument, count, workspace window */",
            "static const struct qc_call calls[] = {", *rows, "};"]
    out.append(f"\n{_signature(p)} {{")
    for k, i in enumerate(p.inputs):
        for j, u in enumerate(p.tensors):
            if u.home == INPUT and u.index == k:
                out.append(f"  t{j}.data = (uint8_t *)in{k} + {u.offset};")
    out.append("  for (uint32_t i = 0; i < sizeof(calls) / sizeof(calls[0]); i++) {\n"
               "    qc_workspace_window(arena + calls[i].ws_offset, calls[i].ws_bytes);\n"
               "    if (calls[i].kernel(NULL, (void *)(args + calls[i].first), calls[i].count, NULL) != 0)"
               " return qc_failed((int)i);\n  }")
    for k, i in enumerate(p.outputs):
        out.append(f"  memcpy(out{k}, t{i}.data, {p.tensors[i].nbytes});")
    out.append("  return 0;\n}")
    return "\n".join(out) + "\n"


def main_c(p: Program) -> str:
    decls, reads, writes, args = [], [], [], []
    for kind, idx, lst in (("in", p.inputs, reads), ("out", p.outputs, writes)):
        for k, i in enumerate(idx):
            t = p.tensors[i]
            decls.append(f"static {_ctype(t.dtype)} {kind}{k}[{t.nbytes} / sizeof({_ctype(t.dtype)})] "
                         f"__attribute__((aligned({ALIGN})));")
            op = "fread" if kind == "in" else "fwrite"
            lst.append(f"  if ({op}({kind}{k}, 1, {t.nbytes}, f) != {t.nbytes}) return {2 if kind == 'in' else 4};")
            args.append(f"{kind}{k}")
    names = ", ".join(f'"{c.kernel}"' for c in p.calls)
    return MAIN_C.format(decls="\n".join(decls), reads="\n".join(reads), writes="\n".join(writes),
                          args=", ".join(args), names=names)


def bare_c(p: Program) -> str:
    decls, args = [], []
    for kind, idx in (("in", p.inputs), ("out", p.outputs)):
        for k, i in enumerate(idx):
            t = p.tensors[i]
            decls.append(f"static {_ctype(t.dtype)} {kind}{k}[{t.nbytes} / sizeof({_ctype(t.dtype)})];")
            args.append(f"{kind}{k}")
    return BARE_C.format(decls="\n".join(decls), args=", ".join(args))


def linker_script(board: Board, primary: int | None = None) -> str:
    """The board's linker script; `primary` shrinks the primary flash region (a part with less
    internal flash). With a big region, section .qc_weights (QC_BIG_WEIGHTS arrays) goes there."""
    big = dict(big_note="", big_region="", big_section="")
    if board.big:
        origin, size, name = board.big
        big = dict(big_note=f"\n   Weight arrays that do not fit FLASH ({BIG_SECTION}) go to {name}, loaded from the ELF "
                            "like flash.",
                   big_region=f"\n  {name} (rx) : ORIGIN = {origin:#010x}, LENGTH = {size}",
                   big_section=f"\n  {BIG_SECTION} : {{ *({BIG_SECTION}*) . = ALIGN(8); }} > {name}")
    return LD.format(fo=board.flash[0], fl=primary or board.flash[1], ro=board.ram[0], rl=board.ram[1],
                     stack=STACK_BYTES, **big)


def makefile(board: Board, target: str, extra_cflags=()) -> str:
    return MAKEFILE.format(target=target, cflags=" ".join((*board.cflags, *OPT, *extra_cflags)), machine=board.machine)


def header_files(kernels_src: str, include_dirs: list[str]) -> dict[str, bytes]:
    """The headers kernels.c includes, transitively, found in `include_dirs` (copied into include/)."""
    found, todo = {}, re.findall(r'#include [<"]([^>"]+)[>"]', kernels_src)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        for d in include_dirs:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    found[name] = f.read()
                todo += re.findall(r'#include [<"]([^>"]+)[>"]', found[name].decode(errors="replace"))
                break
    return {f"include/{k}": v for k, v in found.items()}


def project_files(p: Program, plan: Plan, kernels_src: str, dsp_h: str, target: str, include_dirs: list[str],
                  extra_cflags=(), primary: int | None = None, big=frozenset()) -> dict[str, bytes]:
    """Every file of the project, by relative path; `primary` is the primary flash region's size
    (default the board's), `big` the constants placed in the board's big region."""
    board = BOARDS[target]
    kernels = kernels_src.replace('#include "tvm/ffi/c_api.h"', '#include "tvm/ffi/c_api.h"\n#include "qc_dsp.h"', 1)
    files = {"model.h": model_h(p, plan, target), "model.c": model_c(p, plan, kernels_read_shapes(kernels_src)), "kernels.c": kernels,
             "weights.c": weights_c(p, big)[0], "qc_runtime.h": RUNTIME_H, "qc_runtime.c": RUNTIME_C,
             "qc_dsp.h": dsp_h, "main.c": main_c(p), "bare.c": bare_c(p), "startup.c": STARTUP,
             "board.ld": linker_script(board, primary), "measure.ld": linker_script(MEASURE), "Makefile": makefile(board, target, extra_cflags),
             "README.txt": README.format(target=target, machine=board.machine, signature=_signature(p))}
    out = {k: v.encode() for k, v in files.items()}
    out.update(header_files(kernels, include_dirs))
    return out

