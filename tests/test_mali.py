"""mali target: OpenCL kernels run on PoCL through pyopencl equal the IR's reference, every kernel
has a GPU schedule within the work-group limit, artifacts save/load and export, and bad input
(no OpenCL platform, work-groups over the device limit) fails clearly."""

import os
import subprocess
import sys

import pytest
import torch

import qcompiler as qc
from qcompiler import zoo
from qcompiler.errors import ArtifactError, LoweringError
from tests.conftest import assert_matches_ir, calib_batches

cl = pytest.importorskip("pyopencl")


def _platform_missing():
    try:
        from qcompiler.backends.mali_runner import opencl_device

        opencl_device()
    except LoweringError as e:
        return str(e)
    return None


MISSING = _platform_missing()
needs_opencl = pytest.mark.skipif(MISSING is not None, reason=f"no OpenCL device: {MISSING}")

MODELS = {  # small versions of the zoo models: seconds per compile
    "mlp": (lambda: zoo.MLP(64, 32, 10), (4, 64)),
    "cnn": (zoo.DigitsCNN, (2, 1, 8, 8)),
    "transformer": (lambda: zoo.TransformerBlock(d=32, heads=2, ffn=64), (1, 8, 32)),
}
# between them every kernel kind: int4 conv, grouped and packed linear, max-pool (cnn w4a8);
# int8 linear, activation x activation matmul, softmax, layer norm, gelu (transformer w8a8).
# benchmarks/mali.py runs every model at both recipes.
CASES = [("cnn", "w4a8"), ("transformer", "w8a8")]
_compiled = {}


def compiled(model: str, quant: str):
    if (model, quant) not in _compiled:
        make, shape = MODELS[model]
        torch.manual_seed(0)
        _compiled[model, quant] = qc.compile(make().eval(), (torch.randn(shape),), target="mali", quant=quant,
                                             calib=calib_batches(shape))
    return _compiled[model, quant]




@needs_opencl
@pytest.mark.parametrize("model,quant", CASES)
def test_opencl_kernels_on_pocl_match_ir(model, quant):
    """CNN at W4A8 and transformer block at W8A8: the OpenCL kernels launched on PoCL give the
    IR's outputs (integer layers bit-exact, so float outputs agree to rounding)."""
    art = compiled(model, quant)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        assert_matches_ir(art, torch.randn(MODELS[model][1], generator=g))


@needs_opencl
def test_every_kernel_has_a_gpu_schedule_within_the_limit():
    """Every kernel is scheduled by one of dlight's GPU rules, launches at most 256 work-items a
    group (the Mali target's limit), and the int4 weights stay packed (uchar, unpacked with
    shift and mask in the kernel) while int8 products accumulate in int."""
    p = compiled("cnn", "w4a8").library
    assert set(p.rules) == {c.kernel for c in p.calls}
    assert set(p.rules.values()) <= {"ArmDot4", "Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback"}
    assert all(l.group_size <= 256 for ls in p.launches.values() for l in ls)
    assert "__global uchar* restrict param_0_ptr" in p.source  # two weights a byte in global memory
    assert ") & 15) - 8)" in p.source  # unpacked in the kernel: (byte >> 4*lane) & 15, minus the offset
    q = compiled("transformer", "w8a8").library
    assert "int dot_int" in q.source  # int32 accumulators of the int8 dot


@needs_opencl
def test_smaller_work_group_limit_reschedules():
    """Compiling for a device that allows 32 work-items per group reschedules every kernel to
    fit, and the result still equals the IR."""
    from qcompiler.backends import mali

    art = compiled("cnn", "w4a8")
    shape = MODELS["cnn"][1]
    assert max(l.group_size for ls in art.library.launches.values() for l in ls) > 32
    p = mali.build(art.ir, (torch.randn(shape),), max_threads=32)
    assert max(l.group_size for ls in p.launches.values() for l in ls) <= 32
    x = torch.randn(shape)
    assert_matches_ir(art, x, got=mali.runner(p)(x))


@needs_opencl
def test_work_group_over_device_limit_is_rejected():
    """A launch whose work-group exceeds what the device allows is refused before it runs,
    naming the kernel and the device's limit."""
    from dataclasses import replace

    from qcompiler.backends.mali_runner import MaliRunner, opencl_device

    p = compiled("cnn", "w4a8").library
    ctx, device = opencl_device()
    big = device.max_work_group_size * 2
    name = p.calls[0].kernel
    launch = p.launches[name][0]
    bad = replace(p, launches={**p.launches, name: [replace(launch, local_size=(big, 1, 1),
                                                            global_size=(big, 1, 1))]})
    with pytest.raises(LoweringError, match=rf"{launch.kernel}.*exceeds the limit .*{device.max_work_group_size}"):
        MaliRunner(bad, (ctx, device))


