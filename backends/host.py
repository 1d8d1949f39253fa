"""Host backend: build the Relax module for this machine's CPU and run it in the Relax VM."""

from __future__ import annotations

import torch
import tvm
from tvm import relax

from qcompiler.errors import LoweringError

from .dot_schedule import dot_pipeline
from .lowering import to_relax
from .targets import get_target, tvm_target


def build(gm: torch.fx.GraphModule, example_inputs: tuple, target: str = "host", dynamic_batch: bool = False,
          tune=None):
    """Lower and compile the IR; returns a TVM executable (`relax.VMExecutable`). The code is
    specialized to the example shapes, or takes any batch size with `dynamic_batch`. With
    `tune` (a `tuning.Tune`) the kernels get MetaSchedule's best schedules (`tuning.py`)."""
    info = get_target(target)
    tgt = tvm.target.Target(tvm_target(info))
    with tgt:  # the converters pick the target's int8 dot-product kernels (`dot`)
        mod = to_relax(gm, example_inputs, dynamic_batch, bare_single_output=True)
    pipeline = dot_pipeline(tgt)  # the default pipeline, with those kernels scheduled after fusion
    if tune is not None:
        from .tuning import tuned_pipeline

        pipeline, _ = tuned_pipeline(mod, target, tune)
    try:
        return tvm.compile(mod, target=tgt, relax_pipeline=pipeline)
    except Exception as e:
        raise LoweringError(f"TVM could not compile the model for {target}: {type(e).__name__}: {e}") from e


class HostRunner:
    """Runs a compiled executable (or a library loaded from disk) in the Relax VM."""

    def __init__(self, executable):
        self.vm = relax.VirtualMachine(executable, tvm.cpu())
        self.main = self.vm["main"]

    def __call__(self, *inputs: torch.Tensor) -> tuple:
        # DLPack: the VM reads the torch tensors and torch reads its results without copies
        out = _to_torch(self.main(*[tvm.runtime.from_dlpack(_aligned(x)) for x in inputs]))
        return out if isinstance(out, tuple) else (out,)  # a lone output comes back bare (`to_relax`)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and 64-byte aligned on the CPU, as TVM requires (torch's own allocations are)."""
    if x.requires_grad:
        x = x.detach()
    if x.device.type != "cpu" or not x.is_contiguous():
        x = x.cpu().contiguous()
    return x if x.data_ptr() % 64 == 0 else x.clone()


def _to_torch(out):
    if isinstance(out, tvm.runtime.Tensor):
        return torch.from_dlpack(out.__dlpack__())  # the capsule: torch skips its protocol checks
    return tuple(_to_torch(o) for o in out)


def save_library(executable, path: str) -> None:
    executable.export_library(path)


def load_library(path: str):
    return tvm.runtime.load_module(path)
