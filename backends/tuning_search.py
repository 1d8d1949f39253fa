"""The MetaSchedule side of tuning (`tuning.py` has the options and the build pipelines):
which kernels to tune, how the trial budget is shared, and the measurement loop.

- `select`: a kernel marked `tirx.is_scheduled` keeps its schedule, one with symbolic shapes
  (dynamic_batch) cannot be tuned, one with a valid record in the database is done.
- `share`: trials in proportion to FLOPs, at least one per kernel, lightest kernel first; what
  a kernel leaves unused (a small search space) goes to the next ones.
- `tune_tasks` (for every target; `tune_kernels` extracts the CPU targets' tasks): one kernel at a time, each in a temporary work folder with its own
  JSONDatabase (TVM's evolutionary search, XGBoost cost model, LocalBuilder, and LocalRunner or
  RPCRunner); when a kernel is done its records are merged into the persistent database
  (`tuning_db.merge`), so an interrupt loses only the kernel in progress. tqdm bars count
  kernels and trials.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path

from . import tuning_db
from .targets import get_target
from .toolchain import require
from .tuning import Tune, TuneSummary, device_count, is_cross, kernel_stage, target_key, tuning_target

log = logging.getLogger("qcompiler.tuning")


def _is_static(func) -> bool:
    import tvm

    shapes = [getattr(p, "shape", None) for p in func.params]
    return all(s is not None and all(isinstance(d, tvm.tirx.IntImm) for d in s) for s in shapes)


def select(tasks, database, summary: TuneSummary) -> list:
    """The tasks to tune; the others are sorted into `summary` by why they are left alone."""
    todo = []
    for task in tasks:
        mod = task.dispatched[0]
        func = mod["main"]
        if func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False)):
            summary.scheduled.append(task.task_name)
        elif not _is_static(func):
            summary.dynamic.append(task.task_name)
        elif database.query_tuning_record(mod, task.target, task.task_name) is not None:
            summary.from_database.append(task.task_name)
        else:
            todo.append(task)
    return todo


def _flops(task) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return max(float(estimate_tir_flops(task.dispatched[0])), 1.0)
    except Exception:  # an op the estimator does not know: count it as light
        return 1.0


def share(remaining: int, flops: list[float]) -> int:
    """Trials for the first of the kernels with `flops` (the rest follow) out of `remaining`:
    proportional to its FLOPs, at least one, leaving one for each later kernel."""
    later = len(flops) - 1
    return max(1, min(remaining - later, round(remaining * flops[0] / sum(flops))))


class _Progress:
    """Progress bars: kernels tuned, and trials of the kernel being tuned."""

    def __init__(self, kernels: int, enabled: bool):
        from tqdm import tqdm

        self._tqdm, self.enabled = tqdm, enabled
        self.kernels = tqdm(total=kernels, desc="tuning kernels", unit="kernel", disable=not enabled)
        self.trials = None
        self.count = 0  # trials measured for the current kernel
        self.finished = 0  # kernels done

    def start(self, name: str, trials: int) -> None:
        self.count = 0
        self.trials = self._tqdm(total=trials, desc=name[:48], unit="trial", leave=False,
                                 disable=not self.enabled)

    def measured(self, n: int) -> None:
        self.count += n
        self.trials.update(n)

    def done(self) -> None:
        self.trials.close()
        self.kernels.update(1)
        self.finished += 1

    def close(self) -> None:
        if self.trials is not None:
            self.trials.close()
        self.kernels.close()


def _measure_callbacks(progress: _Progress) -> list:
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class ProgressCallback(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            progress.measured(len(runner_results))
            if not runner_results:  # the search space is exhausted: stop now, not after 5 empty rounds
                task_scheduler.terminate_task(task_id)

    return list(ms.measure_callback.MeasureCallback.create("default")) + [ProgressCallback()]


def _build_without_intrinsics():
    """The builder workers' build function: TVM's default one imports every tensor intrinsic
    (the CUDA ones alone take ~30 s, minutes on a loaded machine) in each worker for each batch
    of candidates; candidates arrive already scheduled (tensorized where at all), so the build
    needs none. Defined in a closure so that cloudpickle sends it by value."""

    def build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    return build


def _export_shared_library(cc: str):
    """The builder workers' export function for a cross target: each candidate becomes a shared
    library linked by the target's cross compiler, which the device's RPC server loads as is
    (TVM's default exports a tar of objects for the device to link, and a board seldom has a
    compiler)."""

    def export(mod):
        import os
        import tempfile

        from tvm.support.cc import cross_compiler

        path = os.path.join(tempfile.mkdtemp(prefix="qc-tune-"), "candidate.so")
        mod.export_library(path, fcompile=cross_compiler(cc))
        return path

    return export


def _alloc_arguments_from_host():
    """The RPC runner's argument allocator: random inputs made on this machine and copied to
    the device. TVM's default fills them on the device with `tvm.contrib.random`, which a
    board's runtime-only TVM (the aarch64 wheel without its compiler library) lacks."""

    def alloc(_session, device, args_info, alloc_repeat):
        import numpy as np
        from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

        rng = np.random.default_rng(0)

        def fill(tensor):
            shape, dtype = tuple(tensor.shape), str(tensor.dtype)
            values = rng.standard_normal(shape) if dtype.startswith("float") else rng.integers(-8, 8, shape)
            tensor.copyfrom(values.astype(dtype))

        return alloc_argument_common(fill, device, args_info, alloc_repeat)

    return alloc


