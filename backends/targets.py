"""Targets are data: a name maps to a TVM target and how code for it is built and run."""

from __future__ import annotations

from dataclasses import dataclass

from qcompiler.errors import LoweringError


@dataclass(frozen=True)
class TargetInfo:
    name: str
    tvm_target: dict
    runner: str  # how artifacts for this target execute
    description: str


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
                      "cross-compiled with aarch64-linux-gnu-gcc and run under qemu-aarch64"),
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
