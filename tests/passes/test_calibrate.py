"""calibrate: observers set ranges; bad calibration data is refused with what would fit."""

import pytest
import torch

import qcompiler as qc
from qcompiler.ir import get_attr_tensor, op_name
from tests.conftest import calib_batches


def _calibrated(model, batches, observer, example):
    ir = qc.trace(model, (example,))
    qc.PassManager.parse(f"fake-quant,calibrate(observer={observer})").run(ir, qc.PassContext(calib=batches))
    return ir


def _input_quantizer(ir):
    n = next(n for n in ir.graph.nodes if op_name(n) == "qc.fake_quant" and n.meta["qc"]["role"] == "act")
    return float(get_attr_tensor(ir, n.args[1])), float(get_attr_tensor(ir, n.args[2])), n


def test_minmax_covers_the_extremes(tiny_mlp):
    """minmax: scale = (max - min) / 255 and the zero point maps min to -128."""
    batches = calib_batches((16, 8))
    s, z, node = _input_quantizer(_calibrated(tiny_mlp, batches, "minmax", batches[0][:2]))
    lo, hi = min(float(b.min()) for b in batches), max(float(b.max()) for b in batches)
    assert s == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert z == -128 - round(lo / s)
    assert node.meta["qc"]["observed"]


def test_mse_and_percentile_clip_heavy_tails(tiny_mlp):
    """On heavy-tailed data, percentile and mse choose tighter ranges than minmax, and mse
    gives a lower quantization error than minmax on that data."""
    torch.manual_seed(1)
    data = torch.distributions.StudentT(2.0).sample((256, 8))  # heavy tails
    batches = list(data.split(64))
    scales, errors = {}, {}
    for obs in ("minmax", "percentile", "mse"):
        s, z, node = _input_quantizer(_calibrated(tiny_mlp, batches, obs, data[:2]))
        scales[obs] = s
        q = torch.ops.qc.fake_quant(data, torch.tensor(s), torch.tensor(z), -128, 127)
        errors[obs] = float((q - data).pow(2).mean())
    assert scales["percentile"] < scales["minmax"] and scales["mse"] < scales["minmax"]
    assert errors["mse"] < errors["minmax"]


def test_missing_calibration_data(tiny_mlp):
    """Without calib the pass says how to give it."""
    with pytest.raises(qc.PassError, match="calibrate needs calibration batches"):
        qc.PassManager.parse("fake-quant,calibrate").run(qc.trace(tiny_mlp, (torch.randn(2, 8),)), qc.PassContext())


@pytest.mark.parametrize("batches,message", [
    ([torch.randn(4, 9)], r"input 0 is torch.float32\[4, 9\]; the model was traced with torch.float32\[2, 8\]"),
    ([torch.randn(4, 8).double()], "torch.float64"),
    ([(torch.randn(4, 8), torch.randn(4, 8))], "has 2 inputs, the model takes 1"),
    ([(1.0,)], "input 0 is a float, not a tensor"),
    ([], "the calibration data is empty"),
])
def test_mismatched_calibration_batches(tiny_mlp, batches, message):
    """Batches must match example_inputs (batch size aside) in count, shape and dtype."""
    with pytest.raises(qc.PassError, match=message) as e:
        qc.PassManager.parse("fake-quant,calibrate").run(qc.trace(tiny_mlp, (torch.randn(2, 8),)), qc.PassContext(calib=batches))
    assert isinstance(e.value.__cause__, qc.CalibrationError)


def test_other_batch_sizes_are_fine(tiny_mlp):
    """Calibration batches may have any batch size (the IR's batch dim is dynamic)."""
    batches = [torch.randn(1, 8), torch.randn(33, 8)]
    _calibrated(tiny_mlp, batches, "minmax", torch.randn(2, 8))


def test_kl_threshold_ignores_the_zeros_of_relu6():
    """KL on ReLU6-like values (mostly exact zeros) keeps most of the range instead of
    collapsing to 256 bins of 2048 (the zero spike is exact on every grid)."""
    from qcompiler.passes.calibrate import kl_threshold

    g = torch.Generator().manual_seed(0)
    v = (torch.randn(65536, generator=g) - 1.5).clamp(0, 6)  # ~93% zeros, max ~3
    t = kl_threshold(v, 256)
    assert 0.5 * float(v.max()) < t <= float(v.max())
    dense = torch.randn(65536, generator=g).clamp(0, 6)  # unchanged where zeros are few
    assert kl_threshold(dense, 256) > 0.5 * float(dense.max())
