"""The `arm` backend: a static aarch64 Linux program per model, run under qemu-aarch64.

build:  IR -> flat Program (`program.py`: the target's default Relax pipeline, storage
        planned by Relax) -> kernels with `tvm.tirx.build` for aarch64 (+neon,+dotprod) as
        kernels.o, C driver (`cdriver.py`) as driver.c ->
        `aarch64-linux-gnu-gcc -O2 -static driver.c kernels.o -lm` -> model.elf
run:    `qemu-aarch64 -cpu <core> model.elf` with the inputs' raw bytes on stdin and the
        outputs' raw bytes on stdout, read back as torch tensors.

`run(binary, inputs, qemu_args=(), wrapper=())` takes extra QEMU arguments (e.g. a TCG
plugin: `-plugin counter.so,...`) and a wrapper command put in front of QEMU; `execute`
gives the finished process (stdout, stderr) for callers that read more than the outputs.
The toolchain is looked up with `toolchain.require`, which names the Debian package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

from qcompiler.errors import ArtifactError, LoweringError, QCompilerError

from .cdriver import generate, include_dirs
from .program import Program, build_kernels, extract
from .targets import get_target
from .toolchain import require

CFLAGS = ("-O2", "-static")
BINARY, DRIVER, KERNELS, META = "model.elf", "driver.c", "kernels.o", "program.json"


@dataclass
class ArmBinary:
    """A linked static program and the files it was linked from."""

    binary: bytes
    sources: dict[str, bytes]  # driver.c and kernels.o
    signature: dict  # {"inputs": [{"shape", "dtype"}], "outputs": [...]}
    target: str = "arm"
    link: list[str] = field(default_factory=list)  # the link command (file names relative)
    summary: str = ""
    program: Program | None = field(default=None, repr=False, compare=False)  # in memory only, not saved
    _dir: tempfile.TemporaryDirectory | None = field(default=None, repr=False, compare=False)

    def path(self) -> str:
        """The binary as an executable file (written once into a private temporary folder)."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="qc-arm-")
            path = os.path.join(self._dir.name, BINARY)
            with open(path, "wb") as f:
                f.write(self.binary)
            os.chmod(path, 0o755)
        return os.path.join(self._dir.name, BINARY)


def preflight(target: str = "arm") -> None:
    """Fail before any work when the cross compiler is missing."""
    require(get_target(target).cc)


def build(gm: torch.fx.GraphModule, example_inputs: tuple, target: str = "arm", dynamic_batch: bool = False,
          tune=None) -> ArmBinary:
    """Cross-compile the IR into a static program specialized to the example shapes; with
    `tune` (a `tuning.Tune` whose `rpc` reaches a device of this target) the kernels get the
    best schedules measured on the device."""
    if dynamic_batch:
        raise LoweringError(f"the {target} target compiles for the example shapes only; compile without "
                            "dynamic_batch=True (or use target='host' for code that takes any batch size)")
    preflight(target)
    program = extract(gm, example_inputs, target, tune=tune)
    with tempfile.TemporaryDirectory(prefix="qc-arm-build-") as work:
        path = os.path.join(work, KERNELS)
        build_kernels(program, target).write_to_file(path)
        with open(path, "rb") as f:
            kernels = f.read()
    return link(program, kernels, target)


