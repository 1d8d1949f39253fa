"""export_onnx: float, fake-quant and converted IR -> ONNX (QDQ) -> onnxruntime.

"Within one quantization step" is checked where quantization happens and at the output:

1. Every quantized tensor of the ONNX model (each QuantizeLinear's int8 output, run in
   onnxruntime) is within one integer step of the IR's tensor at the same point, and almost
   all are equal. The export computes in float what the IR computes in integers, so a value
   within float32 rounding of a rounding boundary (or at a tie, rounded half up by
   `requantize` and half to even by QuantizeLinear) may land one step away; nothing more.
2. The output is within one step of its own grid on at least 98% of its elements. For a
   dequantized output that grid is its quantizer's scale; for a float output
   y = acc * (s_x * s_w) of a last integer layer it is s_x * s_w: where the
   layer's int8 inputs agree, ONNX and the IR differ only by float32 rounding of the sum,
   far below s_x * s_w. The other elements read an input that moved one step under (1); such
   a move shifts y by s_x * s_w * |w_q| (up to 127 steps), which is why they are not bounded
   by one output step, and why (1) is the check that bounds them.

onnxruntime runs with `session.disable_quant_qdq = "1"`, i.e. the QDQ graph as ONNX defines it:
its default session fuses QDQ into int8 kernels that on x86 without VNNI saturate int16 pair
sums (its documented u8s8 limitation), which full-range 8-bit weights hit. 4-bit weights
cannot, and one test runs them in the default session.
"""

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import qcompiler as qc
from qcompiler import zoo
from qcompiler.frontends.onnx_export import export_onnx
from qcompiler.ir import get_attr_tensor, op_name

RECIPES = ("w8a8", "w4a8g32")


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def models(digits_data, digits_mlp, digits_cnn):
    """name -> (float model, calibration batches, test input)."""
    x, _, x_test, _ = digits_data
    torch.manual_seed(0)
    block = zoo.TransformerBlock(d=64, heads=2, ffn=128).eval()
    g = torch.Generator().manual_seed(0)
    return {
        "mlp": (digits_mlp, [x[i:i + 64].flatten(1) for i in range(0, 256, 64)], x_test[:100].flatten(1)),
        "cnn": (digits_cnn, [x[i:i + 64] for i in range(0, 256, 64)], x_test[:100]),
        "transformer": (block, [torch.randn(4, 16, 64, generator=g) for _ in range(4)],
                        torch.randn(8, 16, 64, generator=g)),
    }


@pytest.fixture(scope="session")
def exported(models, tmp_path_factory):
    """(model name, recipe, "fake-quant" | "converted") -> (IR, ONNX path), exported once."""
    cache, folder = {}, tmp_path_factory.mktemp("onnx")

    def get(name, recipe, form):
        if (name, recipe, form) not in cache:
            model, calib, _ = models[name]
            ir = quantized_ir(model, calib, recipe, convert=form == "converted")
            path = str(folder / f"{name}-{recipe}-{form}.onnx")
            export_onnx(ir, path)
            cache[name, recipe, form] = ir, path
        return cache[name, recipe, form]

    return get


def quantized_ir(model, calib, recipe, convert=True):
    """The IR that qcompiler.compile builds for `recipe` (without convert: fake-quant IR)."""
    ir = qc.trace(model, (calib[0],))
    pipeline = qc.QuantSpec.parse(recipe).pipeline()
    pipeline = pipeline if convert else pipeline.removesuffix(",convert")
    qc.PassManager.parse(pipeline).run(ir, qc.PassContext(calib=calib))
    return ir


def run_ort(model, x, extra_outputs=(), fused=False):
    """Outputs of onnxruntime (the QDQ graph as ONNX defines it unless `fused`)."""
    proto = onnx.load(model) if isinstance(model, str) else model
    for name in extra_outputs:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT8, None))
    opts = ort.SessionOptions()
    if not fused:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def ir_int8_tensors(ir, x) -> list[torch.Tensor]:
    """The integer tensor at every activation quantizer of the IR, in graph order."""
    found = []

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if op_name(n) in ("qc.quantize", "qc.requantize"):
                found.append(out)
            elif op_name(n) == "qc.fake_quant" and n.meta["qc"]["role"] == "act":
                args, _ = self.fetch_args_kwargs_from_env(n)
                found.append(torch.ops.qc.quantize(*args))
            return out

    with torch.no_grad():
        Probe(ir).run(x)
    return found


def onnx_int8_names(path) -> list[str]:
    """The int8 tensor each QuantizeLinear makes (after its Clip, if any), in graph order."""
    names = []
    for node in onnx.load(path).graph.node:
        if node.op_type == "QuantizeLinear":
            names.append(node.output[0])
        elif node.op_type == "Clip" and names and node.input[0] == names[-1]:
            names[-1] = node.output[0]
    return names


