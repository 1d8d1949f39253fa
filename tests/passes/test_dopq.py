"""DopQ-ViT: TanQ's levels and error on attention probabilities, its rewrite of the IR;
MOSF keeps the function and equalizes post-LayerNorm channel ranges, or refuses with why."""

import pytest
import torch

import qcompiler as qc
from qcompiler.ir import copy_ir, op_name
from qcompiler.passes.dopq import tanq_reference
from qcompiler.passes.smooth import AbsMax
from qcompiler.passes.stats import watch
from tests.passes.tiny_llm import calib_ids, ids, traced


def test_tanq_levels_keep_0_and_1_and_crowd_at_both_ends():
    """16 levels in [0, 1]; 0 and 1 kept (to float rounding); gaps near the ends smaller than
    uniform's 1/15, gaps in the middle larger."""
    levels = torch.unique(tanq_reference(torch.linspace(0, 1, 100001), 4, 0.6))
    assert levels.numel() == 16 and abs(levels[0]) < 1e-6 and abs(levels[-1] - 1) < 1e-6
    gaps = levels.diff()
    assert gaps[0] < 0.6 / 15 and gaps[-1] < 0.6 / 15 and gaps[7] > 1.4 / 15


def test_tanq_beats_uniform_on_softmax_outputs():
    """On real attention-like probabilities, TanQ's 4-bit error is below the uniform grid's."""
    p = torch.softmax(torch.randn(2000, 64, generator=torch.Generator().manual_seed(0)) * 3, -1).flatten()
    uniform = torch.round(p * 15) / 15
    assert (tanq_reference(p, 4, 0.6) - p).pow(2).mean() < (uniform - p).pow(2).mean()


def test_tanq_pass_rewrites_probability_quantizers():
    """After fake-quant with matmuls, each attention's probs quantizer becomes TanQ."""
    m, ir0 = traced("ln")
    ir = copy_ir(ir0)
    ctx = qc.PassContext(calib=calib_ids())
    qc.PassManager.parse("fake-quant(w=8,a=4),calibrate,tanq").run(ir, ctx)
    tq = [n for n in ir.graph.nodes if n.meta.get("qc", {}).get("role") == "act_tanq"]
    assert len(tq) == 2 and all(n.args[3] == -8 and n.args[4] == 7 for n in tq)
    assert sum(op_name(n) == "aten.atan" for n in ir.graph.nodes) == 2


def test_mosf_keeps_function_and_equalizes_channels():
    """LayerNorm -> linears: logits unchanged; post-LN channel ranges far more even."""
    m, ir0 = traced("ln")
    ir = copy_ir(ir0)
    res = qc.PassManager.parse("mosf").run(ir, qc.PassContext(calib=calib_ids()))
    x = ids(2, 16, seed=3)
    assert (ir(x) - m(x)).abs().max() <= 1e-4 * m(x).abs().max()

    def spread(g):
        ln = next(n for n in g.graph.nodes if op_name(n) == "aten.layer_norm")
        s = AbsMax()
        watch(g, qc.PassContext(calib=calib_ids()), {ln: s}, "test")
        return float(s.value.max() / s.value.min())

    assert spread(ir) < spread(ir0) / 2


def test_mosf_without_layer_norm_is_refused():
    """An RMSNorm model has no LayerNorm to reparameterize: the error says so."""
    with pytest.raises(qc.PassError, match="no LayerNorm is read by linear layers only"):
        qc.PassManager.parse("mosf").run(copy_ir(traced("rms")[1]), qc.PassContext(calib=calib_ids()))
