"""The public API end to end: compile, run, report, save/load, recipes, and bad input."""

import os
import warnings
import zipfile

import pytest
import torch

import qcompiler as qc
from qcompiler import zoo
from qcompiler.cli import main as cli_main


@pytest.fixture(scope="module")
def art(digits_data, digits_cnn):
    x, _, xt, _ = digits_data
    batches = list(x[:512].split(128))
    return qc.compile(digits_cnn, (xt[:64],), target="host", quant="w8a8", calib=batches)


def test_quantized_accuracy_tracks_float(art, digits_data, digits_cnn):
    """W8A8 digits CNN: compiled accuracy on the held-out split within 2 points of float."""
    _, _, xt, yt = digits_data
    float_acc = zoo.accuracy(digits_cnn, xt, yt, batch=64)
    assert float_acc > 0.9
    assert zoo.accuracy(art, xt, yt, batch=64) >= float_acc - 0.02


def test_train_classifier_depends_only_on_the_seed(digits_data):
    """Two models built under different random states train to the same weights with one seed,
    and to different weights with another: the test fixtures are reproducible."""
    x, y, _, _ = digits_data
    x, y = x[:256].flatten(1), y[:256]
    runs = []
    for build_seed, seed in ((1, 0), (2, 0), (1, 1)):
        torch.manual_seed(build_seed)
        runs.append(zoo.train_classifier(zoo.MLP(), x, y, epochs=1, seed=seed).state_dict())
    # equal up to float rounding (a BLAS's summation order may depend on buffer alignment)
    assert all(torch.allclose(runs[0][k], runs[1][k], atol=1e-5) for k in runs[0])
    assert (runs[0]["fc1.weight"] - runs[2]["fc1.weight"]).abs().max() > 1e-2


def test_report_lists_layers_and_float_ops(art):
    """The report has one row per quantized layer with bits, granularity and SQNR."""
    rep = art.report()
    assert [l["name"] for l in rep.layers] == ["conv2d", "conv2d_1", "linear", "linear_1"]
    assert all(l["w_bits"] == 8 and l["a_bits"] == 8 and l["sqnr_db"] > 25 for l in rep.layers)
    text = str(rep)
    assert "SQNR dB" in text and "not quantized (float) ops: none" in text


def test_float_ops_are_listed():
    """Ops left in float (layer_norm, softmax, gelu, ...) appear in the report."""
    torch.manual_seed(0)
    block = zoo.TransformerBlock(d=32, heads=2, ffn=64).eval()
    a = qc.compile(block, (torch.randn(1, 8, 32),), calib=[torch.randn(2, 8, 32)])
    assert {"aten.layer_norm", "aten.softmax.int", "aten.gelu"} <= set(a.report().float_ops)


@pytest.mark.parametrize("suffix", [".qca", ""])
def test_save_and_load_round_trip(art, digits_data, tmp_path, suffix):
    """A saved artifact (file or folder) loads and gives the same outputs and report."""
    _, _, xt, _ = digits_data
    path = str(tmp_path / f"m{suffix}")
    art.save(path)
    back = qc.load(path)
    assert torch.equal(back(xt[:64]), art(xt[:64]))
    assert torch.equal(back.ir(xt[:64]), art.ir(xt[:64]))
    assert str(back.report()) == str(art.report())


def test_artifact_contains_no_pickle(art, tmp_path):
    """The .qca holds JSON, safetensors and the library; no pickle files."""
    path = str(tmp_path / "m.qca")
    art.save(path)
    names = zipfile.ZipFile(path).namelist()
    assert sorted(names) == ["ir.json", "lib.so", "manifest.json", "report.json", "weights.safetensors"]


def _corrupt(path, how):
    data = open(path, "rb").read()
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data = b"not an artifact at all"
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how,message", [
    ("truncate", "not a qcompiler artifact|corrupt"),
    ("garbage", "not a qcompiler artifact"),
])
def test_corrupt_artifact_file(art, tmp_path, how, message):
    """Truncated or foreign .qca files are refused with ArtifactError."""
    path = str(tmp_path / "m.qca")
    art.save(path)
    _corrupt(path, how)
    with pytest.raises(qc.ArtifactError, match=message):
        qc.load(path)


