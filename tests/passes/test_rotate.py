"""rotate: golden IR, the float function kept for every kind and norm, lower low-bit error,
and refusals (post-norm, no norm, sizes without a Hadamard matrix, a failed float check)."""

import pytest
import torch
from torch import nn

import qcompiler as qc
from qcompiler.errors import CalibrationError, TransformError
from qcompiler.ir import add_constant, copy_ir, get_attr_tensor, op_name
from qcompiler.passes.stats import check_equivalent
from tests.passes.tiny_llm import PostNormBlock, TinyLM, calib_ids, ids, traced
from tests.test_ir import golden


@pytest.fixture(scope="module")
def rms_ir():
    return traced("rms")


@pytest.fixture(scope="module")
def ln_ir():
    return traced("ln")


def _run(ir0, text, calib=True):
    ir = copy_ir(ir0)
    qc.PassManager.parse(text).run(ir, qc.PassContext(calib=calib_ids() if calib else None))
    return ir


def test_golden_ir():
    """Residual, head, key and online rotations on a 1-layer model: the IR text is stable."""
    m = TinyLM(d=8, heads=2, kv_heads=1, hidden=16, layers=1).eval()
    ir = _run(qc.trace(m, (ids(),)), "rotate(heads=true,keys=true,online=*.down_proj)")
    assert sum(op_name(n) == "qc.hadamard" for n in ir.graph.nodes) == 3
    golden("tiny_llm_rotated.txt", qc.print_ir(ir))


@pytest.mark.parametrize("kind,which", [("hadamard", "rms"), ("random", "rms"), ("klt", "rms"),
                                        ("klt-hadamard", "rms"), ("hadamard", "ln")])
