"""Patch-based inference (`mcu_patches`) on a small CNN shaped like EfficientNet-Lite's first
stages (SAME pad, stride-2 conv, ReLU6, padded depthwise convs, a residual block): the split
IR equals the unsplit one bit for bit, on the host and on the emulated board, in a smaller
arena; what cannot be split is refused with the reason."""

import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qcompiler as qc
from qcompiler.backends import cortex_m
from qcompiler.backends.mcu_patches import cuts, split_patches
from qcompiler.context import PassContext
from qcompiler.frontends.pytorch import trace
from qcompiler.ir import copy_ir
from qcompiler.pass_manager import PassManager
from qcompiler.spec import QuantSpec

SHAPE = (1, 3, 16, 16)
needs_toolchain = pytest.mark.skipif(any(shutil.which(t) is None for t in ("arm-none-eabi-gcc", "qemu-system-arm")),
                                     reason="arm-none-eabi-gcc / qemu-system-arm not installed (make toolchains)")


class MBBlock(nn.Module):
    """Expand 1x1, ReLU6, depthwise 3x3 (padding 1), ReLU6, project 1x1, residual add."""

    def __init__(self, c, e):
        super().__init__()
        self.expand, self.dw = nn.Conv2d(c, e, 1), nn.Conv2d(e, e, 3, padding=1, groups=e)
        self.project = nn.Conv2d(e, c, 1)

    def forward(self, x):
        return x + self.project(F.relu6(self.dw(F.relu6(self.expand(x)))))


class LiteCNN(nn.Module):
    """EfficientNet-Lite's stem in small: SAME pad + stride-2 conv, depthwise, a residual
    block, a stride-2 depthwise conv, then pooling and a classifier."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.block = MBBlock(8, 16)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.hardtanh(self.stem(self.pad(x)), 0.0, 6.0)  # folded into the requantize
        x = self.down(self.block(F.relu6(self.dw(x))))
        return self.head(x.mean((2, 3)))


def quantized_ir(model):
    torch.manual_seed(0)
    model = model.eval()
    ir = copy_ir(trace(model, (torch.randn(SHAPE),)))
    ctx = PassContext()
    ctx.target = "cortex-m4"
    g = torch.Generator().manual_seed(0)
    ctx.calib = [torch.randn(4, *SHAPE[1:], generator=g) for _ in range(3)]
    PassManager.parse(QuantSpec.parse("w8a8").pipeline()).run(ir, ctx)
    return ir


@pytest.fixture(scope="module")
def lite_ir():
    torch.manual_seed(0)
    return quantized_ir(LiteCNN())


def samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) * 2 for _ in range(n)]


def test_padded_depthwise_relu6_residual_prefix_splits_bit_exact(lite_ir):
    """The prefix runs through the SAME pad, hardtanh, padded depthwise convs and the residual
    add; 2x2, 3x3 and 4x4 patches (border patches with the pad's zero and the convs' zero
    point) give exactly the unsplit IR's outputs."""
    for parts in (2, 3, 4):
        split, note = split_patches(lite_ir, parts)
        assert all(op in note for op in ("aten.pad", "aten.relu6", "aten.add", "qc.dequantize")), note
        for x in samples(3, parts):
            assert torch.equal(split(x), lite_ir(x))


def test_cuts_stop_at_an_op_that_is_not_local(lite_ir):
    """The last possible cut is before the global mean; every cut passes one value on."""
    _, found = cuts(lite_ir)
    prefix, end = found[-1]
    assert all(u in prefix or u.op != "call_function" or "sym_size" in str(u.target) for n in prefix[:-1]
               for u in n.users)
    assert not any("mean" in str(n.target) for n in prefix)
    assert [u for u in end.users if "mean" in str(u.target)]


def test_refuses_reflect_padding_and_too_many_patches(lite_ir):
    """Reflection padding is not a constant pad: the model then has no prefix to split; more
    patches than the prefix's output rows name the possible range."""
    with pytest.raises(qc.LoweringError, match=r"patches=9: the prefix ends at \dx\d, so 2\.\.\d"):
        split_patches(lite_ir, 9)
    model = LiteCNN()
    model.pad = nn.ReflectionPad2d((0, 1, 0, 1))
    with pytest.raises(qc.LoweringError, match="no such prefix"):
        split_patches(quantized_ir(model), 2)


@needs_toolchain
def test_patched_lite_cnn_runs_bit_exact_on_the_board_in_a_smaller_arena(lite_ir):
    """The 2x2-patch program built for cortex-m4 runs on mps2-an386 equal to the unsplit IR
    (its int64 requantizer constants narrowed where their values allow, each patch's weights
    once in flash), and
    its arena plan is smaller than the unsplit program's."""
    from qcompiler.backends.mcu_plan import plan
    from qcompiler.backends.program import extract

    split, _ = split_patches(lite_ir, 2)
    binary = cortex_m.build_program(extract(split, (torch.zeros(SHAPE),), "cortex-m4"), "cortex-m4")
    x = samples(1, 7)[0]
    assert torch.equal(cortex_m.run(binary, (x,))[0], lite_ir(x))
    assert binary.memory["dsp_kernels"]["narrowed_constants"] > 0  # int64 left only where values need it:
    assert all(np.abs(c).max() >= 1 << 31 for c in binary.program.constants if c.dtype.itemsize == 8)
    assert binary.files["weights.c"].count(b"const ") < len(binary.program.constants)  # shared across patches
    unsplit = plan(cortex_m.kernels_source(extract(lite_ir, (torch.zeros(SHAPE),), "cortex-m4"), "cortex-m4",
                                           False, c=False)[0])
    assert binary.memory["arena_bytes"] < unsplit.arena_bytes
