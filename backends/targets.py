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


TARGETS = {
    "host": TargetInfo("host", {"kind": "llvm"}, "in-process Relax VM", "this machine's CPU (x86-64 llvm)"),
}


def get_target(name: str) -> TargetInfo:
    if name not in TARGETS:
        raise LoweringError(
            f"unknown target {name!r}; available targets: {', '.join(sorted(TARGETS))}"
        )
    return TARGETS[name]
