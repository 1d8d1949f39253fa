"""Integer and weight-only kernels with packed sub-byte weights, against the `qc` reference ops.

The kernel matrix (every kernel x weight width x granularity x activation width) is built as
one graph of `qc` ops and compiled once; its data makes every float result exact (power-of-two
scales, small integers), so all outputs, float ones included, must equal torch's bit for bit.
"""

import numpy as np
import pytest
import torch
import torch.fx
import tvm
from tvm import relax

import qcompiler as qc
from qcompiler import zoo
from qcompiler.backends import packing
from qcompiler.backends.host import HostRunner, build
from qcompiler.backends.lowering import to_relax
from qcompiler.backends.targets import get_target, tvm_target
from qcompiler.backends.weights import serialized_bytes
from qcompiler.ops import dyadic
from qcompiler.report import sqnr_db

Q = torch.ops.qc
GEN = torch.Generator().manual_seed(0)


def _ints(lo, hi, *shape, dtype=torch.int8):
    return torch.randint(lo, hi + 1, shape, generator=GEN).to(dtype)


def _pow2(*shape, lo=-2, hi=1):
    return torch.pow(2.0, _ints(lo, hi, *shape, dtype=torch.float32))


class _Graph:
    """A graph of qc ops reading its own inputs and constants, one output per op checked."""

    def __init__(self):
        self.root, self.g = torch.nn.Module(), torch.fx.Graph()
        self.inputs, self.outs, self.names = [], [], []

    def input(self, value):
        self.inputs.append(value)
        return self.g.placeholder(f"in{len(self.inputs)}")

    def const(self, value):
        name = f"c{len(list(self.root.buffers()))}"
        self.root.register_buffer(name, value)
        return self.g.get_attr(name)

    def op(self, target, args, meta=None, out: str | None = None):
        n = self.g.call_function(target, args)
        if meta:
            n.meta["qc"] = meta
        if out:
            self.outs.append(n)
            self.names.append(out)
        return n

    def module(self):
        self.g.output(tuple(self.outs))
        return torch.fx.GraphModule(self.root, self.g)


