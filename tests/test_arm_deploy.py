"""The deployable arm form (backends/arm_deploy.py): export_library output cross-linked for
aarch64, run by its own run_model.py in an aarch64 Python under qemu, equal to the IR."""

import pytest
import torch

import qcompiler as qc
from qcompiler import zoo
from qcompiler.backends import arm_deploy
from qcompiler.errors import LoweringError


@pytest.mark.slow
def test_board_folder_runs_in_emulated_aarch64_python_bit_exact(tmp_path):
    """W8A8 MLP: model.so + run_model.py from export() run in Debian's arm64 CPython with the
    aarch64 TVM runtime wheel under qemu-aarch64 -cpu cortex-a76, and the outputs equal the IR's
    integer reference and the host build bit for bit (first run also builds the cached sysroot)."""
    torch.manual_seed(0)
    model = zoo.MLP(d_in=16, hidden=32, d_out=8).eval()
    x = torch.randn(4, 16)
    art = qc.compile(model, (x,), calib=[torch.randn(64, 16)])
    out = arm_deploy.export(art.ir, (x,), tmp_path / "board")
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "model.so", "run_model.py"]
    elf = (out / "model.so").read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[18] == 183  # e_machine EM_AARCH64
    readme = (out / "README.txt").read_text()
    assert "TVM_USE_RUNTIME_LIB=1 python3 run_model.py model.so input_0.npy" in readme
    assert "input_0.npy: float32[4, 16]" in readme
    xs = torch.randn(4, 16) * 3
    (y,) = arm_deploy.run_on_emulator(out, [xs])
    ref = art.ir(xs)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.equal(y, ref) and torch.equal(y, art(xs))
    assert ref.abs().max() > 0


def test_missing_cross_compiler_names_the_debian_package(monkeypatch, tmp_path):
    """Without aarch64-linux-gnu-gcc, export fails before any compile, naming the packages."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LoweringError, match=r"aarch64-linux-gnu-gcc is not installed.*"
                                            r"apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross"):
        arm_deploy.export(None, (torch.zeros(1, 4),), tmp_path / "board")


def test_non_aarch64_target_is_refused(tmp_path):
    """The board form needs an aarch64 target: 'host' is refused with what would work."""
    with pytest.raises(LoweringError, match=r"target 'host' is not 64-bit ARM Linux.*such as 'arm'"):
        arm_deploy.export(None, (torch.zeros(1, 4),), tmp_path / "board", target="host")


def test_emulator_run_of_a_folder_without_a_model(tmp_path):
    """run_on_emulator on a folder that export() did not write says what is missing."""
    with pytest.raises(LoweringError, match=r"has no model.so: it is not a folder written by arm_deploy.export"):
        arm_deploy.run_on_emulator(tmp_path, [torch.zeros(1, 4)])


def test_interrupted_sysroot_build_leaves_nothing_trusted(monkeypatch, tmp_path):
    """A sysroot build that dies half way leaves no sysroot and no temporary folder; the next
    call builds again and only a complete build is renamed into place."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def half_build(tmp, final):
        calls.append(tmp)
        (tmp / "root" / "usr" / "bin").mkdir(parents=True)
        if len(calls) == 1:
            raise KeyboardInterrupt  # e.g. Ctrl-C during the download

    monkeypatch.setattr(arm_deploy, "_build_sysroot", half_build)
    with pytest.raises(KeyboardInterrupt):
        arm_deploy.sysroot()
    assert list((tmp_path / "qcompiler").iterdir()) == []
    root = arm_deploy.sysroot()
    assert len(calls) == 2 and root.is_dir() and root.parent.name.startswith("aarch64-python3.11-")
    assert [p.name for p in (tmp_path / "qcompiler").iterdir()] == [root.parent.name]
    assert arm_deploy.sysroot() == root and len(calls) == 2


def test_unreachable_package_mirror_says_why(monkeypatch, tmp_path):
    """When the Debian mirror cannot be reached, the error names the mirror and apt's reason."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(arm_deploy, "DEBIAN_SOURCES", (("http://127.0.0.1:9/debian", "bookworm"),))
    with pytest.raises(LoweringError, match=r"(?s)package lists could not be downloaded from "
                                            r"http://127.0.0.1:9/debian bookworm.*127.0.0.1"):
        arm_deploy.sysroot()
    assert list((tmp_path / "qcompiler").iterdir()) == []
