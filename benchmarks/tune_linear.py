"""MetaSchedule tuning of one W8A8 linear layer: host latency untuned vs tuned.

    python benchmarks/tune_linear.py [--n 768] [--k 768] [--tokens 16] [--trials 32] [--database DIR]

Builds nn.Linear(k, n) at `tokens` rows with quant="w8a8" (float in, quantize, int8 kernel,
dequantize, float out), once with the default schedules and once tuned (`backends.tuning`,
measured on this machine with TVM_NUM_THREADS=1), checks the tuned code against the IR's
integer reference bit for bit, and prints one table (milliseconds, median of RUNS calls).
`tuned_linear` returns the tuned executable for reuse (e.g. benchmarks/kernels.py). The
database defaults to a fresh temporary folder, so every run tunes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ["TVM_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import qcompiler as qc  # noqa: E402

from host import median_ms  # noqa: E402  (benchmarks/host.py: one timing helper)


def tuned_linear(n: int = 768, k: int = 768, tokens: int = 16, trials: int = 32, database=None):
    """(untuned Artifact, tuned executable runner, TuneSummary, input) for W8A8 nn.Linear(k, n)."""
    from qcompiler.backends.host import HostRunner
    from qcompiler.backends.tuning import tuned_executable

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(k, n)).eval()
    x = torch.randn(tokens, k)
    calib = [torch.randn(tokens, k) for _ in range(4)]
    art = qc.compile(model, (x,), quant="w8a8", calib=calib)
    exe, summary = tuned_executable(art.ir, (x,), qc.Tune(trials=trials, database=database, num_cores=1))
    return art, HostRunner(exe), summary, x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=768)
    p.add_argument("--k", type=int, default=768)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--database", help="tuning database folder (default: a fresh temporary one)")
    args = p.parse_args()
    database = args.database or tempfile.mkdtemp(prefix="qc-tune-bench-")
    t0 = time.time()
    art, tuned, summary, x = tuned_linear(args.n, args.k, args.tokens, args.trials, database)
    seconds = time.time() - t0
    assert torch.equal(tuned(x)[0], art.ir(x)), "tuned code differs from the IR's integer reference"
    untuned_ms, tuned_ms = median_ms(art, x), median_ms(tuned, x)
    print(f"W8A8 linear {args.k}->{args.n} at {args.tokens} tokens, TVM_NUM_THREADS=1, "
          f"{args.trials} trials ({summary.trials} measured, {seconds:.0f} s to compile and tune)")
    print(f"kernels tuned: {', '.join(summary.tuned) or 'none'}")
    print(f"kernels with their own schedule: {', '.join(summary.scheduled) or 'none'}")
    print(f"{'untuned ms':>12} {'tuned ms':>10} {'speed-up':>9}")
    print(f"{untuned_ms:12.3f} {tuned_ms:10.3f} {untuned_ms / tuned_ms:8.2f}x")


if __name__ == "__main__":
    main()
