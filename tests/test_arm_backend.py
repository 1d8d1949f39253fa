"""arm target: static aarch64 programs run under qemu-aarch64 equal the IR's reference, save and
load, and fail clearly on bad input or a missing toolchain."""

import os
import re
import shutil
import subprocess

import pytest
import torch

import qcompiler as qc
from qcompiler import zoo
from qcompiler.backends import arm, toolchain
from qcompiler.backends.program import BUFFER
from tests.conftest import assert_matches_ir, calib_batches

MISSING = arm.toolchain_available()
needs_toolchain = pytest.mark.skipif(MISSING is not None, reason=f"arm toolchain missing: {MISSING}")

MODELS = {  # small versions of the zoo models, so each compile takes seconds
    "mlp": (lambda: zoo.MLP(64, 32, 10), (4, 64)),
    "cnn": (zoo.DigitsCNN, (2, 1, 8, 8)),
    "transformer": (lambda: zoo.TransformerBlock(d=32, heads=2, ffn=64), (1, 8, 32)),
}
_compiled = {}


def compiled(model: str, quant: str = "w8a8"):
    """The model compiled for arm (once per test session)."""
    if (model, quant) not in _compiled:
        make, shape = MODELS[model]
        torch.manual_seed(0)
        net = make().eval()
        _compiled[model, quant] = qc.compile(net, (torch.randn(shape),), target="arm", quant=quant,
                                             calib=calib_batches(shape))
    return _compiled[model, quant]




@needs_toolchain
@pytest.mark.parametrize("quant", ["w8a8", "w4a8"])
@pytest.mark.parametrize("model", list(MODELS))
def test_program_under_qemu_matches_ir(model, quant):
    """MLP, CNN and transformer block at W8A8 and W4A8: the emulated program equals the IR."""
    art = compiled(model, quant)
    shape = MODELS[model][1]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        assert_matches_ir(art, torch.randn(shape, generator=g))


@needs_toolchain
def test_program_reuses_planned_storage_and_views():
    """The flat program keeps Relax's storage plan (fewer buffers than kernel outputs) and
    the CNN's flatten is a view of the pooling output, not a copy."""
    p = compiled("cnn").library.program
    outputs = {c.args[-1] for c in p.calls}
    assert len(p.buffers) < len(outputs)
    homes = {}
    for t in p.tensors:
        homes.setdefault((t.home, t.index, t.offset), set()).add(t.shape)
    assert any(home[0] == BUFFER and {(2, 32, 4, 4), (2, 512)} <= shapes for home, shapes in homes.items())
    assert p.workspace and all(v > 0 for v in p.workspace.values())


@needs_toolchain
def test_save_load_arm_artifact(tmp_path):
    """A saved arm artifact (folder and .qca) holds the binary and its sources, loads and runs
    the same; an altered binary is refused."""
    art = compiled("mlp")
    x = torch.randn(4, 64)
    for path in (tmp_path / "mlp", tmp_path / "mlp.qca"):
        art.save(str(path))
        back = qc.load(str(path))
        assert back.target == "arm" and torch.equal(back(x), art(x))
    assert {"model.elf", "driver.c", "kernels.o", "program.json"} <= set(os.listdir(tmp_path / "mlp"))
    assert "__TVMBackendAllocWorkspace" in (tmp_path / "mlp" / "driver.c").read_text()
    with open(tmp_path / "mlp" / "model.elf", "r+b") as f:
        f.seek(4096)
        f.write(b"\0" * 16)
    with pytest.raises(qc.ArtifactError, match="model.elf does not match its recorded hash"):
        qc.load(str(tmp_path / "mlp"))


@needs_toolchain
def test_qemu_args_and_wrapper_reach_qemu():
    """Extra QEMU arguments (here -strace) and a wrapper command are passed to the emulator."""
    binary = compiled("mlp").library
    x = torch.randn(4, 64)
    done = arm.execute(binary, (x,), qemu_args=("-strace",), wrapper=("env", "QC_ARM_TEST=1"))
    assert b"write(" in done.stderr
    assert torch.equal(arm.decode_outputs(binary.signature, done.stdout)[0], arm.run(binary, (x,))[0])


