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


SHORT_LOOP = """int8_t pad_zp_global_ptr[9];
        for (int64_t rc_ry_rx_fused = (int64_t)0; rc_ry_rx_fused < (int64_t)9; ++rc_ry_rx_fused) {
          conv2d_int_intermediate_ptr[oc] = ((int32_t)(((int64_t)conv2d_int_intermediate_ptr[oc]) + ((((int64_t)((int32_t)pad_zp_global_ptr[rc_ry_rx_fused])) + (int64_t)55) * (((((int64_t)((int32_t)param_0[((((int64_t)oc) * (int64_t)5) + (rc_ry_rx_fused % (int64_t)5))])) >> ((rc_ry_rx_fused / (int64_t)5) * (int64_t)4)) & (int64_t)15) - (int64_t)8))));
        }"""  # TVM 0.27's C for a 3x3 conv of one input channel at 4 bits (the Fashion CNN's first)


def test_rule_rewrites_short_packed_rows_with_their_span():
    """A row shorter than 32 weights is one block of ceil(K/2) bytes (K = 9: byte k % 5, nibble
    k // 5): its loop becomes qc_dot_s8_u4_span with that span; another nibble order is left alone."""
    src, n = mcu_dsp.use_smlad_u4(SHORT_LOOP)
    assert n == 1 and "qc_dot_s8_u4_span(&pad_zp_global_ptr[0], (const uint8_t *)&param_0[((oc * 5) + (0 % 5))], 9, 5, 55)" in src
    assert mcu_dsp.use_smlad_u4(SHORT_LOOP.replace("(rc_ry_rx_fused / (int64_t)5)", "(rc_ry_rx_fused / (int64_t)4)"))[1] == 0


