"""The `mali` backend: OpenCL kernels for Arm Mali GPUs (TVM `opencl`, `-device=mali`), run here
on PoCL through pyopencl.

build:  IR -> flat Program (`program.extract` with `mali_schedule.mali_pipeline`: TVM's
        generic GPU pipeline, legalize and fuse, then every fused kernel scheduled by
        `ScheduleForGPU`: int8 linears on 4-lane dot products (`mali_dot.py`), the others by
        the first of dlight's Matmul, GEMV, Reduction, GeneralReduction, Fallback that fits;
        with `tune`, MetaSchedule's schedules from the database first; storage planned by Relax)
        -> `tvm.tirx.build` for opencl -device=mali (float constants exact: `exact_floats`),
        with the module kept right after SplitHostDevice to read each kernel's launches
        (`mali_kernels.py`) and the OpenCL C taken from the device module -> `MaliProgram`
        (plain data: tensors, buffers, constants, calls, launches, OpenCL source).
run:    `MaliRunner` (`mali_runner.py`) launches the kernels in order through pyopencl.

The integer kernels are the same TE computations as on the CPU targets (lowering.py,
kernels_int.py): int8 operands, int32 accumulation, requantize in int64 exactly as the
reference; 4-bit weights stay packed two to a byte in global memory and are unpacked (shift,
mask, offset) in registers inside the kernel. Every launch's work-group is at most
`max_threads` work-items (the Mali default 256, the target's `max_num_threads`: dlight sizes
its thread blocks by it); `build(..., max_threads=n)` schedules for a device with a smaller
limit, and a kernel that still exceeds it is rejected with the limit named. Artifacts store
kernels.cl (the OpenCL C), program.json (tensors, buffers, calls, launches) and
constants.npz (weights and requantizer constants, read back with allow_pickle=False).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from qcompiler.errors import ArtifactError, LoweringError

from .mali_kernels import Launch
from .program import KernelCall, Program, Tensor
from .targets import get_target, tvm_target

SOURCE, META, CONSTANTS = "kernels.cl", "program.json", "constants.npz"
DEFAULT_MAX_THREADS = 256  # TVM's opencl -device=mali default (Mali-G: up to 384 or 1024 per group)


@dataclass
class MaliProgram:
    """A compiled model for an OpenCL device: what the runner launches, with no TVM objects."""

    inputs: list[int]
    outputs: list[int]
    tensors: list[Tensor]
    buffers: list[int]
    constants: list[np.ndarray]
    calls: list[KernelCall]
    launches: dict[str, list[Launch]]  # PrimFunc name -> its OpenCL kernel launches
    scratch: dict[str, list[int]]  # PrimFunc name -> bytes of the global buffers its launches share
    source: str  # OpenCL C of every kernel
    target: dict = field(default_factory=dict)  # the TVM target it was compiled for
    summary: str = ""
    program: Program | None = field(default=None, repr=False, compare=False)  # in memory only
    host_module: object = field(default=None, repr=False, compare=False)  # tvm.tirx.build's result, in memory only
    ir: object = field(default=None, repr=False, compare=False)  # the IR and example inputs it was built
    example_inputs: tuple | None = field(default=None, repr=False, compare=False)  # from (for export)
    rules: dict = field(default_factory=dict)  # PrimFunc name -> the rule that scheduled it
    relax_pipeline: object = field(default=None, repr=False, compare=False)  # pipeline(tvm target), for export

    signature = Program.signature

    def launch_table(self) -> list[tuple[str, str, tuple, tuple]]:
        """(PrimFunc, OpenCL kernel, global size, local size) per launch, in execution order."""
        return [(c.kernel, l.kernel, l.global_size, l.local_size) for c in self.calls for l in self.launches[c.kernel]]


def mali_target(target: str = "mali", max_threads: int | None = None) -> dict:
    """The TVM target dict of `target`, with the work-group limit set to `max_threads`."""
    d = dict(tvm_target(get_target(target)))
    if max_threads is not None:
        if not isinstance(max_threads, int) or max_threads < 1:
            raise LoweringError(f"max_threads must be a positive work-group size, got {max_threads!r}")
        d.update(max_num_threads=max_threads, max_threads_per_block=max_threads)
    return d


def preflight(target: str = "mali") -> None:
    """pyopencl must be importable (the OpenCL platform is looked for when the model runs)."""
    from .mali_runner import cl_module

    cl_module()


def build(gm: torch.fx.GraphModule, example_inputs: tuple, target: str = "mali", dynamic_batch: bool = False,
          max_threads: int | None = None, dot: str = "auto", tune=None, pipeline=None) -> MaliProgram:
    """Compile the IR into OpenCL kernels specialized to the example shapes.

    dot: "auto" gives int8 linear layers the 4-lane dot-product kernels of `mali_dot.py`
    (`cl_arm_integer_dot_product_int8` when the device has it, a portable form otherwise);
    "off" leaves them to dlight's rules.
    tune: a `qc.Tune` with `rpc=`: MetaSchedule-tune the kernels on the board (`mali_tune.py`).
    pipeline: `pipeline(tvm_target)` replacing the Relax pipeline (e.g. `mali_tune.apply_records`)."""
    import tvm

    from .mali_dot import opencl_prelude
    from .mali_kernels import compile_kernels
    from .mali_schedule import gpu_rules, mali_pipeline
    from .program import extract

    if dynamic_batch:
        raise LoweringError(f"the {target} target compiles for the example shapes only; compile without "
                            "dynamic_batch=True (or use target='host' for code that takes any batch size)")
    if dot not in ("auto", "off"):
        raise LoweringError(f"dot must be 'auto' (int8 linears on 4-lane dot products) or 'off', got {dot!r}")
    if tune is not None:
        from .mali_tune import require_device

        require_device(tune)
    tdict = mali_target(target, max_threads)
    pipeline = pipeline or (lambda t: mali_pipeline(t, dot == "auto"))
    if tune is not None:
        from . import mali_tune
        from .lowering import to_relax

        with tvm.target.Target(tdict):
            database, _ = mali_tune.tune(to_relax(gm, example_inputs), tdict, tune)
        pipeline = mali_tune.apply_records(database, mali_tune.board_target(tdict), dot == "auto")
    program = extract(gm, example_inputs, target, tdict, pipeline)
    tgt = tvm.target.Target(tdict)
    kernels = program.kernels
    with opencl_prelude():  # the dot-product helper's definition heads the OpenCL source
        lib, source, launches, scratch = compile_kernels(kernels, tgt)
    limit = int(tgt.attrs["max_num_threads"])
    for name, ls in launches.items():
        for launch in ls:
            if launch.group_size > limit:
                raise LoweringError(f"kernel {launch.kernel} (of {name}) was scheduled for work-groups of "
                                    f"{launch.group_size} work-items, over the target's limit of {limit}")
    return MaliProgram(program.inputs, program.outputs, program.tensors, program.buffers, program.constants,
                       program.calls, launches, scratch, source, tdict, program.summary(), program, lib, gm,
                       tuple(example_inputs), gpu_rules(kernels), pipeline)


def save_library(p: MaliProgram, folder: str) -> list[str]:
    """Write kernels.cl, program.json and constants.npz into `folder`; returns the file names."""
    with open(os.path.join(folder, SOURCE), "w") as f:
        f.write(p.source)
    meta = {"target": p.target, "summary": p.summary, "signature": p.signature(), "inputs": p.inputs,
            "outputs": p.outputs, "buffers": p.buffers,
            "tensors": [[list(t.shape), t.dtype, t.home, t.index, t.offset, t.label] for t in p.tensors],
            "calls": [[c.kernel, list(c.args)] for c in p.calls], "rules": p.rules,
            "launches": {k: [l.to_json() for l in v] for k, v in p.launches.items()}, "scratch": p.scratch}
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=1)
    np.savez(os.path.join(folder, CONSTANTS), *p.constants)
    return [SOURCE, META, CONSTANTS]


def load_library(folder: str) -> MaliProgram:
    paths = {n: os.path.join(folder, n) for n in (SOURCE, META, CONSTANTS)}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise ArtifactError(f"{name} is missing from the mali artifact in {folder}; compile it again")
    try:
        with open(paths[META]) as f:
            meta = json.load(f)
        with open(paths[SOURCE]) as f:
            source = f.read()
        with np.load(paths[CONSTANTS], allow_pickle=False) as z:
            constants = [z[f"arr_{i}"] for i in range(len(z.files))]
        tensors = [Tensor(tuple(s), d, h, i, o, lab) for s, d, h, i, o, lab in meta["tensors"]]
        calls = [KernelCall(k, tuple(a)) for k, a in meta["calls"]]
        launches = {k: [Launch.from_json(l) for l in v] for k, v in meta["launches"].items()}
        return MaliProgram(meta["inputs"], meta["outputs"], tensors, meta["buffers"], constants, calls, launches,
                           meta["scratch"], source, meta["target"], meta.get("summary", ""),
                           rules=meta.get("rules", {}))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ArtifactError(f"the mali artifact in {folder} is damaged ({type(e).__name__}: {e}); "
                            "compile it again") from e


def runner(p: MaliProgram):
    from .mali_runner import MaliRunner

    return MaliRunner(p)


def export(p: MaliProgram, folder: str) -> list[str]:
    """The deployable form for an aarch64 board with a Mali GPU (`mali_deploy.py`)."""
    from .mali_deploy import export as deploy

    return deploy(p, folder)
