"""cortex-m4 / cortex-m7 targets: models run on QEMU's MPS2 boards equal the IR bit for bit, the
exported C project builds and runs with its own Makefile, artifacts save and load, and bad
input (target options, ops without an MCU lowering) fails clearly."""

import os
import re
import subprocess

import pytest
import torch

import qcompiler as qc
from qcompiler import zoo
from qcompiler.backends import cortex_m, toolchain
from qcompiler.ir import as_tuple
from tests.conftest import calib_batches

MISSING = [t for t in ("arm-none-eabi-gcc", "qemu-system-arm") if __import__("shutil").which(t) is None]
needs_toolchain = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING} (make toolchains)")
CNN_SHAPE = (1, 1, 8, 8)


def _compile(net, shape, target, quant):
    torch.manual_seed(0)
    return qc.compile(net.eval(), (torch.randn(shape),), target=target, quant=quant, calib=calib_batches(shape))


@pytest.fixture(scope="module")
def cnn_m4():
    """The digits CNN at W8A8 for cortex-m4 (compiled once for the module)."""
    torch.manual_seed(0)
    return _compile(zoo.DigitsCNN(), CNN_SHAPE, "cortex-m4", "w8a8")


@pytest.fixture(scope="module")
def cnn_w4_m7():
    """The digits CNN at W4A8 (packed 4-bit weights: convs, grouped and per-channel linears) for cortex-m7."""
    torch.manual_seed(0)
    return _compile(zoo.DigitsCNN(), CNN_SHAPE, "cortex-m7", "w4a8")


