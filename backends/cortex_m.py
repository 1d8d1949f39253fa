"""The `cortex-m4` / `cortex-m7` targets: a self-contained C project per model, built with
arm-none-eabi-gcc and run on QEMU's MPS2 boards (mps2-an386, mps2-an500) with semihosting.

build:  IR -> flat Program (`program.extract`, Relax pipeline of the llvm thumbv7em target)
        -> kernels.c with TVM's `c` target and `tirx.disable_assert`, float constants as exact
        hexadecimal literals (`exact_floats`), int8 and packed-int4 dot loops on SMLAD
        micro-kernels (`mcu_dsp`) -> static arena plan (`mcu_plan`) ->
        project files (`mcu_project`) -> `make` (its own Makefile) -> model.elf (QEMU
        harness) and bare.elf (the model alone, measured with arm-none-eabi-size and the
        compiler's -fstack-usage files) -> flash / SRAM report checked against the limits.
run:    `qemu-system-arm -M <board> -semihosting ... -kernel model.elf` in a folder holding
        input.bin; the harness writes output.bin; the exit status says whether it ran.

Target options follow the name: `cortex-m4:flash=1M,sram=256K` checks against a part's
limits (default: the QEMU board's: 4 MiB of SRAM; flash is the 4 MiB code region plus, on the
MPS2 boards, the 16 MiB PSRAM that takes the weight arrays which do not fit the code region);
`primary_flash=256K` shrinks the code region (a part with less internal flash: the largest
weight arrays go to the PSRAM); `dsp=0` builds the plain C kernels;
`patches=N` runs the CNN's spatial prefix in N x N patches (`mcu_patches`) and reports the
arena before and after.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field

import torch

from qcompiler.errors import ArtifactError, LoweringError, MemoryLimitError

from .arm import decode_outputs, encode_inputs
from .cdriver import KERNEL_SYMBOL, include_dirs
from .mcu_plan import Plan, check as check_plan, plan as plan_arena
from .mcu_project import BIG_SECTION, BOARDS, HARNESS_BYTES, place_weights, project_files
from .program import CONST, Program, extract, workspace_bytes
from .targets import get_target, split_target, tvm_target
from .toolchain import require

C_TARGET = {"kind": "c"}
PROJECT = "project.tar"  # the C project inside a saved artifact
META = "mcu.json"
RUNTIME_STACK = 256  # frames below the kernels (runtime shim, libm), added to the measured peak


@dataclass
class McuBinary:
    """A built Cortex-M project: its files, the linked harness, and its measured memory."""

    files: dict[str, bytes]  # relative path -> bytes (the exported project)
    elf: bytes  # model.elf (the QEMU harness)
    signature: dict
    target: str  # with its options, e.g. "cortex-m4:sram=256K"
    memory: dict = field(default_factory=dict)
    program: Program | None = field(default=None, repr=False, compare=False)  # as scheduled (in memory only)
    extracted: Program | None = field(default=None, repr=False, compare=False)  # before scheduling: rebuilds


def parse_size(text: str, what: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmM]?)", text.strip())
    if not m:
        raise LoweringError(f"target option {what}={text!r} is not a size; write bytes, or e.g. 256K or 1M")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]


def options(target: str) -> dict:
    """The target's options, checked: flash/sram limits, the primary flash region, dsp on/off,
    patches per side."""
    base, opts = split_target(target)
    board = BOARDS[base]
    out = {"base": base, "flash": board.flash[1] + (board.big[1] if board.big else 0), "sram": board.ram[1],
           "primary_flash": board.flash[1], "dsp": True, "patches": 0}
    for k, v in opts.items():
        if k in ("flash", "sram", "primary_flash"):
            out[k] = parse_size(v, k)
        elif k == "dsp":
            if v not in ("0", "1"):
                raise LoweringError(f"target option dsp={v!r}: write dsp=1 (SMLAD kernels) or dsp=0 (plain C)")
            out[k] = v == "1"
        elif k == "patches":
            if not v.isdigit() or int(v) == 1:
                raise LoweringError(f"target option patches={v!r}: write the patches per side (2, 3, 4, ...; 0 = off)")
            out[k] = int(v)
    if "primary_flash" in opts:
        if not board.big:
            raise LoweringError(f"target option primary_flash={opts['primary_flash']}: {board.machine} has no "
                                "second memory for the weights that would not fit; set flash= (the part's limit)")
        if not 0 < out["primary_flash"] <= board.flash[1]:
            raise LoweringError(f"target option primary_flash={opts['primary_flash']}: {board.machine} maps "
                                f"{board.flash[1] >> 10}K of code flash; write a size from 1 to {board.flash[1] >> 10}K")
    return out


def headers_dirs() -> list[str]:
    """Where the headers kernels.c includes live: TVM FFI / DLPack, and TVM's runtime headers."""
    import tvm

    return [*include_dirs(), os.path.join(os.path.dirname(tvm.__file__), "include")]


