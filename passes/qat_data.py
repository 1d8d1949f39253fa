"""Where QAT's batches come from.

- train: `PassContext.train`, items `(inputs..., target)` (or only the inputs, for
  distillation); validated against the IR's example inputs before training starts.
- calib: `PassContext.calib` batches (no targets: distillation from the teacher).
- synthetic (data-free): inputs drawn from the calibration statistics: float inputs from a
  Gaussian with each element's mean and standard deviation over the calibration batches,
  integer inputs (token ids) from the calibration values' empirical distribution.
- noise (data-free, no data at all): standard normal float inputs; integer inputs uniform in
  [0, max of the example inputs]. Activation quantizers then keep their calibrated ranges
  (noise says nothing about real activations); weights and weight scales still train.

Batch i is item i mod len for the stored sources; the synthesized ones are drawn from a
generator seeded with (seed, i), so a resumed run sees the same batches as an
uninterrupted one. With several processes, process r of w takes batch step * w + r.
"""

from __future__ import annotations

import torch

from qcompiler.errors import CalibrationError, TrainingError

from .calibrate import check_batch

MODES = ("auto", "train", "calib", "synthetic", "noise")


class Batches:
    def __init__(self, mode: str, ctx, examples: tuple, dynamic_batch: bool, batch: int = 0, seed: int = 0):
        self.examples, self.seed = examples, seed
        if mode == "auto":
            mode = "train" if ctx.train is not None else "calib" if ctx.calib is not None else "noise"
        self.mode = mode
        self.items: list | None = None
        if mode in ("train", "calib"):
            src = ctx.train if mode == "train" else ctx.calib
            if src is None:
                field = "train=[(inputs..., target), ...]" if mode == "train" else "calib=[batch, ...]"
                raise TrainingError(f"qat data={mode} needs PassContext({field}); or use data=synthetic or "
                                    "data=noise to train without data (distilling the float teacher)")
            source = "training" if mode == "train" else "calibration"
            self.items = [self._split(item, i, dynamic_batch, source, mode == "train") for i, item in enumerate(src)]
            if not self.items:
                raise TrainingError(f"the {mode} data is empty: give at least one batch")
            return
        size = batch or examples[0].shape[0]
        if mode == "synthetic":
            if ctx.calib is None:
                raise TrainingError("qat data=synthetic draws inputs from calibration statistics: give "
                                    "PassContext(calib=[batch, ...]) or use data=noise")
            calib = [self._split(b, i, dynamic_batch, "calibration", False)[0] for i, b in enumerate(ctx.calib)]
            self.stats = [_stats(torch.cat([c[k] for c in calib])) for k in range(len(examples))]
        self.size = size

    @property
    def has_targets(self) -> bool:
        return self.items is not None and any(t is not None for _, t in self.items)

    def _split(self, item, index: int, dynamic_batch: bool, source: str, labelled: bool):
        """(inputs, target or None) of one stored batch, checked against the example inputs."""
        n = len(self.examples)
        parts = (item,) if isinstance(item, torch.Tensor) else tuple(item) if isinstance(item, (tuple, list)) else None
        if parts is None:
            raise TrainingError(f"{source} batch {index} is a {type(item).__name__}; give a tuple "
                                "(inputs..., target) of tensors")
        labelled = labelled and len(parts) == n + 1
        inputs, target = (parts[:n], parts[n]) if labelled else (parts, None)
        try:
            inputs = check_batch(inputs, self.examples, index, dynamic_batch)
        except CalibrationError as e:
            raise TrainingError(str(e).replace("calibration batch", f"{source} batch")) from None
        if isinstance(target, torch.Tensor) and target.dim() and target.shape[0] != inputs[0].shape[0]:
            raise TrainingError(f"{source} batch {index}: the target's batch size {target.shape[0]} differs "
                                f"from the inputs' {inputs[0].shape[0]}")
        return inputs, target

    def index(self, step: int, rank: int = 0, world: int = 1) -> int | None:
        """Which stored batch `get` returns (None for drawn data, new at every step)."""
        return None if self.items is None else (step * world + rank) % len(self.items)

    def get(self, step: int, rank: int = 0, world: int = 1) -> tuple[tuple, object]:
        i = step * world + rank
        if self.items is not None:
            return self.items[i % len(self.items)]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        if self.mode == "synthetic":
            return tuple(_draw(st, e, self.size, gen) for st, e in zip(self.stats, self.examples)), None
        return tuple(_noise(e, self.size, gen) for e in self.examples), None


def _stats(x: torch.Tensor) -> dict:
    if x.is_floating_point():
        return {"mean": x.mean(0), "std": x.std(0, unbiased=False) if len(x) > 1 else torch.ones_like(x[0])}
    values = x.flatten().long()
    lo = int(values.min())
    return {"lo": lo, "p": torch.bincount(values - lo).double()}


def _draw(st: dict, example: torch.Tensor, size: int, gen) -> torch.Tensor:
    shape = (size, *example.shape[1:])
    if "mean" in st:
        return (st["mean"] + st["std"] * torch.randn(shape, generator=gen)).to(example.dtype)
    idx = torch.multinomial(st["p"], int(torch.tensor(shape).prod()), replacement=True, generator=gen)
    return (idx + st["lo"]).reshape(shape).to(example.dtype)


def _noise(example: torch.Tensor, size: int, gen) -> torch.Tensor:
    shape = (size, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, generator=gen).to(example.dtype)
    return torch.randint(0, int(example.max()) + 1, shape, generator=gen).to(example.dtype)


class TeacherCache:
    """The teacher's outputs per stored batch, computed once: the teacher is frozen and the
    batches repeat every epoch, so later epochs read them back (bit for bit what the teacher
    gives) instead of running it again. Holds at most `mb` megabytes; batches past that run
    the teacher every time."""

    def __init__(self, teacher, mb: int):
        self.teacher, self.room, self.store = teacher, mb * 2**20, {}

    @torch.no_grad()
    def __call__(self, key: int | None, inputs: tuple) -> tuple:
        if key in self.store:
            return self.store[key]
        out = tuple(self.teacher(*inputs))
        size = sum(t.numel() * t.element_size() for t in out if isinstance(t, torch.Tensor))
        if key is not None and size <= self.room:
            self.store[key], self.room = out, self.room - size
        return out
