"""Instruction counts under QEMU (backends/icount.py and the plugin in backends/icount_plugin.c):
deterministic, attributed to the right function, SDOT and the other classes counted exactly."""

import subprocess

import pytest

from qcompiler.backends import icount
from qcompiler.backends.toolchain import require
from qcompiler.errors import LoweringError

N, CALLS = 256, 7  # vector length and calls of each dot product per run

DOT_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#ifdef __ARM_FEATURE_DOTPROD
#include <arm_neon.h>
#endif
#define N %(N)d
int8_t a[N], b[N];

__attribute__((noipa)) int32_t dot_loop(const int8_t *x, const int8_t *y, int n) {
  int32_t s = 0;
  for (int i = 0; i < n; i++) s += x[i] * y[i];
  return s;
}

#ifdef __ARM_FEATURE_DOTPROD
__attribute__((noipa)) int32_t dot_sdot(const int8_t *x, const int8_t *y, int n) {
  int32x4_t acc = vdupq_n_s32(0);
  for (int i = 0; i < n; i += 16) acc = vdotq_s32(acc, vld1q_s8(x + i), vld1q_s8(y + i));
  return vaddvq_s32(acc);
}
#endif

__attribute__((noipa)) void spin(long n) {  /* exactly 2 instructions per iteration */
  __asm__ volatile("1: subs %%0, %%0, #1\n\tb.ne 1b" : "+r"(n) : : "cc");
}

int main(int argc, char **argv) {
  spin(atol(argv[1]));
  int bad = 0;
  for (int k = 0; k < %(CALLS)d; k++) {
    for (int i = 0; i < N; i++) { a[i] = (int8_t)(i * 7 + k); b[i] = (int8_t)(3 - i * k); }
    int32_t want = 0;
    for (int i = 0; i < N; i++) want += a[i] * b[i];
    bad |= dot_loop(a, b, N) != want;
#ifdef __ARM_FEATURE_DOTPROD
    bad |= dot_sdot(a, b, N) != want;
#endif
  }
  printf("%%s\n", bad ? "mismatch" : "ok");
  return bad;
}
""" % {"N": N, "CALLS": CALLS}

# one of each counted A64 form, and neighbours that must not count (add, fmul, fmls, sadalp)
CLASSES_S = r"""
  .arch armv8.6-a+i8mm+dotprod
  .text
  .global kernel
  .type kernel, %function
kernel:
1:
  sdot v0.4s, v1.16b, v2.16b
  sdot v0.2s, v1.8b, v2.4b[1]
  udot v0.4s, v1.16b, v2.16b
  udot v0.4s, v1.16b, v2.4b[3]
  usdot v0.4s, v1.16b, v2.16b
  usdot v0.4s, v1.16b, v2.4b[0]
  sudot v0.4s, v1.16b, v2.4b[2]
  smmla v0.4s, v1.16b, v2.16b
  ummla v0.4s, v1.16b, v2.16b
  usmmla v0.4s, v1.16b, v2.16b
  mul v3.8h, v4.8h, v5.8h
  mla v3.4s, v4.4s, v5.4s
  mls v3.16b, v4.16b, v5.16b
  mul v3.4s, v4.4s, v5.s[1]
  mla v3.8h, v4.8h, v5.h[2]
  smull v6.8h, v7.8b, v8.8b
  smlal2 v6.4s, v7.8h, v8.8h
  umull v6.2d, v7.2s, v8.2s
  smlal v6.4s, v7.4h, v8.h[1]
  fmla v9.4s, v10.4s, v11.4s
  fmla v9.2d, v10.2d, v11.2d
  fmla v9.4s, v10.4s, v11.s[3]
  add v3.4s, v4.4s, v5.4s
  fmul v9.4s, v10.4s, v11.4s
  fmls v9.4s, v10.4s, v11.4s
  sadalp v6.4s, v7.8h
  subs x0, x0, #1
  b.ne 1b
  ret
  .size kernel, .-kernel