def _act(a_bits):
    """int8 activations on an a_bits grid with a zero point inside it."""
    lo, hi = -(1 << (a_bits - 1)), (1 << (a_bits - 1)) - 1
    return lo, hi, int(_ints(lo // 2, hi // 2, 1)[0])


def _requantize(gb, acc, n, axis, name, clamp):
    m, sh = dyadic(torch.rand(n, generator=GEN) * 1e-3 + 1e-4)
    zo = -10
    lo, hi = (zo, zo + 60) if clamp else (-128, 127)  # a fused ReLU6-like clamp
    return gb.op(Q.requantize.default, (acc, gb.const(m), gb.const(sh), zo, lo, hi, axis), out=name)


def _linear_cases(gb, widths=(8, 4, 2), acts=(8, 4)):
    for w_bits in widths:
        for a_bits in acts:
            lo, hi, zx = _act(a_bits)
            n, k = 24, 100  # k not a multiple of 4: the packed rows end in padding
            x = gb.input(_ints(lo, hi, 2, 3, k))
            w = gb.const(_ints(-(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1, n, k))
            b = gb.const(_ints(-2000, 2000, n, dtype=torch.int32))
            name = f"linear_w{w_bits}a{a_bits}"
            meta = {"w_bits": w_bits, "a_bits": a_bits, "source": name, "group_size": 0}
            acc = gb.op(Q.linear_int.default, (x, zx, w, b), meta, out=name)
            _requantize(gb, acc, n, -1, name + "_requant_relu", clamp=True)


def _grouped_cases(gb, widths=(8, 4, 2), acts=(8, 4)):
    for w_bits in widths:
        for group in (32, 64, 128):
            for a_bits in acts:
                lo, hi, zx = _act(a_bits)
                n, k = 16, 200  # ragged: 200 is no multiple of 32, 64 or 128
                groups = -(-k // group)
                x = gb.input(_ints(lo, hi, 3, k))
                w = gb.const(_ints(-(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1, n, k))
                name = f"grouped_w{w_bits}g{group}a{a_bits}"
                meta = {"w_bits": w_bits, "a_bits": a_bits, "source": name, "group_size": group}
                b = gb.const(_ints(-50, 50, n, dtype=torch.float32))
                args = (x, zx, 0.5, w, gb.const(_pow2(n, groups)), group, b)
                gb.op(Q.linear_int_grouped.default, args, meta, out=name)


def _conv_cases(gb, widths=(8, 4, 2), acts=(8, 4)):
    shapes = {  # C, O, kernel, stride, padding, dilation, groups
        "conv": (6, 8, 3, 1, 1, 1, 1),
        "depthwise": (8, 8, 3, 1, 1, 1, 8),
        "grouped_strided_dilated": (4, 6, 3, 2, 2, 2, 2),
    }
    for kind, (c, o, kk, s, p, d, g) in shapes.items():
        for w_bits in widths:
            for a_bits in (acts if kind != "grouped_strided_dilated" else acts[:1]):
                lo, hi, zx = _act(a_bits)
                x = gb.input(_ints(lo, hi, 2, c, 7, 7))
                w = gb.const(_ints(-(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1, o, c // g, kk, kk))
                b = gb.const(_ints(-500, 500, o, dtype=torch.int32))
                name = f"{kind}_w{w_bits}a{a_bits}"
                meta = {"w_bits": w_bits, "a_bits": a_bits, "source": name, "group_size": 0}
                acc = gb.op(Q.conv2d_int.default, (x, zx, w, b, [s, s], [p, p], [d, d], g), meta, out=name)
                _requantize(gb, acc, o, 1, name + "_requant_clamp", clamp=True)


def _weight_only_cases(gb):
    for w_bits in (8, 4, 2):
        for group in (0, 32, 64, 128):
            n, k = 16, 200
            x = gb.input(_ints(-8, 8, 3, k, dtype=torch.float32) / 2)
            w = gb.const(_ints(-(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1, n, k))
            scale = _pow2(n, -(-k // group)) if group else _pow2(n, 1)
            name = f"weight_only_w{w_bits}g{group}"
            meta = {"w_bits": w_bits, "weight_only": True, "source": name, "group_size": group}
            b = gb.const(_ints(-50, 50, n, dtype=torch.float32))
            gb.op(Q.linear_weight_only.default, (x, w, gb.const(scale), group, b), meta, out=name)


@pytest.fixture(scope="module")
def matrix():
    gb = _Graph()
    for cases in (_linear_cases, _grouped_cases, _conv_cases, _weight_only_cases):
        cases(gb)
    gm = gb.module()
    inputs = tuple(gb.inputs)
    got = HostRunner(build(gm, inputs))(*inputs)  # one build for the whole matrix
    with torch.no_grad():
        ref = gm(*inputs)
    return dict(zip(gb.names, zip(got, ref)))


@pytest.mark.parametrize("prefix", ["linear_", "grouped_", "conv_", "depthwise_", "grouped_strided", "weight_only_"])
def test_kernel_matrix_bit_exact(matrix, prefix):
    """Each kernel at weights 8/4/2, per channel and groups 32/64/128, activations 8/4, equals
    its qc reference op bit for bit (raw accumulators and the fused requantize + clamp)."""
    results = matrix
    cases = {k: v for k, v in results.items() if k.startswith(prefix)}
    assert len(cases) >= 6
    for name, (got, ref) in cases.items():
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert torch.equal(got, ref), f"{name}: {int((got != ref).sum())} elements differ"
    clamped = [v for k, v in cases.items() if "requant" in k]
    assert all(int(got.min()) == -10 for got, _ in clamped)  # the clamp's lower bound is reached


def test_weights_are_stored_packed():
    """The lowered module holds 4-bit weights as [N, ceil(K/2)] bytes and 2-bit ones as
    [N, ceil(K/4)] (K padded to whole bytes, or whole groups), and no unpacked copy of them
    (no int8 [N, K], no weight widened to int32)."""
    gb = _Graph()
    for cases in (_linear_cases, _grouped_cases, _conv_cases):
        cases(gb, widths=(4, 2), acts=(8,))
    mod = to_relax(gb.module(), tuple(gb.inputs))
    consts = []

    def visit(e):
        if isinstance(e, tvm.ir.expr.Constant) and hasattr(e.value, "shape"):
            consts.append((tuple(int(d) for d in e.value.shape), str(e.value.dtype)))

    relax.analysis.post_order_visit(mod["main"], visit)
    for shape in [(24, 64), (24, 32),  # linear K=100, padded to 128 (blocks of 32 and 64)
                  (16, 112), (16, 128), (16, 64),  # grouped K=200 padded to 224 / 256
                  (8, 32), (8, 14),  # conv 6x3x3 = 54 weights a row (blocks of 32 and 56)
                  (8, 5), (8, 3)]:  # depthwise 3x3 = 9 weights a row (one short block)
        assert (shape, "uint8") in consts, shape
    assert not [c for c in consts if len(c[0]) >= 2 and c[1] in ("int8", "int32")], consts


# ---------------------------------------------------------------- storage layout


def test_packing_layout_and_round_trip():
    """4-bit weights [1, -2] pack to the byte 0x69 (offset binary, lane 0 low); in a 16-byte
    block byte j holds weights j and j + 16; every 2/4-bit value round-trips, a ragged row is
    zero-padded, pad_to pads to whole groups."""
    assert packing.pack(np.array([[1, -2]]), 4).tolist() == [[0x69]]
    assert packing.pack(np.array([[1, -2, 0, -1]]), 2).tolist() == [[0b01_10_00_11]]
    row = np.zeros((1, 32), np.int64)
    row[0, 3], row[0, 19] = 7, -8
    assert packing.pack(row, 4)[0, 3] == 0x0F and packing.pack(row, 4)[0, 2] == 0x88
    for bits in (4, 2):
        q = 1 << (bits - 1)
        w = np.random.default_rng(bits).integers(-q, q, size=(5, 37)).astype(np.int8)
        p = packing.pack(w, bits, pad_to=64)
        assert p.dtype == np.uint8 and p.shape == (5, 64 // (8 // bits))
        assert np.array_equal(packing.unpack(p, bits, 37, pad_to=64), w)
        assert not packing.unpack(p, bits, 64)[:, 37:].any()


def _converted(model, x, pipeline):
    ir = qc.trace(model, (x,))
    return qc.PassManager.parse(pipeline).run(ir, qc.PassContext(calib=[x]))


def _mlp(d_in=64, hidden=128, d_out=10, seed=0):
    torch.manual_seed(seed)
    return zoo.MLP(d_in, hidden, d_out).eval()


def test_library_holds_packed_weights():
    """The built executable of an MLP (100k weights) shrinks by ~1/2 byte a weight from w8 to
    w4 and by ~1/4 from w4 to w2: it stores the packed bytes (sizes printed); outputs stay
    bit exact."""
    model, x = _mlp(128, 256, 10), torch.randn(4, 128)
    n_weights = sum(m.weight.numel() for m in (model.fc1, model.fc2, model.fc3))
    size = {}
    for recipe in ("w8a8", "w4a8g0", "w2a8g0"):
        ir = _converted(model, x, qc.QuantSpec.parse(recipe).pipeline())
        ex = build(ir, (x,))
        assert torch.equal(HostRunner(ex)(x)[0], ir(x))
        size[recipe] = serialized_bytes(ex)
    print(f"\n{n_weights} weights; serialized executable bytes: " + ", ".join(f"{r} {s}" for r, s in size.items()))
    assert 0.45 * n_weights <= size["w8a8"] - size["w4a8g0"] <= 0.55 * n_weights
    assert 0.2 * n_weights <= size["w4a8g0"] - size["w2a8g0"] <= 0.3 * n_weights


# ---------------------------------------------------------------- fusion and end to end


class _DepthwiseNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.dw(torch.relu(self.conv(x))))
        return self.fc(torch.relu(self.pw(x)).flatten(1))


def test_requantize_and_clamps_fuse_into_the_kernels():
    """After FuseTIR each quantized conv/linear layer is one PrimFunc holding its kernel, bias,
    requantize and ReLU/ReLU6 clamp: no PrimFunc does requantization alone."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 6)
    ir = _converted(_DepthwiseNet().eval(), x, qc.QuantSpec.parse("w4a8g0").pipeline())
    mod = to_relax(ir, (x,))
    tgt = tvm.target.Target(tvm_target(get_target("host")))
    with tgt:
        fused = tvm.transform.Sequential(relax.backend.cpu_generic.legalize_passes(tgt))(mod)
    names = [gv.name_hint for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    requant = [n for n in names if "right_shift" in n]
    assert len(requant) == 3, names  # conv, dw, pw (relu/relu6 are clamps inside them)
    assert all("conv2d_int" in n and "clip" in n for n in requant), names
    assert len(names) <= 6, names  # + quantize, the linear layer, the flatten


def test_depthwise_net_w4a4_end_to_end():
    """conv -> depthwise -> pointwise -> linear at 4-bit weights (group 32) and 4-bit
    activations: the compiled model equals its IR (integer layers exactly, the final grouped
    float combination within float rounding)."""
    torch.manual_seed(0)
    model, x = _DepthwiseNet().eval(), torch.rand(4, 3, 6, 6)
    art = qc.compile(model, (x,), quant="w4a4g32", calib=[torch.rand(16, 3, 6, 6)])
    ops = {n.meta.get("qc", {}).get("a_bits") for n in art.ir.graph.nodes if "kind" in n.meta.get("qc", {})}
    assert ops == {4}
    y, ref = art(x), art.ir(x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6 * float(ref.detach().abs().max()))


def test_weight_only_recipe_end_to_end(tmp_path):
    """quant="w4g32": linear layers become qc.linear_weight_only (float activations, packed
    4-bit weights), every node matches the reference within float tolerance, and the
    exported ONNX model (DQ + MatMul, INT4 weights) computes the same."""
    from qcompiler.backends.verify import verify_nodes

    model, x = _mlp(), torch.randn(4, 64)
    art = qc.compile(model, (x,), quant="w4g32")
    wo = [n for n in art.ir.graph.nodes if n.target == Q.linear_weight_only.default]
    assert len(wo) == 3 and all(n.meta["qc"]["w_bits"] == 4 and n.meta["qc"]["group_size"] == 32 for n in wo)
    assert not any(n.target == Q.quantize.default for n in art.ir.graph.nodes)
    checks = verify_nodes(art.ir, (x,))
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    y = art(x)
    assert torch.allclose(y, art.ir(x), rtol=1e-5, atol=1e-5)
    assert sqnr_db(model(x), y) > 15
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "wo.onnx"
    qc.export_onnx(art, str(path))
    sess = ort.InferenceSession(str(path))
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert np.allclose(out, y.numpy(), rtol=1e-4, atol=1e-4)


def _weight_only_layers(gb, shapes):
    """Weight-only layers on random float data: (bits, K, group, x shape[, rows N = 24]) each."""
    gen = torch.Generator().manual_seed(3)
    for bits, k, group, xshape, *rows in shapes:
        q, n = 1 << (bits - 1), (rows or [24])[0]
        x = gb.input(torch.randn(*xshape, k, generator=gen))
        w = gb.const(torch.randint(-q, q, (n, k), generator=gen).to(torch.int8))
        scale = torch.rand(n, -(-k // group) if group else 1, generator=gen) * 0.1 + 0.01
        name = f"w{bits}g{group}k{k}x{'x'.join(map(str, xshape))}n{n}"
        meta = {"w_bits": bits, "weight_only": True, "source": name, "group_size": group}
        gb.op(Q.linear_weight_only.default, (x, w, gb.const(scale), group, gb.const(torch.randn(n, generator=gen))),
              meta, out=name)


def test_weight_only_offset_form_matches_reference():
    """The weight-only kernel in its offset form (sum x*u per group, minus 2^(b-1) * sum x,
    times the group scale) matches qc.linear_weight_only within float rounding on random data,
    in both layouts: uint32 words (4 bits, groups of 128 over K = 576: a ragged last group of
    64; per channel; 2 bits, K = 768; 2 bits per channel, K = 200 padded to 256) and bytes
    (4 bits, K = 200 in groups of 64: rows padded to whole blocks; 2 bits over 576; 4 bits,
    groups of 32); 1 token, 16 tokens (token tiles of 8, given as [2, 8, K]) and 3 tokens; one
    token in words with tiles of 4 rows (N = 24), 2 (N = 22) and 1 (N = 21)."""
    gb = _Graph()
    words = [(4, 576, 128), (4, 576, 0), (2, 768, 128), (2, 200, 0)]
    nbytes = [(4, 200, 64), (2, 576, 128)]
    shapes = [(*s, xs) for s in words + nbytes for xs in ((1,), (2, 8))] + [(4, 576, 128, (3,)), (4, 576, 32, (1,))]
    shapes += [(4, 576, 128, (1,), 22), (2, 200, 0, (1,), 21)]
    _weight_only_layers(gb, shapes)
    gm, inputs = gb.module(), tuple(gb.inputs)
    mod = to_relax(gm, inputs)
    kernels = [str(f) for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "wo_part" in str(f)]
    assert len(kernels) == len(shapes)
    assert sum("wo_x_words" in k for k in kernels) == 2 * len(words) + 3
    assert not [k for k in kernels if "wo_x_words" in k and 'scope="local"' in k]  # A, P on the stack
    got = HostRunner(build(gm, inputs))(*inputs)
    with torch.no_grad():
        ref = gm(*inputs)
    for name, y, r in zip(gb.names, got, ref):
        assert y.shape == r.shape, name
        err = float((y - r).abs().max() / r.abs().max())
        assert err < 2e-6, f"{name}: max error {err:.2e} of the largest output"


def test_weight_only_token_tiles():
    """Token counts choose the tile a weight is unpacked for: 8, 4, 2 when they divide it,
    else 1 (also for a symbolic count)."""
    from qcompiler.backends.kernels_weight_only import token_tile

    assert [token_tile(t) for t in (1, 2, 3, 4, 6, 8, 12, 16, 24)] == [1, 2, 1, 4, 2, 8, 4, 8, 8]
    assert token_tile(tvm.tirx.Var("batch", "int64") * 16) == 1


def test_weight_only_row_tiles():
    """One token in the words layout takes tiles of 4 rows, or 2 or 1 when 4 does not divide N."""
    from qcompiler.backends.kernels_weight_only import row_tile

    assert [row_tile(n) for n in (24, 3072, 22, 6, 21, 1)] == [4, 4, 2, 2, 1, 1]


def test_weight_only_dynamic_batch():
    """A weight-only layer built for any batch (symbolic token count: the one-token schedule
    for every token) matches the reference at 1 and 5 rows."""
    gb = _Graph()
    _weight_only_layers(gb, [(4, 576, 128, (2,))])
    gm = gb.module()
    runner = HostRunner(build(gm, tuple(gb.inputs), dynamic_batch=True))
    for rows in (1, 5):
        x = torch.randn(rows, 576)
        (y,) = runner(x)
        with torch.no_grad():
            (r,) = gm(x)
        assert float((y - r).abs().max() / r.abs().max()) < 2e-6, rows


@pytest.mark.parametrize("target", ["arm", "cortex-m7"])
def test_weight_only_on_arm_and_cortex_m(target):
    """The weight-only kernels run on aarch64 (under qemu-aarch64) and on a Cortex-M7 (C kernels,
    not vectorized, under qemu-system-arm) and match the IR within float rounding."""
    import shutil

    from qcompiler.backends import arm

    missing = (arm.toolchain_available() if target == "arm" else
               [t for t in ("arm-none-eabi-gcc", "qemu-system-arm") if shutil.which(t) is None])
    if missing:
        pytest.skip(f"toolchain missing: {missing}")
    torch.manual_seed(0)
    art = qc.compile(zoo.MLP(256, 64, 10).eval(), (torch.randn(1, 256),), target=target, quant="w4")
    x = torch.randn(1, 256)
    y, ref = art(x), art.ir(x).detach()
    assert float((y - ref).abs().max() / ref.abs().max()) < 2e-6


# ---------------------------------------------------------------- recipes and bad input


def test_weight_only_recipes_parse():
    """'w4' is weight-only with group 128 (as 'w4g128'), 'w2g64' group 64, 'w4g0' per channel;
    their pipelines quantize only linear weights and skip calibration."""
    spec = qc.QuantSpec.parse("w4")
    assert spec.a_bits is None and spec.group_size == 128 and spec == qc.QuantSpec.parse("w4g128")
    assert qc.QuantSpec.parse("w2g64").group_size == 64 and qc.QuantSpec.parse("w4g0").group_size == 0
    text = qc.QuantSpec.parse("w2g64").pipeline()
    assert "weight_only=true" in text and "ops=linear" in text and "calibrate" not in text
    qc.PassManager.parse(text)
    with pytest.raises(qc.QuantSpecError, match="weight-only 'w4g128'"):
        qc.QuantSpec.parse("w4a")


def test_unsupported_weight_width_names_layer():
    """A layer declared at a width no kernel takes fails to lower, naming the layer and the
    supported widths."""
    ir = _converted(_mlp(), torch.randn(4, 64), "fake-quant,calibrate,convert")
    node = next(n for n in ir.graph.nodes if n.target == Q.linear_int.default)
    node.meta["qc"]["w_bits"] = 1
    with pytest.raises(qc.LoweringError, match=r"layer linear: 1-bit weights are not supported.*8, 4 or 2 bits"):
        to_relax(ir, (torch.randn(4, 64),))


def test_weights_outside_declared_width_are_refused():
    """An 8-bit layer annotated as 2-bit is refused (its values do not fit), naming the layer."""
    ir = _converted(_mlp(), torch.randn(4, 64), "fake-quant,calibrate,convert")
    node = [n for n in ir.graph.nodes if n.target == Q.linear_int.default][1]
    node.meta["qc"]["w_bits"] = 2
    with pytest.raises(qc.LoweringError, match=r"layer linear_1: weights are declared 2-bit but hold values in \[-127"):
        to_relax(ir, (torch.randn(4, 64),))


def test_unsupported_group_size_names_layer():
    """Group size 16 is refused at lowering with the layer and the supported sizes."""
    ir = _converted(_mlp(), torch.randn(4, 64), "fake-quant(w=4,granularity=group,group=16),calibrate,convert")
    msg = r"layer linear: group size 16 is not supported.*32, 64, 128 or one scale per output channel"
    with pytest.raises(qc.LoweringError, match=msg):
        to_relax(ir, (torch.randn(4, 64),))


def test_unsupported_activation_width_names_layer():
    """Activations wider than int8 storage holds are refused, naming the layer."""
    ir = _converted(_mlp(), torch.randn(4, 64), "fake-quant,calibrate,convert")
    node = next(n for n in ir.graph.nodes if n.target == Q.linear_int.default)
    node.meta["qc"]["a_bits"] = 12
    with pytest.raises(qc.LoweringError, match=r"layer linear: 12-bit activations are not supported.*2 to 8 bits"):
        to_relax(ir, (torch.randn(4, 64),))
