"""Pass-manager instruments: hooks run around every pass.

Built in (switched on from `PassContext`): the verifier (after each pass), timing,
printing the IR after each pass or after changing ones, dumping numbered IR files, and a
crash reproducer that saves the input IR and the pipeline text when a pass fails.
"""

from __future__ import annotations

import os
import sys
import time

from .ir import copy_ir, print_ir, verify


class Instrument:
    """Base class: override the hooks you need."""

    def run_start(self, gm, ctx, pm):
        pass

    def before_pass(self, p, gm, ctx):
        pass

    def after_pass(self, p, gm, ctx, result):
        pass

    def failed_pass(self, p, gm, ctx, exc):
        pass


class Verifier(Instrument):
    def after_pass(self, p, gm, ctx, result):
        verify(gm)


class Timing(Instrument):
    def before_pass(self, p, gm, ctx):
        self._t0 = time.perf_counter()

    def after_pass(self, p, gm, ctx, result):
        ctx.timings.append((str(p), time.perf_counter() - self._t0))


class PrintIR(Instrument):
    def __init__(self, mode: str):
        if mode not in ("all", "change"):
            from .errors import PipelineError

            raise PipelineError(f"print_ir_after={mode!r}: use 'all' or 'change'")
        self.mode = mode

    def after_pass(self, p, gm, ctx, result):
        if self.mode == "all" or result.changed:
            out = ctx.print_ir_to or sys.stdout
            out.write(f"// ----- IR after {p} ----- //\n{print_ir(gm)}")


class DumpIR(Instrument):
    def __init__(self, folder: str):
        self.folder = folder
        self.count = 0

    def _write(self, label: str, gm):
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"{self.count:02d}-{label}.txt")
        with open(path, "w") as f:
            f.write(print_ir(gm))
        self.count += 1

    def run_start(self, gm, ctx, pm):
        self._write("input", gm)

    def after_pass(self, p, gm, ctx, result):
        self._write(p.name, gm)


class Reproducer(Instrument):
    """Keeps the IR before each pass; on failure writes a replayable reproducer."""

    def __init__(self, folder: str):
        self.folder = folder

    def run_start(self, gm, ctx, pm):
        self.passes = pm.passes
        self.index = 0

    def before_pass(self, p, gm, ctx):
        self.saved = copy_ir(gm)

    def after_pass(self, p, gm, ctx, result):
        self.index += 1

    def failed_pass(self, p, gm, ctx, exc):
        from .reproducer import write_reproducer

        remaining = ",".join(str(q) for q in self.passes[self.index:])
        write_reproducer(self.folder, self.saved, remaining, ctx, exc)


def default_instruments(ctx) -> list[Instrument]:
    out: list[Instrument] = []
    if ctx.timing:
        out.append(Timing())
    if ctx.verify:
        out.append(Verifier())
    if ctx.print_ir_after:
        out.append(PrintIR(ctx.print_ir_after))
    if ctx.dump_dir:
        out.append(DumpIR(ctx.dump_dir))
    if ctx.reproducer_dir:
        out.append(Reproducer(ctx.reproducer_dir))
    return out
