"""MetaSchedule autotuning of a model's kernels, remembered in a persistent database per target.

`qc.compile(model, x, tune=qc.Tune(trials=64))` runs, inside the backend build:

 1. kernel stage: the target's Relax pipeline up to FuseTIR (library dispatch, legalize, fuse)
    on a copy of the module; its PrimFuncs are the kernels MetaSchedule sees, and
    `ms.relax_integration.extract_tasks` keys them by structural hash (one task per distinct
    kernel, whatever number of calls).
 2. selection: kernels already scheduled (`tirx.is_scheduled`, e.g. tensorized int8 kernels)
    and kernels with symbolic shapes (dynamic_batch) keep their own schedules; kernels with
    records in the database are done; the rest are tuned.
 3. budget: `trials` measurements are shared by the kernels to tune in proportion to their
    FLOPs, at least one each, lightest kernel first; what a kernel leaves unused (its search
    space was smaller) goes to the next ones.
 4. measurement, one kernel at a time in a temporary work folder: on this machine with
    LocalBuilder + LocalRunner; for a device through a TVM RPC tracker (`Tune(rpc=RPC(...))`,
    RPCRunner, one session per registered server). After each kernel its records are merged
    into the database (`tuning_db.merge`, atomic), so an interrupt (Ctrl-C) loses only the
    kernel in progress. Progress bars (tqdm) count kernels and trials.
 5. build: the kernel stage, `relax.transform.MetaScheduleApplyDatabase` (a kernel with records
    gets its best schedule), then the rest of the target's pipeline.

A cross target (e.g. `arm`) has no device here: without `rpc=` a warning says that it is not
tuned and the default schedules are built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from qcompiler.errors import TuningError

from . import tuning_db
from .targets import get_target, tvm_target

log = logging.getLogger("qcompiler.tuning")


@dataclass(frozen=True)
class RPC:
    """Measure on devices registered with a TVM RPC tracker: `tracker` is "host:port", `key`
    the device key the servers were started with (`python -m tvm.exec.rpc_server --tracker
    host:port --key KEY`)."""

    tracker: str
    key: str
    session_timeout_sec: int = 60
    priority: int = 1

    def __post_init__(self):
        host, _, port = str(self.tracker).rpartition(":")
        if not isinstance(self.tracker, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TuningError(f"RPC tracker {self.tracker!r} is not 'host:port' (e.g. '127.0.0.1:9190')")
        if not isinstance(self.key, str) or not self.key or ":" in self.key:
            raise TuningError(f"RPC key {self.key!r} must be the non-empty device key the RPC servers "
                              "registered with (no ':')")
        _positive(self, "session_timeout_sec", int)
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise TuningError(f"RPC priority must be an integer, got {self.priority!r}")

    @property
    def host(self) -> str:
        return self.tracker.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.tracker.rpartition(":")[2])


@dataclass(frozen=True)
class Tune:
    """MetaSchedule tuning options for `qc.compile(..., tune=Tune(...))`.

    trials: measurements shared by the model's kernels that the database does not hold yet.
    database: the database folder (default: $XDG_CACHE_HOME/qcompiler/tuning/<target key>).
    rpc: measure on a device through a TVM RPC tracker (`RPC`); default: on this machine.
    trials_per_iter: candidates built and measured per search round.
    num_cores: cores the schedules may use (default: this machine's physical cores; give the
        device's when measuring through RPC).
    timeout_sec: build and run timeout of one candidate.
    progress: show progress bars.
    seed: seed of the search (None: random).
    """

    trials: int = 64
    database: str | os.PathLike | None = None
    rpc: RPC | None = None
    trials_per_iter: int = 32
    num_cores: int | None = None
    timeout_sec: float = 180.0
    progress: bool = True
    seed: int | None = None

    def __post_init__(self):
        _positive(self, "trials", int)
        _positive(self, "trials_per_iter", int)
        _positive(self, "timeout_sec", (int, float))
        if self.num_cores is not None:
            _positive(self, "num_cores", int)
        if self.database is not None and not isinstance(self.database, (str, os.PathLike)):
            raise TuningError(f"Tune.database must be a folder path, got {type(self.database).__name__}")
        if self.database is not None and Path(self.database).exists() and not Path(self.database).is_dir():
            raise TuningError(f"Tune.database {os.fspath(self.database)!r} exists and is not a folder")
        if self.rpc is not None and not isinstance(self.rpc, RPC):
            raise TuningError(f"Tune.rpc must be a qc.RPC(tracker='host:port', key=...), got {self.rpc!r}")
        if not isinstance(self.progress, bool):
            raise TuningError(f"Tune.progress must be True or False, got {self.progress!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise TuningError(f"Tune.seed must be None or an integer >= 0, got {self.seed!r}")


def _positive(obj, name: str, kind) -> None:
    value = getattr(obj, name)
    if not isinstance(value, kind) or isinstance(value, bool) or not value > 0:
        raise TuningError(f"{type(obj).__name__}.{name} must be a positive "
                          f"{'integer' if kind is int else 'number'}, got {value!r}")


@dataclass
class TuneSummary:
    """What one tuning run did (kernel names per outcome, trials measured)."""

    database: str
    tuned: list = dataclasses.field(default_factory=list)
    from_database: list = dataclasses.field(default_factory=list)
    scheduled: list = dataclasses.field(default_factory=list)  # kept their own schedule
    dynamic: list = dataclasses.field(default_factory=list)  # symbolic shapes: not tunable
    no_budget: list = dataclasses.field(default_factory=list)  # fewer trials than kernels
    trials: int = 0
    applied: int = 0  # kernels built with a schedule from the database


def is_cross(target: str) -> bool:
    """True for a target whose code does not run on this machine (another architecture)."""
    triple = get_target(target).tvm_target.get("mtriple")
    return bool(triple) and not triple.startswith(platform.machine())


def plan(target: str, tune) -> Tune | None:
    """Checks `tune` before any work; returns None, with a warning, when tuning cannot happen
    (a cross target with no device to measure on)."""
    if tune is None:
        return None
    if not isinstance(tune, Tune):
        raise TuningError(f"tune must be a qc.Tune(trials=...), got {type(tune).__name__}")
    if tune.rpc is None and is_cross(target):
        warnings.warn(f"target {target!r} is cross-compiled and no device is reachable to measure on "
                      f"(Tune(rpc=None)): not tuning, the default schedules are built. Measure on a device "
                      f"with tune=qc.Tune(rpc=qc.RPC(tracker='host:port', key='...')).", stacklevel=3)
        return None
    if target != "host":
        import inspect

        from .targets import get_backend

        if "tune" not in inspect.signature(get_backend(target).build).parameters:
            raise TuningError(f"the {target} backend cannot build with tuned schedules yet; "
                              "compile without tune=")
    if tune.rpc is not None:
        device_count(tune.rpc)
    return tune


def device_count(rpc: RPC) -> int:
    """Servers registered with the tracker under `rpc.key`; a TuningError if there are none."""
    from tvm import rpc as tvm_rpc

    try:
        socket.create_connection((rpc.host, rpc.port), timeout=5).close()
        summary = tvm_rpc.connect_tracker(rpc.host, rpc.port).summary()
    except (OSError, RuntimeError) as e:
        raise TuningError(f"cannot reach the RPC tracker at {rpc.tracker} ({e}); start one with "
                          f"`python -m tvm.exec.rpc_tracker --host {rpc.host} --port {rpc.port}`") from e
    keys = [item["key"].split(":", 1)[-1] for item in summary["server_info"]]
    if rpc.key not in keys:
        raise TuningError(f"no RPC server is registered with the tracker at {rpc.tracker} under key "
                          f"{rpc.key!r} (keys there: {sorted(set(keys)) or 'none'}); start one on the "
                          f"device with `python -m tvm.exec.rpc_server --tracker {rpc.tracker} --key {rpc.key}`")
    return keys.count(rpc.key)


def tuning_target(target: str, tune: Tune):
    """The TVM target MetaSchedule tunes and builds for: the target's, plus `num-cores`."""
    import psutil
    import tvm

    cores = tune.num_cores or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return tvm.target.Target({**tvm_target(get_target(target)), "num-cores": cores})


def target_key(target: str, tgt, rpc: RPC | None) -> str:
    """The database folder name: target name, CPU, device key, and a hash of the TVM target."""
    desc = json.dumps(tgt.export(), sort_keys=True, default=str)
    cpu = str(tgt.attrs.get("mcpu", "generic"))
    parts = [target, cpu] + ([rpc.key] if rpc else []) + [hashlib.sha256(desc.encode()).hexdigest()[:10]]
    return "-".join("".join(c if c.isalnum() or c in "._" else "_" for c in p) for p in parts)


def _stages(tgt):
    """The host build pipeline (`dot_schedule.dot_pipeline`: the target's default Relax
    pipeline with `ScheduleDots` after fusion) in two parts: up to the kernels MetaSchedule
    sees (library dispatch, legalize, fuse, then the tensorized dot kernels scheduled and
    marked `tirx.is_scheduled`), and the rest."""
    from tvm.relax import pipeline as passes

    extra = []
    if tgt.kind.name == "llvm":  # tvm.relax.backend.cpu_generic does not export dataflow_lower_passes
        from tvm.relax.backend.cpu_generic import pipeline as passes

        from .dot_schedule import ScheduleDots

        extra = [ScheduleDots]
    return (passes.library_dispatch_passes(tgt) + passes.legalize_passes(tgt) + extra,
            passes.dataflow_lower_passes(tgt) + passes.finalize_passes(tgt))


def kernel_stage(tgt):
    import tvm

    return tvm.transform.Sequential(_stages(tgt)[0])


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


def _builder_runner(target: str, tune: Tune):
    from tvm.s_tir import meta_schedule as ms

    builder = ms.builder.LocalBuilder(timeout_sec=tune.timeout_sec, f_build=_build_without_intrinsics())
    if tune.rpc is None:
        return builder, ms.runner.LocalRunner(timeout_sec=tune.timeout_sec)
    config = ms.runner.RPCConfig(tracker_host=tune.rpc.host, tracker_port=tune.rpc.port,
                                 tracker_key=tune.rpc.key, session_priority=tune.rpc.priority,
                                 session_timeout_sec=tune.rpc.session_timeout_sec)
    return builder, ms.runner.RPCRunner(rpc_config=config, max_workers=device_count(tune.rpc))


def _tune_task(task, trials: int, work_dir: Path, tune: Tune, builder, runner, callbacks):
    """Tunes one kernel with at most `trials` measurements into a JSONDatabase in `work_dir`."""
    from tvm.s_tir import meta_schedule as ms

    context = ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                             search_strategy="evolutionary", task_name=task.task_name,
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
    summary = TuneSummary(str(folder))
    with tgt:
        kernels = kernel_stage(tgt)(tvm.IRModule(mod.functions, attrs=mod.attrs))  # a fresh module
    tasks = ms.relax_integration.extract_tasks(kernels, tgt)
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
            _tune_all(todo, tune, target, folder, work, view, summary)
        memory = ms.database.MemoryDatabase()
        tuning_db.copy_records(view, memory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("tuning %s: %d kernels tuned (%d trials), %d from the database, %d kept their schedule, "
             "%d dynamic, %d without budget; database %s", target, len(summary.tuned), summary.trials,
             len(summary.from_database), len(summary.scheduled), len(summary.dynamic), len(summary.no_budget), folder)
    return memory, summary


def _tune_all(todo, tune: Tune, target: str, folder: Path, work: Path, view, summary: TuneSummary) -> None:
    builder, runner = _builder_runner(target, tune)
    progress = _Progress(len(todo), tune.progress)
    callbacks = _measure_callbacks(progress)
    remaining = tune.trials
    flops = [_flops(t) for t in todo]
    try:
        for i, task in enumerate(todo):
            trials = share(remaining, flops[i:])
            progress.start(task.task_name, trials)
            database = _tune_task(task, trials, work / f"task{i}", tune, builder, runner, callbacks)
            tuning_db.merge(folder, database)  # the kernel is done: persist before the next one
            tuning_db.copy_records(database, view)
            progress.done()
            summary.tuned.append(task.task_name)
            summary.trials += progress.count
            remaining -= progress.count
    finally:
        progress.close()


def tuned_pipeline(mod, target: str, tune: Tune):
    """Tunes the kernels of `mod` (see the module docstring); returns the Relax pipeline that
    builds it with their best schedules, and the TuneSummary (`applied` is set when the
    pipeline has run)."""
    database, summary = tune_kernels(mod, target, tune)
    return apply_pipeline(target, tune, database, summary), summary


def apply_pipeline(target: str, tune: Tune, database, summary: TuneSummary):
    """The target's default Relax pipeline with MetaScheduleApplyDatabase after FuseTIR."""
    import tvm
    from tvm import relax

    tgt = tvm.target.Target(tvm_target(get_target(target)))
    kernels, rest = _stages(tgt)

    @tvm.transform.module_pass(opt_level=0, name="qc.TunedPipeline")
    def pipeline(mod, _ctx):
        with tgt:
            mod = tvm.transform.Sequential(kernels)(mod)
        with tuning_target(target, tune), database:  # the target the records were measured for
            applied = relax.transform.MetaScheduleApplyDatabase()(mod)
        summary.applied = sum(1 for gv, f in applied.functions.items() if not f.same_as(mod[gv]))
        with tgt:
            return tvm.transform.Sequential(rest)(applied)

    return pipeline
