"""The deployable form for 64-bit ARM Linux boards: a shared library for TVM's Relax VM,
cross-linked with aarch64-linux-gnu-gcc, plus the script that runs it on the board.

`export(ir, example_inputs, out_dir)` writes
    model.so       the fused kernels and the VM bytecode (`tvm.compile` for the arm target,
                   `export_library` with TVM's cross_compiler around aarch64-linux-gnu-gcc)
    run_model.py   loads model.so into the Relax VM, reads .npy inputs, writes .npy outputs
    README.txt     what to install on the board and the command that runs the model

Without a board, `run_on_emulator(out_dir, inputs)` runs exactly those files under
`qemu-aarch64 -L <sysroot>`: the sysroot holds Debian bookworm's arm64 CPython 3.11 (its .debs
fetched by `apt-get download` with a private apt configuration: the machine's apt state is
neither read nor changed) and the aarch64 wheels of apache-tvm (runtime library only),
apache-tvm-ffi, numpy and typing_extensions from PyPI (`pip download --platform`). It is built
once under the user cache folder and renamed into place when complete.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from qcompiler.errors import LoweringError

from .cache import atomic_entry, user_cache_dir
from .targets import get_target
from .toolchain import require

PYTHON = "3.11"  # bookworm's CPython; the wheels below are chosen for it
DEBIAN_SOURCES = (("http://deb.debian.org/debian", "bookworm"), ("http://deb.debian.org/debian", "bookworm-updates"),
                  ("http://deb.debian.org/debian-security", "bookworm-security"))
# the interpreter, its stdlib, and the libraries the stdlib modules and TVM's runtime link to
DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libgcc-s1",
        "libstdc++6", "zlib1g", "libexpat1", "libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libuuid1",
        "libcrypt1")
# TVM's runtime, and what its RPC server needs (a board that measures kernels for tuning)
WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy==2.4.6", "typing_extensions==4.16.0",
          "cloudpickle==3.1.3", "psutil==7.2.2")
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
# a board needs TVM's runtime only: leave out the compiler library, CUDA and bundled headers
WHEEL_SKIP = ("tvm/lib/libtvm_compiler.so", "tvm/lib/libtvm_runtime_cuda.so", "tvm/3rdparty/")
# what the runtime never imports (TVM's compiler packages, tests, GUI and asyncio): not precompiled
NOT_PRECOMPILED = re.compile(r"/(tests?|relax|s_tir|topi|contrib|idlelib|lib2to3|tkinter|ensurepip|pydoc_data|"
                             r"unittest|asyncio)/")
BOARD_INSTALL = "python3 -m pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy"

README = """qcompiler model for {description}
target: {target} ({tvm_target})

Files
  model.so      kernels and Relax VM bytecode, linked with aarch64-linux-gnu-gcc
  run_model.py  runs model.so in TVM's Relax VM: .npy inputs in, output_<i>.npy out

Inputs (in order): {inputs}

On the board (aarch64 Linux, glibc >= 2.28, Python >= 3.10):
  {install}
  TVM_USE_RUNTIME_LIB=1 python3 run_model.py model.so {input_files}

