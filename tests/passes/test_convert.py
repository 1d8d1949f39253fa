"""convert: golden integer IR, closeness to the fake-quant graph, and refusal before calibration."""

import pytest
import torch

import qcompiler as qc
from qcompiler.ir import op_name
from qcompiler.report import sqnr_db
from qcompiler import zoo
from tests.conftest import calib_batches
from tests.test_ir import golden


def _run(model, example, pipeline, batches):
    ir = qc.trace(model, (example,))
    return qc.PassManager.parse(pipeline).run(ir, qc.PassContext(calib=batches))


def test_golden_integer_ir(tiny_mlp):
    """An MLP becomes quantize -> (linear_int -> requantize with fused ReLU)* -> linear_int -> dequantize."""
    ir = _run(tiny_mlp, torch.randn(2, 8), "fake-quant,calibrate,convert", calib_batches((16, 8)))
    golden("mlp_converted.txt", qc.print_ir(ir))
    ops = [op_name(n) for n in ir.graph.nodes if n.op == "call_function"]
    assert ops == ["qc.quantize", "qc.linear_int", "qc.requantize", "qc.linear_int", "qc.requantize",
                   "qc.linear_int", "qc.dequantize"]


def test_cnn_stays_integer_through_flatten():
    """conv -> relu -> flatten -> linear: the quantizer moves above flatten, so the ReLU fuses."""
    torch.manual_seed(0)
    model = zoo.DigitsCNN().eval()
    ir = _run(model, torch.rand(2, 1, 8, 8), "fake-quant,calibrate,convert", [torch.rand(16, 1, 8, 8)])
    ops = [op_name(n) for n in ir.graph.nodes if n.op == "call_function"]
    assert ops.count("qc.requantize") == 3 and "aten.relu" not in ops
    rq = [n for n in ir.graph.nodes if op_name(n) == "qc.requantize"]
    assert all(n.meta["qc"].get("activation") == "aten.relu" for n in rq)


@pytest.mark.parametrize("recipe,min_db", [("fake-quant", 35), ("fake-quant(w=4,granularity=group,group=32)", 18)])
def test_converted_graph_tracks_the_fake_quant_graph(recipe, min_db):
    """The integer graph computes what the fake-quant graph does, up to requantization rounding."""
    torch.manual_seed(0)
    model = zoo.TransformerBlock(d=64, heads=2, ffn=128).eval()
    batches = calib_batches((4, 16, 64))
    x = torch.randn(2, 16, 64)
    fq = _run(model, x, f"{recipe},calibrate", batches)
    conv = _run(model, x, f"{recipe},calibrate,convert", batches)
    assert sqnr_db(fq(x), conv(x)) > 40
    assert sqnr_db(model(x), conv(x)) > min_db


def test_convert_before_calibrate_is_refused(tiny_mlp):
    """An activation quantizer without a range stops convert with the node and the fix."""
    with pytest.raises(qc.PassError, match="run calibrate before convert") as e:
        _run(tiny_mlp, torch.randn(2, 8), "fake-quant,convert", None)
    assert e.value.pass_name == "convert"
