"""qat: training recovers low-bit accuracy, the integer model computes what was trained, and
each training feature (LSQ+, distillation, EdgeQAT, Teacher Intervention, low-rank adapters,
data-free) does what it says."""

import re

import pytest
import torch

import qcompiler as qc
from qcompiler import zoo
from qcompiler.ir import add_constant, copy_ir, get_attr_tensor, op_name
from qcompiler.serialize import ir_from_json, ir_to_json
from qcompiler.passes.qat_graph import attention_qk, attentions, float_teacher, qk_entropy, view, without_quantizers
from qcompiler.passes.qat_lora import make_adapters, merge
from qcompiler.passes.qat_params import QuantParams, fake_quants


def _quantized(model, example, recipe, calib, verify=False):
    ir = qc.trace(model, (example,))
    qc.PassManager.parse(f"{recipe},calibrate").run(ir, qc.PassContext(calib=calib, verify=verify))
    return ir


def _qat(ir, options, verify=False, **ctx):
    c = qc.PassContext(verify=verify, **ctx)
    qc.PassManager.parse(f"qat({options})").run(ir, c)
    return c.results[-1][1]


@pytest.fixture(scope="module")
def digits(digits_data):
    x, y, xt, yt = digits_data
    return x, y, xt, yt, list(x[:256].split(64)), list(zip(x.split(64), y.split(64)))


def test_qat_recovers_w2a4_and_the_integer_model_agrees(digits_cnn, digits):
    """W2A4 digits CNN: QAT (task loss) closes more than half of PTQ's accuracy loss, and the
    converted integer IR gives the trained fake-quant IR's predictions (relative error < 1e-5)."""
    x, y, xt, yt, calib, train = digits
    float_acc = zoo.accuracy(digits_cnn, xt, yt)
    before = {k: v.clone() for k, v in digits_cnn.state_dict().items()}
    ir = _quantized(digits_cnn, x[:2], "fake-quant(w=2,a=4)", calib)
    ptq = zoo.accuracy(ir, xt, yt)
    res = _qat(ir, "steps=30,lr=1e-3,loss=task", verify=True, calib=calib, train=train)  # the IR stays well formed
    qat = zoo.accuracy(ir, xt, yt)
    assert all(torch.equal(v, before[k]) for k, v in digits_cnn.state_dict().items())  # the IR trained a copy
    assert float_acc - qat < 0.5 * (float_acc - ptq), (float_acc, ptq, qat)
    assert res.details["losses"][-1] < res.details["losses"][0]
    integer = copy_ir(ir)
    qc.PassManager.parse("convert").run(integer, qc.PassContext())
    assert any(op_name(n) == "qc.conv2d_int" for n in integer.graph.nodes)
    with torch.no_grad():
        a, b = ir(xt), integer(xt)
    assert float((a - b).norm() / a.norm()) < 1e-5
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.99


def test_learned_scales_and_offsets_are_what_convert_reads(digits_mlp, digits):
    """LSQ+ moves the activation scales and zero points (the latter stay integers on the grid),
    the IR keeps them as buffers, and convert's quantize nodes read exactly those values."""
    x, y, xt, yt, calib, train = digits
    ir = _quantized(digits_mlp, x[:2].flatten(1), "fake-quant(w=3,a=3)", [c.flatten(1) for c in calib])
    acts = fake_quants(ir, "act")
    before = {n.name: (float(get_attr_tensor(ir, n.args[1])), float(get_attr_tensor(ir, n.args[2]))) for n in acts}
    text_before = qc.print_ir(ir)
    _qat(ir, "steps=40,lr=1e-3,lr_quant=1e-2,loss=task", train=[(a.flatten(1), b) for a, b in train])
    after = {n.name: (float(get_attr_tensor(ir, n.args[1])), float(get_attr_tensor(ir, n.args[2]))) for n in acts}
    assert all(after[k][0] != before[k][0] for k in before)
    assert all(z == round(z) and -4 <= z <= 3 for _, z in after.values())
    assert not list(ir.parameters()) or not any(p.requires_grad for p in ir.parameters() if p.dim() == 0)
    assert {name for name, _ in ir.named_buffers()} >= {n.args[1].target for n in acts}
    strip = lambda t: re.sub(r"  \{.*\}", "", t)  # noqa: E731  (structure unchanged, meta aside)
    assert strip(qc.print_ir(ir)) == strip(text_before)
    assert all(n.meta["qc"]["learned"] == "lsq+" for n in acts)
    integer = copy_ir(ir)
    qc.PassManager.parse("convert").run(integer, qc.PassContext())
    first_q = next(n for n in integer.graph.nodes if op_name(n) == "qc.quantize")
    s, z = float(get_attr_tensor(integer, first_q.args[1])), float(get_attr_tensor(integer, first_q.args[2]))
    assert (s, z) == after[acts[0].name]


