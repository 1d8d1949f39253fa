"""qcompiler's user cache folder and atomic creation of its entries.

The cache is `$XDG_CACHE_HOME/qcompiler` (or `~/.cache/qcompiler`). An entry (a built plugin,
a downloaded sysroot) is made under a temporary name beside its final place and renamed into
place only once complete, so an interrupted build never leaves an entry that is trusted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path

STALE_SECONDS = 24 * 3600  # a temporary entry this old belongs to a process that died


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qcompiler"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_entry(final: Path):
    """Yields a temporary path beside `final` (nothing exists there yet) for the caller to fill
    with a file or a folder; on success it is renamed to `final`. If another process put
    `final` in place meanwhile, that one is kept. On failure the temporary path is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".{final.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - old.lstat().st_mtime > STALE_SECONDS:
                _remove(old)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_dir():
            try:
                os.rename(tmp, final)  # fails if `final` appeared meanwhile: keep that one
            except OSError:
                if not final.is_dir():
                    raise
        else:
            os.replace(tmp, final)
    finally:
        _remove(tmp)
