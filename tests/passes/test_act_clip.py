"""Clip ratios of run-time activation ranges: fake-quant's a_clip (per token) and kv_clip (KV cache)."""

import pytest
import torch
from torch import nn

import qcompiler as qc
from qcompiler.ir import copy_ir, op_name
from qcompiler.passes.dynamic_quant import dynamic_quantizer
from tests.passes.tiny_llm import Attention, calib_ids, ids, traced


class Id(torch.nn.Module):
    def forward(self, x):
        return x * 1.0


def _quantize_rows(symmetric, clip):
    ir = qc.trace(Id(), (torch.randn(3, 16),))
    x = next(n for n in ir.graph.nodes if n.op == "placeholder")
    mul = next(n for n in ir.graph.nodes if op_name(n) == "aten.mul.Tensor")
    mul.update_arg(0, dynamic_quantizer(ir, x, 4, [-1], symmetric, mul, "test", clip=clip))
    ir.recompile()
    return ir


def test_symmetric_rows_saturate_at_the_clipped_range():
    """Symmetric, clip 0.5: each row's step is 0.5 * max|x| / 7, so values above half the
    extreme saturate at +-7 steps and the rest are within half a step."""
    x = torch.randn(3, 16)
    y = _quantize_rows(True, 0.5)(x)
    step = x.abs().amax(-1, keepdim=True) / (7 / 0.5)
    assert torch.allclose(y.abs().amax(-1, keepdim=True), 7 * step)
    inside = x.abs() <= 7 * step
    assert ((y - x).abs() <= step / 2 + 1e-6)[inside].all() and (~inside).any()
    assert torch.allclose(y[~inside], torch.sign(x[~inside]) * (7 * step).expand_as(x)[~inside])


def test_asymmetric_rows_clip_both_ends():
    """Asymmetric, clip 0.8: the row's range is 0.8 * [min, max] (0.0 still exact), so the
    extremes are pulled in and no output leaves it by more than a step."""
    x = torch.randn(3, 16)
    x[:, 0] = 0.0
    y = _quantize_rows(False, 0.8)(x)
    lo, hi = 0.8 * x.amin(-1, keepdim=True), 0.8 * x.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    assert (y >= lo - step).all() and (y <= hi + step).all()
    assert (y.amax(-1, keepdim=True) < x.amax(-1, keepdim=True)).all() and (y[:, 0] == 0).all()
    plain = _quantize_rows(False, 1.0)(x)
    assert not torch.equal(y, plain)


def test_clip_options_reach_every_run_time_quantizer():
    """fake-quant(a=4, a_clip=0.9, kv=4, kv_clip=0.95): each per-token quantizer of a linear
    carries 0.9, each KV quantizer 0.95, the pipeline prints back as given, and the tiny LM
    stays close to float."""
    m, ir0 = traced("rms")
    text = ("fake-quant(a=4,a_symmetric=true,ops=linear,a_granularity=token,kv=4,"
            "a_clip=0.9,kv_clip=0.95)")
    pm = qc.PassManager.parse(text)
    assert str(pm) == text
    ir = copy_ir(ir0)
    pm.run(ir, qc.PassContext(calib=calib_ids()))
    clips = {}
    for n in ir.graph.nodes:
        meta = n.meta.get("qc", {})
        if meta.get("role") == "act_dynamic":
            clips.setdefault(meta["granularity"], set()).add(meta.get("clip"))
    assert clips == {"token": {0.9}, "kv-key-channel": {0.95}, "kv-value-token": {0.95}}
    x = ids(2, 16, seed=1)
    assert torch.nn.functional.cosine_similarity(ir(x).flatten(), m(x).flatten(), dim=0) > 0.95