@needs_opencl
def test_int8_linears_use_dot_product_kernels_on_both_paths():
    """The transformer's int8 linears run on 4-lane dot products: the portable form (PoCL has no
    cl_arm_integer_dot_product_int8) and the arm_dot form (compiled with the extension macro and
    a stand-in arm_dot) both equal the IR; a stand-in returning 0 changes the outputs, so the
    arm_dot form really is the one compiled."""
    from qcompiler.backends.mali_runner import MaliRunner

    art = compiled("transformer", "w8a8")
    p = art.library
    assert sum(r == "ArmDot4" for r in p.rules.values()) >= 4  # q, k, v, o, fc1, fc2 where K % 4 == 0
    x = torch.randn(MODELS["transformer"][1], generator=torch.Generator().manual_seed(3))
    portable = MaliRunner(p)
    assert portable.dot_path == "portable"
    assert_matches_ir(art, x, got=portable(x))
    emulated = MaliRunner(p, options="-D QC_EMULATE_ARM_DOT")
    assert emulated.dot_path == "arm_dot"
    assert_matches_ir(art, x, got=emulated(x))
    probe = MaliRunner(p, options="-D QC_EMULATE_ARM_DOT -D QC_ARM_DOT_PROBE")
    assert not torch.equal(probe(x)[0], art.ir(x))


def test_no_opencl_platform_names_the_packages(tmp_path):
    """With no OpenCL platform registered (an empty ICD vendor folder), the runner's error names
    the Debian packages and pyopencl."""
    code = ("from qcompiler.backends.mali_runner import opencl_device\n"
            "from qcompiler.errors import LoweringError\n"
            "try:\n    opencl_device()\nexcept LoweringError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, OCL_ICD_VENDORS=str(tmp_path), OCL_ICD_FILENAMES="")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "ERR no OpenCL platform found" in done.stdout, done.stderr[-2000:]
    assert "pocl-opencl-icd ocl-icd-libopencl1" in done.stdout and "pyopencl" in done.stdout


@needs_opencl
def test_save_load_mali_artifact(tmp_path):
    """A saved mali artifact (kernels.cl, program.json, constants.npz) loads and runs the same;
    a missing member is an ArtifactError."""
    art = compiled("cnn", "w4a8")
    art.save(str(tmp_path / "m"))
    back = qc.load(str(tmp_path / "m"))
    x = torch.randn(MODELS["cnn"][1])
    assert torch.equal(back(x), art(x))
    os.remove(tmp_path / "m" / "kernels.cl")
    with pytest.raises(ArtifactError):
        qc.load(str(tmp_path / "m"))


@pytest.mark.skipif(subprocess.run(["which", "aarch64-linux-gnu-gcc"], capture_output=True).returncode != 0,
                    reason="aarch64-linux-gnu-gcc not installed")
@needs_opencl
def test_export_writes_aarch64_library_with_kernels(tmp_path):
    """export() writes an aarch64 shared library embedding the OpenCL kernels, the kernels'
    source, the board script and a README with the run command."""
    from qcompiler.backends.mali_deploy import describe

    art = compiled("cnn", "w4a8")
    files = art.export(str(tmp_path / "board"))
    out = tmp_path / "board"
    assert set(files) == {"model.so", "kernels.cl", "run_model.py", "README.txt"}
    assert "ARM aarch64" in describe(out / "model.so")
    data = (out / "model.so").read_bytes()
    for call in art.library.calls:
        assert call.kernel.encode() + b"_kernel" in data
    assert "python3 run_model.py model.so input_0.npy" in (out / "README.txt").read_text()


def test_weight_only_recipe_is_refused_by_name():
    """A weight-only recipe, whose kernel has no GPU schedule, fails naming the kernel and the
    recipes the mali target supports."""
    torch.manual_seed(0)
    with pytest.raises(LoweringError, match=r"weight_only.*no GPU schedule.*w8a8, w4a8"):
        qc.compile(zoo.MLP(64, 32, 10).eval(), (torch.randn(4, 64),), target="mali", quant="w4g64",
                   calib=calib_batches((4, 64)))


def test_tuning_without_a_device_is_refused():
    """Tuning the mali target needs a board reached through RPC: Tune() without rpc= is a
    TuningError saying so, before any work."""
    from qcompiler.backends import mali
    from qcompiler.errors import TuningError

    with pytest.raises(TuningError, match=r"tuned on a device.*rpc=qc.RPC"):
        mali.build(None, (), tune=qc.Tune(trials=8))


def test_dynamic_batch_is_refused():
    """The mali target compiles for the example shapes: dynamic_batch=True is refused with the
    alternative named."""
    from qcompiler.backends import mali

    with pytest.raises(LoweringError, match="example shapes only"):
        mali.build(None, (), dynamic_batch=True)