def builder_runner(tune: Tune, cross_cc: str | None = None):
    """MetaSchedule's LocalBuilder (candidates linked by `cross_cc` when the code is for
    another machine) and its LocalRunner, or an RPCRunner on the devices of `tune.rpc`."""
    from tvm.s_tir import meta_schedule as ms

    export = _export_shared_library(require(cross_cc)) if cross_cc else None
    builder = ms.builder.LocalBuilder(timeout_sec=tune.timeout_sec, f_build=_build_without_intrinsics(), f_export=export)
    if tune.rpc is None:
        return builder, ms.runner.LocalRunner(timeout_sec=tune.timeout_sec)
    config = ms.runner.RPCConfig(tracker_host=tune.rpc.host, tracker_port=tune.rpc.port,
                                 tracker_key=tune.rpc.key, session_priority=tune.rpc.priority,
                                 session_timeout_sec=tune.rpc.session_timeout_sec)
    return builder, ms.runner.RPCRunner(rpc_config=config, max_workers=device_count(tune.rpc),
                                        f_alloc_argument=_alloc_arguments_from_host())


def _without_gpu_intrinsics() -> None:
    """TuneContext imports `tvm.s_tir.tensor_intrin`, which parses every TVMScript intrinsic
    (CUDA's by the hundred); in a process that has imported torch each parse walks
    sys.modules, and the import took 64 s here (minutes under load). Kernels arrive scheduled
    (tensorized by `dot_schedule` with the project's own intrinsics) and MetaSchedule's CPU
    rules use none, so register only the x86 and Arm intrinsics and mark the package imported;
    an explicit import of another submodule still works."""
    import importlib
    import importlib.util
    import sys

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        sys.modules[name] = importlib.util.module_from_spec(importlib.util.find_spec(name))
        for sub in ("x86", "arm_cpu"):
            importlib.import_module(f"{name}.{sub}")