def preflight(target: str) -> None:
    options(target)
    info = get_target(target)
    require(info.cc)
    require(info.emulator)


def kernels_source(program: Program, target: str, dsp: bool, c: bool = True) -> tuple[Program, str, dict]:
    """The program with its kernels scheduled for the MCU (`mcu_dsp.schedule_kernels`; the
    workspace bounds measured again), kernels.c from TVM's `c` target with argument checks
    off, and with `dsp` the int8 dot loops on the SMLAD micro-kernel. The dict says what was
    done per kernel and how many loops use SMLAD."""
    import tvm

    from .exact_floats import PIPELINE, hex_literals
    from .mcu_dsp import schedule_kernels, use_smlad, use_smlad_u4

    kernels, notes = schedule_kernels(program.kernels)
    llvm = tvm.target.Target(tvm_target(get_target(target)))
    program = dataclasses.replace(program, kernels=kernels, workspace=workspace_bytes(kernels, llvm))
    if not c:  # the schedule and workspace only (to plan memory)
        return program, "", {"schedules": notes}
    try:
        with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
            src = tvm.tirx.build(kernels, target=tvm.target.Target(C_TARGET), pipeline=PIPELINE).inspect_source()
    except Exception as e:
        raise LoweringError(f"TVM could not generate C for the kernels: {type(e).__name__}: {e}") from e
    src = hex_literals(src)  # float constants exact (`exact_floats`)
    smlad = 0
    if dsp:
        src, smlad = use_smlad(src)
        src, smlad4 = use_smlad_u4(src)
        smlad += smlad4
    from .mcu_narrow import narrow_constants  # int64 requantizer constants stored as int32

    program, src, narrowed = narrow_constants(program, src)
    return program, src, {"schedules": notes, "smlad_loops": smlad, "narrowed_constants": narrowed}


def build(gm: torch.fx.GraphModule, example_inputs: tuple, target: str = "cortex-m4",
          dynamic_batch: bool = False) -> McuBinary:
    """Lower, generate the C project, build it with its Makefile, measure and check its memory."""
    if dynamic_batch:
        raise LoweringError(f"the {target} target compiles for the example shapes only; compile without dynamic_batch=True")
    opts = options(target)
    preflight(target)
    from .mcu_checks import check_ops

    check_ops(gm, target)
    if not opts["patches"]:
        return build_program(extract(gm, example_inputs, opts["base"]), target)
    from .mcu_patches import split_patches

    split, note = split_patches(gm, opts["patches"])
    before = plan_arena(kernels_source(extract(gm, example_inputs, opts["base"]), opts["base"], False, c=False)[0])
    binary = build_program(extract(split, example_inputs, opts["base"]), target)
    binary.memory["patches"] = {"split": note, "arena_bytes_unsplit": before.arena_bytes,
                                "arena_bytes": binary.memory["arena_bytes"]}
    return binary