def test_every_kind_keeps_the_function(kind, which, rms_ir, ln_ir):
    """Folded R1 (RMSNorm, and LayerNorm via centering) with R2/R3/online: same logits."""
    m, ir0 = rms_ir if which == "rms" else ln_ir
    ir = _run(ir0, f"rotate(kind={kind},heads=true,keys=true,online=*.down_proj;*.o_proj)")
    x = ids(3, 16, seed=5)
    ref = m(x)
    assert (ir(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert not any(op_name(n) in ("aten.layer_norm",) for n in ir.graph.nodes)


def _w4a4_kl(ir0, m, pre):
    fq = "fake-quant(w=4,a=4,granularity=group,group=16,a_granularity=token,a_symmetric=true,ops=linear,kv=4)"
    ir = _run(ir0, ",".join(pre + [fq]))
    x = ids(4, 16, seed=9)
    with torch.no_grad():
            return float(torch.nn.functional.kl_div(ir(x).log_softmax(-1), m(x).log_softmax(-1), log_target=True,
                                                reduction="batchmean"))


def test_rotation_lowers_w4a4_error(rms_ir):
    """With outlier channels, W4A4KV4 logits are much closer to float after rotating."""
    m, ir0 = rms_ir
    plain = _w4a4_kl(ir0, m, [])
    rotated = _w4a4_kl(ir0, m, ["rotate(heads=true,keys=true,online=*.down_proj)"])
    assert rotated < plain / 3


def test_post_norm_block_is_refused():
    """A BERT-like post-LayerNorm block: the stream reaches the output, refused with the node."""
    ir = qc.trace(PostNormBlock().eval(), (torch.randn(2, 16, 48),))
    with pytest.raises(qc.PassError, match="cannot prove the rotation keeps the function at node"):
        qc.PassManager.parse("rotate").run(ir, qc.PassContext())


def test_no_norm_is_refused_and_online_works_instead():
    """An MLP has no norm: residual rotation refuses; online rotations of its linears work."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    ir = qc.trace(mlp, (torch.randn(2, 16),))
    with pytest.raises(qc.PassError, match="found no RMSNorm or LayerNorm"):
        qc.PassManager.parse("rotate").run(copy_ir(ir), qc.PassContext())
    out = _run(ir, "rotate(residual=false,online=*)", calib=False)
    x = torch.randn(5, 16)
    assert torch.allclose(out(x), mlp(x), atol=1e-5)


def test_size_without_hadamard_matrix_is_refused():
    """Online rotation of a 10-input linear: no Hadamard matrix of order 10, said so."""
    ir = qc.trace(nn.Linear(10, 4).eval(), (torch.randn(2, 10),))
    with pytest.raises(qc.PassError, match="no Hadamard matrix of order 10"):
        qc.PassManager.parse("rotate(residual=false,online=*)").run(ir, qc.PassContext())


def test_klt_needs_calibration_data(rms_ir):
    """kind=klt without calibration batches says what to pass."""
    with pytest.raises(qc.PassError, match="needs calibration batches") as e:
        _run(rms_ir[1], "rotate(kind=klt)", calib=False)
    assert isinstance(e.value.__cause__, CalibrationError)


def test_float_check_reports_error_and_node(rms_ir):
    """A changed graph fails the float check loudly, with the max error and the first node."""
    m, ir0 = rms_ir
    bad = copy_ir(ir0)
    lin = next(n for n in bad.graph.nodes if op_name(n) == "aten.linear")
    zero = add_constant(bad, "zeroed", torch.zeros_like(get_attr_tensor(bad, lin.args[1])), lin)
    lin.update_arg(1, zero)
    bad.recompile()
    with pytest.raises(TransformError, match=rf"max error .* first node whose value differs: {lin.name}"):
        check_equivalent(ir0, bad, (ids(),), 1e-3, "test")


def _a4_error(x, pipeline):
    """Output MSE of a 48-input linear under `pipeline` + 8-bit weights / 4-bit per-token inputs."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 8).eval()
    ir = qc.trace(lin, (x[:2],))
    fq = "fake-quant(w=8,a=4,ops=linear,a_granularity=token,a_symmetric=true)"
    qc.PassManager.parse(",".join(p for p in (pipeline, fq) if p)).run(ir, qc.PassContext(calib=[x[:4]]))
    with torch.no_grad():
        return ir, float((ir(x) - lin(x)).pow(2).mean()), lin


def test_online_signs_randomize_the_hadamard():
    """online_signs=true: inputs with a shared positive mean (as GELU outputs have) are
    multiplied by a +-1 constant before qc.hadamard, the float function is kept, and the
    4-bit per-token error drops well below the plain Hadamard's (which maps the mean onto
    one large coordinate that sets every row's step)."""
    x = 1.0 + torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    plain_ir, plain, lin = _a4_error(x, "rotate(residual=false,online=*)")
    signed_ir, signed, _ = _a4_error(x, "rotate(residual=false,online=*,online_signs=true)")
    def sign_muls(ir):
        return [n for n in ir.graph.nodes if op_name(n) == "aten.mul.Tensor" and any(op_name(u) == "qc.hadamard" for u in n.users)]
    muls = sign_muls(signed_ir)
    assert len(muls) == 1 and not sign_muls(plain_ir)
    d = get_attr_tensor(signed_ir, muls[0].args[1])
    assert set(d.tolist()) == {-1.0, 1.0}
    assert signed < 0.5 * plain
    rotated = _run(qc.trace(lin, (x[:2],)), "rotate(residual=false,online=*,online_signs=true)", calib=False)
    assert torch.allclose(rotated(x), lin(x), atol=1e-5)


def test_online_signs_host_code_is_bit_exact():
    """A randomized online rotation compiles: the quantize / linear_int outputs of the host
    code equal the IR's integer reference bit for bit, node by node."""
    from qcompiler.backends.verify import verify_nodes

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 8)).eval()
    x = torch.randn(4, 16)
    art = qc.compile(mlp, (x,), calib=[torch.randn(8, 16)], pipeline=(
        "rotate(residual=false,online=*,online_signs=true),"
        "fake-quant(w=8,a=4,a_symmetric=true,ops=linear,a_granularity=token),calibrate(token_clip=true),convert"))
    assert sum(op_name(n) == "qc.linear_int" for n in art.ir.graph.nodes) == 2
    exact = [c for c in verify_nodes(art.ir, (x,)) if c.dtype in ("int8", "int32")]
    assert len(exact) >= 4 and all(c.ok for c in exact), exact
    ref = art.ir(x)
    assert torch.allclose(art(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_online_signs_without_online_layers_is_refused():
    """online_signs=true with no online=... has nothing to randomize: refused at parse time."""
    with pytest.raises(qc.QuantSpecError, match=r"online_signs=true\) randomizes .* online=\*.down_proj"):
        qc.PassManager.parse("rotate(online_signs=true)")
