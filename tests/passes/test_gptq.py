"""gptq: lower output error than round-to-nearest on the same grid, results on the grid,
the group option, and refusal without fake-quant."""

import pytest
import torch

import qcompiler as qc
from qcompiler.ir import copy_ir, get_attr_tensor, op_name
from qcompiler.passes.gptq import gptq_quantize, proxy_error
from tests.passes.tiny_llm import calib_ids, traced


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    """On correlated inputs, GPTQ's ||X(W-Q)^T||^2 is well below RTN's at 3 and 4 bits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=g) @ torch.randn(64, 64, generator=g)
    w = torch.randn(32, 64, generator=g)
    h = (x.T @ x / x.shape[0]).double()
    for bits in (3, 4):
        qmax = 2 ** (bits - 1) - 1
        s = (w.abs().amax(1, keepdim=True) / qmax).expand(-1, 64)
        q = gptq_quantize(w, h, s, -qmax, qmax)
        rtn = torch.clamp(torch.round(w / s), -qmax, qmax) * s
        assert torch.allclose(torch.round(q / s) * s, q, atol=1e-6)  # on the grid
        assert proxy_error(w, q, h) < 0.6 * proxy_error(w, rtn, h)


def test_pass_on_the_ir_keeps_the_grid_and_sets_group():
    """gptq(group=16) after per-channel fake-quant: group scales, weights exactly representable."""
    m, ir0 = traced("rms")
    ir = copy_ir(ir0)
    ctx = qc.PassContext(calib=calib_ids(8))
    qc.PassManager.parse("fake-quant(w=4,a=8,ops=linear),calibrate,gptq(group=16)").run(ir, ctx)
    res = ctx.results[-1][1]
    assert res.details["ratio"] < 1.0
    for n in ir.graph.nodes:
        if op_name(n) == "qc.fake_quant" and n.meta["qc"]["role"] == "weight":
            w = get_attr_tensor(ir, n.args[0])
            assert n.args[5] == 16 and torch.equal(torch.ops.qc.fake_quant(w, *[get_attr_tensor(ir, a) for a in n.args[1:3]], *n.args[3:]), w)


def test_needs_fake_quant_first():
    """Without weight quantizers there is nothing to round: a clear error."""
    with pytest.raises(qc.PassError, match="run fake-quant before gptq"):
        qc.PassManager.parse("gptq").run(copy_ir(traced("rms")[1]), qc.PassContext(calib=calib_ids()))


def test_bad_options_are_refused():
    """Negative damping is refused when the pipeline is parsed."""
    with pytest.raises(qc.QuantSpecError, match="damp must be >= 0"):
        qc.PassManager.parse("gptq(damp=-1)")


def test_clip_search_lowers_the_error_on_heavy_tailed_weights():
    """clip=true shrinks max-abs scales where that lowers the rounding error (heavy-tailed
    weights at 4 bits): on the IR, GPTQ's output error ratio to RTN drops further."""
    from qcompiler.passes.gptq import clipped_scale

    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((32, 96)) * 0.1
    s = w.abs().reshape(32, 3, 32).amax(-1) / 7
    c = clipped_scale(w, torch.ones(96), s, 32, -7, 7)
    assert (c <= s + 1e-9).all() and (c >= 0.5 * s - 1e-9).all() and (c < s).any()
    err = lambda sc: float((w - torch.clamp(torch.round(w / sc.repeat_interleave(32, 1)), -7, 7) * sc.repeat_interleave(32, 1)).pow(2).sum())
    assert err(c) < 0.97 * err(s)
    ratios = {}
    for clip in ("false", "true"):
        ir, ctx = copy_ir(traced("rms")[1]), qc.PassContext(calib=calib_ids(8))
        qc.PassManager.parse(f"fake-quant(w=4,a=8,ops=linear,granularity=group,group=16),gptq(clip={clip})").run(ir, ctx)
        ratios[clip] = ctx.results[-1][1].details["ratio"]
    assert ratios["true"] < ratios["false"] < 1.0


def test_sequential_takes_each_hessian_from_the_partly_quantized_model():
    """gptq(sequential=true): each layer's reported proxy error is the one under the inputs it
    sees in the final model (earlier layers rounded, activation quantizers on), and the
    last layers' Hessians differ from the float pass's."""
    from qcompiler.passes.gptq import Hessian

    m, ir0 = traced("rms")
    ir, ctx, calib = copy_ir(ir0), None, calib_ids(8)
    ctx = qc.PassContext(calib=calib)
    qc.PassManager.parse("fake-quant(w=4,a=8,ops=linear),calibrate,gptq(sequential=true)").run(ir, ctx)
    errors = ctx.results[-1][1].details["errors"]
    layers = {n.name: n for n in ir.graph.nodes if op_name(n) == "aten.linear" and n.name in errors}
    original = {n.name: get_attr_tensor(ir0, n.args[1]).detach() for n in ir0.graph.nodes if n.name in layers}
    assert len(layers) >= 4 and set(original) == set(layers)
    seen = {name: Hessian() for name in layers}

    class Inputs(torch.fx.Interpreter):
        def run_node(self, n):
            if n.name in seen:
                seen[n.name](self.env[n.args[0]])
            return super().run_node(n)

    with torch.no_grad():
        for batch in calib:
            Inputs(ir).run(batch)
    for name, lin in layers.items():
        q = get_attr_tensor(ir, lin.args[1].args[0])
        assert proxy_error(original[name], q, seen[name].value()) == pytest.approx(errors[name][0], rel=1e-6)