def build_program(extracted: Program, target: str) -> McuBinary:
    """Schedule, generate C, plan, make, measure and check a flat Program (as `extract` gives it)."""
    from .mcu_dsp import header

    opts = options(target)
    program, src, dsp_counts = kernels_source(extracted, opts["base"], opts["dsp"])
    arena = plan_arena(program)
    check_plan(arena)

    def files_with(big=frozenset()):
        return project_files(program, arena, src, header(), opts["base"], headers_dirs(),
                             primary=opts["primary_flash"], big=big)

    def placed(measured):  # the weights that do not fit the primary flash, in the board's big region
        flash = measured["text"] + measured["data"]
        if BOARDS[opts["base"]].big and opts["primary_flash"] - HARNESS_BYTES < flash <= opts["flash"]:
            return files_with(place_weights(program, flash, opts["primary_flash"] - HARNESS_BYTES))
        return None

    files, elf, memory = make(files_with(), target, opts, lambda measured: {
        **report_memory(program, arena, measured, opts), "dsp_kernels": dsp_counts}, placed)
    return McuBinary(files, elf, program.signature(), target, memory, program, extracted)


def make(files: dict[str, bytes], target: str, opts: dict, memory_of, placed=None) -> tuple[dict, bytes, dict]:
    """Run the project's Makefile: bare.elf first, measured; if `placed(measured)` gives new
    files (weights moved to the board's big region) bare.elf again with them; the report
    (`memory_of(measured)`) checked against the limits, then model.elf. Returns the files,
    model.elf and the report."""
    require("arm-none-eabi-gcc")

    def run(goal):
        done = subprocess.run(["make", "-s", goal], cwd=work, capture_output=True, text=True)
        if done.returncode:
            raise LoweringError(f"building the {target} project failed (make {goal}):\n{done.stderr[-3000:]}")

    with tempfile.TemporaryDirectory(prefix="qc-mcu-") as work:
        write_files(files, work)
        run("bare.elf")
        measured = measure(work)
        if placed and (moved := placed(measured)):
            write_files({k: v for k, v in moved.items() if files.get(k) != v}, work)
            files = moved
            run("bare.elf")
            measured = measure(work)
        memory = memory_of(measured)
        check_fit(memory, opts, target)
        run("model.elf")
        with open(os.path.join(work, "model.elf"), "rb") as f:
            return files, f.read(), memory


def write_files(files: dict[str, bytes], folder: str) -> None:
    for name, data in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def measure(work: str) -> dict:
    """Sizes of bare.elf (text, data, bss; `big`: the read-only bytes in the big region, part of
    text), code bytes per symbol, and stack frames (-fstack-usage)."""
    size = subprocess.run(["arm-none-eabi-size", "-B", "bare.elf"], cwd=work, capture_output=True, text=True, check=True)
    text, data, bss = (int(v) for v in size.stdout.splitlines()[1].split()[:3])
    sections = subprocess.run(["arm-none-eabi-size", "-A", "bare.elf"], cwd=work, capture_output=True, text=True,
                              check=True).stdout.split()
    big = int(sections[sections.index(BIG_SECTION) + 1]) if BIG_SECTION in sections else 0
    nm = subprocess.run(["arm-none-eabi-nm", "-S", "--defined-only", "bare.elf"], cwd=work, capture_output=True,
                        text=True, check=True)
    symbols = {}
    for line in nm.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4:
            symbols[parts[3]] = int(parts[1], 16)
    frames = {}
    for name in os.listdir(work):
        if name.endswith(".su"):
            with open(os.path.join(work, name)) as f:
                for line in f:
                    where, nbytes, _ = line.rsplit("\t", 2)
                    frames[where.rsplit(":", 1)[-1]] = int(nbytes)
    return {"text": text, "data": data, "bss": bss, "big": big, "symbols": symbols, "frames": frames}