def test_compiled_host_equals_ir_bit_exact_with_clip():
    """With a_clip=0.9 the per-token linears still convert to integer linears whose quantize
    and linear_int outputs equal the reference bit for bit on the host, and the compiled
    output matches art.ir."""
    from qcompiler.backends.verify import verify_nodes

    torch.manual_seed(0)
    model = Attention(16, 2, 1).eval()
    x = torch.randn(2, 8, 16)
    art = qc.compile(model, (x,), calib=[torch.randn(2, 8, 16)], pipeline=(
        "fake-quant(w=8,a=4,a_symmetric=true,ops=linear,a_granularity=token,a_clip=0.9,kv=4,kv_clip=0.95),"
        "calibrate,convert"))
    assert sum(op_name(n) == "qc.linear_int" for n in art.ir.graph.nodes) == 4
    y, ref = art(x), art.ir(x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    exact = [c for c in verify_nodes(art.ir, (x,)) if c.dtype in ("int8", "int32")]
    assert len(exact) == 6 and all(c.ok for c in exact), exact
    q = [n for n in art.ir.graph.nodes if op_name(n) == "qc.quantize"]
    assert q and all(n.meta["qc"].get("clip") == 0.9 for n in q)


def test_clip_changes_the_converted_scales():
    """The clip changes the integer graph: the converted model with a_clip=0.5 differs from
    the one without, and each equals its own fake-quant graph up to float rounding."""
    mlp = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    outs = []
    for clip in (1.0, 0.5):
        ir = qc.trace(mlp, (x,))
        qc.PassManager.parse(f"fake-quant(a=4,ops=linear,a_granularity=token,a_symmetric=true,a_clip={clip})"
                             ).run(ir, qc.PassContext(calib=[x]))
        ref = ir(x)
        qc.PassManager.parse("calibrate,convert").run(ir, qc.PassContext(calib=[x]))
        assert sum(op_name(n) == "qc.linear_int" for n in ir.graph.nodes) == 2
        assert torch.allclose(ir(x), ref, rtol=1e-5, atol=1e-5)
        outs.append(ir(x))
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("opts, match", [
    ("a_granularity=token,a_clip=0", r"a_clip=0.0: .*\(0, 1\]"),
    ("a_granularity=token,a_clip=1.5", r"a_clip=1.5: .*\(0, 1\]"),
    ("a_granularity=token,a_clip=nan", r"a_clip=nan: .*\(0, 1\]"),
    ("ops=linear,kv=4,kv_clip=-0.5", r"kv_clip=-0.5: .*\(0, 1\]"),
    ("a_clip=0.9", "a_granularity=token"),
    ("ops=linear,kv_clip=0.9", "kv=<bits>"),
])
def test_bad_clip_options_are_refused(opts, match):
    """A clip ratio outside (0, 1], or one with nothing to clip, fails at parse time naming the option."""
    with pytest.raises(qc.QuantSpecError, match=match):
        qc.PassManager.parse(f"fake-quant({opts})")


def test_clip_with_per_row_levels_is_refused():
    """dynamic_quantizer refuses a clip together with per-row levels (token-bits' rows must stay on their grid)."""
    ir = qc.trace(Id(), (torch.randn(3, 16),))
    x = next(n for n in ir.graph.nodes if n.op == "placeholder")
    mul = next(n for n in ir.graph.nodes if op_name(n) == "aten.mul.Tensor")
    with pytest.raises(qc.QuantSpecError, match="per-row levels"):
        dynamic_quantizer(ir, x, 4, [-1], True, mul, "test", levels=x, clip=0.9)


def _one_linear(weight_col0: float, seed=0):
    """A linear whose inputs carry a large channel 0 on every row; its weight column 0 is scaled."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 32, generator=g))
        lin.weight[:, 0] *= weight_col0
    x = torch.randn(8, 64, 32, generator=g)
    x[..., 0] = 12.0 + torch.rand(8, 64, generator=g)
    return lin.eval(), x


def _searched(model, x, extra=""):
    ir = qc.trace(model, (x[:2],))
    pm = qc.PassManager.parse("fake-quant(a=4,ops=linear,a_granularity=token,a_symmetric=true),"
                              f"calibrate(token_clip=true{extra})")
    results = pm.run(ir, qc.PassContext(calib=[x[i: i + 2] for i in range(0, 8, 2)]))
    fq = next(n for n in ir.graph.nodes if n.meta.get("qc", {}).get("role") == "act_dynamic")
    return ir, fq.meta["qc"].get("clip", 1.0), results


def test_token_clip_search_weighs_errors_by_the_consumer():
    """The searched ratio follows the consumer: when the outlier channel's weights are ~0,
    clipping it is free and the ratio drops to the grid's floor; when they are large the
    outlier must stay exact and the ratio stays 1. The result equals fake-quant with that
    a_clip, its output error is below the unclipped one, and convert keeps it."""
    lin, x = _one_linear(1e-3)
    ir, clip, _ = _searched(lin, x)
    assert clip == 0.5
    fixed = qc.trace(lin, (x[:2],))
    qc.PassManager.parse("fake-quant(a=4,ops=linear,a_granularity=token,a_symmetric=true,a_clip=0.5)"
                         ).run(fixed, qc.PassContext())
    assert torch.equal(ir(x), fixed(x))
    plain = qc.trace(lin, (x[:2],))
    qc.PassManager.parse("fake-quant(a=4,ops=linear,a_granularity=token,a_symmetric=true)").run(plain, qc.PassContext())
    ref = lin(x)
    assert (ir(x) - ref).pow(2).mean() < 0.5 * (plain(x) - ref).pow(2).mean()
    y = ir(x)
    qc.PassManager.parse("convert").run(ir, qc.PassContext())
    assert any(op_name(n) == "qc.linear_int" for n in ir.graph.nodes)
    assert torch.allclose(ir(x), y, rtol=1e-5, atol=1e-5)
    assert _searched(*_one_linear(10.0))[1] == 1.0
    assert _searched(lin, x, ",token_clip_min=0.8")[1] == 0.8


def test_token_clip_option_prints_back_and_refuses_bad_floor():
    """calibrate(token_clip=true,token_clip_min=..) round-trips; a floor outside (0, 1] is refused."""
    text = "calibrate(token_clip=true,token_clip_min=0.7)"
    assert str(qc.PassManager.parse(text)) == text
    for bad in ("0", "1.2"):
        with pytest.raises(qc.CalibrationError, match=r"token_clip_min=.*\(0, 1\]"):
            qc.PassManager.parse(f"calibrate(token_clip=true,token_clip_min={bad})")


def test_token_clip_search_covers_asymmetric_rows():
    """Asymmetric per-token rows are searched too: with the outlier channel's weights ~0 the
    ratio drops below 1, the graph then equals fake-quant(a_symmetric=false, a_clip=c) bit for
    bit, and its output error is below the unclipped one."""
    lin, x = _one_linear(1e-3)
    ir = qc.trace(lin, (x[:2],))
    fq = "fake-quant(a=4,ops=linear,a_granularity=token,a_symmetric=false"
    qc.PassManager.parse(f"{fq}),calibrate(token_clip=true)").run(ir, qc.PassContext(calib=[x[i: i + 2] for i in range(0, 8, 2)]))
    node = next(n for n in ir.graph.nodes if n.meta.get("qc", {}).get("role") == "act_dynamic")
    clip = node.meta["qc"].get("clip", 1.0)
    assert clip < 1.0
    fixed, plain = qc.trace(lin, (x[:2],)), qc.trace(lin, (x[:2],))
    qc.PassManager.parse(f"{fq},a_clip={clip})").run(fixed, qc.PassContext())
    qc.PassManager.parse(f"{fq})").run(plain, qc.PassContext())
    assert torch.equal(ir(x), fixed(x))
    ref = lin(x)
    assert (ir(x) - ref).pow(2).mean() < 0.8 * (plain(x) - ref).pow(2).mean()


def _kv_like(symmetric, clip=1.0):
    """x -> x * 1.0 through a key-like quantizer: per channel over the tokens (dim -2), 4 bits."""
    ir = qc.trace(Id(), (torch.randn(2, 256, 8),))
    x = next(n for n in ir.graph.nodes if n.op == "placeholder")
    mul = next(n for n in ir.graph.nodes if op_name(n) == "aten.mul.Tensor")
    mul.update_arg(0, dynamic_quantizer(ir, x, 4, [-2], symmetric, mul, "kv-key-channel", clip=clip))
    ir.recompile()
    return ir


@pytest.mark.parametrize("symmetric", [True, False])
def test_token_clip_kv_searches_the_kv_cache(symmetric):
    """token_clip_kv=true: a key quantizer (per channel over heavy-tailed tokens) gets a ratio
    below the fixed one, its graph equals the quantizer built with that ratio, and the error
    is below the unclipped one; without token_clip_kv the KV quantizer keeps its fixed clip."""
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((8, 256, 8)) * (1 + torch.rand(8, 1, 8, generator=g))
    calib = [x[i: i + 2] for i in range(0, 8, 2)]

    def clip_of(ir):
        n = next(n for n in ir.graph.nodes if n.meta.get("qc", {}).get("role") == "act_dynamic")
        return n.meta["qc"].get("clip", 1.0)
    kept = _kv_like(symmetric, 0.95)
    qc.PassManager.parse("calibrate(token_clip=true)").run(kept, qc.PassContext(calib=calib))
    assert clip_of(kept) == 0.95
    ir = _kv_like(symmetric, 0.95)
    qc.PassManager.parse("calibrate(token_clip=true,token_clip_kv=true)").run(ir, qc.PassContext(calib=calib))
    c = clip_of(ir)
    assert c < 0.95
    assert torch.equal(ir(x), _kv_like(symmetric, c)(x))
    assert (ir(x) - x).pow(2).sum() < (_kv_like(symmetric)(x) - x).pow(2).sum()


def test_token_clip_kv_needs_token_clip():
    """token_clip_kv=true alone (the KV search is part of the clip search) is refused, naming both options."""
    text = "calibrate(token_clip=true,token_clip_kv=true)"
    assert str(qc.PassManager.parse(text)) == text
    with pytest.raises(qc.CalibrationError, match=r"token_clip_kv=true .* token_clip=true"):
        qc.PassManager.parse("calibrate(token_clip_kv=true)")


def test_kv_symmetric_sets_the_cache_grid_apart_from_the_activations():
    """kv_symmetric=false: symmetric per-token activations, asymmetric KV quantizers (QuaRot's
    setting); 'auto' follows a_symmetric; without kv=<bits> the option is refused."""
    _, ir0 = traced("rms")
    grids = {}
    for kvs in ("auto", "false"):
        ir = copy_ir(ir0)
        qc.PassManager.parse(f"fake-quant(a=4,a_symmetric=true,ops=linear,a_granularity=token,kv=4,kv_symmetric={kvs})"
                             ).run(ir, qc.PassContext(calib=calib_ids()))
        grids[kvs] = {(n.meta["qc"]["granularity"], n.meta["qc"]["symmetric"]) for n in ir.graph.nodes
                      if n.meta.get("qc", {}).get("role") == "act_dynamic"}
    assert grids["auto"] == {("token", True), ("kv-key-channel", True), ("kv-value-token", True)}
    assert grids["false"] == {("token", True), ("kv-key-channel", False), ("kv-value-token", False)}
    with pytest.raises(qc.QuantSpecError, match=r"kv_symmetric=false .* kv=<bits>"):
        qc.PassManager.parse("fake-quant(a_granularity=token,kv_symmetric=false)")