TVM_USE_RUNTIME_LIB=1 loads only TVM's runtime library (the compiler is not needed on the board).
Without a board: qcompiler.backends.arm_deploy.run_on_emulator(folder, inputs) runs these files
under qemu-aarch64 -cpu {cpu} with an aarch64 Python.
"""


def export(ir, example_inputs: tuple, out_dir, target: str = "arm", dynamic_batch: bool = False) -> Path:
    """Cross-compile the IR for `target` (a 64-bit ARM Linux target) into `out_dir`."""
    info = get_target(target)
    if not str(info.tvm_target.get("mtriple", "")).startswith("aarch64"):
        raise LoweringError(f"target {target!r} is not 64-bit ARM Linux; the deployable board form is for "
                            "aarch64 targets such as 'arm'")
    gcc = require(getattr(info, "cc", None) or "aarch64-linux-gnu-gcc")  # before any work
    from tvm.support.cc import cross_compiler

    from .host import build

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    executable = build(ir, example_inputs, target, dynamic_batch)
    try:
        executable.export_library(str(out / "model.so"), fcompile=cross_compiler(gcc))
    except Exception as e:
        raise LoweringError(f"linking model.so with {gcc} failed: {type(e).__name__}: {e}") from e
    shutil.copyfile(Path(__file__).with_name("board_runner.py"), out / "run_model.py")
    inputs = ", ".join(f"input_{k}.npy: {_shape_text(x, dynamic_batch)}" for k, x in enumerate(example_inputs))
    (out / "README.txt").write_text(README.format(
        description=info.description, target=target, tvm_target=json.dumps(info.tvm_target), inputs=inputs,
        install=BOARD_INSTALL, input_files=" ".join(f"input_{k}.npy" for k in range(len(example_inputs))),
        cpu=getattr(info, "cpu", None) or info.tvm_target.get("mcpu", "max")))
    return out


def _shape_text(x: torch.Tensor, dynamic_batch: bool) -> str:
    dims = ["batch" if dynamic_batch and i == 0 else str(d) for i, d in enumerate(x.shape)]
    return f"{str(x.dtype).removeprefix('torch.')}[{', '.join(dims)}]"


def run_on_emulator(out_dir, inputs, cpu: str = "cortex-a76", timeout: float = 600) -> list[torch.Tensor]:
    """Run an `export`ed folder's run_model.py on `inputs` under qemu-aarch64; returns the outputs."""
    out = Path(out_dir)
    for name in ("model.so", "run_model.py"):
        if not (out / name).is_file():
            raise LoweringError(f"{out} has no {name}: it is not a folder written by arm_deploy.export")
    cmd, env = emulated_python(cpu)
    with tempfile.TemporaryDirectory(prefix="qc-arm-run-") as work:
        files = []
        for k, x in enumerate(inputs):
            files.append(os.path.join(work, f"input_{k}.npy"))
            np.save(files[-1], x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        cmd = [*cmd, str(out / "run_model.py"), str(out / "model.so"), *files]
        try:
            done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LoweringError(f"the model did not finish under qemu-aarch64 in {timeout} s") from e
        if done.returncode:
            raise LoweringError(f"run_model.py failed under qemu-aarch64 -cpu {cpu} (exit {done.returncode}):\n"
                                f"{done.stderr[-3000:]}")
        outputs = sorted(Path(work).glob("output_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
        return [torch.from_numpy(np.load(p)) for p in outputs]


def emulated_python(cpu: str = "cortex-a76") -> tuple[list[str], dict]:
    """The command prefix and environment that run the aarch64 Python of the sysroot."""
    qemu = require("qemu-aarch64")
    root = sysroot()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env.update(TVM_USE_RUNTIME_LIB="1", TVM_NUM_THREADS="1", PYTHONPATH=str(root / "site"), PYTHONNOUSERSITE="1")
    return [qemu, "-L", str(root), "-cpu", cpu, str(root / "usr" / "bin" / f"python{PYTHON}")], env


def sysroot() -> Path:
    """The aarch64 sysroot with CPython and TVM's runtime, built once into the user cache."""
    key = hashlib.sha256(json.dumps([DEBIAN_SOURCES, DEBS, WHEELS, WHEEL_PLATFORMS, WHEEL_SKIP]).encode()).hexdigest()
    final = user_cache_dir() / f"aarch64-python{PYTHON}-{key[:12]}"
    if not final.is_dir():
        with atomic_entry(final) as tmp:
            _build_sysroot(tmp, final)
    return final / "root"


def _build_sysroot(tmp: Path, final: Path) -> None:
    dpkg_deb = require("dpkg-deb")
    root = tmp / "root"
    debs = _download_debs(tmp / "apt")
    for deb in debs:
        _run([dpkg_deb, "-x", str(deb), str(root)], f"unpacking {deb.name}")
    for wheel in _download_wheels(tmp / "wheels"):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root / "site", [m for m in z.namelist() if not m.startswith(WHEEL_SKIP)])
    if sys.version_info[:2] == tuple(map(int, PYTHON.split("."))):  # same bytecode: precompile here,
        for d in (Path("usr/lib") / f"python{PYTHON}", Path("site")):   # much faster than under qemu
            compileall.compile_dir(root / d, ddir=final / "root" / d, quiet=2, workers=1, rx=NOT_PRECOMPILED)
    python = root / "usr" / "bin" / f"python{PYTHON}"
    _run([require("qemu-aarch64"), "-L", root, python, "-c", "import ctypes, zlib"],
         "starting the aarch64 Python under qemu-aarch64")  # a sysroot that cannot start is never kept
    shutil.rmtree(tmp / "apt")
    shutil.rmtree(tmp / "wheels")


def _download_debs(state: Path) -> list[Path]:
    """`apt-get update` and `apt-get download` for arm64 with every apt path in `state`."""
    apt_get = require("apt-get")
    for d in ("lists/partial", "archives/partial", "sources.list.d", "preferences.d", "debs"):
        (state / d).mkdir(parents=True)
    (state / "status").touch()
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    (state / "sources.list").write_text("".join(f"deb [arch=arm64 signed-by={keyring}] {url} {suite} main\n"
                                                for url, suite in DEBIAN_SOURCES))
    opts = {"Dir::Etc::SourceList": state / "sources.list", "Dir::Etc::SourceParts": state / "sources.list.d",
            "Dir::Etc::Preferences": state / "preferences", "Dir::Etc::PreferencesParts": state / "preferences.d",
            "Dir::State::Lists": state / "lists", "Dir::State::Status": state / "status",
            "Dir::Cache": state / "cache", "Dir::Cache::Archives": state / "archives",
            "APT::Architecture": "arm64", "APT::Architectures::": "arm64", "Acquire::Languages": "none",
            "Debug::NoLocking": "1"}
    if os.geteuid() == 0:
        opts["APT::Sandbox::User"] = "root"  # apt's _apt user could not write into our folders
    args = [apt_get, "-q"] + [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]
    where = ", ".join(f"{url} {suite}" for url, suite in DEBIAN_SOURCES)
    update = _run(args + ["update"], f"downloading the arm64 package lists ({where})")
    if not any((state / "lists").glob("*_Packages*")):  # apt-get update only warns when a fetch fails
        raise LoweringError(f"building the aarch64 sysroot: the arm64 package lists could not be downloaded "
                            f"from {where}:\n{(update.stderr + update.stdout)[-3000:]}")
    _run(args + ["download", *DEBS], "downloading the arm64 .debs", cwd=state / "debs")
    return sorted((state / "debs").glob("*.deb"))


def _download_wheels(dest: Path) -> list[Path]:
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
          "--python-version", PYTHON, *platforms, "-d", str(dest), *WHEELS], "downloading the aarch64 wheels from PyPI")
    return sorted(dest.glob("*.whl"))


def _run(cmd: list, what: str, cwd=None) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        raise LoweringError(f"building the aarch64 sysroot: {what} took over 900 s") from e
    if done.returncode:
        raise LoweringError(f"building the aarch64 sysroot: {what} failed (exit {done.returncode}):\n"
                            f"$ {' '.join(map(str, cmd))}\n{(done.stderr or done.stdout)[-3000:]}")
    return done