def output_step(ir) -> float:
    """The grid step of the IR's output: the coarsest of the quantized layers summed into it."""
    def step(n) -> float:
        name = op_name(n) if n.op == "call_function" else n.op
        if name == "qc.dequantize":
            return float(get_attr_tensor(ir, n.args[1]).max())
        if name == "qc.linear_int_grouped":
            return n.args[2] * float(get_attr_tensor(ir, n.args[4]).max())
        if name in ("aten.linear", "aten.conv2d"):  # fake-quant IR: s_x * s_w of its quantizers
            s_x, s_w = (get_attr_tensor(ir, fq.args[1]) for fq in n.args[:2])
            return float(s_x) * float(s_w.max())
        if name == "aten.add.Tensor":
            return max(step(a) for a in n.args if isinstance(a, torch.fx.Node))
        if name == "placeholder":
            return 0.0
        raise AssertionError(f"output_step does not know {name}")

    out = next(n for n in ir.graph.nodes if n.op == "output").args[0]
    return step(out[0] if isinstance(out, (list, tuple)) else out)


def assert_within_one_step(ir, path, x, fused=False):
    names = [] if fused else onnx_int8_names(path)
    got = run_ort(path, x, names, fused)
    if not fused:
        want = ir_int8_tensors(ir, x)
        assert len(want) == len(names) > 0
        for name, w, g in zip(names, want, got[1:]):
            diff = (w.int() - torch.from_numpy(g).int()).abs()
            assert diff.max() <= 1, f"{name}: int8 tensors differ by {int(diff.max())} steps"
            assert (diff > 0).float().mean() <= 0.01, f"{name}: {int((diff > 0).sum())} values moved"
    with torch.no_grad():
        ref = ir(x).numpy()
    steps = np.abs(got[0] - ref) / output_step(ir)
    assert (steps <= 1).mean() >= 0.98, f"only {(steps <= 1).mean():.2%} of outputs within one step"
    return steps


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_float_ir_matches_torch(models, name, tmp_path):
    """Float IR exports to plain ONNX that onnxruntime runs like torch, at a new batch size."""
    model, calib, x = models[name]
    ir = qc.trace(model, (calib[0],))
    proto = export_onnx(ir, tmp_path / "float.onnx")
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    with torch.no_grad():
        np.testing.assert_allclose(run_ort(str(tmp_path / "float.onnx"), x)[0], model(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["fake-quant", "converted"])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_quantized_ir_runs_within_one_step(models, exported, name, recipe, form):
    """Fake-quant and converted IR at W8A8 and W4A8 (group 32) run in onnxruntime within one
    quantization step of the IR (see the module docstring for what that means)."""
    ir, path = exported(name, recipe, form)
    assert_within_one_step(ir, path, models[name][2])


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_w4a8_runs_in_the_default_onnxruntime_session(models, exported, name):
    """onnxruntime's default session (QDQ fused into its integer kernels) runs converted W4A8
    within one output step on 98% of outputs: 4-bit weights cannot saturate its int16 sums."""
    ir, path = exported(name, "w4a8g32", "converted")
    assert_within_one_step(ir, path, models[name][2], fused=True)


def test_compiled_artifact_exports_like_its_ir(tmp_path):
    """export_onnx takes an Artifact: the ONNX model runs within one step of art.ir."""
    torch.manual_seed(0)
    model, g = zoo.MLP().eval(), torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = qc.compile(model, torch.randn(8, 64, generator=g), quant="w8a8",
                         calib=[torch.randn(32, 64, generator=g) for _ in range(2)])
    export_onnx(art, tmp_path / "art.onnx")
    assert_within_one_step(art.ir, str(tmp_path / "art.onnx"), torch.randn(16, 64, generator=g))


# ---------------------------------------------------------------- storage


def _weights(proto):
    """Initializers that a DequantizeLinear reads as its quantized input."""
    inits = {i.name: i for i in proto.graph.initializer}
    return [inits[n.input[0]] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def test_4bit_weights_are_stored_as_int4(models, exported, tmp_path):
    """4-bit weights are INT4 initializers (two a byte, blocked DQ for groups): the file is
    smaller than the INT8 one that opset 20 gives, with a warning that says why."""
    model, calib, x = models["mlp"]
    int4 = onnx.load(exported("mlp", "w4a8g32", "converted")[1])
    weights = [w for w in _weights(int4) if w.data_type != onnx.TensorProto.INT32]  # int32: biases
    assert len(weights) == 3 and all(w.data_type == onnx.TensorProto.INT4 for w in weights)
    assert all(len(w.raw_data) == (int(np.prod(w.dims)) + 1) // 2 for w in weights)
    assert any(a.name == "block_size" and a.i == 32 for n in int4.graph.node for a in n.attribute)

    per_channel = quantized_ir(model, calib, "w4a8g0")
    export_onnx(per_channel, tmp_path / "int4_channel.onnx", opset=21)
    with pytest.warns(UserWarning, match="opset 20 has no INT4; 3 weights .* stored as INT8"):
        int8 = export_onnx(per_channel, tmp_path / "int8_channel.onnx", opset=20)
    assert {w.data_type for w in _weights(int8)} == {onnx.TensorProto.INT8, onnx.TensorProto.INT32}
    assert os.path.getsize(tmp_path / "int4_channel.onnx") < os.path.getsize(tmp_path / "int8_channel.onnx")
    for path in ("int4_channel.onnx", "int8_channel.onnx"):
        assert_within_one_step(per_channel, str(tmp_path / path), x)


def test_2bit_weights_are_int4_holding_a_narrow_range(models, tmp_path):
    """2-bit weights are INT4 holding -1..1, and 4-bit activations an int8 Clip to -8..7."""
    model, calib, x = models["mlp"]
    ir = quantized_ir(model, calib, "w2a4g0", convert=False)
    proto = export_onnx(ir, tmp_path / "w2.onnx")
    for w in _weights(proto):
        assert w.data_type == onnx.TensorProto.INT4
        assert set(onnx.numpy_helper.to_array(w).astype(int).ravel()) <= {-1, 0, 1}
    assert [n.op_type for n in proto.graph.node].count("Clip") == 3
    assert_within_one_step(ir, str(tmp_path / "w2.onnx"), x)


# ---------------------------------------------------------------- round trip through load_onnx


def test_onnx_file_round_trips_through_load_onnx(models, exported, tmp_path):
    """ONNX file -> load_onnx -> export_onnx runs in onnxruntime like the original file:
    a float model from torch.onnx, and a W8A8 QDQ model from export_onnx."""
    from qcompiler.frontends.onnx_import import load_onnx

    model, calib, x = models["cnn"]
    torch.onnx.export(model, (calib[0],), tmp_path / "orig.onnx", dynamo=True, verbose=False,
                      dynamic_shapes=({0: "batch"},))
    export_onnx(load_onnx(str(tmp_path / "orig.onnx")), tmp_path / "again.onnx")
    np.testing.assert_allclose(run_ort(str(tmp_path / "again.onnx"), x)[0],
                               run_ort(str(tmp_path / "orig.onnx"), x)[0], rtol=1e-4, atol=1e-5)

    _, qdq = exported("cnn", "w8a8", "converted")
    export_onnx(load_onnx(qdq), tmp_path / "qdq_again.onnx")
    np.testing.assert_allclose(run_ort(str(tmp_path / "qdq_again.onnx"), x)[0], run_ort(qdq, x)[0],
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad input


@torch.library.custom_op("qctest::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class _Mystery(torch.nn.Module):
    def forward(self, x):
        return torch.ops.qctest.mystery(torch.relu(x))


class _Kth(torch.nn.Module):
    def forward(self, x):
        return torch.kthvalue(x, 2, dim=-1).values


def test_op_without_onnx_mapping_names_op_and_node(tmp_path):
    """An op with no ONNX mapping is a LoweringError naming the op and the node; no file is left."""
    ir = qc.trace(_Mystery(), (torch.randn(2, 4),))
    with pytest.raises(qc.LoweringError, match=r"node mystery \(qctest.mystery\).*no ONNX mapping") as e:
        export_onnx(ir, tmp_path / "m.onnx")
    assert e.value.node == "mystery"
    ir = qc.trace(_Kth(), (torch.randn(2, 4),))
    with pytest.raises(qc.LoweringError, match=r"node kthvalue \(aten.kthvalue\) has no ONNX translation"):
        export_onnx(ir, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_unwritable_path_is_a_clear_error(models, tmp_path):
    """A missing folder, a folder, a device or pipe, a bad opset or a non-IR fail before any work."""
    model, calib, _ = models["mlp"]
    ir = qc.trace(model, (calib[0],))
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(qc.QCompilerError, match="folder .*missing does not exist"):
        export_onnx(ir, tmp_path / "missing" / "m.onnx")
    with pytest.raises(qc.QCompilerError, match="it is a folder"):
        export_onnx(ir, tmp_path)
    with pytest.raises(qc.QCompilerError, match="exists and is not a regular file"):
        export_onnx(ir, tmp_path / "pipe")
    with pytest.raises(qc.LoweringError, match="opset=17 is not supported; choose 18..23"):
        export_onnx(ir, tmp_path / "m.onnx", opset=17)
    with pytest.raises(qc.QCompilerError, match="takes the IR"):
        export_onnx(model, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == ["pipe"]


def test_failed_write_is_a_clear_error_and_leaves_no_file(models, tmp_path, monkeypatch):
    """A write that fails late (disk full, permissions) is a QCompilerError; no partial file stays."""
    model, calib, _ = models["mlp"]
    ir = qc.trace(model, (calib[0],))

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(qc.QCompilerError, match="cannot write .*m.onnx: .*No space left"):
        export_onnx(ir, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_group_wise_weights_below_opset_21_are_refused(models, tmp_path):
    """Group-wise scales need DequantizeLinear's block_size (opset 21): opset 20 names the node."""
    model, calib, _ = models["mlp"]
    ir = quantized_ir(model, calib, "w4a8g32")
    with pytest.raises(qc.LoweringError, match=r"node linear_int_grouped\w* .*block_size exists from opset 21"):
        export_onnx(ir, tmp_path / "g.onnx", opset=20)