def test_tampered_member_is_detected(art, tmp_path):
    """A member whose bytes changed fails its hash check, naming the file."""
    folder = str(tmp_path / "m")
    art.save(folder)
    with open(os.path.join(folder, "weights.safetensors"), "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(qc.ArtifactError, match="weights.safetensors does not match its recorded hash"):
        qc.load(folder)
    art.save(folder)
    os.remove(os.path.join(folder, "lib.so"))
    with pytest.raises(qc.ArtifactError, match="lib.so is missing"):
        qc.load(folder)


def test_wrong_input_shape_at_run_time(art):
    """Running with a shape the code was not compiled for says which shape it was compiled for."""
    with pytest.raises(qc.QCompilerError, match=r"compiled for float32\[64, 1, 8, 8\]"):
        art(torch.randn(3, 1, 8, 8))


@pytest.mark.parametrize("recipe,message", [
    ("w9a8", "w_bits=9 is not supported"),
    ("int8", "unknown quantization recipe 'int8'"),
    ("w8a1", "a_bits=1 is not supported"),
])
def test_bad_recipes(recipe, message):
    """Recipes outside w<2..8>a<2..8>[g<n>] are refused before any work."""
    with pytest.raises(qc.QuantSpecError, match=message):
        qc.compile(zoo.MLP(), (torch.randn(2, 64),), quant=recipe)


def test_recipe_parsing():
    """'w4a8' means group 128; 'w8a8' and 'w5a8'..'w7a8' per channel (int8-held weights);
    pipeline text follows the spec."""
    assert qc.QuantSpec.parse("w4a8").group_size == 128
    assert [qc.QuantSpec.parse(f"w{b}a8").group_size for b in (2, 3, 5, 6, 7)] == [128, 128, 0, 0, 0]
    assert qc.QuantSpec.parse("w7a8g128").group_size == 128
    assert qc.QuantSpec.parse("w8a8").pipeline() == "fold-batchnorm,fake-quant(w=8,a=8,granularity=channel),calibrate(observer=minmax),convert"


def test_compile_without_calibration_warns(tiny_mlp):
    """Without calib, compile warns that calibrate sees the example inputs alone; a weight-only
    recipe, which reads no activations, compiles without the warning."""
    with pytest.warns(UserWarning, match="no calibration data given: calibrate will see"):
        qc.compile(tiny_mlp, (torch.randn(4, 8),))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="no calibration data")
        qc.compile(tiny_mlp, (torch.randn(4, 8),), quant="w4g32")


def test_cli_compile_opt_run(tmp_path, capsys):
    """qcompiler compile / run / opt on a torch.export file."""
    import numpy as np

    torch.manual_seed(0)
    model, x = zoo.MLP().eval(), torch.randn(8, 64)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "m.pt2"))
    np.save(tmp_path / "calib.npy", torch.randn(64, 64).numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    out = str(tmp_path / "out")
    assert cli_main(["compile", str(tmp_path / "m.pt2"), "--calib", str(tmp_path / "calib.npy"), "-o", out]) == 0
    assert cli_main(["run", out, "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")]) == 0
    y = torch.from_numpy(np.load(tmp_path / "y.npy"))
    assert torch.equal(y, qc.load(out).ir(x))
    capsys.readouterr()
    assert cli_main(["opt", str(tmp_path / "m.pt2"), "-p", "fake-quant(w=4),calibrate", "--calib",
                     str(tmp_path / "calib.npy"), "--print-ir-after-all"]) == 0
    assert "// ----- IR after fake-quant(w=4) ----- //" in capsys.readouterr().out
    assert cli_main(["opt", str(tmp_path / "m.pt2"), "-p", "fake-qaunt"]) == 1
    assert "Did you mean fake-quant?" in capsys.readouterr().err