def test_distillation_with_intermediates(digits_mlp, digits):
    """loss=distill on the calibration data alone (no labels): the logits KL and the chosen
    intermediate's feature loss both enter the loss, and the loss falls."""
    x, y, xt, yt, calib, _ = digits
    flat = [c.flatten(1) for c in calib]
    ir = _quantized(digits_mlp, x[:2].flatten(1), "fake-quant(w=2,a=4)", flat)
    ptq = zoo.accuracy(ir, xt.flatten(1), yt)
    res = _qat(ir, "steps=60,lr=1e-3,distill_nodes=linear_1", calib=flat)
    assert set(res.details["last_parts"]) == {"distill", "features"}
    losses = res.details["losses"]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert zoo.accuracy(ir, xt.flatten(1), yt) > ptq


def test_a_given_teacher_is_traced_and_matches_the_default(digits_mlp, digits):
    """PassContext(teacher=the float model) is traced and distilled from, intermediates
    included, exactly as the default teacher (the IR with its quantizers bypassed) is."""
    x, _, _, _, calib, _ = digits
    flat = [c.flatten(1) for c in calib]
    runs = []
    for teacher in (None, digits_mlp):
        ir = _quantized(digits_mlp, x[:2].flatten(1), "fake-quant(w=3,a=4)", flat)
        runs.append(_qat(ir, "steps=6,lr=1e-3,distill_nodes=linear_1", calib=flat, teacher=teacher).details["losses"])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_after_gptq_the_default_teacher_reads_the_float_weights(digits_mlp, digits):
    """gptq replaces each weight by its rounded copy; the default teacher still computes the
    float model (the weights gptq kept), distills exactly as the traced float model does, and
    convert drops the kept float weights."""
    x, _, _, _, calib, _ = digits
    flat = [c.flatten(1) for c in calib]
    runs = []
    for teacher in (None, digits_mlp):
        ir = _quantized(digits_mlp, x[:2].flatten(1), "fake-quant(w=3,a=4),gptq", flat)
        kept = {n.meta["qc"]["float_weight"] for n in fake_quants(ir, "weight")}
        assert len(kept) == 3 and all(k in dict(ir.named_buffers()) | dict(ir.named_parameters()) for k in kept)
        if teacher is None:
            with torch.no_grad():
                xs = x[:64].flatten(1)
                assert torch.allclose(float_teacher(ir)(xs), digits_mlp(xs), atol=1e-5)
                bypassed = copy_ir(ir)  # what the teacher was before: the rounded weights, quantizers bypassed
                for n in fake_quants(bypassed):
                    n.replace_all_uses_with(n.args[0])
                    bypassed.graph.erase_node(n)
                bypassed.recompile()
                assert (bypassed(xs) - digits_mlp(xs)).abs().max() > 1e-2
                weights = frozenset(n.name for n in fake_quants(ir, "weight"))
                assert torch.allclose(without_quantizers(ir, weights)(xs), bypassed(xs), atol=1e-6)
                acts_only = without_quantizers(ir, frozenset(n.name for n in fake_quants(ir)) - weights)
                linears = [n for n in acts_only.graph.nodes if op_name(n) == "aten.linear"]
                assert {n.args[1].target for n in linears} == kept  # the float weights, not the rounded ones
                err_acts, err_all = (((f(xs) - digits_mlp(xs)) ** 2).mean() for f in (acts_only, ir))
                assert 1e-8 < err_acts < err_all
                stored = ir_from_json(*ir_to_json(ir))  # the kept weights survive saving the IR
                (out,) = float_teacher(stored)(xs)  # a stored IR returns its flat outputs
                assert torch.allclose(out, digits_mlp(xs), atol=1e-5)
        runs.append(_qat(ir, "steps=6,lr=1e-3", calib=flat, teacher=teacher).details["losses"])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    qc.PassManager.parse("convert").run(ir, qc.PassContext(verify=False))
    names = set(dict(ir.named_buffers())) | set(dict(ir.named_parameters()))
    assert not kept & names


