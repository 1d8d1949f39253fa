"""MetaSchedule autotuning of a model's kernels, remembered in a persistent database per target.

`qc.compile(model, x, tune=qc.Tune(trials=64))` runs, inside the host build:

 1. kernel stage: the build pipeline up to the kernels (library dispatch, legalize, FuseOps,
    FuseTIR, then the hand schedules of `dot_schedule.pipeline_parts`: the tensorized int8
    kernels, depthwise convs and elementwise kernels, marked `tirx.is_scheduled`) on a copy of the module; `ms.relax_integration.extract_tasks` keys
    the PrimFuncs by structural hash (one task per distinct kernel).
 2. tuning (`tuning_search`): kernels that are scheduled, dynamic-shaped or already in the
    database are left alone; `trials` measurements are shared by the others; each kernel is
    measured on this machine (LocalBuilder + LocalRunner) or on devices through a TVM RPC
    tracker (`Tune(rpc=RPC(...))`, RPCRunner), then merged into the database (`tuning_db`:
    $XDG_CACHE_HOME/qcompiler/tuning/<target key>/, checked on every read, written
    atomically under a file lock), so an interrupt loses only the kernel in progress.
 3. build: the kernel stage, `relax.transform.MetaScheduleApplyDatabase` (a kernel with a
    valid record gets its best schedule), then the rest of the target's pipeline.

A cross target (e.g. `arm`) has no device here: without `rpc=`, `plan` warns that it is not
tuned and the default schedules are built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from qcompiler.errors import TuningError

from .targets import get_target, tvm_target


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
    num_cores: cores the schedules may use (default: $TVM_NUM_THREADS if set, else this
        machine's physical cores; give the device's when measuring through RPC).
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

    threads = os.environ.get("TVM_NUM_THREADS", "") if tune.rpc is None else ""  # what local runs will use
    cores = tune.num_cores or (int(threads) if threads.isdigit() and int(threads) > 0 else None) \
        or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return tvm.target.Target({**tvm_target(get_target(target)), "num-cores": cores})


def target_key(target: str, tgt, rpc: RPC | None) -> str:
    """The database folder name: target name, CPU, device key, and a hash of the TVM target."""
    desc = json.dumps(tgt.export(), sort_keys=True, default=str)
    cpu = str(tgt.attrs.get("mcpu", "generic"))
    parts = [target, cpu] + ([rpc.key] if rpc else []) + [hashlib.sha256(desc.encode()).hexdigest()[:10]]
    return "-".join("".join(c if c.isalnum() or c in "._" else "_" for c in p) for p in parts)


def _stages(tgt):
    """The build pipeline in two parts: up to the kernels MetaSchedule sees, and the rest. For
    LLVM targets these are `dot_schedule.pipeline_parts` (library dispatch, legalize, fuse, then
    the hand-scheduled kernels, marked `tirx.is_scheduled`: the int8 dots, depthwise convs and
    elementwise kernels; the row sums MetaSchedule did not tune are scheduled in the rest); for
    the others, Relax's generic passes."""
    if tgt.kind.name == "llvm":
        from .dot_schedule import pipeline_parts

        return pipeline_parts(tgt)
    from tvm.relax import pipeline as passes

    return (passes.library_dispatch_passes(tgt) + passes.legalize_passes(tgt),
            passes.dataflow_lower_passes(tgt) + passes.finalize_passes(tgt))


def kernel_stage(tgt):
    import tvm

    return tvm.transform.Sequential(_stages(tgt)[0])


def tuned_pipeline(mod, target: str, tune: Tune):
    """Tunes the kernels of `mod` (see the module docstring); returns the Relax pipeline that
    builds it with their best schedules, and the TuneSummary (`applied` is set when the
    pipeline has run)."""
    from .tuning_search import tune_kernels

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
        tuned = [gv for gv, f in applied.functions.items() if not f.same_as(mod[gv])]
        summary.applied = len(tuned)
        for gv in tuned:  # its best schedule: the later hand schedules (row sums) leave it alone
            applied[gv] = applied[gv].with_attr("tirx.is_scheduled", True)
        with tgt:
            return tvm.transform.Sequential(rest)(applied)

    return pipeline


def tuned_executable(gm, example_inputs: tuple, tune: Tune, target: str = "host"):
    """(Relax VM executable, TuneSummary) of converted IR `gm`, built as `qc.compile(...,
    tune=tune)` builds it: for benchmarks that reuse the tuned code and report what tuning did."""
    import tvm

    from .lowering import to_relax

    tgt = tvm.target.Target(tvm_target(get_target(target)))
    with tgt:  # the converters pick the target's kernels
        mod = to_relax(gm, example_inputs)
    if plan(target, tune) is None:
        raise TuningError(f"target {target!r} cannot be tuned without a device: pass Tune(rpc=...)")
    pipeline, summary = tuned_pipeline(mod, target, tune)
    return tvm.compile(mod, target=tgt, relax_pipeline=pipeline), summary
