"""`PassContext`: what the passes of one pipeline run share.

It holds data (calibration batches, later training data and the float teacher), the
target, and the debug options that drive the pass manager's instruments. Debug flags live
here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class PassContext:
    """Shared state of a pipeline run.

    calib: iterable of batches; a batch is a tensor or a tuple of tensors matching the
        model's example inputs (batch size may differ).
    train: iterable of `(inputs..., target)` tuples for training passes.
    teacher: the float model (default: the model the IR was traced from).
    loss_fn: the task loss for training passes, `loss_fn(output, target) -> scalar tensor`
        (default: cross-entropy for integer targets, mean squared error for float ones).
    target: name of the compilation target, for passes that depend on it.
    verify: check the IR after every pass (shapes trace, `qc` ops well formed).
    timing: record the wall time of each pass in `timings`.
    print_ir_after: None, "all" (after every pass) or "change" (after passes that changed it).
    print_ir_to: a writable text stream for printed IR (default: stdout).
    dump_dir: write numbered IR files (`00-input.txt`, `01-fake-quant.txt`, ...) there.
    reproducer_dir: on a pass failure write the input IR, the pipeline text and a few
        calibration batches there; `qcompiler opt --replay DIR` runs them again.
    """

    calib: Iterable | None = None
    train: Iterable | None = None
    teacher: Any = None
    loss_fn: Any = None
    target: str = "host"
    verify: bool = True
    timing: bool = True
    print_ir_after: str | None = None
    print_ir_to: Any = None
    dump_dir: str | None = None
    reproducer_dir: str | None = None
    timings: list[tuple[str, float]] = field(default_factory=list)
    results: list = field(default_factory=list)