def _u4_reference(x, w, za, span=16):
    """The packed layout of packing.py: weight k in byte (k // 2S) * S + k % S, nibble (k % 2S) // S."""
    return sum((int(x[k]) + za) * (((int(w[(k // (2 * span)) * span + k % span]) >> (((k % (2 * span)) // span) * 4)) & 15)
                                   - 8) for k in range(len(x)))


@needs_toolchain
def test_micro_kernel_is_exact_on_cortex_m4(tmp_path):
    """qc_dot_s8 and qc_dot_s8_u4 on mps2-an386 equal exact integer sums for lengths 0..37 and
    0..80 (tails, half blocks), zero points from -128 to 128 and extreme values; so do the
    short-row spans (qc_dot_s8_u4_span, 1..13 bytes, partial and whole blocks) and the ragged
    group's clamped reads (qc_dot_s8_u4_clamp: none, some, all but one, all past the end)."""
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
    for span, n in [(s, n) for s in (1, 3, 4, 5, 8, 13) for n in {1, s, 2 * s - 1, 2 * s, 4 * s + 3}]:
        x, w, za = rng.integers(-128, 128, n), rng.integers(0, 256, -(-n // (2 * span)) * span), int(rng.integers(-128, 129))
        want.append(_u4_reference(x, w, za, span))
        body.append(f"  {{ static const int8_t x[] = {arr(x)}; static const uint8_t w[] = {arr(w)};"
                    f' fprintf(f, "%ld\\n", (long)qc_dot_s8_u4_span(x, w, {n}, {span}, {za})); }}')
    for x0, last, n in ((0, 200, 128), (128, 143, 128), (128, 128, 128), (64, 100, 64), (96, 90, 32)):
        x, w = rng.integers(-128, 128, last + 1), rng.integers(0, 256, n // 2)
        want.append(_u4_reference(x[np.minimum(np.arange(x0, x0 + n), last)], w, 7))
        body.append(f"  {{ static const int8_t x[] = {arr(x)}; static const uint8_t w[] = {arr(w)};"
                    f' fprintf(f, "%ld\\n", (long)qc_dot_s8_u4_clamp(x, {x0}, {last}, w, {n}, 7)); }}')
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


GROUPED = """int8_t* lv41 = ...;
      for (int32_t j_0 = 0; j_0 < 4; ++j_0) {
        for (int64_t j_1 = (int64_t)0; j_1 < (int64_t)2; ++j_1) {
          for (int32_t j_2 = 0; j_2 < 16; ++j_2) {
            int64_t cse_v1 = (j_1 * (int64_t)16);
            int64_t cse_v2 = ((int64_t)j_2);
            int64_t cse_v3 = (((int64_t)j_0) * (int64_t)32);
            int32_t cse_v4 = ((i1 * 4) + i2);
            if (((cse_v3 + cse_v1) + cse_v2) == (int64_t)0) {
              group_dot_int[cse_v4] = 0;
            }
            group_dot_int[cse_v4] = ((int32_t)(((int64_t)group_dot_int[cse_v4]) + ((((int64_t)((int32_t)lv41[((((((int64_t)i2) * (int64_t)128) + cse_v3) + cse_v1) + cse_v2)])) + (int64_t)128) * (((((int64_t)((int32_t)param_0[((((i1 * 256) + (i2 * 64)) + (j_0 * 16)) + j_2)])) >> (j_1 * (int64_t)4)) & (int64_t)15) - (int64_t)8))));
          }
        }
      }
"""


def test_rule_rewrites_grouped_int4_three_loop_reductions():
    """TVM's split reduction of a grouped int4 linear (blocks x nibbles x bytes, zeroed on the
    first step; the loop text as TVM 0.27 prints it) becomes one packed SMLAD call over the
    group; a nibble order that differs from the packed layout, or zeroing on another step,
    is left alone. (Exactness on the board: test_cortex_m's W4A8 CNN has a grouped linear.)"""
    src, n = mcu_dsp.use_smlad_u4(GROUPED)
    assert n == 1 and "for (" not in src
    assert ("group_dot_int[(((i1 * 4) + i2))] = qc_dot_s8_u4(&lv41[((((i2 * 128) + ((0 * 32))) + ((0 * 16))) + 0)], "
            "(const uint8_t *)&param_0[((((i1 * 256) + (i2 * 64)) + (0 * 16)) + 0)], 128, 128);") in src
    assert mcu_dsp.use_smlad_u4(GROUPED.replace("(j_1 * (int64_t)4)", "((1 - j_1) * (int64_t)4)"))[1] == 0
    assert mcu_dsp.use_smlad_u4(GROUPED.replace("== (int64_t)0)", "== (int64_t)1)"))[1] == 0


RAGGED = """int8_t* lv45 = ...;
      for (int32_t j_0 = 0; j_0 < 4; ++j_0) {
        for (int64_t j_1 = (int64_t)0; j_1 < (int64_t)2; ++j_1) {
          for (int32_t j_2 = 0; j_2 < 16; ++j_2) {
            int64_t cse_v1 = (j_1 * (int64_t)16);
            int64_t cse_v2 = ((int64_t)j_2);
            int64_t cse_v3 = (((int64_t)j_0) * (int64_t)32);
            int32_t cse_v4 = ((i1 * 7) + i2);
            if (((cse_v3 + cse_v1) + cse_v2) == (int64_t)0) {
              group_dot_int[cse_v4] = 0;
            }
            int64_t v_ = (((((int64_t)i2) * (int64_t)128) + cse_v3) + cse_v1) + cse_v2;
            int64_t v__1 = (int64_t)783;
            group_dot_int[cse_v4] = ((int32_t)(((int64_t)group_dot_int[cse_v4]) + ((((int64_t)((int32_t)lv45[((v_) < (v__1) ? (v_) : (v__1))])) + (int64_t)128) * (((((int64_t)((int32_t)param_0[((((i1 * 448) + (i2 * 64)) + (j_0 * 16)) + j_2)])) >> (j_1 * (int64_t)4)) & (int64_t)15) - (int64_t)8))));
          }
        }
      }
"""  # TVM 0.27's C for the Fashion CNN's grouped fc1 (K = 784 in 7 groups of 128: the last one ragged)


def test_rule_rewrites_ragged_grouped_reductions_with_the_clamp():
    """A grouped int4 nest whose activation index is clamped (min(x0 + k, 783), locals declared
    after the zeroing) becomes one qc_dot_s8_u4_clamp call with the start and last index; a
    clamp of another form, or a wrong nibble order under it, is left alone."""
    src, n = mcu_dsp.use_smlad_u4(RAGGED)
    assert n == 1 and "for (" not in src
    assert ("group_dot_int[(((i1 * 7) + i2))] = qc_dot_s8_u4_clamp(lv45, (int32_t)((((((i2 * 128) + ((0 * 32))) + "
            "((0 * 16))) + 0))), 783, (const uint8_t *)&param_0[((((i1 * 448) + (i2 * 64)) + (0 * 16)) + 0)], 128, 128);") in src
    assert mcu_dsp.use_smlad_u4(RAGGED.replace("(v_) < (v__1) ? (v_) : (v__1)", "(v_) > (v__1) ? (v_) : (v__1)"))[1] == 0
    assert mcu_dsp.use_smlad_u4(RAGGED.replace("(j_1 * (int64_t)4)", "((1 - j_1) * (int64_t)4)"))[1] == 0


@needs_toolchain
def test_short_rows_and_ragged_groups_run_on_smlad_and_equal_the_ir():
    """A W4A8 net whose first conv has 9-weight rows (one 5-byte block) and whose linear has
    K = 448 in groups of 128 (the last one ragged) runs both on the packed SMLAD micro-kernels
    (qc_dot_s8_u4_span, qc_dot_s8_u4_clamp) on mps2-an386 and equals art.ir bit for bit."""
    import torch

    import qcompiler as qc

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 7, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(448, 10)).eval()
    calib = [torch.randn(4, 1, 8, 8) for _ in range(4)]
    art = qc.compile(net, (calib[0][:1],), target="cortex-m4", quant="w4a8", calib=calib)
    kernels = art.library.files["kernels.c"].decode()
    assert "qc_dot_s8_u4_span(" in kernels and "qc_dot_s8_u4_clamp(" in kernels
    for x in torch.randn(3, 1, 1, 8, 8):
        assert torch.equal(art(x), art.ir(x))
