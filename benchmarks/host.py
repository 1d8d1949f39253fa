"""Host latency benchmark: torch fp32 eager vs the int8 code qcompiler generates with TVM.

Models: the digits MLP (batch 16), the digits CNN (batch 16) and one transformer encoder
block (d=256, 4 heads, seq 64, batch 1), each quantized W8A8 with `qc.compile`. Latency is
the median of RUNS calls after WARMUP, single-threaded on both sides. "int8 call" is
`art(x)` as a user calls it (torch -> TVM tensor conversion included); "int8 VM" is the
Relax VM call alone on pre-converted tensors. Quality beside each: top-1 accuracy on the
digits test split (float vs compiled) for the classifiers, output SQNR vs float for the
transformer block. No assertions on time.

    python benchmarks/host.py
"""

from __future__ import annotations

import os

# Threading must be fixed before torch and TVM start their thread pools.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402

import qcompiler as qc  # noqa: E402
from qcompiler import zoo  # noqa: E402
from qcompiler.backends.host import HostRunner  # noqa: E402
from qcompiler.report import sqnr_db  # noqa: E402


WARMUP, RUNS = 10, 100
BATCH = 16  # classifiers; the generated code is specialized to this batch size


def median_ms(fn, *args) -> float:
    """Median wall time of fn(*args) in milliseconds over RUNS calls after WARMUP calls."""
    for _ in range(WARMUP):
        fn(*args)
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(name: str, model, x: torch.Tensor, calib: list, quality) -> tuple:
    """Compile `model` W8A8 for the host at x's shape; time both sides; return a table row."""
    art = qc.compile(model, x, target="host", quant="w8a8", calib=calib)
    with torch.no_grad():
        t_float = median_ms(model, x)
    t_call = median_ms(art, x)
    vm_main = HostRunner(art.library).vm["main"]
    t_vm = median_ms(vm_main, tvm.runtime.tensor(np.ascontiguousarray(x.numpy())))
    return (name, "x".join(map(str, x.shape)), f"{t_float:.3f}", f"{t_call:.3f}", f"{t_vm:.3f}",
            f"{t_float / t_call:.2f}x", quality(model, art))


def accuracy_of(x_test, y_test):
    def quality(model, art):
        f, q = zoo.accuracy(model, x_test, y_test, BATCH), zoo.accuracy(art, x_test, y_test, BATCH)
        return f"acc {f:.2%} -> {q:.2%}"
    return quality


def sqnr_on(x):
    def quality(model, art):
        with torch.no_grad():
            return f"SQNR {sqnr_db(model(x), art(x)):.1f} dB"
    return quality


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = zoo.digits()
    calib_img = list(x_train[:256].split(BATCH * 4))  # 4 calibration batches of 64 images

    mlp = zoo.train_classifier(zoo.MLP(), x_train.flatten(1), y_train)
    cnn = zoo.train_classifier(zoo.DigitsCNN(), x_train, y_train)
    block = zoo.TransformerBlock(d=256, heads=4).eval()
    seq = torch.randn(1, 64, 256)

    rows = [("model", "input", "torch fp32 ms", "int8 call ms", "int8 VM ms", "speedup", "quality (float -> int8)")]
    rows.append(measure("MLP", mlp, x_train[:BATCH].flatten(1), [c.flatten(1) for c in calib_img],
                        accuracy_of(x_test.flatten(1), y_test)))
    rows.append(measure("DigitsCNN", cnn, x_train[:BATCH], calib_img, accuracy_of(x_test, y_test)))
    rows.append(measure("TransformerBlock", block, seq, [torch.randn(1, 64, 256) for _ in range(8)],
                        sqnr_on(torch.randn(1, 64, 256))))

    n_eval = len(x_test) // BATCH * BATCH
    print(f"qcompiler host benchmark: {cpu_name()} ({os.cpu_count()} cores), "
          f"threads: torch {torch.get_num_threads()}, TVM {os.environ['TVM_NUM_THREADS']} (TVM_NUM_THREADS); "
          f"median of {RUNS} runs after {WARMUP} warm-up")
    print(f"accuracy: digits test split, {n_eval} of {len(x_test)} images in batches of {BATCH}; "
          "speedup = torch fp32 / int8 call (below 1x: int8 is slower)\n")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