"""
CLASSES_EXPECTED = {"sdot": 2, "udot": 2, "usdot": 3, "smmla": 1, "ummla": 1, "usmmla": 1,
                    "mul_mla": 5, "mull_mlal": 4, "fmla": 3}
CLASSES_MAIN = r"""
void kernel(long n);
int main(void) { kernel(%d); return 0; }
"""


def _cross_gcc(tmp, name, sources: dict, *flags):
    """Static aarch64 binary `tmp/name` from {file name: text}."""
    gcc = require("aarch64-linux-gnu-gcc")
    paths = []
    for file, text in sources.items():
        (tmp / file).write_text(text)
        paths.append(str(tmp / file))
    out = tmp / name
    subprocess.run([gcc, "-static", *flags, "-o", str(out), *paths], check=True)
    return out


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("icount")
    return {"dotprod": _cross_gcc(tmp, "dot_dotprod", {"dot.c": DOT_C}, "-O3", "-march=armv8.2-a+dotprod"),
            "plain": _cross_gcc(tmp, "dot_plain", {"dot.c": DOT_C}, "-O3", "-march=armv8-a")}


def test_counts_repeat_exactly_and_do_not_depend_on_the_cpu_model(binaries):
    """Two runs give identical tables; cortex-a76 and max run the program's own functions with
    identical counts (only libc routines chosen by CPU features, e.g. memcpy, may differ)."""
    first = icount.count_instructions([binaries["dotprod"], "1000"])
    assert first.stdout == b"ok\n"
    assert icount.count_instructions([binaries["dotprod"], "1000"]).symbols == first.symbols
    other = icount.count_instructions([binaries["dotprod"], "1000"], cpu="max")
    for name in ("main", "dot_loop", "dot_sdot", "spin"):
        assert other.symbols[name] == first.symbols[name], name
    assert first.total > 10_000 and first.symbols["?"].insns < 0.01 * first.total


def test_sdot_count_is_the_number_of_executed_vdotq(binaries):
    """The explicit vdotq_s32 loop executes N/16 SDOTs per call, and that is what is counted;
    with +dotprod GCC also vectorizes the plain loop with SDOT, without it no SDOT exists."""
    counts = icount.count_instructions([binaries["dotprod"], "10"])
    assert counts.symbols["dot_sdot"].classes["sdot"] == CALLS * N // 16
    assert counts.symbols["dot_loop"].classes["sdot"] > 0
    # main's reference sum is vectorized too; libc has no SDOT
    assert {n for n, s in counts.symbols.items() if s.classes["sdot"]} == {"dot_sdot", "dot_loop", "main"}
    plain = icount.count_instructions([binaries["plain"], "10"], cpu="cortex-a53")
    assert plain.stdout == b"ok\n" and "dot_sdot" not in plain.symbols
    assert plain.class_total("sdot") == 0 and plain.symbols["dot_loop"].insns > counts.symbols["dot_loop"].insns


def test_instructions_are_attributed_to_their_function(binaries):
    """spin(n) runs 2n instructions: 2000 more iterations add exactly 4000 to `spin` and
    nothing to the dot products."""
    small = icount.count_instructions([binaries["dotprod"], "1000"])
    large = icount.count_instructions([binaries["dotprod"], "3000"])
    assert large.symbols["spin"].insns - small.symbols["spin"].insns == 4000
    for name in ("dot_loop", "dot_sdot"):
        assert large.symbols[name] == small.symbols[name]
    assert large.matching("dot_*").insns == sum(large.symbols[f].insns for f in ("dot_loop", "dot_sdot"))


def test_a64_classes_match_what_the_assembler_emits(tmp_path):
    """Each A64 class counts exactly its instructions as GNU as encodes them (i8mm under -cpu
    max), and neighbouring encodings (add, fmul, fmls, sadalp) count in no class."""
    prog = _cross_gcc(tmp_path, "classes", {"kernel.S": CLASSES_S, "main.c": CLASSES_MAIN % 50})
    kernel = icount.count_instructions([prog], cpu="max").symbols["kernel"]
    assert kernel.classes == {name: 50 * k for name, k in CLASSES_EXPECTED.items()}
    assert kernel.insns == 50 * 28 + 1


M4_C = r"""
#include <stdint.h>
extern uint32_t _stack_top;
void reset(void);
__attribute__((section(".vectors"), used)) const void *vectors[2] = {&_stack_top, (void *)reset};

