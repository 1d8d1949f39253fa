"""token-bits: per-token activation widths from the attention each token receives (EdgeQAT)."""

import math

import pytest
import torch
from torch import nn

import qcompiler as qc
from qcompiler.ir import copy_ir, op_name
from qcompiler.passes.stats import watch
from tests.passes.tiny_llm import Attention, calib_ids, ids, traced
from tests.test_ir import golden

FQ = "fake-quant(w=8,a=8,ops=linear,a_granularity=token,a_symmetric=true{})"


class Spotlight(nn.Module):
    """One attention head whose queries all look for channel 0 of the keys: the tokens with
    a large x[..., 0] receive (nearly) all the attention, so their importance is known."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        with torch.no_grad():
            self.q.weight.zero_()
            self.q.weight[0, 1] = 4.0  # q = 4 * x[..., 1] (a constant channel) along e0
            self.k.weight.copy_(torch.eye(d))
            self.v.weight.copy_(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
            self.o.weight.copy_(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        q, k, v = self.q(x)[:, None], self.k(x)[:, None], self.v(x)[:, None]  # [B, 1, T, d]
        p = torch.softmax(torch.matmul(q, k.transpose(2, 3)), dim=-1)
        return self.o(torch.matmul(p, v)[:, 0])


def _spotlight_input(seed, hot):
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(seed))
    x[..., 1] = 1.0
    x[..., 0] = 0.0
    for b, tokens in enumerate(hot):
        x[b, tokens, 0] = 3.0
    return x


def _run(ir, text, calib):
    ctx = qc.PassContext(calib=calib)
    qc.PassManager.parse(text).run(ir, ctx)
    return ctx


def test_most_attended_tokens_get_high_bits():
    """Tokens 2 and 5 (batch 0) and 0 and 7 (batch 1) receive the attention: with keep=0.25 of
    8 tokens exactly they are quantized on the 8-bit grid (max |q| = 127) and every other row
    on the 4-bit grid (max |q| = 7) at o's input; q/k/v, before the attention, stay 8-bit."""
    x = _spotlight_input(0, [[2, 5], [0, 7]])
    ir = qc.trace(Spotlight().eval(), (x,))
    _run(ir, FQ.format("") + ",token-bits(high=8,low=4,keep=0.25)", [x])
    lin = [n for n in ir.graph.nodes if op_name(n) == "aten.linear"]
    assert [n.meta["qc"].get("a_bits_low") for n in lin] == [None, None, None, 4]
    fq = lin[3].args[0]
    seen = {}
    watch(ir, qc.PassContext(calib=[x]), {fq.args[0]: lambda v: seen.setdefault("x", v),
                                          fq.args[1]: lambda v: seen.setdefault("s", v)}, "test")
    levels = torch.round(seen["x"].abs().amax(-1) / seen["s"][..., 0])
    want = torch.full((2, 8), 7.0)
    want[0, [2, 5]] = want[1, [0, 7]] = 127.0
    assert torch.equal(levels, want)
    y, f = ir(x), Spotlight().eval()(x)
    assert torch.nn.functional.cosine_similarity(y.flatten(), f.flatten(), dim=0) > 0.98


def test_golden_converted_ir():
    """Golden text of the converted Spotlight model: the importance ranking (sum of the
    softmax over heads and queries, comparison rank, mask), the per-row levels 127/7, and o as
    quantize -> linear_int -> dequantize with the row scale times the weight scales."""
    x = _spotlight_input(0, [[2, 5], [0, 7]])
    ir = qc.trace(Spotlight().eval(), (x,))
    _run(ir, FQ.format("") + ",token-bits(keep=0.25),calibrate,convert", [x])
    assert sum(op_name(n) == "qc.linear_int" for n in ir.graph.nodes) == 4
    golden("spotlight_token_bits.txt", qc.print_ir(ir))


def test_average_width_and_token_fraction():
    """Average width = element-weighted mean over the linears' quantized inputs, measured on
    the calibration data: 16 tokens, keep=0.2 -> ceil(3.2) = 4 high rows (fraction 0.25);
    keep=1 gives every row 8 bits."""
    _, ir0 = traced("rms")
    for keep, frac in ((0.2, 0.25), (1.0, 1.0)):
        ir = copy_ir(ir0)
        ctx = _run(ir, FQ.format("") + f",token-bits(high=8,low=4,keep={keep})", calib_ids())
        stats = ir.meta["qc"]["token_bits"]
        assert stats["high_token_fraction"] == frac
        fqs = {n.args[0] for n in ir.graph.nodes if op_name(n) == "aten.linear"}
        width = {fq: (8 * frac + 4 * (1 - frac)) if "low_bits" in fq.meta["qc"] else 8 for fq in fqs}
        rows = {fq: fq.meta["val"].shape[-1] for fq in fqs}
        want = sum(width[f] * rows[f] for f in fqs) / sum(rows.values())
        assert math.isclose(stats["avg_bits"], want, rel_tol=1e-9), (stats, want)
        assert f"{want:.3f} bits" in ctx.results[-1][1].summary
    assert stats["avg_bits"] == 8.0


