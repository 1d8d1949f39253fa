"""The pass manager: pipeline text, registry errors, instruments, failures and reproducers."""

import io
import os

import pytest
import torch

import qcompiler as qc
from qcompiler.cli import main as cli_main
from qcompiler.pass_manager import PassResult, register

from conftest import calib_batches


@pytest.mark.parametrize("text", [
    "fake-quant,calibrate,convert",
    "fake-quant(w=4,granularity=group,group=64),calibrate(observer=mse),convert",
    "fake-quant(a=6,a_symmetric=true,ops=linear;matmul),calibrate(observer=percentile,percentile=99.9)",
])
def test_pipeline_text_round_trips(text):
    """Canonical pipeline text parses and prints back identically."""
    assert str(qc.PassManager.parse(text)) == text


def test_pipeline_text_is_canonicalized():
    """Spaces and options equal to their defaults are dropped when printed."""
    pm = qc.PassManager.parse(" fake-quant( w=8 , a=4 ) , convert ")
    assert str(pm) == "fake-quant(a=4),convert"
    assert str(qc.PassManager.parse(str(pm))) == str(pm)


def test_unknown_pass_suggests_a_name():
    """An unknown pass says 'did you mean' and lists the passes."""
    with pytest.raises(qc.PipelineError, match=r"unknown pass 'calibrte'. Did you mean calibrate\?.*Passes: "):
        qc.PassManager.parse("fake-quant,calibrte")


def test_unknown_option_lists_valid_ones():
    """An unknown option names the pass and lists its options with types."""
    with pytest.raises(qc.PipelineError, match=r"pass calibrate has no option 'obsever'. Did you mean observer\?.*minmax\|percentile\|mse"):
        qc.PassManager.parse("calibrate(obsever=mse)")


@pytest.mark.parametrize("text,message", [
    ("calibrate(observer=entropy)", "expected one of minmax, percentile, mse, kl"),
    ("fake-quant(w=four)", "cannot read 'four'"),
    ("fake-quant(a_symmetric=maybe)", "expected true or false"),
    ("fake-quant(w=8", r"unclosed '\('"),
    ("fake-quant,,convert", "empty pass"),
    ("fake-quant(w)", "is not key=value"),
])
def test_malformed_pipeline_text(text, message):
    """Malformed text or values fail with a PipelineError saying what is wrong."""
    with pytest.raises(qc.PipelineError, match=message):
        qc.PassManager.parse(text)


@pytest.mark.parametrize("text", ["fake-quant(w=9)", "fake-quant(a=1)", "fake-quant(w=0)"])
def test_bits_outside_2_to_8(text):
    """Bit widths outside 2..8 are refused with the supported range."""
    with pytest.raises(qc.QuantSpecError, match="bit widths go from 2 to 8"):
        qc.PassManager.parse(text)


def test_print_ir_after_change_and_timing(tiny_mlp):
    """print_ir_after='change' prints only after passes that changed the IR; timings are kept."""
    out = io.StringIO()
    ctx = qc.PassContext(calib=calib_batches((4, 8)), print_ir_after="change", print_ir_to=out)
    qc.PassManager.parse("fake-quant,calibrate,convert").run(qc.trace(tiny_mlp, (torch.randn(2, 8),)), ctx)
    text = out.getvalue()
    assert text.count("// ----- IR after") == 3
    assert "IR after convert" in text and "qc.linear_int" in text
    assert [name for name, _ in ctx.timings] == ["fake-quant", "calibrate", "convert"]


def test_dump_dir_writes_numbered_files(tiny_mlp, tmp_path):
    """dump_dir gets one numbered IR file per pass, after the input."""
    ctx = qc.PassContext(calib=calib_batches((4, 8)), dump_dir=str(tmp_path))
    qc.PassManager.parse("fake-quant,calibrate").run(qc.trace(tiny_mlp, (torch.randn(2, 8),)), ctx)
    assert sorted(os.listdir(tmp_path)) == ["00-input.txt", "01-fake-quant.txt", "02-calibrate.txt"]
    assert "qc.fake_quant" in (tmp_path / "01-fake-quant.txt").read_text()


@register("test-break-shapes")
class BreakShapes(qc.Pass):
    """Test pass: rewires the second linear layer to the model input (a shape error)."""

    def run(self, gm, ctx):
        lin = next(n for n in gm.graph.nodes if n.name == "linear_1")
        lin.update_arg(0, next(n for n in gm.graph.nodes if n.op == "placeholder"))
        gm.recompile()
        return PassResult(True)


def test_failure_names_the_pass_and_those_before(tiny_mlp, tmp_path):
    """A failing pass raises PassError naming it and the passes run before; a reproducer replays it."""
    ctx = qc.PassContext(calib=calib_batches((4, 8)), reproducer_dir=str(tmp_path))
    with pytest.raises(qc.PassError) as e:
        qc.PassManager.parse("fake-quant(w=4),test-break-shapes,convert").run(
            qc.trace(tiny_mlp, (torch.randn(2, 8),)), ctx)
    assert e.value.pass_name == "test-break-shapes"
    assert e.value.before == ("fake-quant(w=4)",)
    assert "passes run before it: fake-quant(w=4)" in str(e.value)
    assert (tmp_path / "pipeline.txt").read_text().strip() == "test-break-shapes,convert"
    assert "no longer traces" in (tmp_path / "error.txt").read_text()
    assert cli_main(["opt", "--replay", str(tmp_path)]) == 1  # the replay fails the same way
    assert cli_main(["opt", "--replay", str(tmp_path), "-p", "calibrate,convert"]) == 0  # and is usable


def test_verifier_can_be_switched_off(tiny_mlp):
    """With verify=False the broken graph passes through the pass manager unchecked."""
    ctx = qc.PassContext(verify=False)
    qc.PassManager.parse("test-break-shapes").run(qc.trace(tiny_mlp, (torch.randn(2, 8),)), ctx)