__attribute__((noinline)) void macs(int n) {
  __asm__ volatile("1:\n smlad r4, r5, r6, r4\n smuad r4, r5, r6\n smlabb r4, r5, r6, r4\n"
                   " mla r4, r5, r6, r4\n muls r4, r5, r4\n vfma.f32 s0, s1, s2\n"
                   " vmla.f32 s0, s1, s2\n add r4, r4, r5\n vmul.f32 s0, s1, s2\n"
                   " subs %0, %0, #1\n bne 1b\n" : "+r"(n) : : "r4", "r5", "r6", "s0", "cc");
}

void reset(void) {
  *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20;  /* CPACR: enable the FPU */
  __asm__ volatile("dsb\n isb");
  macs(40);
  register uint32_t r0 __asm__("r0") = 0x18, r1 __asm__("r1") = 0x20026;  /* semihosting exit(0) */
  __asm__ volatile("bkpt 0xab" : : "r"(r0), "r"(r1));
  for (;;) {}
}
"""
M4_LD = """MEMORY { FLASH (rx) : ORIGIN = 0, LENGTH = 4M  RAM (rwx) : ORIGIN = 0x20000000, LENGTH = 4M }
SECTIONS { .text : { KEEP(*(.vectors)) *(.text*) *(.rodata*) } > FLASH
           .bss : { *(.bss*) } > RAM  _stack_top = ORIGIN(RAM) + LENGTH(RAM); }
"""


def test_cortex_m4_under_qemu_system_arm(tmp_path):
    """The same plugin in qemu-system-arm (Cortex-M4, Thumb): T32 classes counted exactly
    (SMLAD/SMUAD, SMLABB, MLA/MULS, VFMA/VMLA), attributed to the function that runs them."""
    gcc = require("arm-none-eabi-gcc")
    (tmp_path / "app.c").write_text(M4_C)
    (tmp_path / "link.ld").write_text(M4_LD)
    elf = tmp_path / "app.elf"
    subprocess.run([gcc, "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "-O2",
                    "-nostdlib", "-T", str(tmp_path / "link.ld"), "-o", str(elf), str(tmp_path / "app.c")], check=True)
    args = ["-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "none",
            "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)]
    counts = icount.count_instructions(args, qemu="qemu-system-arm", cpu=None, timeout=60)
    macs = counts.symbols["macs"]
    assert macs.classes == {"smlad": 80, "smlaxy": 40, "mla_mul": 80, "vmla_vfma": 80}
    assert 11 * 40 <= macs.insns <= 11 * 40 + 8 and "reset" in counts.symbols


def test_missing_emulator_names_the_debian_package(monkeypatch, tmp_path):
    """No qemu-aarch64 on PATH: the error names the Debian package qemu-user."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LoweringError, match=r"qemu-aarch64 is not installed.*apt-get install qemu-user"):
        icount.count_instructions(["./prog"])


def test_missing_host_compiler_for_the_plugin(monkeypatch, tmp_path):
    """With no plugin built yet and no gcc on PATH, the error says to install gcc."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LoweringError, match=r"gcc is not installed.*apt-get install gcc"):
        icount.plugin_path()


def test_plugin_is_built_once_into_the_cache(monkeypatch, tmp_path):
    """A fresh cache gets one plugin file named by the source hash, and no leftovers."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = icount.plugin_path()
    assert path.parent == tmp_path / "qcompiler" and path.name.startswith("qemu_icount-")
    assert icount.plugin_path() == path and [p.name for p in path.parent.iterdir()] == [path.name]


def test_cpu_without_the_instruction_is_a_clear_error(binaries):
    """SDOT code on a Cortex-A53 (no dot product) fails naming SIGILL and which -cpu would work."""
    with pytest.raises(LoweringError, match=r"cortex-a53: killed by SIGILL .*SDOT needs e.g. cortex-a76"):
        icount.count_instructions([binaries["dotprod"], "1"], cpu="cortex-a53")


def test_unknown_class_lists_the_counted_ones(binaries):
    """Asking for a class that was not counted names the classes that were."""
    counts = icount.count_instructions([binaries["plain"], "1"])
    with pytest.raises(LoweringError, match=r"no instruction class 'vdot' was counted; counted: sdot, udot"):
        counts.class_total("vdot")