def test_edgeqat_finds_queries_and_keys_and_trains():
    """On a transformer block the q@k^T matmul's two quantizers are found (not att@v's), and
    loss=edgeqat trains with the entropy and distribution terms on them."""
    torch.manual_seed(0)
    block = zoo.TransformerBlock(d=32, heads=2, ffn=64).eval()
    calib = [torch.randn(4, 6, 32) for _ in range(3)]
    ir = _quantized(block, calib[0][:2], "fake-quant(w=4,a=4)", calib)
    pairs = attention_qk(ir)
    assert len(pairs) == 1
    q, k = pairs[0]
    matmul = next(iter(q.users))
    assert k in matmul.args and any(op_name(u) == "aten.div.Tensor" for u in matmul.users)
    res = _qat(ir, "steps=20,lr=1e-4,loss=edgeqat,output_loss=mse", calib=calib)
    assert set(res.details["last_parts"]) == {"distill", "entropy", "distribution"}
    assert res.details["qk_quantizers"] == [q.name, k.name]


def test_edgeqat_entropy_acts_on_the_codes_of_quantized_operands_only():
    """With a quantized KV cache and float queries, the EdgeQAT terms act on the keys alone. The
    entropy term reads the integer codes (x/s + z, what `qk_entropy` reports), so on a run-time
    grid it does not change when the keys are scaled, and a learned static step gets no
    gradient from it."""
    from qcompiler.passes.qat_losses import code_grids, entropy_loss

    torch.manual_seed(0)
    block = zoo.TransformerBlock(d=32, heads=2, ffn=64).eval()
    calib = [torch.randn(4, 6, 32) for _ in range(3)]
    ir = _quantized(block, calib[0][:2], "fake-quant(w=4,a=8,ops=linear,a_granularity=token,kv=4)", calib)
    (q, k), = attention_qk(ir)
    assert op_name(q) != "qc.fake_quant" and op_name(k) == "qc.fake_quant"
    grid, = code_grids([k])
    assert not grid.static
    x = calib[0]
    with torch.no_grad():
        _, kq, *vals = view(ir, [k.name, *grid.names], what="probe")(x)
    codes = grid.codes(dict(zip(grid.names, vals)))
    assert torch.allclose(torch.round(codes) * vals[1] - vals[1] * vals[2], kq, atol=1e-5)  # what the fake-quant gives
    assert k.args[3] <= codes.min() and codes.max() <= k.args[4]
    from_output = torch.round(kq / vals[1] + vals[2]).flatten().long()  # qk_entropy reports these codes' entropy
    p = torch.bincount(from_output - k.args[3]).double()
    p = p[p > 0] / p.sum()
    assert qk_entropy(ir, [(x,)]) == {k.name: pytest.approx(float(-(p * p.log2()).sum()), abs=1e-6)}
    # the run-time grid follows the keys: scaling k_proj's output leaves the codes and the loss as they are
    k_in = k.args[0]
    scaled = copy_ir(ir)
    node = next(n for n in scaled.graph.nodes if n.name == k_in.name)
    with scaled.graph.inserting_after(node):
        big = scaled.graph.call_function(torch.ops.aten.mul.Tensor, (node, 10.0))
    node.replace_all_uses_with(big, delete_user_cb=lambda u: u is not big)
    scaled.recompile()
    with torch.no_grad():
        _, kq10, *vals10 = view(scaled, [k.name, big.name, *grid.names[1:]], what="probe")(x)
    assert torch.allclose(kq10, 10 * kq, rtol=1e-4, atol=1e-5)
    loss = entropy_loss([codes])
    assert float(entropy_loss([grid.codes(dict(zip(grid.names, vals10)))])) == pytest.approx(float(loss), abs=1e-4)
    assert float(entropy_loss([kq10])) != pytest.approx(float(entropy_loss([kq])), abs=0.5)  # var(x) would move
    res = _qat(ir, "steps=4,lr=1e-4,loss=edgeqat,output_loss=mse", calib=calib)
    assert res.details["qk_quantizers"] == [k.name]
    assert set(res.details["last_parts"]) == {"distill", "entropy", "distribution"}
    # a learned static step is held out of the entropy term
    static = _quantized(block, calib[0][:2], "fake-quant(w=4,a=4)", calib)
    (sq, _), = attention_qk(static)
    sgrid, = code_grids([sq])
    assert sgrid.static
    scale = get_attr_tensor(static, sq.args[1]).clone().requires_grad_(True)  # as LSQ trains it
    zero = get_attr_tensor(static, sq.args[2])
    xs = view(static, [sq.args[0].name], what="probe")(x)[1].detach().requires_grad_(True)
    entropy_loss([sgrid.codes(dict(zip(sgrid.names, (xs, scale, zero))))]).backward()
    assert scale.grad is None and float(xs.grad.abs().sum()) > 0


