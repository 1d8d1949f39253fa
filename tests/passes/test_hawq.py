"""hawq: Hutchinson traces against known Hessians, the integer program against brute force, the
budget met, widths honoured end to end (host and arm equal the IR with 2-, 4- and 8-bit layers),
measured latency costs cached, and bad input refused with what would work."""

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import qcompiler as qc
from qcompiler.errors import BudgetError, LoweringError, PassError, PipelineError, QuantSpecError
from qcompiler.frontends.pytorch import trace
from qcompiler.ir import copy_ir, op_name
from qcompiler.pass_manager import PassManager
from qcompiler.passes import hawq_alloc, hawq_cost
from qcompiler.passes.hawq_trace import ModelHVP, hutchinson

from tests.conftest import assert_matches_ir, calib_batches


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(4 * 6 * 6, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


_NET = []


def net_ir():
    """A fresh copy of the traced Net (traced once per session)."""
    if not _NET:
        torch.manual_seed(0)
        _NET.append(trace(Net().eval(), (torch.randn(2, 1, 6, 6),)))
    return copy_ir(_NET[0])


def run(ir, text, calib=None):
    PassManager.parse(text).run(ir, qc.PassContext(calib=calib or calib_batches((8, 1, 6, 6)), verify=False))
    return ir


@pytest.mark.parametrize("per_layer", [False, True])
def test_hutchinson_matches_known_traces(per_layer):
    """Hutchinson's running mean equals tr(A_l)/n_l of a quadratic loss 1/2 w^T A w (with coupling
    between blocks) within 3 standard errors, and converged estimates meet the tolerance; one
    product for all blocks, or one per block (only that block's vector: no cross terms)."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(30, 30, generator=g)
    a = m @ m.T + 30 * torch.eye(30)  # diagonal-heavy: few samples needed
    sizes = {"w1": (10,), "w2": (4, 5)}

    def hvp(vs, i):
        hv = a @ torch.cat([vs.get("w1", torch.zeros(10)), vs.get("w2", torch.zeros(4, 5)).flatten()])
        return {k: v for k, v in (("w1", hv[:10]), ("w2", hv[10:].reshape(4, 5))) if k in vs}

    est = hutchinson(hvp, {k: torch.zeros(s) for k, s in sizes.items()}, tol=0.02, min_samples=4, max_samples=400,
                     per_layer=per_layer)
    for k, sl in (("w1", slice(0, 10)), ("w2", slice(10, 30))):
        exact = float(torch.diagonal(a)[sl].mean())
        e = est[k]
        assert e.converged and e.relative_error <= 0.02
        assert abs(e.mean - exact) <= 3 * e.std_error + 1e-9, (k, e, exact)


@pytest.mark.parametrize("method", ["double-backward", "finite-difference"])
def test_model_hvp_equals_the_analytic_product(method):
    """On y = x W^T with the mse loss to reference outputs, H v = 2/(B N) V X^T X for both ways
    of computing it (double backward, central differences of gradients)."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3, bias=False).eval()
    ir = trace(lin, (torch.randn(2, 6),))
    x = torch.randn(5, 6)
    hvp = ModelHVP(ir, [n.target for n in ir.graph.nodes if n.op == "get_attr"], [(x,)], "mse", method)
    v = torch.randn(3, 6)
    (name,) = hvp.weights
    got = hvp({name: v}, 0)[name]
    exact = 2 / (5 * 3) * v @ x.T @ x
    assert torch.allclose(got, exact, rtol=1e-3, atol=1e-5)
    assert hvp.method == method


@torch.library.custom_op("qctest::cube", mutates_args=())
def _cube(x: torch.Tensor) -> torch.Tensor:
    return x ** 3


@torch.library.custom_op("qctest::cube_grad", mutates_args=())
def _cube_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return g * 3 * x * x  # an op without autograd: no double backward through cube


_cube.register_fake(lambda x: torch.empty_like(x))
_cube_grad.register_fake(lambda g, x: torch.empty_like(x))
_cube.register_autograd(lambda ctx, g: _cube_grad(g, ctx.saved_tensors[0]),
                        setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


class CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.ops.qctest.cube(self.fc1(x)))


def test_no_double_backward_falls_back_to_finite_differences():
    """An op without double backward: hawq warns, uses finite differences of gradients for every
    layer (said per layer), and its traces match double backward on the same model without it."""
    torch.manual_seed(0)
    model = CubeNet().eval()
    ir = trace(model, (torch.randn(2, 6),))
    calib = calib_batches((16, 6), n=2)
    with pytest.warns(UserWarning, match="finite differences"):
        run(ir, "hawq(budget_kb=0.2,tol=1,min_samples=20,max_samples=20)", calib)
    layers = ir.meta["qc"]["hawq"]["layers"]
    assert {v["method"] for v in layers.values()} == {"finite-difference"}
    assert "double backward unavailable" in ir.meta["qc"]["hawq"]["hvp"]

    class Plain(CubeNet):
        def forward(self, x):
            return self.fc2(self.fc1(x) ** 3)

    plain = Plain().eval()
    plain.load_state_dict(model.state_dict())
    ref = run(trace(plain, (torch.randn(2, 6),)), "hawq(budget_kb=0.2,tol=1,min_samples=20,max_samples=20)", calib)
    for (k, v), r in zip(layers.items(), ref.meta["qc"]["hawq"]["layers"].values()):
        assert r["method"] == "double-backward"
        assert abs(v["trace"] - r["trace"]) <= 1e-3 * abs(r["trace"])  # the same samples, (k, v["trace"], r["trace"])


def per_layer_traces(hvp: str) -> dict:
    ir = run(net_ir(), f"hawq(budget_kb=2.5,estimator=layer,hvp={hvp},min_samples=4,max_samples=4,tol=10)")
    layers = ir.meta["qc"]["hawq"]["layers"]
    assert all(e["samples"] == 4 and e["method"] == hvp for e in layers.values())
    return {k: e["trace"] for k, e in layers.items()}


def test_per_layer_estimator_gives_positive_traces_by_both_methods():
    """estimator=layer: one product per layer with the others held fixed; at the float weights H
    is the Gauss-Newton matrix of the KL loss, so every layer's trace is positive; double
    backward and finite differences agree on the same samples (to 2%: ReLU kinks inside eps)."""
    a, b = per_layer_traces("double-backward"), per_layer_traces("finite-difference")
    assert all(v > 0 for v in a.values())
    assert all(abs(a[k] - b[k]) <= 2e-2 * a[k] for k in a), (a, b)


def test_milp_equals_brute_force():
    """The integer program's optimum equals exhaustive search on random 5-layer x 3-width cases,
    at budgets across the feasible range; below the smallest cost it finds nothing."""
    rng = np.random.default_rng(0)
    for _ in range(4):
        sens = rng.random((5, 3)) ** 3
        cost = np.sort(rng.random((5, 3)) * 10, axis=1)
        for budget in np.linspace(hawq_alloc.min_cost(cost), hawq_alloc.max_cost(cost), 7):
            best = min((hawq_alloc.evaluate(ix, sens, cost) for ix in itertools.product(range(3), repeat=5)
                        if hawq_alloc.evaluate(ix, sens, cost).cost <= budget + 1e-9), key=lambda c: c.sensitivity)
            got = hawq_alloc.solve(sens, cost, float(budget))
            assert got.cost <= budget * (1 + 1e-9)
            assert got.sensitivity == pytest.approx(best.sensitivity, rel=1e-9, abs=1e-12)
        assert hawq_alloc.solve(sens, cost, hawq_alloc.min_cost(cost) * 0.99) is None
        front = hawq_alloc.frontier(sens, cost, 12)
        assert all(a.cost < b.cost and a.sensitivity > b.sensitivity for a, b in zip(front, front[1:]))


def test_budget_met_and_widths_written():
    """The chosen widths fit budget_kb, sit on every layer as w_bits, fake-quant uses them, the
    pass result lists the frontier, and a_bits is written only with acts=true."""
    ir = run(net_ir(), "hawq(budget_kb=2.5,bits=2;4;8,max_samples=30),fake-quant(a=8)")
    h = ir.meta["qc"]["hawq"]
    assert h["size_kb"] <= 2.5 and h["cost"] == pytest.approx(h["size_kb"])
    layers = [n for n in ir.graph.nodes if op_name(n) in ("aten.linear", "aten.conv2d")]
    assert len(set(h["bits"].values())) > 1  # a real mix, not one width everywhere
    for n in layers:
        assert n.meta["qc"]["w_bits"] == h["bits"][n.name] and n.meta["qc"]["a_bits"] == 8
        assert n.args[1].meta["qc"]["bits"] == h["bits"][n.name]  # fake-quant honoured it
    sizes = [sum(hawq_cost.size_bytes(l, b, 0) for l, b in zip(hawq_cost.find_layers(net_ir()), bits)) / 1024
             for bits in itertools.product((2, 4, 8), repeat=3)]
    assert h["size_kb"] >= min(sizes) and len(h["frontier"]) >= 2
    for e in h["layers"].values():
        assert e["std_error"] > 0 and e["samples"] >= 8 and e["method"] == "double-backward"
    acts = run(net_ir(), "hawq(budget_bops=20000000,acts=true,max_samples=16)")
    for n in acts.graph.nodes:
        if op_name(n) in ("aten.linear", "aten.conv2d"):
            assert n.meta["qc"]["a_bits"] == n.meta["qc"]["w_bits"]
    assert acts.meta["qc"]["hawq"]["cost"] <= 2e7


@pytest.mark.filterwarnings("ignore:hawq")
def test_layers_reading_one_tensor_share_a_width_with_acts():
    """With acts=true, linears reading the same tensor (one activation quantizer, like q/k/v)
    get one width."""
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.q.weight.data *= 0.01  # q and v: tiny quantization errors, k: a large one
            self.v.weight.data *= 0.01

        def forward(self, x):
            return self.q(x) + self.k(x) + self.v(x)

    torch.manual_seed(0)
    ir0 = trace(QKV().eval(), (torch.randn(2, 16),))
    widths = {}
    for acts in ("false", "true"):
        ir = run(copy_ir(ir0), f"hawq(budget_kb=0.6,acts={acts},max_samples=16)", calib_batches((8, 16)))
        widths[acts] = [n.meta["qc"]["w_bits"] for n in ir.graph.nodes if op_name(n) == "aten.linear"]
    assert len(set(widths["false"])) > 1  # alone, k would get more bits than q and v
    assert len(set(widths["true"])) == 1
    assert {n.meta["qc"]["a_bits"] for n in ir.graph.nodes if op_name(n) == "aten.linear"} == set(widths["true"])


@pytest.mark.filterwarnings("ignore:hawq")
def test_mixed_widths_compile_and_equal_the_ir_on_host_and_arm():
    """hawq's widths through qc.compile: the report states them, the size and the frontier; a model
    with 2-, 4- and 8-bit layers equals art.ir bit for bit on host and under qemu on arm."""
    from qcompiler.backends import arm
    from qcompiler.backends.targets import get_backend

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 1, 6, 6)
    calib = calib_batches((8, 1, 6, 6))
    art = qc.compile(model, x, calib=calib, pipeline="hawq(budget_kb=2.5,max_samples=16),fake-quant(a=8),calibrate,convert")
    text = str(art.report())
    assert "hawq: budget_kb" in text and "KiB" in text and "frontier of" in text
    assert_matches_ir(art, x)
    ir = trace(model, (x,))
    for n, b in zip([n for n in ir.graph.nodes if op_name(n) in ("aten.linear", "aten.conv2d")], (2, 4, 8)):
        n.meta.setdefault("qc", {})["w_bits"] = b
    run(ir, "fake-quant(a=8),calibrate,convert", calib)
    assert [n.meta["qc"]["w_bits"] for n in ir.graph.nodes if "kind" in n.meta.get("qc", {})] == [2, 4, 8]
    host = get_backend("host")
    lib = host.build(copy_ir(ir), (x,), "host")
    assert torch.equal(host.runner(lib)(x)[0], ir(x))
    if arm.toolchain_available() is None:
        assert torch.equal(arm.run(arm.build(copy_ir(ir), (x,)), (x,))[0], ir(x))


