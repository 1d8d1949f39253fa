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
}


def tvm_target(info: TargetInfo) -> dict:
    """The TVM target dict, with '<host>' resolved to this machine's CPU."""
    return {k: (host_cpu() if v == "<host>" else v) for k, v in info.tvm_target.items()}


def get_target(name: str) -> TargetInfo:
    if name not in TARGETS:
        raise LoweringError(
            f"unknown target {name!r}; available targets: {', '.join(sorted(TARGETS))}"
        )
    return TARGETS[name]


@dataclass(frozen=True)
class Backend:
    """How code for a target is built, run and stored."""

    build: Callable  # (ir, example_inputs, target, dynamic_batch) -> library
    runner: Callable  # library -> callable(*tensors) -> tuple of tensors
    save: Callable  # (library, folder) -> names of the files written there
    load: Callable  # (folder) -> library
    preflight: Callable = lambda: None  # fails early when a tool the build needs is missing


HOST_LIB = "lib.so"


def get_backend(target: str) -> Backend:
    """The backend of target `target` (host: Relax VM in process; arm: static binary under QEMU)."""
    name = get_target(target).backend
    if name == "arm":
        from . import arm

        return Backend(arm.build, arm.ArmRunner, arm.save_library, arm.load_library, lambda: arm.preflight(target))
    from . import host

    def save(library, folder):
        host.save_library(library, os.path.join(folder, HOST_LIB))
        return [HOST_LIB]

    return Backend(host.build, host.HostRunner, save, lambda folder: host.load_library(os.path.join(folder, HOST_LIB)))
