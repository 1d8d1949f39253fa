"""fold-batchnorm: folded graphs compute the same function; unfoldable cases are left alone."""

import torch
from torch import nn

import qcompiler as qc
from qcompiler.ir import op_name
from qcompiler.passes.fold_batchnorm import FoldBatchNorm
from tests.conftest import calib_batches
from tests.test_ir import golden


def _bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 12 * 12, 6),
                        nn.BatchNorm1d(6))
    for m in net:
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):  # non-trivial statistics
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def test_folding_keeps_the_function_and_removes_every_batch_norm():
    """conv/depthwise conv/linear + BatchNorm fold exactly (to float rounding)."""
    net = _bn_net()
    ir = qc.trace(net, (torch.randn(2, 3, 16, 16),))
    res = FoldBatchNorm().run(ir, qc.PassContext())
    assert len(res.details["folded"]) == 3 and not res.details["kept"]
    assert not any(op_name(n) == "aten.batch_norm" for n in ir.graph.nodes)
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(ir(x), net(x), atol=1e-5, rtol=1e-5)
    golden("bn_folded.txt", qc.print_ir(ir))


def test_relu6_fuses_into_requantize():
    """After folding, conv -> ReLU6 becomes one requantize whose clamp holds ReLU6's bounds."""
    net = _bn_net()
    ir = qc.trace(net, (torch.randn(2, 3, 16, 16),))
    qc.PassManager.parse("fold-batchnorm,fake-quant,calibrate,convert").run(
        ir, qc.PassContext(calib=calib_batches((8, 3, 16, 16))))
    rq = [n for n in ir.graph.nodes if op_name(n) == "qc.requantize"]
    act = [n for n in rq if n.meta["qc"].get("activation") == "aten.hardtanh"]
    assert len(act) == 1
    zo, lo, hi = act[0].args[3], act[0].args[4], act[0].args[5]
    so = act[0].meta["qc"]["out_scale"]
    assert lo == max(-128, zo)  # quantize(0.0)
    assert hi == min(127, round(6.0 / so) + zo)  # quantize(6.0), or the top of the range
    assert not any(op_name(n) == "aten.hardtanh" for n in ir.graph.nodes)


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + nn.functional.conv2d(x, self.conv.weight)


def test_shared_weight_is_not_folded():
    """A weight read by two ops is left alone (folding would change the other op), with the reason."""
    ir = qc.trace(SharedWeight().eval(), (torch.randn(2, 3, 4, 4),))
    res = FoldBatchNorm().run(ir, qc.PassContext())
    assert not res.changed
    assert "weight is not a constant read only by this layer" in res.details["kept"][0]