def test_latency_costs_are_measured_once_and_cached(tmp_path, monkeypatch):
    """budget_latency on host times each (layer, width) once, stores the table in the tuning
    database folder, and a second run reads it without building anything."""
    from qcompiler.backends import layer_costs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    ir0 = trace(model, (torch.randn(2, 16),))
    text = "hawq(budget_latency=1000,bits=4;8,max_samples=8,skip=linear_1)"
    ir = run(copy_ir(ir0), text, calib_batches((8, 16)))
    h = ir.meta["qc"]["hawq"]
    assert h["budget"]["unit"] == "ms" and all(v > 0 for e in h["layers"].values() for v in e["cost"].values())
    table = json.loads(layer_costs.cache_path("host").read_text())
    assert len(table) == 2 and str(layer_costs.cache_path("host")).startswith(str(tmp_path / "qcompiler" / "tuning"))
    monkeypatch.setattr(layer_costs, "measure", lambda *a, **k: pytest.fail("measured again"))
    again = run(copy_ir(ir0), text, calib_batches((8, 16)))
    assert again.meta["qc"]["hawq"]["layers"]["linear"]["cost"] == h["layers"]["linear"]["cost"]
    # an entry measured on other kernels (an older revision) is not trusted: measured again
    stale = {k: {**v, "kernels": layer_costs.KERNELS - 1, "value": 99.0} for k, v in table.items()}
    layer_costs.cache_path("host").write_text(json.dumps(stale))
    monkeypatch.setattr(layer_costs, "measure", lambda *a, **k: 0.5)
    fresh = run(copy_ir(ir0), text, calib_batches((8, 16)))
    assert set(fresh.meta["qc"]["hawq"]["layers"]["linear"]["cost"].values()) == {0.5}
    stored = json.loads(layer_costs.cache_path("host").read_text())
    assert {v["kernels"] for v in stored.values()} == {layer_costs.KERNELS}


