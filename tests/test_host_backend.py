"""Host backend: generated code equals the IR's reference ops, and lowering errors are clear."""

import pytest
import torch

import qcompiler as qc
from qcompiler import zoo
from qcompiler.backends.verify import verify_nodes
from qcompiler.report import sqnr_db
from tests.conftest import calib_batches


def _assert_all_nodes_match(art, x):
    checks = verify_nodes(art.ir, (x,))
    bad = [c for c in checks if not c.ok]
    assert not bad, f"nodes differing from the reference: {bad}"
    assert any(c.dtype == "int32" for c in checks) and any(c.dtype == "int8" for c in checks)


def test_mlp_bit_exact(digits_data, digits_mlp):
    """W8A8 MLP: the host output equals the IR output exactly (all layers integer)."""
    x, _, xt, _ = digits_data
    art = qc.compile(digits_mlp, (xt[:16].flatten(1),), calib=[x[:128].flatten(1)])
    for i in range(3):
        xi = xt[16 * i:16 * (i + 1)].flatten(1)
        assert torch.equal(art(xi), art.ir(xi))
    _assert_all_nodes_match(art, xt[:16].flatten(1))


@pytest.mark.parametrize("quant", ["w8a8", "w4a8g32"])
def test_digits_cnn_bit_exact(digits_data, digits_cnn, quant):
    """Digits CNN at W8A8 and W4A8 (group 32): host equals the IR exactly."""
    x, _, xt, _ = digits_data
    art = qc.compile(digits_cnn, (xt[:32],), quant=quant, calib=[x[:256]])
    for i in range(3):
        xi = xt[32 * i:32 * (i + 1)]
        y, ref = art(xi), art.ir(xi)
        assert torch.equal(y, ref) if quant == "w8a8" else torch.allclose(y, ref, rtol=1e-5, atol=1e-6)
    _assert_all_nodes_match(art, xt[:32])


def test_transformer_block_matches_reference_and_float():
    """Transformer block (d=256, 4 heads, seq 64) W8A8: every node of the generated code matches
    the reference (integers exactly, float ops within 1e-5), and the output is > 30 dB SQNR vs float."""
    torch.manual_seed(0)
    model = zoo.TransformerBlock().eval()
    x = torch.randn(1, 64, 256)
    art = qc.compile(model, (x,), quant=qc.QuantSpec(observer="mse"), calib=calib_batches((4, 64, 256)))
    _assert_all_nodes_match(art, x)
    xs = torch.randn(1, 64, 256)
    y, ref = art(xs), art.ir(xs)
    assert (y - ref).norm() / ref.norm() < 1e-3  # end to end: ulps in float ops may flip a rounding
    assert sqnr_db(model(xs), y) > 30


class _GeluErf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 64)

    def forward(self, x):
        h = self.fc(x)
        return torch.nn.functional.gelu(h) + torch.erf(h), torch.nn.functional.gelu(h, approximate="tanh")


def test_gelu_and_erf_lower_to_vector_code():
    """Exact gelu and erf lower to a vectorizable erf, not a libm erff call per element: each
    output within 1e-6 of torch's over [-6, 6] (past erf's saturation), and no erff in the code."""
    torch.manual_seed(0)
    model = _GeluErf().eval()
    x = torch.linspace(-6, 6, 8 * 32).reshape(8, 32)
    with torch.no_grad():  # h spans the range both ways
        model.fc.weight.copy_(torch.eye(64, 32) * 3)
        model.fc.bias.zero_()
    art = qc.compile(model, (x,), quant="w8a8", calib=[x])
    checks = verify_nodes(art.ir, (x,))
    erf_nodes = [c for c in checks if c.op in ("aten.gelu", "aten.erf")]
    assert len(erf_nodes) == 3 and all(c.max_abs_diff < 1e-6 for c in erf_nodes), erf_nodes
    assert "erff" not in art.library.mod.imports[0].inspect_source("asm")


class Unlowerable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.cummax(self.fc(x), 1)[0]


def test_unlowerable_op_names_op_and_node():
    """An op TVM cannot lower fails with a LoweringError naming the op and the node."""
    with pytest.raises(qc.LoweringError, match=r"cannot lower these ops: cummax.default \(node cummax\)"):
        qc.compile(Unlowerable(), (torch.randn(4, 8),), calib=[torch.randn(4, 8)])


def test_unknown_target():
    """An unknown target lists the available ones."""
    with pytest.raises(qc.LoweringError, match="unknown target 'tpu'; available targets: arm, cortex-m4, cortex-m55, cortex-m7, host, mali"):
        qc.compile(zoo.MLP(), (torch.randn(2, 64),), target="tpu", calib=[torch.randn(2, 64)])


def test_dynamic_batch_code_takes_any_batch(tmp_path):
    """With dynamic_batch=True one build serves every batch size, equal to the IR, also after save/load."""
    torch.manual_seed(0)
    model = zoo.TransformerBlock(d=64, heads=2, ffn=128).eval()
    art = qc.compile(model, (torch.randn(1, 16, 64),), calib=calib_batches((4, 16, 64)), dynamic_batch=True)
    art.save(str(tmp_path / "m.qca"))
    back = qc.load(str(tmp_path / "m.qca"))
    for b in (1, 3, 8):
        x = torch.randn(b, 16, 64)
        ref = art.ir(x)
        assert (art(x) - ref).norm() / ref.norm() < 1e-3
        assert torch.equal(back(x), art(x))
    with pytest.raises(qc.QCompilerError, match=r"compiled for float32\[None, 16, 64\]"):
        art(torch.randn(2, 8, 64))



class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4), torch.nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.a(h), self.b(h)


def test_one_output_is_returned_bare_and_two_as_a_tuple():
    """A one-output model's code returns its tensor bare (no one-element tuple to build and
    index per call) and art(x) gives that tensor; a two-output model gives both outputs."""
    import tvm

    torch.manual_seed(0)
    x = torch.randn(4, 16)
    calib = [torch.randn(4, 16) for _ in range(4)]
    one = qc.compile(torch.nn.Sequential(torch.nn.Linear(16, 8)).eval(), x, calib=calib)
    got = one(x)
    assert isinstance(one._runner.main(tvm.runtime.from_dlpack(x)), tvm.runtime.Tensor)
    assert got.shape == (4, 8) and (got - one.ir(x)).abs().max() < 1e-5
    two = qc.compile(_TwoHeads().eval(), x, calib=calib)
    got, ref = two(x), two.ir(x)
    assert isinstance(got, tuple) and [tuple(g.shape) for g in got] == [(4, 4), (4, 3)]
    assert all((g - r).abs().max() < 1e-5 for g, r in zip(got, ref))