def test_attention_loss_is_the_kl_of_the_maps_rows():
    """attention_loss is KL(t || s) per row of the attention probabilities, averaged over rows
    and maps; causally masked positions (0 in both) add nothing, and it is 0 for equal maps."""
    from qcompiler.passes.qat_losses import attention_loss

    g = torch.Generator().manual_seed(0)
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1)
    t = torch.softmax(torch.randn(2, 3, 5, 5, generator=g) + mask, -1)
    s = torch.softmax(torch.randn(2, 3, 5, 5, generator=g) + mask, -1)
    keep = mask == 0
    rows = [(t[b, h, i][keep[i]] * (t[b, h, i][keep[i]] / s[b, h, i][keep[i]]).log()).sum()
            for b in range(2) for h in range(3) for i in range(5)]
    assert float(attention_loss([s], [t])) == pytest.approx(float(torch.stack(rows).mean()), rel=1e-5)
    assert float(attention_loss([t, s], [t, t])) == pytest.approx(float(torch.stack(rows).mean()) / 2, rel=1e-5)
    assert float(attention_loss([t], [t])) == pytest.approx(0.0, abs=1e-6)


def test_attention_weight_distills_the_attention_maps():
    """attention_weight>0 finds the block's attention softmax, trains with the attention-map term,
    and brings the quantized block's attention probabilities closer to the float ones."""
    from qcompiler.passes.qat_losses import attention_loss

    torch.manual_seed(0)
    block = zoo.TransformerBlock(d=32, heads=2, ffn=64).eval()
    calib = [torch.randn(4, 6, 32) for _ in range(4)]
    ir = _quantized(block, calib[0][:2], "fake-quant(w=3,a=4)", calib)
    (sm, _, _), = attentions(ir)
    maps = view(float_teacher(ir), [sm.name], what="teacher")

    def kl():
        with torch.no_grad():
            return float(sum(attention_loss([view(ir, [sm.name], what="probe")(x)[1]], [maps(x)[1]]) for x in calib))

    before = kl()
    res = _qat(ir, "steps=60,lr=1e-3,lr_quant=1e-3,loss=distill,output_loss=mse,attention_weight=10", calib=calib)
    assert res.details["attention_maps"] == [sm.name] and "attention" in res.details["last_parts"]
    assert kl() < 0.7 * before, (before, kl())
    with pytest.raises(qc.PassError, match="has no attention"):
        _qat(_quantized(torch.nn.Linear(8, 4), torch.randn(2, 8), "fake-quant(w=4,a=8)", [torch.randn(4, 8)]),
             "steps=2,attention_weight=1", calib=[torch.randn(4, 8)])