def _search_strategy(trials: int):
    """TVM's evolutionary search with its population scaled to the budget: the default 512
    candidates evolved for 4 generations per batch cost far more than a budget of a few dozen
    measurements needs (minutes per kernel on a loaded 2-core machine)."""
    from tvm.s_tir import meta_schedule as ms

    population = min(512, max(64, 8 * trials))
    return ms.search_strategy.EvolutionarySearch(population_size=population, init_min_unmeasured=min(50, population // 4))


def _tune_task(task, trials: int, work_dir: Path, tune: Tune, builder, runner, callbacks):
    """Tunes one kernel with at most `trials` measurements into a JSONDatabase in `work_dir`."""
    from tvm.s_tir import meta_schedule as ms

    context = ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                             search_strategy=_search_strategy(trials), task_name=task.task_name,
                             rand_state=-1 if tune.seed is None else tune.seed,
                             logger=logging.getLogger(f"qcompiler.tuning.{task.task_name}"),
                             num_threads="physical").clone()
    work_dir.mkdir(parents=True)
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    ms.tune_tasks(tasks=[context], task_weights=[task.weight], work_dir=str(work_dir),
                  max_trials_global=trials, max_trials_per_task=trials,
                  num_trials_per_iter=min(trials, tune.trials_per_iter), builder=builder, runner=runner,
                  database=database, measure_callbacks=callbacks, task_scheduler="round-robin")
    return database


def tune_kernels(mod, target: str, tune: Tune):
    """Tunes the kernels of Relax module `mod` that the database lacks; returns the database
    (in memory: the persistent one plus this run's records) and a TuneSummary."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    tgt = tuning_target(target, tune)
    folder = Path(tune.database) if tune.database is not None else tuning_db.default_dir(target_key(target, tgt, tune.rpc))
    with tgt:
        kernels = kernel_stage(tgt)(tvm.IRModule(mod.functions, attrs=mod.attrs))  # a fresh module
    tasks = ms.relax_integration.extract_tasks(kernels, tgt)
    cross_cc = get_target(target).cc if is_cross(target) else None
    return tune_tasks(tasks, target, tune, folder, lambda: builder_runner(tune, cross_cc))


def tune_tasks(tasks, target: str, tune: Tune, folder: Path, make_builder_runner, cpu: bool = True):
    """The loop every target shares: the tasks the database in `folder` lacks are tuned one
    at a time (`_tune_all`); returns (the database in memory, the TuneSummary)."""
    from tvm.s_tir import meta_schedule as ms

    summary = TuneSummary(str(folder))
    work = Path(tempfile.mkdtemp(prefix="qcompiler-tune-"))
    try:
        (work / "view").mkdir()
        view = tuning_db.snapshot(folder, work / "view")
        todo = sorted(select(tasks, view, summary), key=_flops)
        if len(todo) > tune.trials:  # one trial at least per kernel: the heaviest ones get them
            summary.no_budget = [t.task_name for t in todo[:len(todo) - tune.trials]]
            todo = todo[len(todo) - tune.trials:]
            warnings.warn(f"{len(summary.no_budget)} kernels get no trial (Tune(trials={tune.trials}) is less than "
                          f"the {len(todo) + len(summary.no_budget)} kernels to tune); they keep the default "
                          "schedules until a later compile tunes them", stacklevel=4)
        if todo:
            if cpu:
                _without_gpu_intrinsics()
            _tune_all(todo, tune, make_builder_runner(), folder, work, view, summary)
        memory = ms.database.MemoryDatabase()
        tuning_db.copy_records(view, memory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("tuning %s: %d kernels tuned (%d trials), %d from the database, %d kept their schedule, "
             "%d dynamic, %d without budget; database %s", target, len(summary.tuned), summary.trials,
             len(summary.from_database), len(summary.scheduled), len(summary.dynamic), len(summary.no_budget), folder)
    return memory, summary


@contextlib.contextmanager
def _interrupts_stay_interrupts():
    """TVM's FFI turns a KeyboardInterrupt raised in Python code that C++ calls (Ctrl-C lands in
    the builder, the runner or a measure callback) into a bare RuntimeError, or the task
    scheduler logs it as a failed trial and goes on: note SIGINT while tuning (yields the list
    of signals seen, for the caller to check before it keeps a kernel's results) and raise
    KeyboardInterrupt again."""
    previous = signal.getsignal(signal.SIGINT)
    seen = []
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield seen  # signals go to the main thread only; SIGINT ignored or default: nothing to catch
        return

    def note(signum, frame):
        seen.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield seen
    except Exception as e:
        if seen:
            raise KeyboardInterrupt from e
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def _tune_all(todo, tune: Tune, builder_and_runner, folder: Path, work: Path, view, summary: TuneSummary) -> None:
    builder, runner = builder_and_runner
    progress = _Progress(len(todo), tune.progress)
    callbacks = _measure_callbacks(progress)
    remaining, flops = tune.trials, [_flops(t) for t in todo]
    with _interrupts_stay_interrupts() as interrupted:
        try:
            for i, task in enumerate(todo):
                trials = share(remaining, flops[i:])
                progress.start(task.task_name, trials)
                database = _tune_task(task, trials, work / f"task{i}", tune, builder, runner, callbacks)
                if interrupted:  # Ctrl-C that TVM swallowed: this kernel's results are not kept
                    raise KeyboardInterrupt
                tuning_db.merge(folder, database)  # the kernel is done: persist before the next one
                tuning_db.copy_records(database, view)
                progress.done()
                summary.tuned.append(task.task_name)
                summary.trials += progress.count
                remaining -= progress.count
        finally:
            progress.close()
