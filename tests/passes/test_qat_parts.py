"""qat's pieces: LSQ gradients, oscillation tracking/freezing, checkpoints and resume, and
every class of bad input refused with a clear error."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import qcompiler as qc
from qcompiler.errors import TrainingError
from qcompiler.ir import get_attr_tensor
from qcompiler.ops import _expand_groups
from qcompiler.passes.qat_oscillation import Oscillation
from qcompiler.passes.qat_params import QuantParams, fake_quants


def _lsq_reference(x, s, z, qmin, qmax, group):
    """LSQ's fake quantizer written with autograd ops: round is straight-through."""
    se, ze = _expand_groups(s, x, group), _expand_groups(z, x, group)
    r = x / se
    q = torch.clamp(r + (torch.round(r) - r).detach() + ze, qmin, qmax)
    return (q - ze) * se


@pytest.mark.parametrize("x_shape,s_shape,group", [((6, 10), (), 0), ((6, 10), (6, 1), 0), ((6, 10), (6, 3), 4),
                                                    ((2, 3, 4, 4), (2, 1, 1, 1), 0)])
def test_fake_quant_gives_the_lsq_gradients(x_shape, s_shape, group):
    """With scale and zero point requiring grad, qc.fake_quant's backward equals autograd of
    the LSQ formula (per tensor, per channel, per ragged group), and its forward is unchanged."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(x_shape, generator=g) * 2).requires_grad_()
    s = (torch.rand(s_shape, generator=g) * 0.3 + 0.1).requires_grad_()
    z = torch.randint(-3, 3, s_shape, generator=g).float().requires_grad_()
    w = torch.randn(x_shape, generator=g)
    y = torch.ops.qc.fake_quant(x, s, z, -8, 7, group)
    ref = _lsq_reference(x, s, z, -8, 7, group)
    assert torch.equal(y, torch.ops.qc.fake_quant(x.detach(), s.detach(), z.detach(), -8, 7, group))
    got, want = torch.autograd.grad((y * w).sum(), (x, s, z)), torch.autograd.grad((ref * w).sum(), (x, s, z))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert got[1].abs().sum() > 0


@pytest.mark.parametrize("learn", ["x", "xs", "xsz", "sz"])
@pytest.mark.parametrize("x_shape,s_shape,group", [((6, 10), (6, 1), 0), ((6, 10), (6, 3), 4), ((5, 16), (5, 2), 8)])
def test_training_fake_quant_is_the_op_bit_for_bit(learn, x_shape, s_shape, group):
    """qat's training fake quantizer (qat_fq) gives exactly qc.fake_quant's output and exactly
    its autograd gradients, for every combination of learned input, scale and zero point."""
    from qcompiler.passes.qat_fq import fake_quant_train

    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(x_shape, generator=g) * 2
    x0[0, :3] = torch.tensor([0.5, -0.5, 1.5]) * 0.2  # halfway cases: round half to even
    s0, z0 = torch.full(s_shape, 0.2), torch.randint(-3, 3, s_shape, generator=g).float()
    w = torch.randn(x_shape, generator=g)
    outs = []
    for fn in (torch.ops.qc.fake_quant, fake_quant_train):
        x, s, z = (t.clone().requires_grad_(c in learn) for t, c in ((x0, "x"), (s0, "s"), (z0, "z")))
        y = fn(x, s, z, -8, 7, group)
        wrt = [t for t in (x, s, z) if t.requires_grad]
        outs.append((y.detach(), torch.autograd.grad((y * w).sum(), wrt)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


@pytest.mark.parametrize("size", [64, 1536, 576])
def test_hadamard_gradient_is_the_transposed_rotation(size):
    """qat trains through online rotations: qc.hadamard's gradient is d y R^T per block, R the
    orthogonal matrix of the forward (non-symmetric Paley factors 12 and 36 included)."""
    from qcompiler.hadamard import hadamard_matrix

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2 * size, dtype=torch.float64, generator=g).requires_grad_()
    dy = torch.randn(3, 2 * size, dtype=torch.float64, generator=g)
    (dx,) = torch.autograd.grad(torch.ops.qc.hadamard(x, size), x, dy)
    want = (dy.reshape(-1, size) @ hadamard_matrix(size).T).reshape(dy.shape)
    assert torch.allclose(dx, want, atol=1e-12)


def test_lsq_gradient_scaling(tiny_mlp):
    """A learned weight scale's gradient is the raw LSQ gradient times 1/sqrt(N * qmax), N the
    weights per channel; zero points of symmetric weight quantizers are not trained."""
    ir = qc.trace(tiny_mlp, (torch.randn(2, 8),))
    qc.PassManager.parse("fake-quant(w=4),calibrate").run(ir, qc.PassContext(calib=[torch.randn(8, 8)]))
    qp = QuantParams(ir, "lsq+")
    fq = fake_quants(ir, "weight")[0]
    s, w = get_attr_tensor(ir, fq.args[1]), get_attr_tensor(ir, fq.args[0]).detach()
    s_raw = s.detach().clone().requires_grad_()
    torch.ops.qc.fake_quant(w, s_raw, torch.zeros_like(s_raw), -7, 7, 0).sum().backward()
    torch.ops.qc.fake_quant(w, s, torch.zeros_like(s), -7, 7, 0).sum().backward()
    assert torch.allclose(s.grad, s_raw.grad / (w.shape[1] * 7) ** 0.5)
    assert fq.args[2].target not in qp.zero_points
    assert fake_quants(ir, "act")[0].args[2].target in qp.zero_points
    qp.restore()


def test_oscillation_tracking_and_freezing(tiny_mlp):
    """A weight flipping between two grid points is counted as oscillating, frozen once its
    frequency passes the threshold, and then held at its grid point; damping is zero on the
    grid and pulls off-grid weights towards it."""
    ir = qc.trace(tiny_mlp, (torch.randn(2, 8),))
    qc.PassManager.parse("fake-quant(w=2),calibrate").run(ir, qc.PassContext(calib=[torch.randn(8, 8)]))
    qp = QuantParams(ir, "fixed")
    osc = Oscillation(qp, bits=2, damp=1.0, freeze=0.05, momentum=0.9)
    q = osc.tracked[0]
    w, s = qp.weights[q["w"]], get_attr_tensor(ir, fq_node(ir, q).args[1]).detach()
    with torch.no_grad():
        for t in osc.tracked:  # every weight on its grid point
            qp.weights[t["w"]].copy_(osc._int(t) * osc._scale(t))
        w.copy_(torch.zeros_like(w))
    osc.update()
    assert float(osc.loss().detach()) == 0.0
    for step in range(8):  # element (0, 0) crosses the 0/1 rounding threshold back and forth
        with torch.no_grad():
            w[0, 0] = s[0, 0] * (0.6 if step % 2 == 0 else 0.4)
        osc.update()
    st = osc.state[q["w"]]
    assert st["freq"][0, 0] > 0.05 and bool(st["frozen"][0, 0]) and int(st["frozen"].sum()) == 1
    with torch.no_grad():
        w[0, 0] = s[0, 0] * 0.9
    osc.update()
    assert float(w[0, 0].detach()) == pytest.approx(float(torch.round(st["ema"][0, 0]) * s[0, 0]))
    with torch.no_grad():
        w[1, 1] = s[1, 0] * 0.3
    loss = osc.loss()
    loss.backward()
    assert loss.item() > 0 and float(w.grad[1, 1]) > 0 and float(w.grad[0, 0]) == 0  # pulled down; frozen masked
    osc.remove()
    qp.restore()


def fq_node(ir, q):
    return next(n for n in fake_quants(ir, "weight") if n.name == q["node"])


# ---------------------------------------------------------------- checkpoints and bad input


@pytest.fixture()
def mlp_setup(tiny_mlp):
    torch.manual_seed(0)
    data = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(4)]

    def fresh():
        ir = qc.trace(tiny_mlp, (torch.randn(2, 8),))
        qc.PassManager.parse("fake-quant(w=3,a=4),calibrate").run(ir, qc.PassContext(calib=[d for d, _ in data],
                                                                                     verify=False))
        return ir

    return fresh, data


def _trained(ir):
    return {k: v.clone() for k, v in list(ir.named_parameters()) + list(ir.named_buffers())}


def _interrupting_loss(at):
    """Cross-entropy that raises KeyboardInterrupt (a user's Ctrl-C) on its `at`-th call."""
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(out, target)

    return loss_fn


def test_resume_after_interruption_matches_an_uninterrupted_run(mlp_setup, tmp_path):
    """Checkpoints every 3 steps (safetensors + JSON, no temporary files left); a run
    interrupted at step 7 and started again resumes from step 6 and ends bit-identical to a
    run that was never interrupted."""
    fresh, data = mlp_setup
    opts = "steps=10,lr=1e-2,loss=task,damp=0.01,freeze=0.3,checkpoint_every=3"
    full = fresh()
    qc.PassManager.parse(f"qat({opts})").run(full, qc.PassContext(verify=False, train=data))
    ck = tmp_path / "ck"
    broken = fresh()
    with pytest.raises(KeyboardInterrupt):
        qc.PassManager.parse(f"qat({opts},checkpoint_dir={ck})").run(
            broken, qc.PassContext(verify=False, train=data, loss_fn=_interrupting_loss(at=8)))
    record = json.loads((ck / "qat-checkpoint.json").read_text())
    assert record["step"] == 6 and sorted(os.listdir(ck)) == ["qat-checkpoint.json", "qat-step0000006.safetensors"]
    resumed = fresh()
    ctx = qc.PassContext(verify=False, train=data)
    qc.PassManager.parse(f"qat({opts},checkpoint_dir={ck})").run(resumed, ctx)
    assert ctx.results[-1][1].details["start_step"] == 6
    a, b = _trained(full), _trained(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_teacher_trains_exactly_like_running_it(mlp_setup):
    """Reading the teacher's outputs back from the per-batch cache in later epochs trains
    bit for bit like running the teacher at every step (teacher_cache_mb=0)."""
    fresh, data = mlp_setup
    states = []
    for cache in (64, 0):
        ir = fresh()
        qc.PassManager.parse(f"qat(steps=10,lr=1e-2,loss=distill,teacher_cache_mb={cache})").run(
            ir, qc.PassContext(train=data, verify=False))
        states.append(_trained(ir))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_warmup_raises_the_rates_linearly_then_decays_them(mlp_setup):
    """With warmup=2 of 6 steps, every parameter group's rate goes 1/3, 2/3 of its base, then
    the cosine decay over the 4 remaining steps; the weights and the scales keep their ratio."""
    fresh, data = mlp_setup
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append({g["name"]: g["lr"] for g in opt.param_groups}))
    try:
        qc.PassManager.parse("qat(steps=6,warmup=2,lr=1e-2,lr_quant=1e-3,loss=task)").run(
            fresh(), qc.PassContext(train=data, verify=False))
    finally:
        hook.remove()
    want = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert len(seen) == 6 and {"weights", "scales"} <= set(seen[0])
    for rates, factor in zip(seen, want):
        assert rates["weights"] == pytest.approx(1e-2 * factor) and rates["scales"] == pytest.approx(1e-3 * factor)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(mlp_setup, tmp_path):
    """A loss that turns NaN at step 5 stops training with an error naming step 5 and the last
    good checkpoint (step 4); the IR is back at that checkpoint's state."""
    fresh, data = mlp_setup
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(out, target)
        return loss * float("nan") if len(calls) == 5 else loss

    ir = fresh()
    with pytest.raises(qc.PassError, match=r"the loss is nan at step 5 .*last good checkpoint is .*qat-step0000004") as e:
        qc.PassManager.parse(f"qat(steps=10,lr=1e-2,loss=task,checkpoint_every=2,checkpoint_dir={tmp_path})").run(
            ir, qc.PassContext(verify=False, train=data, loss_fn=loss_fn))
    assert isinstance(e.value.__cause__, TrainingError)
    assert json.loads((tmp_path / "qat-checkpoint.json").read_text())["step"] == 4
    stored = load_file(str(tmp_path / "qat-step0000004.safetensors"))
    w = fake_quants(ir, "weight")[0].args[0].target
    assert torch.equal(get_attr_tensor(ir, fake_quants(ir, "weight")[0].args[0]), stored[w])
    assert all(torch.isfinite(t).all() for t in _trained(ir).values())


def test_resume_from_another_models_checkpoint_is_refused(mlp_setup, tmp_path):
    """A checkpoint written for one IR is refused for an IR of another shape, naming both
    fingerprints; a damaged tensors file is refused too."""
    fresh, data = mlp_setup
    ctx = {"verify": False, "train": data}
    qc.PassManager.parse(f"qat(steps=2,loss=task,checkpoint_dir={tmp_path})").run(fresh(), qc.PassContext(**ctx))
    torch.manual_seed(1)
    other = qc.trace(qc.zoo.MLP(d_in=8, hidden=12, d_out=4).eval(), (torch.randn(2, 8),))
    qc.PassManager.parse("fake-quant(w=3,a=4),calibrate").run(other, qc.PassContext(calib=[torch.randn(8, 8)]))
    with pytest.raises(qc.PassError, match="was written for another model .*give a new checkpoint_dir"):
        qc.PassManager.parse(f"qat(steps=4,loss=task,checkpoint_dir={tmp_path})").run(other, qc.PassContext(**ctx))
    with pytest.raises(qc.PassError, match="written with other qat options"):
        qc.PassManager.parse(f"qat(steps=4,loss=task,lora_rank=2,checkpoint_dir={tmp_path})").run(
            fresh(), qc.PassContext(verify=False, train=data))
    (tmp_path / "qat-step0000002.safetensors").write_bytes(b"truncated")
    with pytest.raises(qc.PassError, match="do not match the sha256"):
        qc.PassManager.parse(f"qat(steps=4,loss=task,checkpoint_dir={tmp_path})").run(fresh(), qc.PassContext(**ctx))


@pytest.mark.parametrize("ctx,options,message", [
    ({"train": [(torch.randn(16, 9), torch.zeros(16, dtype=torch.long))]}, "loss=task",
     r"training batch 0, input 0 is torch.float32\[16, 9\]; the model was traced with torch.float32\[2, 8\]"),
    ({"train": [(torch.randn(16, 8), torch.zeros(15, dtype=torch.long))]}, "loss=task",
     "the target's batch size 15 differs from the inputs' 16"),
    ({"train": [(torch.randn(16, 8), torch.zeros(16, 3, dtype=torch.long))]}, "loss=task",
     r"integer targets \[16, 3\] do not fit the output \[16, 4\]"),
    ({"calib": [torch.randn(16, 8)]}, "loss=task", "loss=task .*needs targets"),
    ({}, "data=train", r"data=train needs PassContext\(train="),
    ({"calib": [torch.randn(16, 8)]}, "loss=edgeqat", "loss=edgeqat needs quantized attention"),
    ({"calib": [torch.randn(16, 8)]}, "lr_clip=0.01", "lr_clip=0.01 learns the clip ratios of run-time quantizers, "
     "and the IR has none"),
    ({"calib": [torch.randn(16, 8)]}, "distill_nodes=linear_9", "has no node 'linear_9' .*nodes like it: linear"),
])
def test_bad_training_input(mlp_setup, ctx, options, message):
    """Data that does not fit the IR, a loss without targets, or nodes that do not exist: each
    a TrainingError saying what is wrong and what would work."""
    fresh, _ = mlp_setup
    with pytest.raises(qc.PassError, match=message) as e:
        qc.PassManager.parse(f"qat(steps=2,{options})").run(fresh(), qc.PassContext(verify=False, **ctx))
    assert isinstance(e.value.__cause__, TrainingError)


@pytest.mark.parametrize("pipeline,message", [
    ("qat(steps=0)", "steps=0 must be positive"),
    ("qat(lora_rank=4,freeze=0.1)", "freeze acts on the weights"),
    ("qat(loss=task,data=noise)", "loss=task needs targets"),
    ("qat(intervene_steps=3)", "intervene_steps needs intervene"),
    ("qat(lr_clip=-0.1)", "lr_clip=-0.1: learning rates must be positive"),
    ("qat(steps=5,warmup=5)", "warmup=5 must be fewer than steps=5"),
    ("qat(loss=task,attention_weight=1)", "loss=task has no teacher"),
])
def test_conflicting_options(pipeline, message):
    """Options that cannot work together are refused when the pipeline is parsed."""
    with pytest.raises(qc.QuantSpecError, match=message):
        qc.PassManager.parse(pipeline)


def test_qat_before_calibrate_is_refused(tiny_mlp):
    """qat on an IR without quantizers, or with uncalibrated ones, says what to run first."""
    ir = qc.trace(tiny_mlp, (torch.randn(2, 8),))
    with pytest.raises(qc.PassError, match="run fake-quant and calibrate before qat"):
        qc.PassManager.parse("qat").run(ir, qc.PassContext(calib=[torch.randn(4, 8)]))
    with pytest.raises(qc.PassError, match="has no range yet: run calibrate before qat"):
        qc.PassManager.parse("fake-quant,qat").run(ir, qc.PassContext(calib=[torch.randn(4, 8)]))
