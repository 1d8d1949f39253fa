"""convert: golden integer IR, closeness to the fake-quant graph, and refusal before calibration."""

import pytest
import torch

import qcompiler as qc
from qcompiler.ir import copy_ir, get_attr_tensor, op_name
from qcompiler.passes.convert import Convert
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


def _near_dead_conv():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    with torch.no_grad():  # channel 2: weights ~1e-9 (a BatchNorm with gamma ~0, folded), bias 2.0
        model.weight[2] *= 1e-9
        model.bias[2] = 2.0
    return model


def test_near_dead_channel_bias_fits_int32():
    """A channel with ~0 weights and a large bias gets a raised weight scale (named in a warning),
    its int32 bias fits, and the integer graph matches the fake-quant graph."""
    model, x = _near_dead_conv(), torch.rand(2, 3, 8, 8) * 2 - 1
    batches = [torch.rand(8, 3, 8, 8) * 2 - 1]
    with pytest.warns(UserWarning, match=r"raised the weight scale of 1 near-dead output channels .*conv2d \(1\)"):
        fq = _run(model, x, "fake-quant,calibrate", batches)
    conv = qc.PassManager.parse("convert").run(copy_ir(fq), qc.PassContext())
    bq = next(n for n in conv.graph.nodes if op_name(n) == "qc.conv2d_int").args[3]
    assert get_attr_tensor(conv, bq).abs().max() <= 2**30 * 1.001  # 2^30, up to float32 rounding of sx*sw
    y_fq, y = fq(x), conv(x)
    assert torch.allclose(y[:, 2], torch.full_like(y[:, 2], 2.0), rtol=1e-6)
    assert torch.equal(y[:, 2], y_fq[:, 2])
    assert torch.allclose(y, y_fq, atol=1e-4)  # other channels: bias rounded to the grid sx*sw (~1e-5)
    assert sqnr_db(model(x), y) > 35


def test_bias_fit_reports_channels_in_convert():
    """convert raises scales itself when they no longer fit (weights changed after calibrate), reporting them."""
    model, x = _near_dead_conv(), torch.rand(2, 3, 8, 8) * 2 - 1
    with pytest.warns(UserWarning, match="near-dead"):  # calibrate's own fit
        ir = _run(model, x, "fake-quant,calibrate", [torch.rand(8, 3, 8, 8) * 2 - 1])
    w_fq = next(n for n in ir.graph.nodes if n.meta.get("qc", {}).get("role") == "weight")
    get_attr_tensor(ir, w_fq.args[1])[2] = 1e-12  # as if a later pass had shrunk channel 2
    with pytest.warns(UserWarning, match="near-dead"):
        result = Convert().run(ir, qc.PassContext())
    assert result.details["bias_fit"] == {"conv2d": [2]}