def report_memory(p: Program, arena: Plan, m: dict, opts: dict) -> dict:
    """Flash and peak SRAM, total and per kernel call, from the linked image and the plan."""
    stack = m["frames"].get("qc_model_run", 0) + m["frames"].get("main", 0) + RUNTIME_STACK + max(
        (m["frames"].get(KERNEL_SYMBOL.format(c.kernel), 0) for c in p.calls), default=0)
    layers = []
    for i, c in enumerate(p.calls):
        weights = sum(p.tensors[a].nbytes for a in set(c.args) if p.tensors[a].home == CONST)
        layers.append({"call": i, "kernel": c.kernel, "code_bytes": m["symbols"].get(KERNEL_SYMBOL.format(c.kernel), 0),
                       "weight_bytes": weights, "sram_bytes": arena.live_bytes[i], "workspace_bytes": arena.workspace[i]})
    board = BOARDS[opts["base"]]
    regions = {f"flash {board.flash[0]:#x}": m["text"] + m["data"] - m.get("big", 0)}
    if board.big:
        regions[f"{board.big[2]} {board.big[0]:#x}"] = m.get("big", 0)
    return {"flash_bytes": m["text"] + m["data"], "flash_regions": regions, "primary_flash_limit": opts["primary_flash"],
            "big_flash_limit": board.big[1] if board.big else 0, "peak_sram_bytes": m["data"] + m["bss"] + stack,
            "arena_bytes": arena.arena_bytes, "unplanned_bytes": arena.naive_bytes, "stack_bytes": stack,
            "weight_bytes": sum(c.nbytes for c in p.constants), "flash_limit": opts["flash"],
            "sram_limit": opts["sram"], "layers": layers}


def check_fit(memory: dict, opts: dict, target: str) -> None:
    """MemoryLimitError with needed vs available, the largest layers and what would help."""
    problems = []
    if memory["flash_bytes"] > opts["flash"]:
        top = sorted(memory["layers"], key=lambda l: -(l["weight_bytes"] + l["code_bytes"]))[:3]
        biggest = "; ".join(f"{l['kernel']}: {l['weight_bytes']} B weights + {l['code_bytes']} B code" for l in top)
        problems.append(f"flash: needs {memory['flash_bytes']} bytes, {opts['flash']} available "
                        f"(weights {memory['weight_bytes']} B). Largest layers: {biggest}. Would help: lower weight "
                        "bits (quant='w4a8' packs two weights a byte, 'w2a8' four), fewer channels, or a part with "
                        "more flash (target option flash=)")
    else:  # the total fits: each region of the board must too (the code stays in the primary one)
        limits = [memory.get("primary_flash_limit", opts["primary_flash"]), memory.get("big_flash_limit", 0)]
        for (region, used), limit in zip(memory.get("flash_regions", {}).items(), limits):
            if used > limit:
                problems.append(f"flash region {region}: needs {used} bytes, {limit} available (code, executor "
                                "tables and the constants not moved stay in the primary region; the largest weight "
                                "arrays go to the big one). Would help: lower weight bits, fewer channels, or a "
                                "larger primary_flash=")
    if memory["peak_sram_bytes"] > opts["sram"]:
        top = sorted(memory["layers"], key=lambda l: -l["sram_bytes"])[:3]
        biggest = "; ".join(f"{l['kernel']}: {l['sram_bytes']} B live ({l['workspace_bytes']} B workspace)" for l in top)
        problems.append(f"SRAM: needs {memory['peak_sram_bytes']} bytes ({memory['arena_bytes']} B arena, "
                        f"{memory['stack_bytes']} B stack), {opts['sram']} available. Largest layers: {biggest}. "
                        "Would help: a smaller input resolution or fewer channels in the first stages (their "
                        "activations dominate), lower activation bits, or a part with more SRAM (target option sram=)")
    if problems:
        raise MemoryLimitError(f"the model does not fit {target}: " + " | ".join(problems))


