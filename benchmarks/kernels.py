"""Kernel benchmark: host latency of linear layers and a transformer block, and executed
instructions of the same layers on `arm` (under QEMU, counted by the TCG plugin).

Host table (milliseconds, median of benchmarks/host.py's RUNS calls after its warm-up, one thread):
  torch fp32          nn.Linear in eager PyTorch
  torch dyn int8      torch.ao dynamic quantization of the nn.Linear modules (activations quantized per call)
  ORT dyn int8        onnxruntime's quantize_dynamic on the same layer or block (activation
                      quantization included, as in qcompiler's code; the block as torch.onnx.export
                      writes it: its dynamic quantizer takes only MatMuls with constant weights, so the
                      attention products stay float, which qc's w8a8 quantizes too)
  qc w8a8             qc.compile(..., quant="w8a8"): float in, quantize, int8 kernel,
                      requantize/dequantize, float out (activation quantization included)
  qc w8a8 tuned       the same after MetaSchedule tuning (--trials, 0 skips it)
  w8a8 kernel         the int8 dot kernel(s) qc w8a8 runs (`backends/dot.py`, with the register tile)
  qc w4a8 per-ch      4-bit per-channel weights (quant="w4a8g0"), int8 activations: the same
                      u8 x s8 dot kernel, the packed weights unpacked per column of tiles inside it
  qc w4 w-only        weight-only int4 (group 128), float activations, through art(x)
  w4 kernel           the same layer's weight-only kernel alone (`kernels_weight_only`, built by
                      itself from the layer's quantized weights with the converter's schedule),
                      TVM time_evaluator, min (and median) of KERNEL_REPEATS x KERNEL_NUMBER calls
  w4 bound            W4 weight bytes incl. float32 group scales / measured copy bandwidth (the
                      memory-bound floor at 1 token; the kernel reads its weights from cache when
                      they fit, so it is not a floor for cache-resident weights)

Dot-kernel table (--dot): the int8 linear kernel alone (int8 in, bias and requantizer fused, int8
out), ms, the minimum over interleaved rounds (robust to other jobs on the machine): avx2_u8s8 on
7-bit weights (the instruction mix of onnxruntime's AVX2 kernel, which saturates on full-range
weights), then on full-range 8-bit weights avx2_s16s8 and avx2_sign (vpxor, the
one w8a8 models get).

Arm table: instructions executed inside the model's kernels (ELF symbols of the generated code),
for fp32 vs w8a8 vs w4a8 (per channel and group 128) vs w4 weight-only, and how many of them are SDOT. Counts are exact
and repeatable (QEMU TCG plugin, see backends/icount.py).

    python benchmarks/kernels.py [--trials 32] [--skip-arm] [--skip-host] [--only SUBSTRING] [--dot] [--w4-only] [--vs-ort]

--vs-ort prints only qc w8a8 against onnxruntime's dynamic int8 and torch fp32 (the host cases,
--only filters them), each the per-call minimum over interleaved rounds: on a shared machine the
medians of the host table move by 10-30% between runs. Its w7a8 column (linear layers) is qc with
per-channel 7-bit weights (quant="w7a8"), on which the 3-op u8 x s8 kernel (onnxruntime's instruction mix) is
exact, where full-range 8-bit weights need the 4-op sign kernel. Then one input on which the u8 x s8
instruction onnxruntime uses on AVX2 without VNNI (vpmaddubsw) overflows its int16 pair sums:
what torch fp32, qc w8a8 and onnxruntime compute for it.
--w4-only prints only the w4 weight-only columns (art(x), the kernel alone as min and median, the
bound and kernel/bound) for the linear shapes, with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import qcompiler as qc  # noqa: E402
from qcompiler import zoo  # noqa: E402
from qcompiler.ir import get_attr_tensor  # noqa: E402

from host import RUNS, median_ms  # noqa: E402  (benchmarks/host.py: one timing helper)

SHAPES = [(768, 768, 1), (768, 768, 16), (3072, 768, 1), (3072, 768, 16)]  # (N out, K in, tokens)
KERNEL_NUMBER, KERNEL_REPEATS = 5, 400  # short batches: the min is the uninterrupted time


def linear(n: int, k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(k, n)).eval()


def calib_for(x: torch.Tensor) -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(x.shape, generator=g) for _ in range(4)]


def ort_dynamic_int8(model: torch.nn.Module, x: torch.Tensor):
    """onnxruntime's dynamic int8 quantizer: a linear layer as a MatMul+Add graph holding its
    weights, any other model (the transformer block) as torch.onnx.export writes it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        if isinstance(model, torch.nn.Sequential):
            lin = model[0]
            w = lin.weight.detach().numpy().T.copy()
            b = lin.bias.detach().numpy()
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
                "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], w.shape[1]])],
                [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
        else:
            torch.onnx.export(model, (x,), src, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(dst, opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


def copy_bandwidth() -> float:
    """Bytes per second that one core copies between two 256 MiB buffers: the best of 5 rounds
    (like the kernel's minimum, the least disturbed by other jobs; the first round also faults
    the target's pages in)."""
    a = np.ones(1 << 28, dtype=np.uint8)
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return a.nbytes / min(times)


def w4_weight_bytes(n: int, k: int, group: int = 128) -> int:
    """Packed int4 weights plus one float32 scale per group."""
    return n * k // 2 + n * -(-k // group) * 4


def w4_kernel_ms(art, x: torch.Tensor) -> tuple[float, float]:
    """(min, median) ms of the art's weight-only layer's kernel alone, on x, one thread."""
    import tvm
    from tvm import te

    from qcompiler.backends import kernels_weight_only as kw, packing
    from qcompiler.backends.targets import get_target, tvm_target

    node = next(n for n in art.ir.graph.nodes if n.target == torch.ops.qc.linear_weight_only.default)
    _, w, ws, group, b = (get_attr_tensor(art.ir, a).detach()
                          if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a for a in node.args)
    bits, (t, k) = node.meta["qc"]["w_bits"], x.shape
    p = kw.kernel_rows(packing.pack(w.numpy(), bits), k, bits, group, ws.shape[1])
    span, tile = packing.span(k, bits), kw.token_tile(t)
    data = [x.numpy(), p, ws.numpy().astype(np.float32), b.numpy().astype(np.float32)]
    ph = [te.placeholder(a.shape, str(a.dtype), f"a{i}") for i, a in enumerate(data)]
    y = kw.weight_only_linear(*ph[:3], ph[3], bits, group, span, tile)
    func = kw.schedule(te.create_prim_func([*ph, y]), tile, bits, span)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(tvm_target(get_target("host"))))
    args = [tvm.runtime.tensor(a) for a in data] + [tvm.runtime.tensor(np.zeros((t, p.shape[0]), np.float32))]
    lib["main"](*args)
    ref = art(x).detach().numpy()
    if np.abs(args[-1].numpy() - ref).max() > 1e-5 * np.abs(ref).max():
        raise RuntimeError("the kernel built alone does not compute what the artifact does")
    res = lib.mod.time_evaluator("main", tvm.cpu(), number=KERNEL_NUMBER, repeat=KERNEL_REPEATS)(*args).results
    return min(res) * 1e3, statistics.median(res) * 1e3


def w4_rows(bandwidth: float) -> list[tuple]:
    """The w4 weight-only columns alone for the linear shapes."""
    rows = [("layer", "qc w4 w-only", "w4 kernel min", "w4 kernel median", "w4 bound", "kernel min / bound")]
    for n, k, t in SHAPES:
        model, x = linear(n, k), torch.randn(t, k)
        art = qc.compile(model, x, quant="w4g128")
        kmin, kmed = w4_kernel_ms(art, x)
        bound = w4_weight_bytes(n, k) / bandwidth * 1e3
        rows.append((f"linear {n}x{k} @{t}", f"{median_ms(art, x):.3f}", f"{kmin:.4f}", f"{kmed:.4f}",
                     f"{bound:.4f}", f"{kmin / bound:.2f}x"))
    return rows


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def w8a8_kernels(art, x: torch.Tensor) -> str:
    """The dot kernels (name, register tile, K chunk) of `art`'s host build, e.g. "avx2_sign 1x8 k128"."""
    import tvm

    from qcompiler.backends.dot_schedule import fused_kernels, scheduled_dots
    from qcompiler.backends.lowering import to_relax
    from qcompiler.backends.targets import get_target, tvm_target

    tgt = tvm.target.Target(tvm_target(get_target("host")))
    with tgt:
        found = scheduled_dots(fused_kernels(to_relax(art.ir, (x,)), tgt)).values()
    return ", ".join(sorted({v.rsplit(" ", 1)[0] for v in found})) or "plain"  # "fused"/"root" dropped


def host_cases(only: str = "") -> list[tuple]:
    """(name, model, x) for the linear SHAPES and the transformer block whose name contains `only`."""
    torch.manual_seed(0)
    cases = [(f"linear {n}x{k} @{t}", linear(n, k), torch.randn(t, k)) for n, k, t in SHAPES]
    cases.append(("transformer block d256 seq16", zoo.TransformerBlock(d=256, heads=4).eval(), torch.randn(1, 16, 256)))
    return [c for c in cases if only in c[0]]


def host_rows(trials: int, only: str = "") -> list[tuple]:
    torch.set_num_threads(1)
    bandwidth = copy_bandwidth()
    rows = [("layer", "torch fp32", "torch dyn int8", "ORT dyn int8", "qc w8a8", "qc w8a8 tuned",
             "qc w4a8 per-ch", "qc w4 w-only", "w4 kernel", "w4 bound", "w8a8 kernel")]
    for name, model, x in host_cases(only):
        calib = calib_for(x)
        with torch.no_grad():
            t_fp32 = median_ms(model, x)
            is_linear = isinstance(model, torch.nn.Sequential)
            t_dyn = median_ms(torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8), x)
        t_ort = median_ms(ort_dynamic_int8(model, x))
        art = qc.compile(model, x, quant="w8a8", calib=calib)
        t_qc = median_ms(art, x)
        t_tuned = None
        if trials:
            tuned = qc.compile(model, x, quant="w8a8", calib=calib, tune=qc.Tune(trials=trials))
            t_tuned = median_ms(tuned, x)
        t_w4 = t_kernel = bound = t_w4a8 = None
        if is_linear:
            t_w4a8 = median_ms(qc.compile(model, x, quant="w4a8g0", calib=calib), x)
            w4 = qc.compile(model, x, quant="w4g128", calib=calib)
            t_w4 = median_ms(w4, x)
            t_kernel = w4_kernel_ms(w4, x)[0]
            bound = w4_weight_bytes(*model[0].weight.shape) / bandwidth * 1e3
        fmt = [name] + [f"{v:.3f}" if v is not None else "-"
                        for v in (t_fp32, t_dyn, t_ort, t_qc, t_tuned, t_w4a8, t_w4, t_kernel, bound)]
        rows.append((*fmt, w8a8_kernels(art, x)))
    print(f"copy bandwidth (one core, 256 MiB): {bandwidth / 1e9:.2f} GB/s; {load()}")
    return rows


def dot_rows(rounds: int = 10) -> list[tuple]:
    """Kernel-only timings of the avx2 int8 linear kernels (`backends/dot_kernels.py`) on
    SHAPES, each the minimum over `rounds` interleaved rounds of 40 calls."""
    import tvm

    from qcompiler.backends import dot_kernels as dk
    from qcompiler.backends.targets import get_target, tvm_target

    host = tvm_target(get_target("host"))
    kernels = ["avx2_u8s8", "avx2_s16s8", "avx2_sign"]
    rows = [("layer", "u8s8 (7-bit w)", "s16s8", "sign", "s16s8 / sign", "sign / u8s8")]
    rng = np.random.default_rng(0)
    for n, k, t in SHAPES:
        w8 = rng.integers(-127, 128, (n, k)).astype(np.int8)  # the w8a8 grid
        w7 = rng.integers(-64, 65, (n, k)).astype(np.int8)  # u8s8 is exact only on these
        x = rng.integers(-128, 128, (t, k)).astype(np.int8)
        bias = rng.integers(-999, 999, n).astype(np.int32)
        timers = []
        for kern in kernels:
            w = w7 if kern == "avx2_u8s8" else w8
            func, consts = dk.linear_kernel(kern, x.shape, w, 3, bias, requantize=True)
            lib = dk.build(func, host)
            args = [tvm.runtime.tensor(a) for a in (x, *consts, np.zeros((t, n), np.int8))]
            lib["main"](*args)
            if not np.array_equal(args[-1].numpy(), dk.reference_requantize(dk.reference_linear(x, 3, w, bias))):
                raise AssertionError(f"{kern} differs from the reference on {n}x{k} @{t}")
            timers.append((lib.time_evaluator("main", tvm.cpu(), number=1, repeat=40, min_repeat_ms=0), args))
        best = [float("inf")] * len(timers)
        for _ in range(rounds):  # interleaved, so a burst of load elsewhere hits every kernel alike
            best = [min(b, min(f(*a).results) * 1e3) for b, (f, a) in zip(best, timers)]
        u8, s16, sign = best
        rows.append((f"linear {n}x{k} @{t}", *(f"{b:.4f}" for b in best), f"{s16 / sign:.2f}x", f"{sign / u8:.2f}x"))
    return rows


def vs_ort_rows(only: str = "", rounds: int = 15, calls: int = 50) -> list[tuple]:
    """qc w8a8 (`art(x)`), onnxruntime dynamic int8 and torch fp32 on the host cases (linear
    shapes and the transformer block): per-call minimum over `rounds` interleaved rounds of
    `calls` calls, so a burst of load elsewhere hits all three alike (medians move 10-30% here)."""
    torch.set_num_threads(1)
    rows = [("layer", "qc w8a8 us", "ORT dyn int8 us", "torch fp32 us", "qc / ORT", "qc w7a8 us", "w7a8 / ORT")]
    for name, model, x in host_cases(only):
        art = qc.compile(model, x, quant="w8a8", calib=calib_for(x))
        fns = [lambda: art(x), ort_dynamic_int8(model, x), lambda: model(x)]
        if isinstance(model, torch.nn.Sequential):  # 7-bit per-channel weights (pairs |w0|+|w1| <= 128):
            w7 = qc.compile(model, x, quant="w7a8", calib=calib_for(x))  # the 3-op avx2_u8s8 kernel is exact
            fns.append(lambda: w7(x))
        best = [float("inf")] * len(fns)
        with torch.no_grad():
            for _ in range(rounds):
                for i, fn in enumerate(fns):
                    fn()
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    best[i] = min(best[i], (time.perf_counter() - t0) / calls * 1e6)
        w7_cols = (f"{best[3]:.1f}", f"{best[3] / best[1]:.2f}x") if len(best) > 3 else ("–", "–")
        rows.append((name, *(f"{b:.1f}" for b in best[:3]), f"{best[0] / best[1]:.2f}x", *w7_cols))
    return rows


def saturation_rows() -> list[tuple]:
    """What each int8 path computes for one input on which u8 x s8 pair sums overflow int16: a
    64-input linear whose weights all sit at their channel's maximum (int8 127), fed inputs at
    the ends of their range (onnxruntime's dynamic quantizer maps them to uint8 0 and 255). The
    exact result is 62; vpmaddubsw saturates each pair 255 * 127 * 2 at 32767."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    x = torch.ones(1, 64)
    x[0, 0] = -1.0
    art = qc.compile(model, x, quant="w8a8", calib=[x])
    outs = [model(x), art(x), torch.from_numpy(ort_dynamic_int8(model, x)()[0])]
    return [("path", "y[0] (float: 62; w8a8 rounds its output to 8 bits)")] + [(name, f"{float(y.detach().reshape(-1)[0]):.3f}")
                                             for name, y in zip(("torch fp32", "qc w8a8", "ORT dyn int8"), outs)]


def arm_rows() -> list[tuple]:
    from qcompiler.backends import arm, icount

    rows = [("layer", "build", "kernel insns", "SDOT", "SDOT share", "fp32 / this")]
    for n, k, t in [(768, 768, 16), (768, 768, 1)]:
        model, x = linear(n, k), torch.randn(t, k)
        base = None
        for label, quant in [("fp32", None), ("w8a8", "w8a8"), ("w4a8 per-ch", "w4a8g0"), ("w4a8 g128", "w4a8"),
                             ("w4 w-only", "w4g128")]:
            kw = {"pipeline": "fold-batchnorm"} if quant is None else {"quant": quant}
            art = qc.compile(model, x, target="arm", calib=calib_for(x), **kw)
            with icount.Counter() as counter:
                arm.run(art.library, (x,), qemu_args=counter.qemu_args)
                counts = counter.read()
            names = {call.kernel for call in art.library.program.calls}  # the generated kernels
            insns = sdot = 0
            for symbol, c in counts.symbols.items():  # a kernel and its outlined parts (<name>_compute_)
                if any(symbol == k or symbol.startswith(k + "_") for k in names):
                    insns, sdot = insns + c.insns, sdot + c.classes["sdot"]
            base = base or insns
            rows.append((f"linear {n}x{k} @{t}", label, f"{insns:,}", f"{sdot:,}",
                         f"{sdot / insns:.1%}", f"{base / insns:.2f}x"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=32, help="MetaSchedule trials per model (0: skip tuning)")
    p.add_argument("--skip-host", action="store_true")
    p.add_argument("--skip-arm", action="store_true")
    p.add_argument("--only", default="", help="host rows whose name contains this text (e.g. '@16', '768x768')")
    p.add_argument("--dot", action="store_true", help="also time the int8 dot kernels alone (W8A8)")
    p.add_argument("--w4-only", action="store_true", help="only the host w4 weight-only columns, then stop")
    p.add_argument("--vs-ort", action="store_true", help="only qc w8a8 vs onnxruntime vs torch fp32 on the host "
                   "cases (--only filters), minimum over interleaved rounds, then stop")
    args = p.parse_args()
    if args.vs_ort:
        print(f"host latency, us (1 thread, per-call minimum over interleaved rounds); {load()}")
        print(table(vs_ort_rows(args.only)))
        print(load())
        print("\nexactness on inputs that overflow vpmaddubsw's int16 pair sums (u8 255 x s8 127, twice):")
        print(table(saturation_rows()))
        return
    if args.w4_only:
        torch.set_num_threads(1)
        bandwidth = copy_bandwidth()
        print(f"copy bandwidth (one core, 256 MiB): {bandwidth / 1e9:.2f} GB/s; {load()}")
        print(f"w4 weight-only, ms (1 thread; art(x) median of {RUNS}, kernel alone min/median of "
              f"{KERNEL_REPEATS} x {KERNEL_NUMBER} calls)")
        print(table(w4_rows(bandwidth)))
        print(load())
        return
    if not args.skip_host:
        print(f"host latency, ms (1 thread, median of {RUNS})")
        print(table(host_rows(args.trials, args.only)))
        print()
    if args.dot:
        print("int8 dot kernels alone (1 thread, int8 in/out, bias + requantize fused), ms, min of interleaved rounds")
        print(table(dot_rows()))
        print()
    if not args.skip_arm:
        print("arm (cortex-a76 under qemu-aarch64): instructions executed in the model's kernels")
        print(table(arm_rows()))


if __name__ == "__main__":
    main()