def test_teacher_intervention_feeds_teacher_values_then_withdraws(digits_mlp, digits):
    """The intervention view computes the student with the teacher's value at the node; a run
    with intervene trains phase 1 with the intervention loss and ends in the plain student."""
    x, _, xt, yt, calib, _ = digits
    flat = [c.flatten(1) for c in calib]
    ir = _quantized(digits_mlp, x[:2].flatten(1), "fake-quant(w=2,a=4)", flat)
    teacher = float_teacher(ir)
    t_relu = view(teacher, ["relu"], what="teacher")(flat[0])[1]
    out, own = view(ir, ["relu"], ["relu"])(flat[0], t_relu)
    by_hand = copy_ir(ir)  # the student with the teacher's value stored in place of relu's
    node = next(n for n in by_hand.graph.nodes if n.name == "relu")
    node.replace_all_uses_with(add_constant(by_hand, "t_relu", t_relu, node))
    by_hand.recompile()
    assert torch.equal(out, view(by_hand)(flat[0])[0])
    assert not torch.equal(own, t_relu)
    res = _qat(ir, "steps=30,lr=1e-3,intervene=relu,intervene_steps=10", calib=flat)
    assert "intervention" not in res.details["last_parts"] and len(res.details["losses"]) == 30


def test_lora_adapters_train_through_the_quantizer_and_merge_exactly(digits_mlp, digits):
    """A view with adapters equals the IR after merging them; a lora_rank run trains only the
    adapters and scales (the graph keeps no adapter node) and lowers the loss."""
    x, _, xt, yt, calib, _ = digits
    flat = [c.flatten(1) for c in calib]
    ir = _quantized(digits_mlp, x[:2].flatten(1), "fake-quant(w=3,a=8)", flat)
    qp = QuantParams(ir, "fixed", train_weights=False)
    adapters = make_adapters(qp, 4, 0.0)
    with torch.no_grad():
        for a, b, _ in adapters.values():
            b.normal_(0, 0.02)
        expected = view(ir, adapters=adapters)(flat[0])[0]
        merge(qp, adapters)
    qp.restore()
    assert torch.allclose(view(ir)(flat[0])[0], expected, atol=1e-5)
    fresh = _quantized(digits_mlp, x[:2].flatten(1), "fake-quant(w=3,a=8)", flat)
    w0 = get_attr_tensor(fresh, fake_quants(fresh, "weight")[0].args[0]).clone()
    res = _qat(fresh, "steps=40,lr=1e-2,lora_rank=4,quantizers=lsq", calib=flat)
    assert res.details["losses"][-1] < res.details["losses"][0]
    assert not torch.equal(get_attr_tensor(fresh, fake_quants(fresh, "weight")[0].args[0]), w0)
    assert "lora" not in qc.print_ir(fresh)


@pytest.mark.parametrize("data", ["synthetic", "noise"])
def test_data_free_distills_the_float_model(digits_mlp, digits, data):
    """Data-free QAT (inputs drawn from calibration statistics, or noise without any data)
    distills the float teacher: the loss falls and accuracy does not collapse."""
    x, _, xt, yt, calib, _ = digits
    flat = [c.flatten(1) for c in calib]
    ir = _quantized(digits_mlp, x[:2].flatten(1), "fake-quant(w=4,a=8)", flat)
    ptq = zoo.accuracy(ir, xt.flatten(1), yt)
    ctx = {"calib": flat} if data == "synthetic" else {}
    res = _qat(ir, f"steps=40,lr=1e-4,data={data},batch=64", **ctx)
    losses = res.details["losses"]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert zoo.accuracy(ir, xt.flatten(1), yt) > ptq - 0.05


