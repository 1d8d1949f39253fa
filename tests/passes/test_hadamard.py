"""qc.hadamard: the fast transform equals x R for R orthogonal, sizes 2^k * m (576, 1536),
bad sizes are refused, and the TVM lowering matches the torch reference bit for bit."""

import pytest
import torch

import qcompiler as qc
from qcompiler.hadamard import factor, hadamard_matrix, hadamard_reference, small_orders
from qcompiler.ir import op_name

H = torch.ops.qc.hadamard


@pytest.mark.parametrize("n,m", [(64, 1), (576, 36), (1536, 12), (48, 12), (40, 20)])
def test_fast_transform_is_an_orthogonal_rotation(n, m):
    """y = x R with R R^T = I; SmolLM2's sizes factor as 36 * 16 and 12 * 128."""
    assert factor(n)[0] == m
    r = hadamard_matrix(n)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert set(torch.unique((r * n**0.5).round()).tolist()) == {-1.0, 1.0}
    x = torch.randn(3, 5, n)
    assert torch.allclose(H(x, n).double(), x.double() @ r, atol=1e-5)


def test_blocks_of_the_last_dim():
    """size < last dim: each block of `size` is rotated alone (per attention head)."""
    x = torch.randn(2, 4 * 64)
    y = H(x, 64)
    assert torch.equal(y[:, 64:128], hadamard_reference(x[:, 64:128], 64))


def test_rows_done_in_chunks_give_the_bits_of_each_row_alone(monkeypatch):
    """The reference transforms rows in cache-sized chunks; a row's result does not depend
    on which chunk it falls in (nor do signed zeros)."""
    import qcompiler.hadamard as hd

    monkeypatch.setattr(hd, "CHUNK_ELEMENTS", 3 * 576 + 1)  # 3 rows per chunk, the last one short
    x = torch.randn(7, 2 * 576) * torch.logspace(-3, 3, 7)[:, None]
    x[0, :2] = torch.tensor([0.0, -0.0])
    y = hadamard_reference(x, 576)
    alone = torch.cat([hadamard_reference(r[None], 576) for r in x])
    assert torch.equal(y.view(torch.int32), alone.view(torch.int32))
    assert torch.allclose(y.double(), (x.double().reshape(14, 576) @ hadamard_matrix(576)).reshape(7, -1), atol=1e-3)


def test_sizes_without_a_matrix_are_refused():
    """10 = 5 * 2 and 18 = 9 * 2 have no known Hadamard factor."""
    assert 5 not in small_orders() and factor(10) is None and factor(18) is None
    with pytest.raises(ValueError, match="no Hadamard matrix of order 10"):
        hadamard_matrix(10)


def test_online_rotation_compiles_and_matches_the_ir():
    """rotate(online) + w8a8 on an MLP: qc.hadamard stays in the integer IR, its TVM lowering
    computes what the torch reference does, and the artifact matches the IR's output."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(96, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8)).eval()
    x = torch.randn(4, 96)
    calib = [torch.randn(16, 96) for _ in range(2)]
    art = qc.compile(mlp, (x,), calib=calib,
                     pipeline="rotate(residual=false,online=*),fake-quant,calibrate,convert")
    assert sum(op_name(n) == "qc.hadamard" for n in art.ir.graph.nodes) == 2
    assert torch.allclose(art(x), art.ir(x), atol=1e-4)
    assert torch.nn.functional.cosine_similarity(art(x).flatten(), mlp(x).flatten(), dim=0) > 0.99


class Rot(torch.nn.Module):
    def forward(self, x):
        return H(x, 96) + 1.0, H(x, 32)


def test_tvm_lowering_is_bit_exact():
    """The TE butterflies + small-factor mix compute exactly what the torch reference does."""
    from qcompiler.backends.host import HostRunner, build

    x = torch.randn(3, 7, 96)
    ir = qc.trace(Rot(), (x,))
    out = HostRunner(build(ir, (x,)))(x)
    for got, want in zip(out, Rot()(x)):
        assert torch.equal(got, want)