def test_refit_lowers_the_proxy_error_with_the_codes_kept():
    """refit_scales: for GPTQ's integer codes, the least-squares group scales under H lower
    every changed row's proxy error, keep the codes, and stay exactly representable."""
    from qcompiler.passes.fake_quant import weight_scale
    from qcompiler.passes.gptq import _scales_for_columns, refit_scales

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 80, generator=g) @ torch.randn(80, 80, generator=g)
    w, h = torch.randn(24, 80, generator=g), (x.T @ x / 2048).double()
    for group in (0, 32):  # per channel; groups of 32 with a ragged last group of 16
        s = weight_scale(w, 4, group)
        q = gptq_quantize(w, h, _scales_for_columns(s, 80, group), -7, 7)
        s2, q2 = refit_scales(w, q, h, s, group)
        full, full2 = _scales_for_columns(s, 80, group), _scales_for_columns(s2, 80, group)
        assert s2.shape == s.shape and (s2 > 0).all() and not torch.equal(s2, s)
        assert torch.equal(torch.round(q / full), torch.round(q2 / full2))
        assert proxy_error(w, q2, h) < 0.99 * proxy_error(w, q, h)
        assert torch.equal(torch.ops.qc.fake_quant(q2.float(), s2, torch.zeros_like(s2), -7, 7, group), q2.float())


def _ratio_and_grid(opts, w=4, heavy=False, gran="granularity=group,group=16"):
    ir, ctx = copy_ir(traced("rms")[1]), qc.PassContext(calib=calib_ids(8))
    if heavy:  # Student-t weights: max-abs scales waste most levels on a few outliers
        torch.manual_seed(0)
        for n in ir.graph.nodes:
            if op_name(n) == "aten.linear":
                p = get_attr_tensor(ir, n.args[1])
                p.data = torch.distributions.StudentT(2.0).sample(p.shape) * 0.05
    qc.PassManager.parse(f"fake-quant(w={w},a=8,ops=linear,{gran}),gptq({opts})").run(ir, ctx)
    for n in ir.graph.nodes:
        if op_name(n) == "qc.fake_quant" and n.meta["qc"]["role"] == "weight":
            w = get_attr_tensor(ir, n.args[0])
            assert torch.equal(torch.ops.qc.fake_quant(w, *[get_attr_tensor(ir, a) for a in n.args[1:3]], *n.args[3:]), w)
    return ctx.results[-1][1].details["ratio"]


def test_refit_and_search_options_on_the_ir():
    """gptq(refit=2) and gptq(search=4) (layer-level scale factors, the least full-Hessian
    error kept) lower the output error ratio to RTN; weights stay on their (new) grids."""
    assert _ratio_and_grid("clip=true,refit=2", 3) < 0.9 * _ratio_and_grid("clip=true", 3)
    chan = "granularity=channel"
    assert _ratio_and_grid("search=4", 4, True, chan) < 0.98 * _ratio_and_grid("", 4, True, chan)


def test_float_target_fits_the_float_outputs():
    """gptq(sequential=true,float_target=true) rounds each layer toward the float model's
    outputs from its quantized inputs: the second linear of an MLP makes up for the first's
    rounding, so the output error to float on the calibration data drops well below plain
    sequential GPTQ's."""
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    m, g = MLP().eval(), torch.Generator().manual_seed(1)
    mix = torch.randn(32, 32, generator=g)
    calib = [torch.randn(64, 32, generator=g) @ mix for _ in range(4)]
    ir0, errs = qc.trace(m, (calib[0],)), {}
    for opt in ("sequential=true", "sequential=true,float_target=true"):
        ir = copy_ir(ir0)
        qc.PassManager.parse(f"fake-quant(w=3,a=8,ops=linear),calibrate,gptq({opt})").run(ir, qc.PassContext(calib=calib))
        with torch.no_grad():
            errs[opt] = sum(float((ir(x) - m(x)).pow(2).sum()) for x in calib)
    assert errs["sequential=true,float_target=true"] < 0.85 * errs["sequential=true"]


@pytest.mark.parametrize("opts, match", [("search=1", "search must be 0"), ("refit=-1", "refit >= 0"),
                                          ("float_target=true", "float_target needs sequential=true")])
def test_bad_new_options_are_refused(opts, match):
    """search=1 (one factor is no search), a negative refit and float_target without
    sequential are refused when the pipeline is parsed."""
    with pytest.raises(qc.QuantSpecError, match=match):
        qc.PassManager.parse(f"gptq({opts})")