def link(program: Program, kernels: bytes, target: str = "arm", workspace: int | None = None) -> ArmBinary:
    """Generate the C driver for `program` and link it with the kernels' object file."""
    cc = require(get_target(target).cc)
    driver = generate(program, workspace)
    command = [os.path.basename(cc), *CFLAGS, *(f"-I{d}" for d in include_dirs()), DRIVER, KERNELS, "-o", BINARY, "-lm"]
    with tempfile.TemporaryDirectory(prefix="qc-arm-link-") as work:
        for name, data in ((DRIVER, driver.encode()), (KERNELS, kernels)):
            with open(os.path.join(work, name), "wb") as f:
                f.write(data)
        done = subprocess.run([cc, *command[1:]], cwd=work, capture_output=True, text=True)
        if done.returncode:
            raise LoweringError(f"linking the {target} program failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
        with open(os.path.join(work, BINARY), "rb") as f:
            binary = f.read()
    return ArmBinary(binary, {DRIVER: driver.encode(), KERNELS: kernels}, program.signature(), target,
                     command, program.summary(), program)


def encode_inputs(signature: dict, inputs) -> bytes:
    """The inputs' raw bytes in order, after checking them against the program's inputs."""
    specs = signature["inputs"]
    if len(inputs) != len(specs):
        raise QCompilerError(f"the program takes {len(specs)} inputs, got {len(inputs)}")
    chunks = []
    for i, (x, spec) in enumerate(zip(inputs, specs)):
        if not isinstance(x, torch.Tensor):
            raise QCompilerError(f"input {i} is a {type(x).__name__}, expected a tensor")
        dtype = str(x.dtype).removeprefix("torch.")
        if list(x.shape) != spec["shape"] or dtype != spec["dtype"]:
            raise QCompilerError(f"input {i} is {dtype}{list(x.shape)}; the program was compiled for "
                                 f"{spec['dtype']}{spec['shape']}")
        chunks.append(x.detach().cpu().contiguous().numpy().tobytes())
    return b"".join(chunks)


def decode_outputs(signature: dict, data: bytes) -> tuple[torch.Tensor, ...]:
    outs, at = [], 0
    for spec in signature["outputs"]:
        dtype = getattr(torch, spec["dtype"])
        n = torch.Size(spec["shape"]).numel() * torch.empty((), dtype=dtype).element_size()
        if at + n > len(data):
            raise LoweringError(f"the program wrote {len(data)} bytes; its outputs take "
                                f"{sum(torch.Size(s['shape']).numel() for s in signature['outputs'])} elements")
        outs.append(torch.frombuffer(bytearray(data[at:at + n]), dtype=dtype).reshape(spec["shape"]))
        at += n
    if at != len(data):
        raise LoweringError(f"the program wrote {len(data)} bytes, {len(data) - at} more than its outputs")
    return tuple(outs)


def execute(binary: ArmBinary, inputs, qemu_args=(), wrapper=(), cpu: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the program under QEMU: `[*wrapper] qemu-aarch64 -cpu <cpu> [*qemu_args] model.elf`,
    inputs on stdin. Returns the finished process (stdout: the outputs' bytes; stderr bytes)."""
    info = get_target(binary.target)
    qemu = require(info.emulator)
    data = encode_inputs(binary.signature, inputs)
    cmd = [*wrapper, qemu, "-cpu", cpu or info.cpu, *qemu_args, binary.path()]
    try:
        done = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise LoweringError(f"the {binary.target} program did not finish in {timeout} s under {' '.join(cmd[:-1])}") from e
    if done.returncode:
        why = f"exit status {done.returncode}" if done.returncode > 0 else f"signal {-done.returncode}"
        if done.returncode in (-4, 132):
            why += f" (illegal instruction: -cpu {cpu or info.cpu} lacks an instruction the code uses)"
        raise LoweringError(f"the {binary.target} program failed under {' '.join(cmd[:-1])}: {why}\n"
                            f"{done.stderr.decode(errors='replace')[-2000:]}")
    return done


def run(binary: ArmBinary, inputs, qemu_args=(), wrapper=(), cpu: str | None = None,
        timeout: float = 600) -> tuple[torch.Tensor, ...]:
    """Run the program under QEMU and return its outputs as torch tensors."""
    return decode_outputs(binary.signature, execute(binary, inputs, qemu_args, wrapper, cpu, timeout).stdout)


class ArmRunner:
    """`runner(*tensors)` runs a built program under QEMU (the Artifact's runner for `arm`)."""

    def __init__(self, binary: ArmBinary, qemu_args=(), wrapper=(), cpu: str | None = None):
        self.binary, self.qemu_args, self.wrapper, self.cpu = binary, tuple(qemu_args), tuple(wrapper), cpu

    def __call__(self, *inputs: torch.Tensor):
        return run(self.binary, inputs, self.qemu_args, self.wrapper, self.cpu)


def save_library(binary: ArmBinary, folder: str) -> list[str]:
    """Write the program, its sources and a description into `folder`; returns the file names."""
    path = os.path.join(folder, BINARY)
    with open(path, "wb") as f:
        f.write(binary.binary)
    os.chmod(path, 0o755)
    for name, data in binary.sources.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    meta = {"target": binary.target, "signature": binary.signature, "link": binary.link,
            "summary": binary.summary, "run": f"{get_target(binary.target).runner} {BINARY} < inputs.bin > outputs.bin"}
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=1)
    return [BINARY, *binary.sources, META]


def load_library(folder: str) -> ArmBinary:
    def read(name):
        try:
            with open(os.path.join(folder, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ArtifactError(f"{name} is missing from the arm artifact in {folder}; compile it again") from None

    try:
        meta = json.loads(read(META))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{META} of the arm artifact is not valid JSON ({e})") from e
    return ArmBinary(read(BINARY), {DRIVER: read(DRIVER), KERNELS: read(KERNELS)}, meta["signature"],
                     meta["target"], meta["link"], meta.get("summary", ""))


def toolchain_available(target: str = "arm") -> str | None:
    """None if the cross compiler and emulator are installed, else the reason they are not."""
    info = get_target(target)
    missing = [t for t in (info.cc, info.emulator) if shutil.which(t) is None]
    return f"{', '.join(missing)} not installed (`make toolchains`)" if missing else None
