"""Measured cost of one quantized layer on a target, cached beside the tuning database.

`hawq(budget_latency=...)` needs C[layer, bits]: what the target pays for that layer at that
width. The pass builds each (layer, bits) as a model of its own (the layer with its shapes,
float in and out: quantize, the integer layer with its requantize/dequantize) and hands the
converted IR here:

- host: compiled by `host.build` (the same kernels as a whole model), timed in the Relax VM
  with `time_evaluator` (`repeat` rounds of `number` calls, fewer for a slow layer; the
  fastest round's mean), in ms;
- arm: cross-compiled by `arm.build`, run once under qemu-aarch64 with the instruction-count
  plugin (`icount.Counter`); the cost is the instructions executed in the program's kernels
  (symbols of `program.calls`, outlined parts included): exact and repeatable.

The quantize of the float input and the dequantize of the output are in every entry of a
layer alike, so they shift that layer's row of the table and not the choice between widths.

Cache: `layer_costs.json` in the target's tuning-database folder (`tuning_db.default_dir` of
the key `tuning.target_key` gives it), one entry per key (layer kind, shapes, widths,
granularity; the caller builds it), value, unit and `KERNELS`, the revision of the kernels it
was measured on: an entry of another revision is measured again (revision 2: the 4/2-bit
linears and the convolutions moved to the dot-product kernels, 4-200x faster on the host).
Each new entry is merged under the database's exclusive file lock and written to a temporary file that replaces the old one
(`os.replace`), so an interrupt loses at most the entry being measured; a file that does not
parse is set aside with a warning and rebuilt.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable

from qcompiler.errors import LoweringError

from .targets import get_target

FILE = "layer_costs.json"
KERNELS = 2  # bump when the kernels a layer compiles to change, so cached costs are measured again
UNITS = {"host": "ms", "arm": "instructions"}


def unit(target: str) -> str:
    backend = get_target(target).backend
    if backend not in UNITS:
        raise LoweringError(f"layer latencies are measured on the host (timed) and arm (instruction counts) "
                            f"targets, not {target!r}: give budget_kb or budget_bops for it, or target host/arm")
    return UNITS[backend]


def cache_path(target: str) -> Path:
    from . import tuning, tuning_db

    tgt = tuning.tuning_target(target, tuning.Tune(progress=False))
    return tuning_db.default_dir(tuning.target_key(target, tgt, None)) / FILE


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, dict) and "value" in v for v in data.values()):
            raise ValueError("not a table of {key: {value, unit}}")
        return data
    except (ValueError, UnicodeDecodeError) as e:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.replace(path, aside)
        warnings.warn(f"layer cost table {path} is damaged ({e}); moved to {aside.name}, measuring again")
        return {}


def _store(path: Path, key: str, entry: dict) -> None:
    from .tuning_db import _fsync, _locked

    with _locked(path.parent, exclusive=True):
        table = _read(path)
        table[key] = entry
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
        _fsync(tmp)
        os.replace(tmp, path)


def measure(ir, inputs: tuple, target: str, number: int = 20, repeat: int = 5) -> float:
    """The cost of running the converted IR `ir` on `inputs` on `target` (see the module doc)."""
    backend = get_target(target).backend
    unit(target)
    if backend == "host":
        import tvm
        from tvm import relax

        from . import host

        vm = relax.VirtualMachine(host.build(ir, inputs, target), tvm.cpu())
        args = [tvm.runtime.from_dlpack(host._aligned(x)) for x in inputs]
        start = time.perf_counter()
        vm["main"](*args)  # warm up; a slow layer gets fewer calls per round (~0.2 s a round)
        number = max(1, min(number, int(0.2 / max(time.perf_counter() - start, 1e-6))))
        res = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(*args)
        return float(min(res.results)) * 1e3
    from . import arm

    return float(kernel_instructions(arm.build(ir, inputs, target), inputs))


def kernel_instructions(binary, inputs: tuple) -> int:
    """Instructions an arm program (`arm.ArmBinary`) executes in its kernels on `inputs`: the
    symbols of `program.calls` and their outlined parts (`<kernel>_*`), not libc or the driver."""
    from . import arm, icount

    with icount.Counter() as counter:
        arm.run(binary, inputs, qemu_args=counter.qemu_args)
        counts = counter.read()
    names = {call.kernel for call in binary.program.calls}
    return sum(c.insns for s, c in counts.symbols.items() if any(s == k or s.startswith(k + "_") for k in names))


def costs(entries: list[tuple[str, Callable[[], tuple]]], target: str, progress: Callable | None = None) -> list[float]:
    """The cost of each (key, make) entry: from the cache, else `make()` -> (converted IR,
    inputs) is measured and stored at once."""
    path = cache_path(target)
    table, out = _read(path), []
    for i, (key, make) in enumerate(entries):
        if table.get(key, {}).get("kernels") != KERNELS:
            ir, inputs = make()
            table[key] = {"value": measure(ir, inputs, target), "unit": unit(target), "kernels": KERNELS}
            _store(path, key, table[key])
            if progress:
                progress(i + 1, len(entries), key, table[key]["value"])
        out.append(float(table[key]["value"]))
    return out
