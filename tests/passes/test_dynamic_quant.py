"""Per-token activations and KV-cache quantization in fake-quant, and the KL observer."""

import pytest
import torch

import qcompiler as qc
from qcompiler.ir import copy_ir, op_name
from qcompiler.passes.calibrate import kl_threshold
from qcompiler.passes.dynamic_quant import dynamic_quantizer
from tests.passes.tiny_llm import calib_ids, ids, traced


class Id(torch.nn.Module):
    def forward(self, x):
        return x * 1.0


def _quantize_with(dims, symmetric):
    ir = qc.trace(Id(), (torch.randn(2, 3, 5, 8),))
    x = next(n for n in ir.graph.nodes if n.op == "placeholder")
    mul = next(n for n in ir.graph.nodes if op_name(n) == "aten.mul.Tensor")
    mul.update_arg(0, dynamic_quantizer(ir, x, 4, dims, symmetric, mul, "test"))
    ir.recompile()
    return ir


def test_per_token_and_per_channel_scales():
    """Per row (dims=-1): each row's max-abs value is exact and the row has <= 15 levels;
    per channel over tokens (dims=-2): the same along the other axis."""
    x = torch.randn(2, 3, 5, 8) * torch.logspace(-2, 2, 8)
    for dims in ([-1], [-2]):
        y = _quantize_with(dims, True)(x)
        amax = x.abs().amax(dims, keepdim=True)
        assert torch.allclose(y.abs().amax(dims, keepdim=True), amax)
        levels = torch.round(y / (amax / 7))
        assert levels.abs().max() <= 7 and torch.allclose(levels * amax / 7, y, atol=1e-6)


def test_asymmetric_rows_keep_zero_exact():
    """Asymmetric per-row quantization: 0.0 stays 0.0 and the error is at most half a step."""
    x = torch.rand(2, 3, 5, 8) + torch.tensor([0.0] * 7 + [-0.5])
    y = _quantize_with([-1], False)(x)
    step = (x.amax(-1, keepdim=True).clamp_min(0) - x.amin(-1, keepdim=True).clamp_max(0)) / 15
    assert (y - x).abs().le(step / 2 + 1e-6).all()
    z = torch.zeros(2, 3, 5, 8)
    z[..., 0] = 1.0
    assert torch.equal(_quantize_with([-1], False)(z)[..., 1:], z[..., 1:])


def test_fake_quant_kv_and_token_options():
    """kv=4 puts a key (per channel) and a value (per token) quantizer on each attention;
    calibrate leaves run-time quantizers alone."""
    m, ir0 = traced("rms")
    ir = copy_ir(ir0)
    qc.PassManager.parse("fake-quant(w=8,a=8,ops=linear,a_granularity=token,kv=4),calibrate").run(
        ir, qc.PassContext(calib=calib_ids()))
    dyn = [n.meta["qc"]["granularity"] for n in ir.graph.nodes if n.meta.get("qc", {}).get("role") == "act_dynamic"]
    assert dyn.count("kv-key-channel") == 2 and dyn.count("kv-value-token") == 2 and dyn.count("token") > 4
    x = ids(2, 16, seed=1)
    assert torch.nn.functional.cosine_similarity(ir(x).flatten(), m(x).flatten(), dim=0) > 0.99


def test_kv_with_quantized_matmuls_is_refused():
    """kv= quantizes attention itself; with matmul in ops the error says what to write."""
    with pytest.raises(qc.QuantSpecError, match="give ops=linear"):
        qc.PassManager.parse("fake-quant(kv=4)")


def test_kl_threshold_clips_outliers():
    """Gaussian values plus two huge outliers: the KL threshold ignores the outliers at 8 bits
    and clips harder at 4 bits; calibrate(observer=kl) runs end to end."""
    v = torch.cat([torch.randn(100000, generator=torch.Generator().manual_seed(0)), torch.tensor([40.0, -35.0])])
    t8, t4 = kl_threshold(v, 128), kl_threshold(v, 8)
    assert 2.5 < t8 < 8 and t4 < t8
    ir = copy_ir(traced("rms")[1])
    qc.PassManager.parse("fake-quant(w=8,a=8),calibrate(observer=kl)").run(ir, qc.PassContext(calib=calib_ids()))
    assert all(n.meta["qc"]["observed"] for n in ir.graph.nodes if n.meta.get("qc", {}).get("role") == "act")