def test_composes_with_kv4_and_importance_source():
    """With kv=4 the key/value quantizers stay; o_proj/gate/up/down take their own block's
    attention, q/k/v of block 1 the previous block's, block 0's q/k/v keep 8 bits."""
    m, ir0 = traced("rms")
    ir = copy_ir(ir0)
    _run(ir, FQ.format(",kv=4") + ",token-bits(keep=0.25),calibrate", calib_ids())
    kinds = [n.meta["qc"]["granularity"] for n in ir.graph.nodes if n.meta.get("qc", {}).get("role") == "act_dynamic"]
    assert kinds.count("kv-key-channel") == 2 and kinds.count("kv-value-token") == 2
    src = [n.meta["qc"].get("importance") for n in ir.graph.nodes if op_name(n) == "aten.linear"]
    assert src == [None] * 3 + ["softmax"] * 7 + ["softmax_1"] * 5
    x = ids(2, 16, seed=1)
    assert torch.nn.functional.cosine_similarity(ir(x).flatten(), m(x).flatten(), dim=0) > 0.99


def test_compiled_host_equals_ir_bit_exact():
    """A tiny_llm attention (causal mask, GQA) with kv=4 and token-bits compiles for the host:
    o_proj becomes an integer linear with run-time per-token scales, every integer op equals
    the reference bit for bit (node by node), the output equals art.ir within float rounding,
    and the report shows 8/4 bits and the average width."""
    from qcompiler.backends.verify import verify_nodes

    torch.manual_seed(0)
    model = Attention(16, 2, 1).eval()
    x = torch.randn(2, 8, 16)
    art = qc.compile(model, (x,), pipeline=FQ.format(",kv=4") + ",token-bits(keep=0.25),calibrate,convert",
                     calib=[torch.randn(2, 8, 16)])
    ints = [n for n in art.ir.graph.nodes if op_name(n) == "qc.linear_int"]
    assert len(ints) == 4 and ints[-1].meta["qc"]["a_bits_low"] == 4
    y, ref = art(x), art.ir(x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    checks = verify_nodes(art.ir, (x,))
    exact = [c for c in checks if c.dtype in ("int8", "int32")]
    assert len(exact) == 6 and all(c.ok for c in exact), exact  # 2 quantize (q/k/v share one), 4 linear_int
    # float ops too, except the -inf mask (inf - inf is nan in the comparison)
    assert all(c.ok for c in checks if c.op not in ("aten.full", "aten.triu", "aten.add.Tensor")), checks
    text = str(art.report())
    assert "8/4" in text and "per-token activation bits" in text


@pytest.mark.parametrize("opts, match", [
    ("keep=0", "keep=0"), ("keep=1.5", r"in \(0, 1\]"), ("high=4,low=4", "must be wider"),
    ("high=4,low=8", "must be wider"), ("high=9", "high=9"),
])
def test_bad_options_are_refused(opts, match):
    """keep outside (0, 1], high <= low and unsupported widths fail at parse time."""
    with pytest.raises(qc.QuantSpecError, match=match):
        qc.PassManager.parse(f"token-bits({opts})")


def test_model_without_attention_is_refused():
    """An MLP has no attention to rank tokens by: the error says so and what to use instead."""
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(2, 4, 8)
    ir = qc.trace(mlp, (x,))
    with pytest.raises(qc.PassError, match="no attention") as e:
        _run(ir, FQ.format("") + ",token-bits", [x])
    assert isinstance(e.value.__cause__, qc.QuantSpecError)


def test_without_fake_quant_is_refused():
    """token-bits needs the quantized linears of fake-quant: run alone it says so."""
    ir = copy_ir(traced("rms")[1])
    with pytest.raises(qc.PassError, match="run fake-quant") as e:
        _run(ir, "token-bits", calib_ids())
    assert isinstance(e.value.__cause__, qc.QuantSpecError)


def test_uniform_per_token_linears_convert_to_integer():
    """Without token-bits too: linear -> linear behind symmetric per-token quantizers become
    two integer linears (no requantize between run-time scales) that compute the fake-quant
    graph's function up to float rounding; asymmetric rows stay in float simulation."""
    mlp = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    for sym, ints in (("true", 2), ("false", 0)):
        ir = qc.trace(mlp, (x,))
        _run(ir, f"fake-quant(ops=linear,a_granularity=token,a_symmetric={sym})", [x])
        ref = ir(x)
        _run(ir, "calibrate,convert", [x])
        assert sum(op_name(n) == "qc.linear_int" for n in ir.graph.nodes) == ints
        assert torch.allclose(ir(x), ref, rtol=1e-5, atol=1e-5)
