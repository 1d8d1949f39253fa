"""Targets are data: a name maps to a TVM target and how code for it is built and run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from qcompiler.errors import LoweringError


@dataclass(frozen=True)
class TargetInfo:
    name: str
    tvm_target: dict
    runner: str  # how artifacts for this target execute
    description: str
    backend: str = "host"  # the module of qcompiler.backends that builds and runs it (`get_backend`)
    cc: str | None = None  # cross compiler that links the generated code
    emulator: str | None = None  # runs the linked program on this machine
    cpu: str | None = None  # the emulated core (`-cpu`)
    options: tuple[str, ...] = ()  # options the name may carry: "cortex-m4:sram=256K,dsp=0"


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. znver3, skylake-avx512)."""
    import tvm.target.codegen

    return tvm.target.codegen.llvm_get_system_cpu()


TARGETS = {
    "host": TargetInfo("host", {"kind": "llvm", "mcpu": "<host>"}, "in-process Relax VM",
                       "this machine's CPU (llvm with -mcpu of this machine, so its vector units are used)"),
    "arm": TargetInfo("arm", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                              "mattr": ["+neon", "+dotprod"]},
                      "qemu-aarch64 -cpu cortex-a76",
                      "64-bit ARM Linux (Cortex-A76: NEON and the SDOT dot-product instructions), "
                      "cross-compiled with aarch64-linux-gnu-gcc and run under qemu-aarch64",
                      backend="arm", cc="aarch64-linux-gnu-gcc", emulator="qemu-aarch64", cpu="cortex-a76"),
    "mali": TargetInfo("mali", {"kind": "opencl", "device": "mali", "host": {"kind": "llvm"}},
                       "OpenCL kernels launched through pyopencl (PoCL on this machine)",
                       "Arm Mali GPUs through OpenCL (TVM opencl -device=mali); verified here on PoCL, "
                       "deployed as an aarch64 library with the OpenCL kernels embedded",
                       backend="mali", cc="aarch64-linux-gnu-gcc"),
    **{f"cortex-m{n}": TargetInfo(
        f"cortex-m{n}", {"kind": "llvm", "mtriple": triple, "mcpu": f"cortex-m{n}", "mfloat-abi": "hard"},
        f"qemu-system-arm -M {board} -semihosting",
        f"Cortex-M{n} microcontroller: a self-contained C project (TVM c target, SMLAD kernels, static arena), "
        f"built with arm-none-eabi-gcc and run on QEMU's {board} board",
        backend="cortex_m", cc="arm-none-eabi-gcc", emulator="qemu-system-arm", cpu=board,
        options=("flash", "sram", "dsp", "patches", "primary_flash"))
       for n, board, triple in ((4, "mps2-an386", "thumbv7em-none-eabihf"), (7, "mps2-an500", "thumbv7em-none-eabihf"),
                                (55, "mps3-an547", "thumbv8.1m.main-none-eabihf"))},
}


def tvm_target(info: TargetInfo) -> dict:
    """The TVM target dict, with '<host>' resolved to this machine's CPU."""
    return {k: (host_cpu() if v == "<host>" else v) for k, v in info.tvm_target.items()}


def split_target(name: str) -> tuple[str, dict[str, str]]:
    """"cortex-m4:sram=256K,dsp=0" -> ("cortex-m4", {"sram": "256K", "dsp": "0"})."""
    base, _, rest = name.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise LoweringError(f"target option {item!r} of {name!r} has no value; write key=value")
        opts[key.strip()] = value.strip()
    return base, opts


def get_target(name: str) -> TargetInfo:
    base, opts = split_target(name)
    if base not in TARGETS:
        raise LoweringError(
            f"unknown target {base!r}; available targets: {', '.join(sorted(TARGETS))}"
        )
    info = TARGETS[base]
    for key in opts:
        if key not in info.options:
            valid = ", ".join(info.options) or "none"
            raise LoweringError(f"target {base!r} has no option {key!r}; its options: {valid}")
    return info


@dataclass(frozen=True)
class Backend:
    """How code for a target is built, run and stored."""

    build: Callable  # (ir, example_inputs, target, dynamic_batch) -> library
    runner: Callable  # library -> callable(*tensors) -> tuple of tensors
    save: Callable  # (library, folder) -> names of the files written there
    load: Callable  # (folder) -> library
    preflight: Callable = lambda: None  # fails early when a tool the build needs is missing
    export: Callable | None = None  # (library, folder) -> files written: a project to build elsewhere


HOST_LIB = "lib.so"


def get_backend(target: str) -> Backend:
    """The backend of target `target` (host: Relax VM in process; arm: static binary under QEMU;
    cortex_m: C project on an emulated board)."""
    name = get_target(target).backend
    if name == "cortex_m":
        from . import cortex_m

        return Backend(cortex_m.build, cortex_m.McuRunner, cortex_m.save_library, cortex_m.load_library,
                       lambda: cortex_m.preflight(target), cortex_m.export)
    if name == "mali":
        from . import mali

        return Backend(mali.build, mali.runner, mali.save_library, mali.load_library, lambda: mali.preflight(target),
                       mali.export)
    if name == "arm":
        from . import arm

        return Backend(arm.build, arm.ArmRunner, arm.save_library, arm.load_library, lambda: arm.preflight(target))
    from . import host

    def save(library, folder):
        host.save_library(library, os.path.join(folder, HOST_LIB))
        return [HOST_LIB]

    return Backend(host.build, host.HostRunner, save, lambda folder: host.load_library(os.path.join(folder, HOST_LIB)))
