"""Weight storage and decode latency of packed sub-byte weights on the host.

Model: a transformer feed-forward block, Linear(768, 3072) -> ReLU -> Linear(3072, 768)
(4.7M weights), compiled with `qc.compile` for one token (a memory-bound GEMV, as in
decoding) at each recipe. Per recipe: the ideal weight bytes (weights x bits / 8, scales
aside), the bytes of the serialized executable that `export_library` embeds (VM program and
constants), the size of the exported shared library, and the median latency of the Relax VM
call (1 thread). "bound" is the weight bytes of the executable over this machine's measured
copy bandwidth (a 64 MiB copy, i.e. DRAM): the time to read the weights once from memory; the
FFN's packed weights may fit the last-level cache, where a call can beat it. On a loaded
machine both the copy and the calls slow down. No assertions; the numbers are printed.

    python benchmarks/packed_weights.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402

import qcompiler as qc  # noqa: E402
from qcompiler.backends.host import HostRunner  # noqa: E402
from qcompiler.backends.weights import serialized_bytes  # noqa: E402

from host import median_ms  # noqa: E402  (benchmarks/host.py, beside this script)

RECIPES = ["w8a8", "w4a8g0", "w4a8g128", "w2a8g64", "w8", "w4g0", "w4", "w2g64"]
D, HIDDEN = 768, 3072


def copy_bandwidth() -> float:
    """Bytes per second of a large memcpy (numpy), the best of a few."""
    a = np.ones(64 << 20, np.uint8)
    b = np.empty_like(a)
    best = min(_timed(np.copyto, b, a) for _ in range(5))
    return a.nbytes / best


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, D)).eval()
    n_weights = 2 * D * HIDDEN
    x = torch.randn(1, D)
    calib = [torch.randn(16, D)]
    bw = copy_bandwidth()
    with torch.no_grad():
        t_fp32 = median_ms(model, x)
    rows = [("fp32 (torch)", "32", f"{n_weights * 4:,}", "-", "-", f"{t_fp32:.3f}", f"{n_weights * 4 / bw * 1e3:.3f}")]
    for recipe in RECIPES:
        spec = qc.QuantSpec.parse(recipe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            art = qc.compile(model, (x,), quant=spec, calib=calib)
        blob = serialized_bytes(art.library)
        with tempfile.TemporaryDirectory() as d:
            art.library.export_library(os.path.join(d, "lib.so"))
            so = os.path.getsize(os.path.join(d, "lib.so"))
        vm_main = HostRunner(art.library).vm["main"]
        t = median_ms(vm_main, tvm.runtime.tensor(np.ascontiguousarray(x.numpy())))
        rows.append((recipe, str(spec.w_bits), f"{n_weights * spec.w_bits // 8:,}", f"{blob:,}", f"{so:,}",
                     f"{t:.3f}", f"{blob / bw * 1e3:.3f}"))
    head = ("recipe", "w bits", "ideal weight B", "executable B", "library B", "1 token ms", "bound ms")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print(f"FFN {D}x{HIDDEN}x{D}, {n_weights:,} weights, copy bandwidth {bw / 1e9:.1f} GB/s, 1 thread")
    for r in [head] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
