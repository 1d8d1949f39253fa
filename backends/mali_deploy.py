"""The deployable form of a `mali` model: an aarch64 shared library for TVM's Relax VM with the
OpenCL kernels embedded, plus the script and README that run it on a board with a Mali GPU.

`export(program, out_dir)` compiles the model again with the same lowering and schedules as
the verified build (its Relax pipeline: `mali_schedule.mali_pipeline`, or the tuned one; the
same work-group limit) but with an aarch64 host (`llvm -mtriple=aarch64-linux-gnu`) and writes

    model.so       host code for aarch64 (linked by aarch64-linux-gnu-gcc through TVM's
                   cross_compiler) and the OpenCL C of every kernel, compiled by the board's
                   driver when the module is first run
    kernels.cl     the same OpenCL C, for reading and for offline compilers (Mali's malioc)
    run_model.py   loads model.so into the Relax VM on tvm.opencl(0) (`mali_board_runner.py`)
    README.txt     what the board needs and the command that runs the model

This machine has no Mali GPU and the PyPI TVM runtime has no OpenCL: the library is checked
here for its architecture and for the kernels it embeds, not run. The kernels themselves are
the ones the `mali` runner verifies on PoCL.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from qcompiler.errors import ArtifactError, LoweringError

from .toolchain import require

AARCH64_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon"]}

README = """qcompiler model for an Arm Mali GPU (OpenCL), aarch64 Linux host
target: {target}

Files
  model.so      aarch64 host code + the OpenCL kernels (Relax VM executable)
  kernels.cl    the OpenCL C of the kernels (as embedded in model.so)
  run_model.py  runs model.so in TVM's Relax VM on the OpenCL device: .npy in, output_<i>.npy out

Inputs (in order): {inputs}
Kernel launches per run: {launches}; largest work-group {group} work-items (the device must allow it).

On the board (aarch64 Linux with the Mali OpenCL driver: libmali from the vendor BSP, or Mesa
rusticl with panfrost; check with `clinfo`):
  1. a TVM 0.27 runtime built with OpenCL:
       git clone --recursive -b v0.27.0 https://github.com/apache/tvm && cd tvm
       cmake -B build -DUSE_OPENCL=ON -DUSE_LLVM=OFF && cmake --build build --target tvm_runtime -j4
       pip install apache-tvm-ffi==0.1.14.post1 numpy && export TVM_LIBRARY_PATH=$PWD/build PYTHONPATH=$PWD/python
  2. python3 run_model.py model.so {input_files}

The first run compiles kernels.cl with the board's OpenCL compiler; run_model.py times the second.
"""


def export(program, out_dir) -> list[str]:
    """Write model.so, kernels.cl, run_model.py and README.txt for `program` into `out_dir`."""
    ir, examples = getattr(program, "ir", None), getattr(program, "example_inputs", None)
    if ir is None or examples is None:
        raise ArtifactError("this mali artifact was loaded from disk and keeps no IR to compile the board "
                            "library from; export the artifact qc.compile returned (before saving)")
    gcc = require("aarch64-linux-gnu-gcc")
    import tvm
    from tvm.support.cc import cross_compiler

    from .exact_floats import PIPELINE
    from .lowering import to_relax
    from .mali_dot import opencl_prelude
    from .mali_schedule import mali_pipeline

    target = dict(program.target, host=AARCH64_HOST)
    tgt = tvm.target.Target(target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tgt:
            mod = to_relax(ir, examples)
        with opencl_prelude():
            pipeline = program.relax_pipeline or mali_pipeline  # the verified build's (tuned) schedules
            executable = tvm.compile(mod, target=tgt, relax_pipeline=pipeline(tgt), tir_pipeline=PIPELINE)
        executable.export_library(str(out / "model.so"), fcompile=cross_compiler(gcc))
    except Exception as e:
        raise LoweringError(f"building model.so for an aarch64 host with OpenCL kernels failed: "
                            f"{type(e).__name__}: {e}") from e
    (out / "kernels.cl").write_text(opencl_source(executable))
    shutil.copyfile(Path(__file__).with_name("mali_board_runner.py"), out / "run_model.py")
    sig = program.signature()["inputs"]
    (out / "README.txt").write_text(README.format(
        target=json.dumps(target), launches=len(program.launch_table()),
        group=max((l.group_size for ls in program.launches.values() for l in ls), default=1),
        inputs=", ".join(f"input_{k}.npy: {s['dtype']}{s['shape']}" for k, s in enumerate(sig)),
        input_files=" ".join(f"input_{k}.npy" for k in range(len(sig)))))
    return ["model.so", "kernels.cl", "run_model.py", "README.txt"]


def opencl_source(executable) -> str:
    """The OpenCL C embedded in a compiled executable."""
    found = []

    def walk(m):
        if m.kind == "opencl":
            found.append(m.inspect_source())
        for sub in m.imports:
            walk(sub)

    walk(executable.mod)
    if not found:
        raise LoweringError("the compiled model holds no OpenCL module")
    return "\n".join(found)


def describe(path) -> str:
    """`file`'s description of a library (used to check the architecture)."""
    return subprocess.run(["file", "-b", str(path)], capture_output=True, text=True).stdout.strip()
