"""The qc ops: quantization semantics and the exactness of the integer reference ops."""

import pytest
import torch

import qcompiler  # noqa: F401  (registers torch.ops.qc)
from qcompiler.ops import dyadic

Q = torch.ops.qc


def test_fake_quant_equals_dequantize_of_quantize():
    """fake_quant(x) is bit-identical to dequantize(quantize(x)), per tensor and per group."""
    x = torch.randn(6, 20) * 3
    s, z = torch.tensor(0.05), torch.tensor(3.0)
    assert torch.equal(Q.fake_quant(x, s, z, -128, 127), Q.dequantize(Q.quantize(x, s, z, -128, 127), s, z))
    gs = torch.rand(6, 3) + 0.01  # groups of 8 over 20 columns: a ragged last group of 4
    gz = torch.zeros(6, 3)
    fq = Q.fake_quant(x, gs, gz, -7, 7, 8)
    assert torch.equal(fq, Q.dequantize(Q.quantize(x, gs, gz, -7, 7, 8), gs, gz, 8))
    assert torch.allclose(fq[:, 16:] / gs[:, 2:3], torch.round(fq[:, 16:] / gs[:, 2:3]), atol=1e-4)


def test_fake_quant_straight_through_gradient():
    """The gradient passes inside the integer range and is zero where values clip."""
    x = torch.tensor([-10.0, -0.2, 0.0, 0.3, 10.0], requires_grad=True)
    Q.fake_quant(x, torch.tensor(0.01), torch.tensor(0.0), -127, 127).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_quantize_rounds_half_to_even():
    """Ties round to even, as TVM's nearbyint does."""
    q = Q.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), torch.tensor(1.0), torch.tensor(0.0), -128, 127)
    assert q.tolist() == [0, 2, 2, 0, -2]


def _int8(*shape, seed=0):
    return torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_linear_int_is_exact():
    """linear_int equals an int64 computation of sum_k (x - zx) * w + b."""
    x, w = _int8(3, 5, 300), _int8(7, 300, seed=1)
    b = torch.randint(-(2**20), 2**20, (7,), dtype=torch.int32)
    ref = (x.long() - 11) @ w.long().t() + b.long()
    out = Q.linear_int(x, 11, w, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), ref)


def test_conv2d_int_pads_with_zero_point():
    """conv2d_int equals an int64 convolution of (x - zx), i.e. padding holds the zero point."""
    x, w = _int8(2, 3, 9, 9), _int8(4, 3, 3, 3, seed=2)
    out = Q.conv2d_int(x, -5, w, None, [2, 2], [1, 1], [1, 1], 1)
    xp = torch.nn.functional.pad(x.long() + 5, (1, 1, 1, 1))
    ref = torch.zeros(2, 4, 5, 5, dtype=torch.long)
    for i in range(5):
        for j in range(5):
            patch = xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            ref[:, :, i, j] = (patch.unsqueeze(1) * w.long().unsqueeze(0)).sum((2, 3, 4))
    assert torch.equal(out.long(), ref)


def test_matmul_int_is_exact():
    """matmul_int equals (a - za) @ (b - zb) in int64, batched."""
    a, b = _int8(2, 4, 6, 64), _int8(2, 4, 64, 6, seed=3)
    ref = (a.long() + 3) @ (b.long() - 7)
    assert torch.equal(Q.matmul_int(a, -3, b, 7).long(), ref)


def test_requantize_matches_integer_arithmetic():
    """requantize equals clamp(((acc*m + 2^(sh-1)) >> sh) + z) computed with Python ints."""
    g = torch.Generator().manual_seed(4)
    acc = torch.randint(-(2**31), 2**31 - 1, (4, 5), generator=g, dtype=torch.int64).to(torch.int32)
    m = torch.randint(2**30, 2**31 - 1, (5,), generator=g, dtype=torch.int64).to(torch.int32)
    sh = torch.randint(31, 45, (5,), generator=g, dtype=torch.int64).to(torch.int32)
    out = Q.requantize(acc, m, sh, 3, -128, 127, -1)
    for i in range(4):
        for c in range(5):
            a, mm, s = int(acc[i, c]), int(m[c]), int(sh[c])
            want = min(max(((a * mm + (1 << (s - 1))) >> s) + 3, -128), 127)
            assert int(out[i, c]) == want


def test_dyadic_approximates_to_31_bits():
    """dyadic(r) gives m in [2^30, 2^31) and m * 2^-sh within 2^-31 relative of r."""
    r = torch.tensor([1e-6, 3.3e-4, 0.25, 0.9999999, 7.0])
    m, sh = dyadic(r)
    assert ((m >= 2**30) & (m.long() < 2**31)).all()
    approx = m.double() * torch.pow(2.0, -sh.double())
    assert ((approx - r.double()).abs() / r.double()).max() < 2**-30


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), 2.0**40])
def test_dyadic_rejects_out_of_range(bad):
    """Non-positive, infinite or huge factors are refused, not wrapped."""
    with pytest.raises(ValueError):
        dyadic(torch.tensor([bad]))