@needs_toolchain
def test_workspace_exhaustion_is_reported():
    """A driver linked with a too small workspace arena stops with a message, not a crash."""
    binary = compiled("cnn").library
    small = arm.link(binary.program, binary.sources["kernels.o"], workspace=64)
    with pytest.raises(qc.LoweringError, match=r"workspace arena of 64 bytes exhausted"):
        arm.run(small, (torch.randn(2, 1, 8, 8),))


@needs_toolchain
def test_driver_rejects_wrong_input_size():
    """The program itself checks the byte count it reads (exit status 2)."""
    binary = compiled("mlp").library
    qemu = shutil.which("qemu-aarch64")
    for data in (b"\0" * 100, b"\0" * (4 * 64 * 4 + 1)):
        done = subprocess.run([qemu, "-cpu", "cortex-a76", binary.path()], input=data, capture_output=True)
        assert done.returncode == 2 and re.search(rb"qcompiler: (input 0: expected 1024 bytes, got 100|the inputs are longer)", done.stderr)


@needs_toolchain
def test_wrong_input_shape():
    """An input of another shape or dtype names the compiled one, through the artifact and `arm.run`."""
    art = compiled("mlp")
    with pytest.raises(qc.QCompilerError, match=r"compiled for float32\[4, 64\]"):
        art(torch.randn(2, 64))
    with pytest.raises(qc.QCompilerError, match=r"input 0 is int8\[4, 64\]; the program was compiled for float32\[4, 64\]"):
        arm.run(art.library, (torch.zeros(4, 64, dtype=torch.int8),))


def test_missing_cross_compiler_names_debian_package(monkeypatch):
    """Without aarch64-linux-gnu-gcc, compiling for arm fails before any work, naming the package."""
    which = shutil.which
    monkeypatch.setattr(toolchain.shutil, "which", lambda t: None if t == "aarch64-linux-gnu-gcc" else which(t))
    with pytest.raises(qc.LoweringError, match="apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross"):
        qc.compile(zoo.MLP(8, 8, 4), (torch.randn(2, 8),), target="arm", calib=[torch.randn(2, 8)])


@needs_toolchain
def test_missing_emulator_names_debian_package(monkeypatch):
    """Without qemu-aarch64, running an arm artifact names the qemu-user package."""
    art = compiled("mlp")
    which = shutil.which
    monkeypatch.setattr(toolchain.shutil, "which", lambda t: None if t == "qemu-aarch64" else which(t))
    with pytest.raises(qc.LoweringError, match="qemu-aarch64 is not installed.*apt-get install qemu-user"):
        arm.run(art.library, (torch.randn(4, 64),))


def test_dynamic_batch_is_host_only(monkeypatch):
    """dynamic_batch=True for arm says the target is specialized to the example shapes."""
    monkeypatch.setattr(arm, "preflight", lambda target="arm": None)  # no toolchain needed to get there
    with pytest.raises(qc.LoweringError, match="compiles for the example shapes only"):
        qc.compile(zoo.MLP(8, 8, 4), (torch.randn(2, 8),), target="arm", calib=[torch.randn(2, 8)],
                   dynamic_batch=True)


@needs_toolchain
def test_verify_nodes_on_arm():
    """verify_nodes builds the isolated-op graph for arm and runs it under QEMU: every integer op
    of the transformer block equals the reference, float ops agree within rtol."""
    from qcompiler.backends.verify import verify_nodes

    art = compiled("transformer")
    x = torch.randn(MODELS["transformer"][1])
    checks = verify_nodes(art.ir, (x,), target="arm")
    assert len(checks) > 10
    assert [c for c in checks if not c.ok] == []
    assert any(c.dtype == "int8" for c in checks)
