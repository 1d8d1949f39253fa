"""MetaSchedule tuning of the `mali` target's kernels on a device reached through TVM's RPC
tracker, remembered in the same persistent database as the other targets.

`qc.compile(model, x, target="mali", tune=qc.Tune(trials=..., rpc=qc.RPC("host:9190", "mali")))`:

 1. kernel stage: library dispatch, legalize, FuseOps/FuseTIR for the board's target
    (`opencl -device=mali` with an aarch64 host, `mali_deploy.AARCH64_HOST`), without dlight,
    so the kernels reach MetaSchedule unscheduled; `extract_tasks` keys them by structural hash.
 2. tuning: kernels the database lacks (`tuning_search.select`) share `trials` measurements;
    candidates are built here (LocalBuilder, host code linked by aarch64-linux-gnu-gcc) and run
    on the OpenCL device of the boards registered under `rpc.key` (RPCRunner); each finished
    kernel is merged into $XDG_CACHE_HOME/qcompiler/tuning/<mali-...-key-hash>/ (`tuning_db`).
 3. build: the kernel stage, `MetaScheduleApplyDatabase` (each kernel with a record gets its
    best schedule), `ScheduleForGPU` for the rest (dlight, dot-product kernels), then the GPU
    pipeline's remaining passes; the runner and export are unchanged.

This machine has no OpenCL runtime for TVM to measure with (the PyPI wheel lacks it), so
tuning needs `rpc=`; docs/mali.md gives the board's commands. `apply_records` is step 3 alone.
"""

from __future__ import annotations

from pathlib import Path

from qcompiler.errors import TuningError

from . import tuning_db

CROSS_CC = "aarch64-linux-gnu-gcc"  # links the board's host code of each candidate


def require_device(tune_opts) -> None:
    """Tuning measures on a board: `rpc=` is required."""
    if getattr(tune_opts, "rpc", None) is None:
        raise TuningError("the mali target is tuned on a device: pass tune=qc.Tune(rpc=qc.RPC(tracker='host:port', "
                          "key='...')) with an RPC server on the board (docs/mali.md); TVM here has no OpenCL "
                          "runtime to measure with")


def board_target(tdict: dict):
    import tvm

    from .mali_deploy import AARCH64_HOST

    return tvm.target.Target(dict(tdict, host=AARCH64_HOST))


def kernel_passes(tgt) -> list:
    """Dispatch, legalize and fusion of TVM's GPU pipeline, without dlight's schedules."""
    from tvm.relax.backend.gpu_generic import pipeline as stages

    legalize = [p for p in stages.legalize_passes(tgt) if p.info.name != "ApplyDefaultSchedule"]
    return stages.library_dispatch_passes(tgt) + legalize


def apply_records(database, board, dot: bool = True):
    """`pipeline(tgt)` for `program.extract`: kernels get the database's schedules (queried for
    the board's target), the others `ScheduleForGPU`'s."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.gpu_generic import pipeline as stages

    from .mali_schedule import ScheduleForGPU

    def pipeline(tgt):
        @tvm.transform.module_pass(opt_level=0, name="qc.MaliTunedPipeline")
        def _pipeline(mod, _ctx):
            with tgt:
                mod = tvm.transform.Sequential(kernel_passes(tgt))(mod)
            with board, database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            with tgt:
                rest = [ScheduleForGPU(dot)] + stages.dataflow_lower_passes(tgt) + stages.finalize_passes(tgt)
                return tvm.transform.Sequential(rest)(mod)

        return _pipeline

    return pipeline


def tune(mod, tdict: dict, tune_opts):
    """Tunes the kernels of Relax module `mod` on the RPC device; returns (database, summary)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .tuning import target_key
    from .tuning_search import builder_runner, tune_tasks

    require_device(tune_opts)
    board = board_target(tdict)
    folder = Path(tune_opts.database) if tune_opts.database is not None else \
        tuning_db.default_dir(target_key("mali", board, tune_opts.rpc))
    with board:
        kernels = tvm.transform.Sequential(kernel_passes(board))(tvm.IRModule(mod.functions, attrs=mod.attrs))
    tasks = ms.relax_integration.extract_tasks(kernels, board)
    return tune_tasks(tasks, "mali", tune_opts, folder, lambda: builder_runner(tune_opts, CROSS_CC), cpu=False)


def sampled_database(gm, example_inputs: tuple, tdict: dict, seed: int = 0):
    """A database holding, per kernel, one schedule drawn from MetaSchedule's GPU design space
    for the board's target (no measurement): what `apply_records` would apply after tuning, for
    checking tuned-form kernels on PoCL without a board. Slow (MetaSchedule's GPU rules load
    every tensor intrinsic TVM ships: minutes)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .lowering import to_relax

    board = board_target(tdict)
    with tvm.target.Target(tdict):
        mod = to_relax(gm, example_inputs)
    with board:
        kernels = tvm.transform.Sequential(kernel_passes(board))(mod)
    database = ms.database.MemoryDatabase()
    for task in ms.relax_integration.extract_tasks(kernels, board):
        func = task.dispatched[0]
        context = ms.TuneContext(mod=func, target=board, space_generator="post-order-apply",
                                 task_name=task.task_name, rand_state=seed, num_threads=1)
        space = context.generate_design_space()[0]
        workload = database.commit_workload(func)
        database.commit_tuning_record(ms.database.TuningRecord(
            space.trace, workload, [1.0], board, ms.arg_info.ArgInfo.from_prim_func(func["main"])))
    return database