def inputs(shape, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@needs_toolchain
def test_cnn_on_m4_equals_ir(cnn_m4):
    """The digits CNN (W8A8) run on mps2-an386 equals art.ir exactly (float outputs included)."""
    for x in inputs(CNN_SHAPE):
        assert torch.equal(cnn_m4(x), cnn_m4.ir(x))


@needs_toolchain
def test_w4_cnn_on_m7_equals_ir_with_packed_weights(cnn_w4_m7):
    """The W4A8 CNN on mps2-an500 equals art.ir through the packed-int4 SMLAD micro-kernel, and
    its 4-bit weights are stored packed in weights.c (the 64x512 linear in 16 KiB, not 32)."""
    for x in inputs(CNN_SHAPE):
        assert torch.equal(cnn_w4_m7(x), cnn_w4_m7.ir(x))
    assert b"qc_dot_s8_u4(" in cnn_w4_m7.library.files["kernels.c"]  # the packed SMLAD micro-kernel runs
    p = cnn_w4_m7.library.program
    assert any(c.dtype == "uint8" and c.nbytes == 64 * 512 // 2 for c in p.constants)
    assert b"qc_c" in cnn_w4_m7.library.files["weights.c"]


@needs_toolchain
def test_exported_project_builds_and_runs_with_its_own_makefile(cnn_m4, tmp_path):
    """export() writes a C project whose Makefile builds model.elf, and `make run` under QEMU
    turns input.bin into the outputs art.ir computes."""
    files = cnn_m4.export(str(tmp_path))
    for name in ("model.h", "model.c", "kernels.c", "weights.c", "qc_runtime.c", "startup.c", "board.ld", "Makefile"):
        assert name in files
    assert "int qc_model_run(const float *in0, float *out0);" in (tmp_path / "model.h").read_text()
    subprocess.run(["make", "-s"], cwd=tmp_path, check=True, capture_output=True)
    symbols = subprocess.run(["arm-none-eabi-nm", "bare.elf"], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert " malloc" not in symbols.stdout and " qc_model_run" in symbols.stdout  # the model alone allocates nothing
    x = inputs(CNN_SHAPE, 1, seed=5)[0]
    (tmp_path / "input.bin").write_bytes(x.numpy().tobytes())
    subprocess.run(["make", "-s", "run"], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    got = torch.frombuffer(bytearray((tmp_path / "output.bin").read_bytes()), dtype=torch.float32)
    assert torch.equal(got.reshape(1, 10), cnn_m4.ir(x))


@needs_toolchain
def test_save_load_runs_the_same_firmware(cnn_m4, tmp_path):
    """A saved .qca reloads with its project and firmware, runs, and keeps the memory report."""
    cnn_m4.save(str(tmp_path / "m.qca"))
    art = qc.load(str(tmp_path / "m.qca"))
    x = inputs(CNN_SHAPE, 1, seed=7)[0]
    assert torch.equal(art(x), cnn_m4.ir(x))
    assert art.report().flash_bytes == cnn_m4.report().flash_bytes


def test_bad_target_options():
    """Unknown options, options of targets without any, and bad sizes are named with what works."""
    with pytest.raises(qc.LoweringError, match="no option 'ram'.*flash, sram, dsp, patches"):
        qc.compile(zoo.MLP(8, 8, 2), torch.randn(2, 8), target="cortex-m4:ram=1K")
    with pytest.raises(qc.LoweringError, match="target 'host' has no option 'sram'"):
        qc.compile(zoo.MLP(8, 8, 2), torch.randn(2, 8), target="host:sram=1K")
    with pytest.raises(qc.LoweringError, match="not a size.*256K"):
        cortex_m.options("cortex-m7:sram=lots")
    with pytest.raises(qc.LoweringError, match="dsp=1"):
        cortex_m.options("cortex-m4:dsp=yes")


def test_op_without_mcu_lowering_names_op_and_layer():
    """topk has no MCU lowering: the error names the op, the layer and what to do instead."""

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.topk(self.fc(x), 3).values

    from qcompiler.backends.mcu_checks import check_ops
    from qcompiler.frontends.pytorch import trace

    gm = trace(Head().eval(), (torch.randn(2, 8),))
    with pytest.raises(qc.LoweringError, match=r"aten.topk in layer .*Head.*no cortex-m4 lowering.*tvm.contrib.sort"):
        check_ops(gm, "cortex-m4")


def test_missing_toolchain_names_debian_package(monkeypatch):
    """Without arm-none-eabi-gcc, compile fails before any work naming the Debian packages."""
    monkeypatch.setattr(toolchain.shutil, "which", lambda tool: None)
    with pytest.raises(qc.LoweringError, match="gcc-arm-none-eabi libnewlib-arm-none-eabi"):
        qc.compile(zoo.MLP(8, 8, 2), torch.randn(2, 8), target="cortex-m4")


@needs_toolchain
def test_exported_sizes_match_the_compiled_shapes(cnn_w4_m7, tmp_path):
    """model.h states the input/output element counts and the arena the plan sized."""
    cnn_w4_m7.export(str(tmp_path))
    h = (tmp_path / "model.h").read_text()
    assert "#define QC_MODEL_IN0_ELEMS 64" in h and "#define QC_MODEL_OUT0_ELEMS 10" in h
    assert f"#define QC_MODEL_ARENA_BYTES {cnn_w4_m7.library.memory['arena_bytes']}" in h
    assert os.path.exists(tmp_path / "include" / "dlpack" / "dlpack.h")


@needs_toolchain
def test_memory_plan_is_sound_and_reported(cnn_m4):
    """The arena plan never overlaps two live items, shares memory (arena < the buffers and
    workspace side by side), and the report's flash / peak SRAM come from the linked image."""
    from qcompiler.backends import mcu_plan

    p = cnn_m4.library.program
    plan = mcu_plan.plan(p)
    mcu_plan.check(plan)
    m = cnn_m4.report().memory
    assert plan.arena_bytes == m["arena_bytes"] < plan.naive_bytes
    assert cnn_m4.report().flash_bytes > m["weight_bytes"] == sum(c.nbytes for c in p.constants)
    assert cnn_m4.report().peak_sram_bytes >= m["arena_bytes"] + m["stack_bytes"]
    assert len(m["layers"]) == len(p.calls) and max(l["sram_bytes"] for l in m["layers"]) <= m["arena_bytes"]
    assert all(l["code_bytes"] > 0 for l in m["layers"])  # each kernel's size read from the image
    assert "peak SRAM" in str(cnn_m4.report())


@needs_toolchain
def test_model_that_does_not_fit_names_numbers_layers_and_options(cnn_m4):
    """Limits below the CNN's needs fail with needed vs available, the largest layers and the
    options that would help (lower weight bits for flash, smaller first stages for SRAM)."""
    m = cnn_m4.report().memory
    opts = cortex_m.options("cortex-m4:flash=16K,sram=4K")
    with pytest.raises(qc.MemoryLimitError) as e:
        cortex_m.check_fit(m, opts, "cortex-m4:flash=16K,sram=4K")
    text = str(e.value)
    assert f"flash: needs {m['flash_bytes']} bytes, 16384 available" in text
    assert f"SRAM: needs {m['peak_sram_bytes']} bytes" in text and "4096 available" in text
    assert "conv2d" in text and "w4a8" in text and "smaller input resolution" in text


@needs_toolchain
def test_build_refuses_a_model_over_the_flash_limit(cnn_m4):
    """The build itself (bare firmware linked and measured, then checked) raises
    MemoryLimitError, a LoweringError, before linking the board image, for a 16 KiB part."""
    with pytest.raises(qc.MemoryLimitError, match="flash: needs .* bytes, 16384 available"):
        cortex_m.build_program(cnn_m4.library.extracted, "cortex-m4:flash=16K")


@needs_toolchain
def test_smlad_kernels_are_exact_and_execute_fewer_instructions(cnn_m4):
    """The CNN's int8 dot loops run on SMLAD (counted by the QEMU plugin); the plain-C build of
    the same program (dsp=0) has none, gives the same outputs and executes more instructions."""
    assert cnn_m4.library.memory["dsp_kernels"]["smlad_loops"] >= 3
    plain = cortex_m.build_program(cnn_m4.library.extracted, "cortex-m4:dsp=0")
    x = inputs(CNN_SHAPE, 1, seed=3)[0]
    assert torch.equal(cortex_m.run(plain, (x,))[0], cnn_m4.ir(x))
    dsp = cortex_m.kernel_instructions(cortex_m.instruction_counts(cnn_m4.library, (x,)))
    base = cortex_m.kernel_instructions(cortex_m.instruction_counts(plain, (x,)))
    assert dsp.classes["smlad"] > 0 and base.classes["smlad"] == 0
    assert dsp.insns < base.insns


@needs_toolchain
def test_patch_split_is_bit_exact_and_refuses_what_it_cannot_split(cnn_m4):
    """The CNN's prefix (quantize, two convs, requantize, max-pool) split into 2x2 and 3x3
    patches with halos computes exactly what the unsplit IR does (border patches padded with
    the zero point); an MLP has no spatial prefix, and more patches than output rows fail."""
    from qcompiler.backends.mcu_patches import split_patches

    for parts in (2, 3):
        split, note = split_patches(cnn_m4.ir, parts)
        assert "qc.conv2d_int -> qc.requantize -> qc.conv2d_int" in note
        for x in inputs(CNN_SHAPE, 3, seed=parts):
            assert torch.equal(split(x), cnn_m4.ir(x))
    with pytest.raises(qc.LoweringError, match="2..4 patches per side"):
        split_patches(cnn_m4.ir, 5)
    from qcompiler.frontends.pytorch import trace

    with pytest.raises(qc.LoweringError, match="no such prefix"):
        split_patches(trace(zoo.MLP(8, 8, 2).eval(), (torch.randn(2, 8),)), 2)


@needs_toolchain
def test_same_program_runs_on_cortex_m55_an547(cnn_m4):
    """The CNN's program built for cortex-m55 (mps3-an547: code in ITCM, data in DTCM, its
    512 KiB limits) runs bit-exact with SMLAD kernels."""
    m55 = cortex_m.build_program(cnn_m4.library.extracted, "cortex-m55")
    x = inputs(CNN_SHAPE, 1, seed=11)[0]
    assert torch.equal(cortex_m.run(m55, (x,))[0], cnn_m4.ir(x))
    assert m55.memory["flash_limit"] == 512 * 1024 and m55.memory["dsp_kernels"]["smlad_loops"] >= 3


@needs_toolchain
def test_patches_run_bit_exact_on_the_board_with_a_smaller_arena(cnn_m4):
    """The 2x2-patch program (border patches with a conv and a zero-point pad fused in one
    kernel) runs on mps2-an386 bit-exact with the unsplit IR, in a smaller arena."""
    from qcompiler.backends.mcu_patches import split_patches
    from qcompiler.backends.program import extract

    split, _ = split_patches(cnn_m4.ir, 2)
    binary = cortex_m.build_program(extract(split, (torch.zeros(CNN_SHAPE),), "cortex-m4"), "cortex-m4")
    for x in inputs(CNN_SHAPE, 2, seed=13):
        assert torch.equal(cortex_m.run(binary, (x,))[0], cnn_m4.ir(x))
    assert binary.memory["arena_bytes"] < cnn_m4.report().memory["arena_bytes"]


def _symbol_addresses(binary, tmp_path) -> dict[str, int]:
    (tmp_path / "model.elf").write_bytes(binary.elf)
    nm = subprocess.run(["arm-none-eabi-nm", "model.elf"], cwd=tmp_path, check=True, capture_output=True, text=True)
    return {f[2]: int(f[0], 16) for f in (line.split() for line in nm.stdout.splitlines()) if len(f) == 3}


@needs_toolchain
@pytest.mark.parametrize("target, psram", [("cortex-m4:primary_flash=32K", 0x21000000),
                                           ("cortex-m7:primary_flash=24K", 0x60000000)], ids=["m4", "m7"])
def test_weights_over_the_primary_flash_run_exactly_from_psram(cnn_m4, target, psram, tmp_path):
    """With a primary flash region smaller than the CNN's image, its largest weight array (the
    32 KiB int8 linear) is linked into the board's PSRAM (mps2-an386: 0x21000000, mps2-an500:
    0x60000000), QEMU loads it from the ELF, the run equals art.ir, and the report still counts
    every read-only byte as flash, split by region."""
    binary = cortex_m.build_program(cnn_m4.library.extracted, target)
    x = inputs(CNN_SHAPE, 1, seed=17)[0]
    assert torch.equal(cortex_m.run(binary, (x,))[0], cnn_m4.ir(x))
    m, limit = binary.memory, cortex_m.options(target)["primary_flash"]
    primary, big = m["flash_regions"].values()
    assert big >= 32768 and primary + big == m["flash_bytes"] and primary <= limit < cnn_m4.report().flash_bytes
    assert f"PSRAM (rx) : ORIGIN = {psram:#010x}" in binary.files["board.ld"].decode()
    moved = [n for n in re.findall(rb"QC_BIG_WEIGHTS const \w+ (qc_c\d+)", binary.files["weights.c"])]
    assert moved and all(psram <= _symbol_addresses(binary, tmp_path)[n.decode()] < psram + (16 << 20) for n in moved)


@needs_toolchain
def test_primary_flash_option_and_region_limits_fail_clearly(cnn_m4):
    """primary_flash= beyond the board's code flash, on a board with no PSRAM, or not a size is
    refused; a primary region too small for the code itself fails with that region's numbers."""
    with pytest.raises(qc.LoweringError, match="maps 4096K of code flash; write a size from 1 to 4096K"):
        cortex_m.options("cortex-m4:primary_flash=8M")
    with pytest.raises(qc.LoweringError, match="mps3-an547 has no second memory"):
        cortex_m.options("cortex-m55:primary_flash=64K")
    with pytest.raises(qc.LoweringError, match="not a size"):
        cortex_m.options("cortex-m7:primary_flash=half")
    with pytest.raises(qc.MemoryLimitError, match=r"flash region flash 0x0: needs \d+ bytes, 4096 available"):
        cortex_m.build_program(cnn_m4.library.extracted, "cortex-m4:primary_flash=4K")
