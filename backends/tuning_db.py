"""The persistent MetaSchedule database of one target, shared by processes and never trusted blindly.

A database is a folder (by default `$XDG_CACHE_HOME/qcompiler/tuning/<target key>/`) holding
TVM's JSONDatabase files: `database_workload.json` (one line per kernel: structural hash and
the serialized PrimFunc module) and `database_tuning_record.json` (one line per measured
schedule: `[workload line index, [trace, run seconds, target, argument info]]`).

- Reading (`snapshot`): under a shared `flock` on `<folder>/.lock`, both files are copied into a
  private folder, every line is checked (JSON, shape, a record's workload index inside the
  workload file, the final newline that a truncated file lacks), then TVM loads the copy.
  A database failing any check is moved aside (`<file>.corrupt-<UTC time>`, both files, under
  the exclusive lock, unless another process replaced it meanwhile) with a warning naming the
  file and the fault, and the snapshot starts empty: tuning rebuilds it.
- Writing (`merge`): under the exclusive lock, the current files are copied into a staging
  folder beside them, the new records are committed there through TVM (which deduplicates
  workloads by structural equality and only appends), and the staged files replace the live
  ones with `os.replace`: the workload file first, so at every instant each record line
  refers to a workload line that exists. An interrupted merge leaves the old files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

from .cache import user_cache_dir

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
FILES = (WORKLOADS, RECORDS)


class CorruptDatabase(Exception):
    """A database file that fails a check: `path` is the file, the message says why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def default_dir(target_key: str) -> Path:
    return user_cache_dir() / "tuning" / target_key


@contextlib.contextmanager
def _locked(folder: Path, exclusive: bool):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise CorruptDatabase(path, "the last line is incomplete (the file is truncated)")
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CorruptDatabase(path, f"not UTF-8 text ({e})") from e


def _parse(path: Path, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise CorruptDatabase(path, f"line {number} is not valid JSON ({e.msg})") from e


def check_files(folder: Path) -> int:
    """Checks every line of the database in `folder` (see the module docstring); returns the
    number of records or raises CorruptDatabase."""
    wpath, rpath = folder / WORKLOADS, folder / RECORDS
    workloads = _lines(wpath)
    for i, line in enumerate(workloads, 1):
        w = _parse(wpath, i, line)
        if not (isinstance(w, list) and len(w) == 2 and all(isinstance(x, str) for x in w)):
            raise CorruptDatabase(wpath, f"line {i} is not a [structural hash, module] pair")
    records = _lines(rpath)
    for i, line in enumerate(records, 1):
        r = _parse(rpath, i, line)
        if not (isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], list)
                and len(r[1]) == 4):
            raise CorruptDatabase(rpath, f"line {i} is not a [workload index, [trace, seconds, target, args]] record")
        if not 0 <= r[0] < len(workloads):
            raise CorruptDatabase(rpath, f"line {i} refers to workload {r[0]}, but {wpath.name} has "
                                         f"{len(workloads)} workloads (records whose workload is missing)")
    return len(records)


def _load(folder: Path):
    """TVM's JSONDatabase over the files in `folder` (created empty where missing)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(work_dir=str(folder), allow_missing=True)
    except Exception as e:  # TVM's own parse of modules and traces: anything it rejects is corrupt
        text = str(e).strip().splitlines()
        raise CorruptDatabase(folder / WORKLOADS, f"TVM cannot load it: {type(e).__name__}: "
                                                  f"{text[-1] if text else ''}") from e


def _copy_files(src: Path, dst: Path) -> list[tuple[int, int]]:
    """Copies the database files; returns their (inode, size) so a later check can tell whether
    they were replaced meanwhile."""
    ident = []
    for name in FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
            st = (src / name).stat()
            ident.append((st.st_ino, st.st_size))
        else:
            ident.append((0, 0))
    return ident


def _identity(folder: Path) -> list[tuple[int, int]]:
    out = []
    for name in FILES:
        st = (folder / name).stat() if (folder / name).exists() else None
        out.append((st.st_ino, st.st_size) if st else (0, 0))
    return out


def _move_aside(folder: Path) -> list[str]:
    """Renames both database files to `<file>.corrupt-<UTC time>`; the caller holds the
    exclusive lock."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for name in FILES:
        if (folder / name).exists():
            aside = folder / f"{name}.corrupt-{stamp}-{uuid.uuid4().hex[:6]}"
            os.replace(folder / name, aside)
            moved.append(str(aside))
    return moved


def _warn(err: CorruptDatabase, moved: list[str]) -> None:
    warnings.warn(f"tuning database {err.path} is corrupt: {err.reason}; moved aside to "
                  f"{', '.join(moved)}; it is not used, and tuning rebuilds it", stacklevel=2)


def _set_aside(folder: Path, err: CorruptDatabase, seen: list[tuple[int, int]]) -> None:
    """Moves the corrupt files out of the way, unless another process replaced them since
    they were read (the next read checks the new ones)."""
    with _locked(folder, exclusive=True):
        if _identity(folder) != seen:
            return
        moved = _move_aside(folder)
    _warn(err, moved)


def snapshot(folder: Path, into: Path):
    """A private, checked copy of the database in `folder`, loaded as a TVM JSONDatabase living
    in `into` (an empty folder the caller owns). A corrupt database is set aside and the copy
    starts empty."""
    with _locked(folder, exclusive=False):
        seen = _copy_files(folder, into)
    try:
        check_files(into)
        return _load(into)
    except CorruptDatabase as e:
        e = CorruptDatabase(folder / e.path.name, e.reason)
        _set_aside(folder, e, seen)
        for name in FILES:
            (into / name).unlink(missing_ok=True)
        return _load(into)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_records(source, target) -> None:
    """Commits every record of TVM database `source` to `target` (workloads deduplicated)."""
    from tvm.s_tir import meta_schedule as ms

    for rec in source.get_all_tuning_records():
        workload = target.commit_workload(rec.workload.mod)
        target.commit_tuning_record(ms.database.TuningRecord(
            rec.trace, workload, rec.run_secs, rec.target, rec.args_info))


def merge(folder: Path, source) -> int:
    """Adds every record of TVM database `source` to the database in `folder`, atomically;
    returns how many records were added."""
    records = source.get_all_tuning_records()
    if not records:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder, exclusive=True):
        stage = Path(tempfile.mkdtemp(prefix=".merge-", dir=folder))
        try:
            _copy_files(folder, stage)
            try:
                check_files(stage)
                target = _load(stage)
            except CorruptDatabase as e:  # corrupted since this process read it: start afresh
                _warn(CorruptDatabase(folder / e.path.name, e.reason), _move_aside(folder))
                for name in FILES:
                    (stage / name).unlink(missing_ok=True)
                target = _load(stage)
            copy_records(source, target)
            del target  # JSONDatabase appends each commit to its files: they are complete now
            check_files(stage)
            for name in FILES:  # workloads first: records only ever refer to existing workloads
                _fsync(stage / name)
                os.replace(stage / name, folder / name)
            _fsync(folder)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return len(records)