def test_infeasible_budget_names_the_smallest():
    """A budget below every layer at its cheapest width fails with the smallest achievable one."""
    with pytest.raises(PassError, match=r"infeasible: the smallest achievable is 1\.\d+ KiB") as e:
        run(net_ir(), "hawq(budget_kb=0.5)")
    assert isinstance(e.value.__cause__, BudgetError)


def test_unconverged_trace_warns_names_layers_and_proceeds():
    """Too few samples for the tolerance: a warning names the layers and the fallback (the mean
    so far), and the widths are still chosen."""
    with pytest.warns(UserWarning, match=r"did not reach tol=1e-06.*conv2d.*using the mean of those 3 samples"):
        ir = run(net_ir(), "hawq(budget_kb=2.5,tol=0.000001,min_samples=2,max_samples=3)")
    assert all(not e["converged"] and e["samples"] == 3 for e in ir.meta["qc"]["hawq"]["layers"].values())
    assert ir.meta["qc"]["hawq"]["size_kb"] <= 2.5


@pytest.mark.parametrize("text, error, match", [
    ("hawq", QuantSpecError, "needs a budget"),
    ("hawq(budget_kb=4,budget_bops=100)", QuantSpecError, "one budget, got budget_kb and budget_bops"),
    ("hawq(budget_kb=4,bits=2;4;4)", QuantSpecError, "repeats a width"),
    ("hawq(budget_kb=4,bits=2;9)", QuantSpecError, "bit widths go from 2 to 8"),
    ("hawq(budget_kb=4,bits=)", QuantSpecError, "bits= is empty"),
    ("hawq(budget_kb=-1)", QuantSpecError, "must be positive"),
    ("hawq(budget_kb=4,max_samples=1)", QuantSpecError, "min_samples <= max_samples"),
    ("hawq(budget=4)", PipelineError, "Options: budget_kb: float"),
])
def test_bad_options(text, error, match):
    """No budget, two budgets, a bad bits list or sample counts: refused with what would work."""
    with pytest.raises(error, match=match):
        PassManager.parse(text)


def test_bad_placement_and_target():
    """hawq after fake-quant, and a latency budget on a target without measured costs, fail."""
    with pytest.raises(PassError, match="runs before fake-quant"):
        run(net_ir(), "fake-quant,hawq(budget_kb=4)")
    with pytest.raises(PassError, match="measured on the host .* and arm"):
        run(net_ir(), "hawq(budget_latency=4,target=cortex-m4)")
    assert str(PassManager.parse("hawq(budget_kb=40,bits=2;4;8)")) == "hawq(budget_kb=40.0)"
    assert isinstance(BudgetError("x"), QuantSpecError) and issubclass(LoweringError, qc.QCompilerError)
