"""Executed-instruction counts under QEMU: performance figures that do not depend on how busy
the machine is.

`icount_plugin.c` (beside this module) is a QEMU TCG plugin that adds one to a counter of the current
ELF function symbol before every executed guest instruction, and to a counter of each chosen
instruction class whose encoding matches (`word & mask == value`). Counts are exact and the
same on every run and every `-cpu` model that executes the same code (single guest thread).

Two ways in:
    counts = count_instructions(["./prog", "arg"])                 # runs qemu itself
    counter = Counter()                                            # or around another runner:
    run_with_qemu(..., qemu_args=counter.qemu_args); counts = counter.read()

The plugin is compiled with the host gcc into the user cache folder, named by the hash of its
source, the first time it is needed (`make setup` does it once: `python -m
qcompiler.backends.icount`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qcompiler.errors import LoweringError

from .cache import atomic_entry, user_cache_dir
from .toolchain import require

PLUGIN_SOURCE = Path(__file__).resolve().parent / "icount_plugin.c"  # shipped as package data
CFLAGS = ("-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall")


def _t32(mask: int, value: int) -> tuple[int, int]:
    """A 32-bit T32 encoding written as (first halfword << 16 | second) -> the plugin's word,
    which reads the bytes little-endian (first halfword in the low half)."""
    swap = lambda w: ((w & 0xFFFF) << 16) | (w >> 16)  # noqa: E731
    return swap(mask), swap(value)


# class name -> [(instruction size in bytes, mask, value)], from the Arm ARM encodings.
A64_CLASSES = {
    "sdot": [(4, 0xBFE0FC00, 0x0E809400), (4, 0xBFC0F400, 0x0F80E000)],   # vector, by element
    "udot": [(4, 0xBFE0FC00, 0x2E809400), (4, 0xBFC0F400, 0x2F80E000)],
    "usdot": [(4, 0xBFE0FC00, 0x0E809C00), (4, 0xBFC0F400, 0x0F80F000),   # i8mm: USDOT,
              (4, 0xBFC0F400, 0x0F00F000)],                                # SUDOT by element
    "smmla": [(4, 0xFFE0FC00, 0x4E80A400)],                                # i8mm
    "ummla": [(4, 0xFFE0FC00, 0x6E80A400)],
    "usmmla": [(4, 0xFFE0FC00, 0x4E80AC00)],
    "mul_mla": [(4, 0xBF20FC00, 0x0E209C00), (4, 0xBF20FC00, 0x0E209400),  # MUL, MLA,
                (4, 0xBF20FC00, 0x2E209400), (4, 0xBF00F400, 0x0F008000),  # MLS; by element
                (4, 0xBF00F400, 0x2F000000), (4, 0xBF00F400, 0x2F004000)],
    "mull_mlal": [(4, 0x9F20FC00, 0x0E208000), (4, 0x9F20FC00, 0x0E20A000),  # [SU]MLAL, MLSL,
                  (4, 0x9F20FC00, 0x0E20C000), (4, 0x9F00F400, 0x0F002000),  # MULL; by element
                  (4, 0x9F00F400, 0x0F006000), (4, 0x9F00F400, 0x0F00A000)],
    "fmla": [(4, 0xBFA0FC00, 0x0E20CC00), (4, 0xBF80F400, 0x0F801000)],   # vector, by element
}
T32_CLASSES = {
    "smlad": [(4, *_t32(0xFFF000E0, 0xFB200000))],                         # SMLAD(X), SMUAD(X)
    "smlaxy": [(4, *_t32(0xFFF000C0, 0xFB100000))],                        # SMLA<x><y>, SMUL<x><y>
    "mla_mul": [(4, *_t32(0xFFF000F0, 0xFB000000)), (2, 0xFFC0, 0x4340)],  # MLA/MUL, MULS
    "vmla_vfma": [(4, *_t32(0xFFB00E50, 0xEE000A00)), (4, *_t32(0xFFB00E50, 0xEEA00A00))],
}
CLASSES_BY_QEMU = {"qemu-aarch64": A64_CLASSES, "qemu-system-aarch64": A64_CLASSES,
                   "qemu-arm": T32_CLASSES, "qemu-system-arm": T32_CLASSES}


@dataclass(frozen=True)
class SymbolCounts:
    insns: int
    classes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class InstructionCounts:
    """Executed instructions per ELF function symbol (`?`: outside every symbol QEMU knows)."""

    symbols: dict[str, SymbolCounts]
    class_names: tuple[str, ...]
    stdout: bytes = b""

    @property
    def total(self) -> int:
        return sum(s.insns for s in self.symbols.values())

    def class_total(self, name: str) -> int:
        self._check_class(name)
        return sum(s.classes[name] for s in self.symbols.values())

    def matching(self, pattern: str) -> SymbolCounts:
        """The sum over symbols whose name matches a shell pattern (e.g. `fused_*`)."""
        hits = [s for n, s in self.symbols.items() if fnmatch.fnmatchcase(n, pattern)]
        return SymbolCounts(sum(s.insns for s in hits),
                            {c: sum(s.classes[c] for s in hits) for c in self.class_names})

    def table(self, top: int = 20) -> str:
        rows = sorted(self.symbols.items(), key=lambda kv: (-kv[1].insns, kv[0]))[:top]
        width = max([len(n) for n, _ in rows] + [6])
        head = f"{'symbol':<{width}} {'insns':>12}" + "".join(f" {c:>9}" for c in self.class_names)
        lines = [head] + [f"{n:<{width}} {s.insns:>12}" + "".join(f" {s.classes[c]:>9}" for c in self.class_names)
                          for n, s in rows]
        lines.append(f"{'total':<{width}} {self.total:>12}"
                     + "".join(f" {self.class_total(c):>9}" for c in self.class_names))
        return "\n".join(lines)

    def _check_class(self, name):
        if name not in self.class_names:
            raise LoweringError(f"no instruction class {name!r} was counted; counted: {', '.join(self.class_names)}")


def plugin_path() -> Path:
    """The compiled plugin, built into the user cache folder if it is not there yet."""
    if not PLUGIN_SOURCE.is_file():
        raise LoweringError(f"the QEMU plugin source {PLUGIN_SOURCE} is missing: instruction counting "
                            "needs qcompiler's source tree (pip install -e)")
    source = PLUGIN_SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    path = user_cache_dir() / f"qemu_icount-{digest}.so"
    if not path.is_file():
        gcc = require("gcc")
        with atomic_entry(path) as tmp:
            done = subprocess.run([gcc, *CFLAGS, "-o", str(tmp), str(PLUGIN_SOURCE)], capture_output=True, text=True)
            if done.returncode:
                raise LoweringError(f"building the QEMU plugin failed:\n{done.stderr}")
    return path


def _qemu_opt(value: str) -> str:
    return value.replace(",", ",,")  # QEMU option syntax: a comma in a value is doubled


class Counter:
    """The QEMU arguments that load the plugin (`qemu_args`), and the counts after the run."""

    def __init__(self, classes: dict | None = None, qemu: str = "qemu-aarch64"):
        if classes is None:
            classes = CLASSES_BY_QEMU.get(os.path.basename(qemu), A64_CLASSES)
        self.class_names = tuple(classes)
        self._dir = tempfile.TemporaryDirectory(prefix="qc-icount-")
        self.out = Path(self._dir.name) / "counts.tsv"
        spec = [str(plugin_path()), f"out={self.out}"]
        spec += [f"class={name}:{size}:{mask:#x}:{value:#x}"
                 for name, patterns in classes.items() for size, mask, value in patterns]
        self.qemu_args = ("-plugin", ",".join(_qemu_opt(s) for s in spec))

    def read(self, stdout: bytes = b"") -> InstructionCounts:
        if not self.out.is_file():
            raise LoweringError("QEMU wrote no instruction counts: the guest did not exit normally, or "
                                "the QEMU run did not get this Counter's qemu_args")
        lines = self.out.read_text().splitlines()
        header = lines[0].split("\t")
        if header[:2] != ["symbol", "insns"] or tuple(header[2:]) != self.class_names:
            raise LoweringError(f"unexpected instruction-count header {header}")
        symbols = {}
        for line in lines[1:]:
            name, insns, *cls = line.split("\t")
            symbols[name] = SymbolCounts(int(insns), dict(zip(self.class_names, map(int, cls))))
        return InstructionCounts(symbols, self.class_names, stdout)

    def close(self):
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = (" (an instruction this -cpu lacks: SDOT needs e.g. cortex-a76 or max, i8mm needs max)"
                if name == "SIGILL" else "")
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def count_instructions(argv, qemu: str = "qemu-aarch64", cpu: str | None = "cortex-a76", extra_args=(),
                       classes: dict | None = None, env: dict | None = None, input: bytes | None = None,
                       timeout: float = 600) -> InstructionCounts:
    """Run `qemu [-cpu cpu] -plugin ... *extra_args *argv` and return its instruction counts.

    qemu-user (qemu-aarch64): argv is the static guest binary and its arguments.
    qemu-system-*: argv is the rest of the command line (e.g. `-M mps2-an386 -nographic
    -semihosting-config enable=on,target=native -kernel app.elf`); pass cpu=None to keep the
    board's CPU. Classes default to the A64 or T32 table by the emulator's name. The guest's
    stdout is in `.stdout`; a non-zero exit raises a LoweringError with its stderr.
    """
    exe = require(qemu)
    argv = [os.fspath(a) for a in argv]
    with Counter(classes, qemu) as counter:
        cmd = [exe, *(["-cpu", cpu] if cpu else []), *counter.qemu_args, *extra_args, *argv]
        try:
            done = subprocess.run(cmd, input=input, capture_output=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LoweringError(f"{qemu} did not finish in {timeout} s: {' '.join(argv)}") from e
        if done.returncode:
            where = f"{qemu} -cpu {cpu}" if cpu else qemu
            raise LoweringError(f"{' '.join(argv)} under {where}: {_exit_reason(done.returncode)}\n"
                                f"{done.stderr.decode(errors='replace')[-2000:]}")
        return counter.read(done.stdout)


if __name__ == "__main__":  # `make setup`: build the plugin once
    print(plugin_path())