def execute(binary: McuBinary, inputs, qemu_args=(), timeout: float = 300) -> tuple[subprocess.CompletedProcess, bytes]:
    """Run model.elf under qemu-system-arm; returns the process and the bytes of output.bin."""
    base = split_target(binary.target)[0]
    qemu = require(get_target(base).emulator)
    data = encode_inputs(binary.signature, inputs)
    with tempfile.TemporaryDirectory(prefix="qc-mcu-run-") as work:
        with open(os.path.join(work, "model.elf"), "wb") as f:
            f.write(binary.elf)
        with open(os.path.join(work, "input.bin"), "wb") as f:
            f.write(data)
        cmd = [qemu, "-M", BOARDS[base].machine, "-nographic", "-monitor", "none", "-serial", "none",
               "-semihosting-config", "enable=on,target=native", *qemu_args, "-kernel", "model.elf"]
        try:
            done = subprocess.run(cmd, cwd=work, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LoweringError(f"the {base} program did not finish in {timeout} s under {' '.join(cmd)}") from e
        if done.returncode:
            raise LoweringError(f"the {base} program failed under {' '.join(cmd)}: exit status {done.returncode} "
                                f"({_EXIT.get(done.returncode, 'unknown')})\n{done.stderr.decode(errors='replace')[-2000:]}")
        with open(os.path.join(work, "output.bin"), "rb") as f:
            return done, f.read()


_EXIT = {1: "input.bin or output.bin would not open", 2: "input.bin is too short", 3: "a kernel failed",
         4: "writing output.bin failed", 127: "a processor fault (HardFault/UsageFault)"}


KERNEL_SYMBOLS = ("__tvm_ffi_*", "qc_dot_*")  # the kernels, and the micro-kernel parts kept out of line


def kernel_instructions(counts):
    """The kernels' share of `instruction_counts`: the `__tvm_ffi_*` symbols (SMLAD micro-kernels
    inlined into them) plus the out-of-line `qc_dot_*` parts (`qc_dot_s8_u4_rest`)."""
    from .icount import SymbolCounts

    parts = [counts.matching(p) for p in KERNEL_SYMBOLS]
    return SymbolCounts(sum(p.insns for p in parts), {c: sum(p.classes[c] for p in parts) for c in counts.class_names})


def instruction_counts(binary: McuBinary, inputs):
    """Executed instructions per symbol (and SMLAD-class counts) of one run, from the QEMU
    TCG plugin (`icount.Counter`); `kernel_instructions` gives the kernels' share."""
    from .icount import Counter

    with Counter(qemu="qemu-system-arm") as counter:
        execute(binary, inputs, counter.qemu_args)
        return counter.read()


def run(binary: McuBinary, inputs, qemu_args=()) -> tuple[torch.Tensor, ...]:
    return decode_outputs(binary.signature, execute(binary, inputs, qemu_args)[1])


class McuRunner:
    """`runner(*tensors)` runs the model on the emulated board (the Artifact's runner)."""

    def __init__(self, binary: McuBinary, qemu_args=()):
        self.binary, self.qemu_args = binary, tuple(qemu_args)

    def __call__(self, *inputs):
        return run(self.binary, inputs, self.qemu_args)


def export(binary: McuBinary, folder: str) -> list[str]:
    """Write the C project into `folder` (created); returns the relative paths written."""
    os.makedirs(folder, exist_ok=True)
    write_files(binary.files, folder)
    return sorted(binary.files)


def save_library(binary: McuBinary, folder: str) -> list[str]:
    """model.elf, the C project as one tar file (artifact files are flat), and mcu.json."""
    with tarfile.open(os.path.join(folder, PROJECT), "w") as tar:
        for name in sorted(binary.files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(binary.files[name]), 0
            tar.addfile(info, io.BytesIO(binary.files[name]))
    with open(os.path.join(folder, "model.elf"), "wb") as f:
        f.write(binary.elf)
    with open(os.path.join(folder, META), "w") as f:
        json.dump({"target": binary.target, "signature": binary.signature, "memory": binary.memory}, f, indent=1)
    return [PROJECT, "model.elf", META]


def load_library(folder: str) -> McuBinary:
    try:
        with open(os.path.join(folder, META)) as f:
            meta = json.load(f)
        with tarfile.open(os.path.join(folder, PROJECT)) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        with open(os.path.join(folder, "model.elf"), "rb") as f:
            elf = f.read()
    except FileNotFoundError as e:
        raise ArtifactError(f"{os.path.basename(e.filename)} is missing from the Cortex-M artifact in {folder}") from None
    except (json.JSONDecodeError, KeyError, tarfile.TarError) as e:
        raise ArtifactError(f"the Cortex-M artifact in {folder} is damaged ({type(e).__name__}: {e})") from e
    return McuBinary(files, elf, meta["signature"], meta["target"], meta["memory"])
