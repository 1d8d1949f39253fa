"""ONNX files through the public entry points: qc.compile("m.onnx") and the CLI."""

import numpy as np
import onnx
import onnxruntime as ort
import torch

import qcompiler as qc
from qcompiler.cli import main as cli_main
from tests import onnx_cases


def test_compile_onnx_file_path(tmp_path):
    """qc.compile takes an .onnx path: float model quantized W8A8, code matches its IR (the final
    float bias add may be fused with the dequantize, so compare within 1e-5 relative)."""
    path = str(tmp_path / "m.onnx")
    onnx.save(onnx_cases.cnn_mlp(), path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 8, 8, generator=g)
    art = qc.compile(path, (x,), calib=[torch.randn(32, 1, 8, 8, generator=g)])
    assert "fake-quant" in art.report().pipeline
    ref = art.ir(x)
    assert torch.allclose(art(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_compile_qdq_onnx_keeps_its_scales(tmp_path):
    """A QDQ file from onnxruntime's quantizer compiles with its own scales (only `convert` runs)
    and the generated code is within one output step of onnxruntime's run of the same file."""
    path = onnx_cases.quantize_cnn_mlp(str(tmp_path), per_channel=True, act="QInt8")
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32))
    art = qc.compile(path, (x,))
    assert art.report().pipeline == "convert"
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    model = onnx.load(path)
    step = float(onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "y_scale")))
    assert np.abs(art(x).numpy() - ref).max() <= step * (1 + 1e-4)


def test_cli_compiles_an_onnx_file(tmp_path):
    """`qcompiler compile m.onnx` writes an artifact that `qcompiler run` executes."""
    path = str(tmp_path / "m.onnx")
    onnx.save(onnx_cases.cnn_mlp(), path)
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).standard_normal((32, 1, 8, 8)).astype(np.float32))
    out = str(tmp_path / "out.qca")
    assert cli_main(["compile", path, "--calib", str(tmp_path / "calib.npy"), "-o", out]) == 0
    x = qc.load(out).inputs[0]["shape"]
    np.save(tmp_path / "x.npy", np.zeros(x, dtype=np.float32))
    assert cli_main(["run", out, "--input", str(tmp_path / "x.npy")]) == 0
