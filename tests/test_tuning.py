"""MetaSchedule tuning: options, the persistent database (corruption, atomic merge, locking),
kernel selection and budget, applying records, the cross-target fallback, and two real tuning
runs (this machine with an interrupt and reuse; a TVM RPC tracker with two servers)."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import qcompiler as qc
from qcompiler import cli
from qcompiler.backends import tuning, tuning_db, tuning_search


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()


FLOAT = "fold-batchnorm"  # a pipeline that leaves the model float: two distinct matmul kernels


def _kernels(model, x, dynamic_batch=False):
    """(tuning target, the tasks MetaSchedule extracts from the model's float Relax module)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from qcompiler.backends.lowering import to_relax

    tgt = tuning.tuning_target("host", qc.Tune())
    with tgt:
        mod = to_relax(qc.trace(model, (x,)), (x,), dynamic_batch)
        kernels = tuning.kernel_stage(tgt)(mod)
    return tgt, mod, kernels, ms.relax_integration.extract_tasks(kernels, tgt)


@pytest.fixture(scope="module")
def records():
    """A TVM MemoryDatabase with one record per kernel of `_mlp` (a one-instruction schedule that
    only annotates a block, made without tuning: records need an instruction to be valid), the
    relax module and the example input."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    x = torch.randn(4, 16)
    tgt, mod, _, tasks = _kernels(_mlp(), x)
    db = ms.database.MemoryDatabase()
    for t in tasks:
        sch = tvm.s_tir.Schedule(t.dispatched[0])
        sch.annotate(sch.get_child_blocks(sch.get_sblock("root"))[0], "qc.test_record", 1)
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(t.dispatched[0]), [1e-5], tgt,
            ms.arg_info.ArgInfo.from_prim_func(t.dispatched[0]["main"])))
    return db, mod, x


def _files(folder: Path) -> dict:
    return {n: (folder / n).read_bytes() for n in tuning_db.FILES if (folder / n).exists()}


@pytest.mark.parametrize("make, match", [
    (lambda: qc.Tune(trials=0), "Tune.trials must be a positive integer, got 0"),
    (lambda: qc.Tune(trials=2.5), "Tune.trials must be a positive integer"),
    (lambda: qc.Tune(trials=True), "Tune.trials must be a positive integer"),
    (lambda: qc.Tune(trials_per_iter=-1), "Tune.trials_per_iter must be a positive integer"),
    (lambda: qc.Tune(num_cores=0), "Tune.num_cores must be a positive integer"),
    (lambda: qc.Tune(timeout_sec=0), "Tune.timeout_sec must be a positive number"),
    (lambda: qc.Tune(database=3), "Tune.database must be a folder path"),
    (lambda: qc.Tune(database=__file__), "exists and is not a folder"),
    (lambda: qc.Tune(rpc="127.0.0.1:9190"), r"Tune.rpc must be a qc.RPC\(tracker='host:port'"),
    (lambda: qc.Tune(seed=-1), "Tune.seed must be None or an integer >= 0"),
    (lambda: qc.RPC("localhost", "k"), "RPC tracker 'localhost' is not 'host:port'"),
    (lambda: qc.RPC("localhost:99999", "k"), "is not 'host:port'"),
    (lambda: qc.RPC("localhost:9190", ""), "RPC key '' must be the non-empty device key"),
    (lambda: qc.compile(_mlp(), (torch.randn(4, 16),), tune=64), "tune must be a qc.Tune"),
])
def test_bad_tuning_options(make, match):
    """Out-of-range or mistyped tuning options raise TuningError naming the option and the value."""
    with pytest.raises(qc.TuningError, match=match):
        make()


def test_unreachable_tracker_fails_before_any_work():
    """rpc= naming a tracker nobody listens on fails at once, saying how to start one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(qc.TuningError, match=rf"cannot reach the RPC tracker at 127.0.0.1:{port}.*rpc_tracker"):
        qc.compile(_mlp(), (torch.randn(4, 16),), tune=qc.Tune(rpc=qc.RPC(f"127.0.0.1:{port}", "k")))


def test_cross_target_without_device_falls_back_with_a_warning():
    """A cross target (arm) with no RPC device is not tuned: a warning says so; the host is tuned silently."""
    assert tuning.is_cross("arm") and not tuning.is_cross("host")
    with pytest.warns(UserWarning, match="target 'arm' is cross-compiled and no device is reachable.*default schedules"):
        assert tuning.plan("arm", qc.Tune(trials=4)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tune = qc.Tune(trials=4)
        assert tuning.plan("host", tune) is tune and tuning.plan("host", None) is None


def test_cli_tuning_options(tmp_path, capsys):
    """The CLI turns --tune-trials/--tune-db/--rpc-* into a Tune, and bad values exit 1 with the reason."""
    args = cli.parser().parse_args(["compile", "m.pt2", "-o", "out", "--tune-trials", "8", "--tune-db", str(tmp_path)])
    assert cli._tune(args) == qc.Tune(trials=8, database=str(tmp_path))
    assert cli._tune(cli.parser().parse_args(["compile", "m.pt2", "-o", "out"])) is None
    assert cli.main(["compile", "m.pt2", "-o", str(tmp_path / "o"), "--tune-trials", "0"]) == 1
    assert "Tune.trials must be a positive integer, got 0" in capsys.readouterr().err
    assert cli.main(["compile", "m.pt2", "-o", str(tmp_path / "o"), "--rpc-key", "k"]) == 1
    assert "need --tune-trials" in capsys.readouterr().err


def test_default_database_folder_is_per_target_in_user_cache(monkeypatch, tmp_path):
    """The database lives under $XDG_CACHE_HOME/qcompiler/tuning/<target key>; the key names the
    target and CPU and changes with the target description and the RPC device key."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tgt = tuning.tuning_target("host", qc.Tune())
    key = tuning.target_key("host", tgt, None)
    assert key.startswith(f"host-{tgt.attrs['mcpu']}-")
    assert tuning_db.default_dir(key) == tmp_path / "qcompiler" / "tuning" / key
    assert tuning.target_key("host", tuning.tuning_target("host", qc.Tune(num_cores=7)), None) != key
    assert tuning.target_key("host", tgt, qc.RPC("h:1", "pi4")) != key


def test_budget_share():
    """Trials are shared in proportion to FLOPs, at least one per kernel, one kept for each later kernel."""
    assert tuning_search.share(64, [1.0, 3.0]) == 16
    assert tuning_search.share(64, [1.0, 1e9]) == 1
    assert tuning_search.share(3, [1e9, 1.0, 1.0]) == 1
    assert tuning_search.share(10, [5.0]) == 10


def test_selection_skips_scheduled_dynamic_and_stored_kernels(records):
    """Kernels marked tirx.is_scheduled keep their schedule, kernels with symbolic shapes are not
    tunable, kernels with records come from the database; only the rest are tuned."""
    from tvm.s_tir import meta_schedule as ms

    db, _, x = records
    tgt, _, kernels, tasks = _kernels(_mlp(), x)
    names = sorted(t.task_name for t in tasks)
    assert len(names) == 2
    summary = tuning.TuneSummary("db")
    assert tuning_search.select(tasks, db, summary) == [] and sorted(summary.from_database) == names
    summary = tuning.TuneSummary("db")
    todo = tuning_search.select(tasks, ms.database.MemoryDatabase(), summary)
    assert sorted(t.task_name for t in todo) == names
    gv = kernels.get_global_var(names[0])
    kernels[gv] = kernels[gv].with_attr("tirx.is_scheduled", True)
    summary = tuning.TuneSummary("db")
    todo = tuning_search.select(ms.relax_integration.extract_tasks(kernels, tgt), ms.database.MemoryDatabase(), summary)
    assert summary.scheduled == [names[0]] and [t.task_name for t in todo] == [names[1]]
    _, _, _, dynamic = _kernels(_mlp(), x, dynamic_batch=True)
    summary = tuning.TuneSummary("db")
    assert tuning_search.select(dynamic, ms.database.MemoryDatabase(), summary) == [] and len(summary.dynamic) == 2


def test_kernel_stage_keeps_the_hand_schedules():
    """A tuned build's kernel stage runs the default build's hand schedules: a quantized
    depthwise conv (`window_schedule`) is marked scheduled and tuning leaves it alone, rather than
    building it unscheduled (its quantize rounded once per window tap) when the budget runs out."""
    from tvm.s_tir import meta_schedule as ms

    from qcompiler.backends.lowering import to_relax

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU()).eval()
    x = torch.randn(1, 8, 8, 8)
    art = qc.compile(model, (x,), calib=[torch.randn(2, 8, 8, 8)])
    tgt = tuning.tuning_target("host", qc.Tune())
    with tgt:
        kernels = tuning.kernel_stage(tgt)(to_relax(art.ir, (x,)))
    summary = tuning.TuneSummary("db")
    todo = tuning_search.select(ms.relax_integration.extract_tasks(kernels, tgt), ms.database.MemoryDatabase(), summary)
    assert [n for n in summary.scheduled if "depthwise_int" in n], summary.scheduled
    assert not [t.task_name for t in todo if "depthwise_int" in t.task_name]


def test_apply_pipeline_builds_the_same_code(records):
    """The tuned build pipeline (kernel stage, apply database, rest) gives the default build's
    results: with no records nothing is replaced, with a record per kernel every kernel is."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from qcompiler.backends.host import HostRunner
    from qcompiler.backends.targets import get_target, tvm_target

    db, mod, x = records
    tgt = tvm.target.Target(tvm_target(get_target("host")))
    want = HostRunner(tvm.compile(mod, target=tgt))(x)[0]
    assert torch.allclose(want, _mlp()(x), atol=1e-6)
    for database, applied in [(ms.database.MemoryDatabase(), 0), (db, 2)]:
        summary = tuning.TuneSummary("db")
        pipeline = tuning.apply_pipeline("host", qc.Tune(), database, summary)
        got = HostRunner(tvm.compile(mod, target=tgt, relax_pipeline=pipeline))(x)[0]
        assert summary.applied == applied and torch.equal(got, want)


def _corrupt_truncated(folder):
    data = (folder / tuning_db.RECORDS).read_bytes()
    (folder / tuning_db.RECORDS).write_bytes(data[:len(data) // 2])


def _corrupt_bad_json(folder):
    with open(folder / tuning_db.RECORDS, "a") as f:
        f.write('[0, [["oops"\n')


def _corrupt_missing_workload(folder):
    lines = (folder / tuning_db.WORKLOADS).read_text().splitlines(keepends=True)
    (folder / tuning_db.WORKLOADS).write_text(lines[0])


def _corrupt_module(folder):
    lines = (folder / tuning_db.WORKLOADS).read_text().splitlines(keepends=True)
    lines[0] = lines[0][:40] + "!!!!" + lines[0][44:]  # inside the base64 module text
    (folder / tuning_db.WORKLOADS).write_text("".join(lines))


@pytest.mark.parametrize("corrupt, bad_file, reason", [
    (_corrupt_truncated, tuning_db.RECORDS, "truncated"),
    (_corrupt_bad_json, tuning_db.RECORDS, "line 3 is not valid JSON"),
    (_corrupt_missing_workload, tuning_db.RECORDS, "refers to workload 1, but database_workload.json has 1"),
    (_corrupt_module, tuning_db.WORKLOADS, "TVM cannot load it"),
])
def test_corrupt_database_is_set_aside_and_rebuilt(records, tmp_path, corrupt, bad_file, reason):
    """A corrupt database is detected on open, moved aside (*.corrupt-<time>) with a warning naming
    the file and the fault, never used, and the next merge rebuilds a valid one."""
    db, _, _ = records
    folder = tmp_path / "db"
    assert tuning_db.merge(folder, db) == 2 and tuning_db.check_files(folder) == 2
    corrupt(folder)
    (tmp_path / "view").mkdir()
    with pytest.warns(UserWarning, match=rf"tuning database {folder / bad_file} is corrupt: .*{reason}.*moved aside"):
        view = tuning_db.snapshot(folder, tmp_path / "view")
    assert len(view) == 0 and _files(folder) == {}
    assert sorted(p.name.split(".corrupt-")[0] for p in folder.glob("*.corrupt-*")) == sorted(tuning_db.FILES)
    assert tuning_db.merge(folder, db) == 2 and tuning_db.check_files(folder) == 2


def test_interrupted_merge_keeps_a_valid_database(records, tmp_path, monkeypatch):
    """An interrupt between the two file replacements of a merge leaves a database whose every
    record still has its workload, and no staging folder."""
    db, _, _ = records
    folder = tmp_path / "db"
    tuning_db.merge(folder, db)
    before = tuning_db.check_files(folder)
    real_replace, calls = os.replace, []

    def replace_then_interrupt(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(tuning_db.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tuning_db.merge(folder, db)
    monkeypatch.undo()
    assert tuning_db.check_files(folder) == before and not list(folder.glob(".merge-*"))


def test_concurrent_merges_lose_nothing(records, tmp_path):
    """Merges from several threads (each with its own lock file handle, as processes have) all land."""
    db, _, _ = records
    folder = tmp_path / "db"
    threads = [threading.Thread(target=lambda: [tuning_db.merge(folder, db) for _ in range(3)]) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tuning_db.check_files(folder) == 2 * 9
    assert len((folder / tuning_db.WORKLOADS).read_text().splitlines()) == 2


def _summaries(monkeypatch) -> list:
    got, real = [], tuning.tuned_pipeline

    def spy(*args, **kwargs):
        pipeline, summary = real(*args, **kwargs)
        got.append(summary)
        return pipeline, summary

    monkeypatch.setattr(tuning, "tuned_pipeline", spy)
    return got


def test_tune_interrupt_resume_and_reuse(tmp_path, monkeypatch, request):
    """Real tuning of a two-kernel model on this machine: an interrupt during the second kernel
    leaves only the first kernel's records; the next compile tunes only the second kernel; a
    third compile (and the CLI) run zero trials, leave the database byte-identical and build
    both kernels from it."""
    model, x, db = _mlp(), torch.randn(4, 16), tmp_path / "db"
    tune = qc.Tune(trials=6, trials_per_iter=4, database=db, progress=False, seed=0)
    summaries, measured, real = _summaries(monkeypatch), [], tuning_search._Progress.measured

    def measure(self, n, interrupt=True):
        measured.append(n)
        real(self, n)
        if interrupt and self.finished == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the second kernel is measured

    monkeypatch.setattr(tuning_search._Progress, "measured", measure)
    # Ctrl-C as an interactive process handles it (a library loaded by an earlier test may have
    # replaced the handler at the OS level without Python knowing)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler))
    with pytest.raises(KeyboardInterrupt):
        qc.compile(model, (x,), calib=[x], pipeline=FLOAT, tune=tune)
    assert len((db / tuning_db.WORKLOADS).read_text().splitlines()) == 1
    first = tuning_db.check_files(db)
    assert first >= 1

    monkeypatch.setattr(tuning_search._Progress, "measured", lambda self, n: measure(self, n, interrupt=False))
    art = qc.compile(model, (x,), calib=[x], pipeline=FLOAT, tune=tune)
    s = summaries[-1]
    assert len(s.tuned) == 1 and len(s.from_database) == 1 and s.applied == 2 and 1 <= s.trials <= 6
    assert tuning_db.check_files(db) == first + s.trials
    assert torch.allclose(art(x), model(x), atol=1e-5)

    stored, n_measured = _files(db), len(measured)
    art = qc.compile(model, (x,), calib=[x], pipeline=FLOAT, tune=tune)
    s = summaries[-1]
    assert s.tuned == [] and s.trials == 0 and len(s.from_database) == 2 and s.applied == 2
    assert _files(db) == stored and len(measured) == n_measured
    assert torch.allclose(art(x), model(x), atol=1e-5)

    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    assert cli.main(["compile", str(path), "-p", FLOAT, "-o", str(tmp_path / "art"),
                     "--tune-trials", "6", "--tune-db", str(db)]) == 0
    assert summaries[-1].trials == 0 and summaries[-1].applied == 2 and _files(db) == stored


def _stop(procs) -> None:
    """Ends each process with the workers it started (each runs in a session of its own)."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_tracker(tmp_path):
    """A TVM RPC tracker and two RPC servers (key "qc-test") on loopback; yields "host:port"
    and the servers' log files."""
    port = _free_port()
    tracker = f"127.0.0.1:{port}"
    procs, logs = [], []

    def start(name, *args):
        logs.append(tmp_path / f"{name}.log")
        procs.append(subprocess.Popen([sys.executable, "-m", *args], stdout=open(logs[-1], "w"),
                                      stderr=subprocess.STDOUT, env={**os.environ, "TVM_NUM_THREADS": "1"},
                                      start_new_session=True))

    try:
        start("tracker", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))
        for i in range(2):
            server_port = _free_port()
            start(f"server{i}", "tvm.exec.rpc_server", "--tracker", tracker, "--key", "qc-test", "--host",
                  "127.0.0.1", "--port", str(server_port), "--port-end", str(server_port + 1))
        deadline = time.time() + 300
        while True:
            assert all(p.poll() is None for p in procs), "an RPC process exited: " + \
                " | ".join(p.read_text()[-300:] for p in logs)
            try:
                if tuning.device_count(qc.RPC(tracker, "qc-test")) == 2:
                    break
            except qc.TuningError:
                pass
            assert time.time() < deadline, "the RPC tracker and servers did not start: " + \
                " | ".join(p.read_text()[-300:] for p in logs)
            time.sleep(1)
        yield tracker, logs[1:]
    finally:
        _stop(procs)


def test_tune_through_rpc_tracker(rpc_tracker, tmp_path, monkeypatch):
    """A float linear layer (a W8A8 one has nothing left to tune: its int8 and elementwise
    kernels are hand-scheduled) tuned with measurements through a TVM RPC tracker and two
    servers: the servers load the candidate modules, every record holds a real run time, and
    the artifact built from the database computes what the model does."""
    tracker, server_logs = rpc_tracker
    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(16, 16)).eval(), torch.randn(4, 16)
    summaries = _summaries(monkeypatch)
    tune = qc.Tune(trials=2, database=tmp_path / "db", rpc=qc.RPC(tracker, "qc-test"), progress=False, seed=0)
    art = qc.compile(model, (x,), calib=[x], pipeline=FLOAT, tune=tune)
    s = summaries[-1]
    assert s.tuned and s.trials >= 1 and s.applied == len(s.tuned)
    import json

    times = [json.loads(line)[1][1] for line in (tmp_path / "db" / tuning_db.RECORDS).read_text().splitlines()]
    assert len(times) == s.trials and all(0 < t[0] < 1 for t in times)
    assert any("load_module" in log.read_text() for log in server_logs)
    assert torch.allclose(art(x), model(x), atol=1e-5)


@pytest.fixture
def emulated_arm_board(tmp_path):
    """A TVM RPC tracker on loopback and one emulated aarch64 board: the board's Python (the
    sysroot of backends/arm_deploy) running TVM's RPC server under qemu-aarch64, registered as
    "qc-arm". The server starts its worker with sys.executable, so that points at a script that
    runs the aarch64 Python under QEMU again (no binfmt_misc here)."""
    from qcompiler.backends import arm, arm_deploy

    if arm.toolchain_available() is not None:
        pytest.skip(f"arm toolchain missing: {arm.toolchain_available()}")
    python, env = arm_deploy.emulated_python()
    wrapper = tmp_path / "python-aarch64"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(python) + ' "$@"\n')
    wrapper.chmod(0o755)
    port = _free_port()
    tracker = f"127.0.0.1:{port}"
    server = ("import runpy, sys; sys.executable = %r; sys.argv[0] = 'rpc_server'; "
              "runpy.run_module('tvm.exec.rpc_server', run_name='__main__')") % str(wrapper)
    board_port = _free_port()
    logs = [tmp_path / "tracker.log", tmp_path / "board.log"]
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                               str(port), "--port-end", str(port + 1)], stdout=open(logs[0], "w"), stderr=subprocess.STDOUT,
                              start_new_session=True),
             subprocess.Popen([*python, "-c", server, "--tracker", tracker, "--key", "qc-arm", "--host", "127.0.0.1",
                               "--port", str(board_port), "--port-end", str(board_port + 1)], env=env,
                              stdout=open(logs[1], "w"), stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        deadline = time.time() + 300
        while True:
            assert all(p.poll() is None for p in procs), "an RPC process exited: " + \
                " | ".join(p.read_text()[-500:] for p in logs)
            try:
                if tuning.device_count(qc.RPC(tracker, "qc-arm")) == 1:
                    break
            except qc.TuningError:
                pass
            assert time.time() < deadline, "the emulated board did not register: " + logs[1].read_text()[-500:]
            time.sleep(1)
        yield tracker
    finally:
        _stop(procs)


def test_tune_arm_kernels_on_a_board_through_rpc(emulated_arm_board, tmp_path, monkeypatch):
    """The arm target tunes on a device through the tracker: candidates are cross-linked into
    shared libraries, measured on the (emulated) board, stored under a database folder of their
    own, and the program built from the records equals the float model; a second compile
    measures nothing. (The emulator's timings say nothing about a real core: this checks the
    path, not the speed.)"""
    model, x, db = _mlp(), torch.randn(4, 16), tmp_path / "db"
    tune = qc.Tune(trials=2, trials_per_iter=2, rpc=qc.RPC(emulated_arm_board, "qc-arm"), database=db,
                   progress=False, seed=0)
    summaries = _summaries(monkeypatch)
    art = qc.compile(model, (x,), calib=[x], pipeline=FLOAT, target="arm", tune=tune)
    s = summaries[-1]
    assert s.trials >= 1 and len(s.tuned) == 2 and s.applied >= 1
    assert tuning_db.check_files(db) == s.trials
    assert torch.allclose(art(x), model(x), atol=1e-5)
    stored = _files(db)
    qc.compile(model, (x,), calib=[x], pipeline=FLOAT, target="arm", tune=tune)
    assert summaries[-1].trials == 0 and _files(db) == stored