def test_trained_model_compiles_to_the_fake_quant_outputs(digits_mlp, digits):
    """The learned-scale -> convert -> host path is exact: qc.compile runs qat inside its
    pipeline (train data in the PassContext); the artifact equals its integer IR, and equals
    the trained fake-quant IR (the same deterministic run without convert) to float rounding,
    ~1e-7 of the output's range, because qat snaps biases to the integer accumulator grid
    (without the snap the gap is ~1e-2)."""
    x, y, xt, yt, calib, train = digits
    flat, xe = [c.flatten(1) for c in calib], xt[:32].flatten(1)
    labelled = [(a.flatten(1), b) for a, b in train]
    steps = "fake-quant(w=4,a=4),calibrate,qat(steps=30,lr=1e-3,loss=task)"
    art = qc.compile(digits_mlp, (xe,), calib=flat, ctx=qc.PassContext(train=labelled), pipeline=f"{steps},convert")
    fq = qc.trace(digits_mlp, (xe,))
    qc.PassManager.parse(steps).run(fq, qc.PassContext(calib=flat, train=labelled, verify=False))
    assert any(n.meta["qc"].get("learned") == "lsq+" for n in fq.graph.nodes if "qc" in n.meta)
    got, ref = art(xe), art.ir(xe)
    with torch.no_grad():
        want = fq(xe)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), float((got - want).abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_ratios_of_run_time_quantizers_are_learned_and_deploy(symmetric):
    """With lr_clip > 0 the clip ratio of every per-token and KV-cache quantizer is trained
    (starting from fake-quant's a_clip / kv_clip) and written back in the constant form
    calibrate's clip search writes (no trained attribute left in the IR); convert and the host
    backend then compute exactly what that IR computes."""
    from qcompiler.passes.calibrate import ClipSearch

    torch.manual_seed(0)
    block = zoo.TransformerBlock(d=32, heads=2, ffn=64).eval()
    calib = [torch.randn(4, 6, 32) for _ in range(3)]
    sym = str(symmetric).lower()
    fq = f"fake-quant(w=4,a=4,a_granularity=token,a_symmetric={sym},ops=linear,kv=4,kv_symmetric={sym},a_clip=0.9,kv_clip=0.95)"
    steps = f"{fq},calibrate,qat(steps=25,lr=1e-4,lr_clip=0.02,loss=distill,output_loss=mse)"
    ctx = qc.PassContext(calib=calib, verify=False)
    ir = qc.trace(block, (calib[0][:2],))
    qc.PassManager.parse(steps).run(ir, ctx)
    learned = ctx.results[-1][1].details["clip_ratios"]
    quantizers = [n for n in ir.graph.nodes if ClipSearch.applies(n, kv=True)]
    assert len(quantizers) == len(learned) >= 6  # 4 linear inputs... and the keys and values
    assert all(0.05 <= c <= 1 for c in learned.values())
    assert sum(abs(c - (0.95 if "kv" in n.meta["qc"]["granularity"] else 0.9)) > 1e-3
               for n in quantizers for c in [learned[n.name]]) >= len(learned) // 2
    for n in quantizers:
        c = learned[n.name]
        assert n.meta["qc"]["clip"] == c
        div = n.args[1].args[0]
        if symmetric:
            assert div.args[1] == n.args[4] / c
        else:
            assert all(b.args[1] == c for b in div.args[0].args[:2])
    assert not any("clip_ratio" in name for name, _ in list(ir.named_parameters()) + list(ir.named_buffers()))
    x = torch.randn(2, 6, 32)
    art = qc.compile(block, (x,), calib=calib, pipeline=f"{steps},convert")
    with torch.no_grad():
        assert torch.allclose(art(x), art.ir(x), rtol=1e-5, atol=1e-5)
