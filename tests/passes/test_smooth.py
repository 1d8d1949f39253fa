"""smooth: golden IR, the float function kept, channel ranges flattened, and bad options."""

import pytest
import torch

import qcompiler as qc
from qcompiler.ir import copy_ir, op_name
from qcompiler.passes.smooth import AbsMax, Smooth
from qcompiler.passes.stats import watch
from tests.passes.tiny_llm import TinyLM, calib_ids, ids, traced
from tests.test_ir import golden


def _down_proj_input_spread(ir):
    """max over channels / median over channels of max|x| entering the first down_proj."""
    lin = [n for n in ir.graph.nodes if op_name(n) == "aten.linear"][6]
    stat = AbsMax()
    watch(ir, qc.PassContext(calib=calib_ids()), {lin.args[0]: stat}, "test")
    return float(stat.value.max() / stat.value.median())


def test_keeps_function_and_flattens_outliers():
    """After smoothing, logits are unchanged and down_proj's input has a much flatter range."""
    m, ir0 = traced("rms")
    ir = copy_ir(ir0)
    res = Smooth().run(ir, qc.PassContext(calib=calib_ids()))
    assert len(res.details["smoothed"]) == 13  # q/k/v, gate/up, down x 2 layers, lm_head
    assert set(res.details["skipped"]) == {"linear_3", "linear_10"}  # o_proj: input from attention
    x = ids(3, 16, seed=4)
    assert (ir(x) - m(x)).abs().max() <= 1e-4 * m(x).abs().max()
    assert _down_proj_input_spread(ir) < _down_proj_input_spread(ir0) / 3


def test_golden_ir():
    """smooth on a 1-layer model: new norm weights and up_proj rows, no new ops."""
    m = TinyLM(d=8, heads=2, kv_heads=1, hidden=16, layers=1).eval()
    ir = qc.trace(m, (ids(),))
    n_ops = len(ir.graph.nodes)
    qc.PassManager.parse("smooth(alpha=0.5)").run(ir, qc.PassContext(calib=calib_ids()))
    assert len(ir.graph.nodes) == n_ops
    golden("tiny_llm_smoothed.txt", qc.print_ir(ir))


def test_alpha_out_of_range_is_refused():
    """alpha outside [0, 1] is a QuantSpecError naming the valid range."""
    with pytest.raises(qc.QuantSpecError, match=r"alpha=1.5 must be in \[0, 1\]"):
        qc.PassManager.parse("smooth(alpha=1.5)")


def test_needs_calibration_data():
    """smooth without calibration batches says what to pass."""
    with pytest.raises(qc.PassError, match="needs calibration batches"):
        qc.PassManager.parse("smooth").run(copy_ir(traced("rms")[1]), qc.PassContext())
