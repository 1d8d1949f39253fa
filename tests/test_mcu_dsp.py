"""The SMLAD micro-kernel and the rule that calls it: exact on the emulated Cortex-M4 for every
length, zero point and extreme value; only contiguous int8 dot loops are rewritten."""

import shutil
import subprocess

import numpy as np
import pytest

from qcompiler.backends import mcu_dsp, mcu_project
from qcompiler.backends.mcu_templates import STARTUP

needs_toolchain = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                                     reason="gcc-arm-none-eabi / qemu-system-arm not installed")

LOOP = """  for (int32_t k = 0; k < 64; ++k) {
    acc[i] = (acc[i] + ((((int32_t)x[((i * 64) + k)]) + 128) * ((int32_t)w[k])));
  }"""
DECLS = "int8_t* x = ...;\nint8_t* w = ...;\n"


def test_rule_rewrites_contiguous_int8_dot_loops():
    """A contiguous loop becomes one qc_dot_s8 call with the base addresses, length and zero point."""
    src, n = mcu_dsp.use_smlad(DECLS + LOOP)
    assert n == 1
    assert "acc[i] = (acc[i] + qc_dot_s8(&x[(i * 64)], &w[0], 64, 128));" in src


@pytest.mark.parametrize("change", [
    ("w[k]", "w[(k * 2)]"),                 # strided operand
    ("acc[i]", "acc[k]"),                   # accumulator moves with k
    ("k < 64", "k < 4"),                    # too short to pay off
    ("int8_t* w", "uint8_t* w"),            # not int8
])
def test_rule_leaves_other_loops_alone(change):
    """Strided, unsigned, short loops, or an accumulator indexed by the loop, stay as they are."""
    src = DECLS + LOOP
    src = src.replace(*change)
    assert mcu_dsp.use_smlad(src)[1] == 0


U4_LOOP = """  for (int64_t k = (int64_t)0; k < (int64_t)144; ++k) {
    acc[oc] = ((int32_t)(((int64_t)acc[oc]) + ((((int64_t)((int32_t)x[k])) + (int64_t)128) * (((((int64_t)((int32_t)w[(((((int64_t)oc) * (int64_t)80) + ((k >> (int64_t)5) * (int64_t)16)) + (k & (int64_t)15))])) >> (((k & (int64_t)31) >> (int64_t)4) * (int64_t)4)) & (int64_t)15) - (int64_t)8))));
  }"""  # TVM 0.27's C for a packed conv


def test_rule_rewrites_packed_int4_dot_loops():
    """TVM's unpack-multiply-accumulate loop over packed 4-bit weights (int64 casts and all)
    becomes one qc_dot_s8_u4 call; a different nibble order is left alone."""
    src, n = mcu_dsp.use_smlad_u4(DECLS + U4_LOOP)
    assert n == 1 and "qc_dot_s8_u4(&x[0], (const uint8_t *)&w[(((oc * 80) + ((0 >> 5) * 16)) + (0 & 15))], 144, 128)" in src
    swapped = U4_LOOP.replace("(k >> (int64_t)5) * (int64_t)16", "(k >> (int64_t)4) * (int64_t)16")
    assert mcu_dsp.use_smlad_u4(DECLS + swapped)[1] == 0


def _u4_reference(x, w, za):
    """The packed layout of kernels_int.py: weight k in byte (k >> 5) * 16 + (k & 15)."""
    return sum((int(x[k]) + za) * (((int(w[(k >> 5) * 16 + (k & 15)]) >> (((k & 31) >> 4) * 4)) & 15) - 8)
               for k in range(len(x)))


@needs_toolchain
def test_micro_kernel_is_exact_on_cortex_m4(tmp_path):
    """qc_dot_s8 and qc_dot_s8_u4 on mps2-an386 equal exact integer sums for lengths 0..37 and
    0..80 (tails, half blocks), zero points from -128 to 128 and extreme values."""
    rng = np.random.default_rng(0)
    arr = lambda v: "{" + ", ".join(map(str, v.tolist() or [0])) + "}"  # noqa: E731
    body = ["#include <stdio.h>", '#include "qc_dsp.h"', "int main(void) {", '  FILE *f = fopen("out.txt", "w");']
    want = []
    for n in range(38):
        for za in (-128, -1, 0, 17, 128):
            a, b = rng.integers(-128, 128, n), rng.integers(-128, 128, n)
            if n == 37:
                a, b = np.full(n, -128), np.full(n, -128 if za <= 0 else 127)
            want.append(int(((a.astype(np.int64) + za) * b).sum()))
            body.append(f"  {{ static const int8_t a[] = {arr(a)}, b[] = {arr(b)};"
                        f' fprintf(f, "%ld\\n", (long)qc_dot_s8(a, b, {n}, {za})); }}')
    for n in list(range(0, 81, 3)) + [16, 32, 48, 64, 144]:
        for za in (-128, 0, 128):
            x, w = rng.integers(-128, 128, n), rng.integers(0, 256, -(-n // 32) * 16)
            want.append(_u4_reference(x, w, za))
            body.append(f"  {{ static const int8_t x[] = {arr(x)}; static const uint8_t w[] = {arr(w)};"
                        f' fprintf(f, "%ld\\n", (long)qc_dot_s8_u4(x, w, {n}, {za})); }}')
    body += ["  fclose(f);", "  return 0;", "}"]
    (tmp_path / "main.c").write_text("\n".join(body))
    (tmp_path / "qc_dsp.h").write_text(mcu_dsp.header())
    (tmp_path / "startup.c").write_text(STARTUP)
    board = mcu_project.BOARDS["cortex-m4"]
    (tmp_path / "board.ld").write_text(mcu_project.linker_script(board))
    subprocess.run(["arm-none-eabi-gcc", *board.cflags, "-O2", "-I.", "-nostartfiles", "-T", "board.ld",
                    "--specs=nano.specs", "--specs=rdimon.specs", "main.c", "startup.c", "-o", "t.elf"],
                   cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(["qemu-system-arm", "-M", board.machine, "-nographic", "-monitor", "none", "-serial", "none",
                    "-semihosting-config", "enable=on,target=native", "-kernel", "t.elf"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    got = [int(v) for v in (tmp_path / "out.txt").read_text().split()]
    assert got == want
