"""mali target on PoCL: correctness against the IR, kernel launches and work-group sizes, and
PoCL time beside the host build (a sanity figure only: PoCL runs OpenCL on this CPU; the real
speed comes from a Mali GPU).

Models: the digits MLP and digits CNN (batch 16), one transformer encoder block (d=256,
4 heads, seq 64, batch 1) and EfficientNet-Lite0 (batch 1, 224x224; needs the `models` extra),
each at W8A8 and W4A8. Per model: how far `art(x)` is from `art.ir(x)` ("exact", else the
largest difference relative to the output's magnitude), beside the same for the host build
(integer layers are bit-exact on both; float ops such as layer norm, softmax and gelu round
differently from torch, and a flipped rounding in a following quantize moves the output by
one step, on the host as on the GPU), the number of kernel
launches per run, the largest work-group, the wall time of one PoCL run (inputs in, kernels,
outputs out; median) and of the host build (Relax VM, 1 thread). With --kernels, a table per
model: each launch with its dlight rule, global/local size and PoCL's kernel time.

    nice -n 10 python benchmarks/mali.py [--models mlp,cnn,transformer,effnet] [--quant w8a8,w4a8] [--kernels]
                                         [--ms-sample]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks.realdata

import torch  # noqa: E402

import qcompiler as qc  # noqa: E402
from qcompiler import zoo  # noqa: E402
from qcompiler.backends.mali_runner import MaliRunner, device_summary  # noqa: E402
from qcompiler.ir import as_tuple  # noqa: E402


def models():
    def effnet():
        from benchmarks.realdata import load_efficientnet_lite0, sample_images

        calib = sample_images(crops=2, seed=1)  # as benchmarks/accuracy.py calibrates it
        return load_efficientnet_lite0(), sample_images(crops=1)[:1], [calib[i:i + 8] for i in range(0, len(calib), 8)]

    def small(make, shape):
        def f():
            torch.manual_seed(0)
            g = torch.Generator().manual_seed(0)
            return make().eval(), torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(4)]
        return f

    return {"mlp": small(zoo.MLP, (16, 64)), "cnn": small(zoo.DigitsCNN, (16, 1, 8, 8)),
            "transformer": small(zoo.TransformerBlock, (1, 64, 256)), "effnet": effnet}


def difference(fn, ir, x) -> str:
    """"exact", or the largest difference to the IR relative to the output's largest magnitude."""
    with torch.no_grad():
        got, ref = as_tuple(fn(x)), as_tuple(ir(x))
    worst = 0.0
    for y, r in zip(got, ref):
        if not r.dtype.is_floating_point:
            if not torch.equal(y, r):
                return "integers differ"
            continue
        worst = max(worst, float((y - r).abs().max()) / max(float(r.abs().max()), 1e-30))
    return "exact" if worst == 0 else f"{worst:.1e}"


def ms_sampled(art, x) -> str:
    """How far the model built from MetaSchedule-sampled schedules is from the IR on PoCL."""
    from qcompiler.backends import mali, mali_tune

    tdict = mali.mali_target()
    database = mali_tune.sampled_database(art.ir, (x,), tdict)
    pipeline = mali_tune.apply_records(database, mali_tune.board_target(tdict))
    p = mali.build(art.ir, (x,), pipeline=pipeline)
    return difference(MaliRunner(p), art.ir, x) + f" ({sum(r == 'MetaSchedule' for r in p.rules.values())} kernels)"


def median_s(fn, runs: int = 10) -> float:
    fn()
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return sorted(samples)[len(samples) // 2]


def table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,transformer,effnet")
    ap.add_argument("--quant", default="w8a8,w4a8")
    ap.add_argument("--kernels", action="store_true", help="print every launch of every model")
    ap.add_argument("--ms-sample", action="store_true",
                    help="also build each model with one MetaSchedule-sampled schedule per kernel (the form "
                         "tuned kernels take, `mali_tune.sampled_database`) and compare it with the IR on PoCL")
    args = ap.parse_args()
    makers = models()
    rows = [("model", "quant", "vs IR: mali", "vs IR: host", "launches", "kernels", "max work-group", "compile s",
             "PoCL ms", "host ms")]
    device = None
    for name in args.models.split(","):
        try:
            net, x, calib = makers[name]()
        except ImportError as e:
            print(f"{name}: skipped ({e}; pip install -e '.[models]')")
            continue
        for quant in args.quant.split(","):
            t = time.perf_counter()
            try:
                art = qc.compile(net, x, target="mali", quant=quant, calib=calib)
            except qc.QCompilerError as e:
                rows.append((name, quant, f"failed: {str(e).splitlines()[0][:90]}", *[""] * 7))
                continue
            seconds = time.perf_counter() - t
            host = qc.compile(net, x, target="host", quant=quant, calib=calib)
            p = art.library
            runner = MaliRunner(p)
            device = runner.device
            ok, host_ok = difference(art, art.ir, x), difference(host, host.ir, x)
            pocl = median_s(lambda: runner.run((x,)))
            host_ms = median_s(lambda: host(x)) * 1e3
            launches = p.launch_table()
            rows.append((name, quant, ok, host_ok, len(launches), len(p.launches), max(l[3][0] * l[3][1] * l[3][2]
                         for l in launches), f"{seconds:.1f}", f"{pocl * 1e3:.2f}", f"{host_ms:.2f}"))
            if args.ms_sample:
                print(f"{name} {quant}: MetaSchedule-sampled schedules on PoCL vs IR: {ms_sampled(art, x)}")
            if args.kernels:
                _, times = runner.run((x,), profile=True)
                print(f"\n{name} {quant}: {len(launches)} launches")
                table([("kernel", "rule", "global", "local", "PoCL ms")] + [
                    (k[:60], p.rules.get(f, "?"), "x".join(map(str, g)), "x".join(map(str, loc)), f"{s * 1e3:.3f}")
                    for (f, k, g, loc), s in zip(launches, times)])
    print(f"\nmali target on {device_summary(device) if device else 'no device'} (PoCL time is a sanity figure)\n")
    table(rows)


if __name__ == "__main__":
    main()
