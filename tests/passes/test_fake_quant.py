"""fake-quant: golden IR, quantization error, shared quantizers and bad options."""

import pytest
import torch

import qcompiler as qc
from qcompiler.ir import op_name
from qcompiler.passes.fake_quant import FakeQuant
from qcompiler.report import sqnr_db
from tests.test_ir import golden


def _fq_nodes(ir, role):
    return [n for n in ir.graph.nodes if op_name(n) == "qc.fake_quant" and n.meta["qc"]["role"] == role]


def test_golden_ir(tiny_mlp):
    """fake-quant(w=4) on an MLP: the IR text is stable."""
    ir = qc.PassManager.parse("fake-quant(w=4)").run(qc.trace(tiny_mlp, (torch.randn(2, 8),)))
    golden("mlp_fake_quant.txt", qc.print_ir(ir))


@pytest.mark.parametrize("bits,min_db", [(8, 40), (4, 17)])
def test_weight_error_per_channel(bits, min_db):
    """Per-channel symmetric weight quantization: SQNR of the quantized weights per bit width."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    ir = qc.trace(lin, (torch.randn(2, 256),))
    FakeQuant(w=bits).run(ir, qc.PassContext())
    (wfq,) = _fq_nodes(ir, "weight")
    w = lin.weight.detach()
    q = torch.ops.qc.fake_quant(w, *[getattr(ir, a.target) for a in wfq.args[1:3]], *wfq.args[3:])
    assert sqnr_db(w, q) > min_db
    assert q.unique().numel() <= 64 * (2**bits - 1)


def test_group_scales_with_ragged_tail():
    """Group quantization over 100 inputs with groups of 32 keeps 4 scales per row (last group of 4)."""
    lin = torch.nn.Linear(100, 8)
    ir = qc.trace(lin, (torch.randn(2, 100),))
    FakeQuant(w=4, granularity="group", group=32).run(ir, qc.PassContext())
    (wfq,) = _fq_nodes(ir, "weight")
    assert getattr(ir, wfq.args[1].target).shape == (8, 4) and wfq.args[5] == 32
    w = lin.weight.detach()
    tail = w[:, 96:].abs().amax(1) / 7
    assert torch.allclose(getattr(ir, wfq.args[1].target)[:, 3], tail)


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_layers_sharing_an_input_share_its_quantizer():
    """Two linears reading the same tensor get one activation quantizer."""
    ir = qc.trace(TwoHeads(), (torch.randn(2, 8),))
    FakeQuant().run(ir, qc.PassContext())
    assert len(_fq_nodes(ir, "act")) == 1 and len(_fq_nodes(ir, "weight")) == 2


def test_skip_and_ops_options(tiny_mlp):
    """skip leaves named nodes float; ops restricts which kinds are quantized."""
    ir = qc.trace(tiny_mlp, (torch.randn(2, 8),))
    res = FakeQuant(skip=("linear_2",)).run(ir, qc.PassContext())
    assert res.details["nodes"] == ["linear", "linear_1"]
    ir2 = qc.trace(tiny_mlp, (torch.randn(2, 8),))
    assert not FakeQuant(ops=("conv2d",)).run(ir2, qc.PassContext()).changed


def test_unknown_op_kind_is_refused():
    """ops= names only quantizable op kinds."""
    with pytest.raises(qc.QuantSpecError, match="cannot be quantized; choose from linear, conv2d, matmul"):
        FakeQuant(ops=("lstm",))
