"""Kernel benchmark: host latency of linear layers and a transformer block, and executed
instructions of the same layers on `arm` (under QEMU, counted by the TCG plugin).

Host table (milliseconds, median of benchmarks/host.py's RUNS calls after its warm-up, one thread):
  torch fp32          nn.Linear in eager PyTorch
  torch dyn int8      torch.ao dynamic quantization (activations quantized per call)
  ORT dyn int8        onnxruntime's quantize_dynamic on the same layer (activation
                      quantization included, as in qcompiler's code)
  qc w8a8             qc.compile(..., quant="w8a8"): float in, quantize, int8 kernel,
                      requantize/dequantize, float out (activation quantization included)
  qc w8a8 tuned       the same after MetaSchedule tuning (--trials, 0 skips it)
  qc w4 w-only        weight-only int4 (group 128), float activations
  bound               W4 weight bytes / measured copy bandwidth (the memory-bound floor at 1 token)

Arm table: instructions executed inside the model's kernels (ELF symbols of the generated code),
for fp32 vs w8a8 vs w4a8 vs w4 weight-only, and how many of them are SDOT. Counts are exact
and repeatable (QEMU TCG plugin, see backends/icount.py).

    python benchmarks/kernels.py [--trials 32] [--skip-arm] [--skip-host]
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

from host import RUNS, median_ms  # noqa: E402  (benchmarks/host.py: one timing helper)

SHAPES = [(768, 768, 1), (768, 768, 16), (3072, 768, 1), (3072, 768, 16)]  # (N out, K in, tokens)


def linear(n: int, k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(k, n)).eval()


def calib_for(x: torch.Tensor) -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(x.shape, generator=g) for _ in range(4)]


def ort_dynamic_int8(model: torch.nn.Module, x: torch.Tensor):
    """onnxruntime's dynamic int8 quantizer on a MatMul+Add graph holding the layer's weights."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    lin = model[0]
    w = lin.weight.detach().numpy().T.copy()
    b = lin.bias.detach().numpy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(dst, opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


def copy_bandwidth() -> float:
    """Bytes per second that one core copies between two 256 MiB buffers (median of 5)."""
    a = np.ones(1 << 28, dtype=np.uint8)
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return a.nbytes / statistics.median(times)


def table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def host_rows(trials: int) -> list[tuple]:
    torch.set_num_threads(1)
    bandwidth = copy_bandwidth()
    rows = [("layer", "torch fp32", "torch dyn int8", "ORT dyn int8", "qc w8a8", "qc w8a8 tuned",
             "qc w4 w-only", "w4 bound")]
    cases = [(f"linear {n}x{k} @{t}", linear(n, k), torch.randn(t, k)) for n, k, t in SHAPES]
    cases.append(("transformer block d256 seq16", zoo.TransformerBlock(d=256, heads=4).eval(), torch.randn(1, 16, 256)))
    for name, model, x in cases:
        calib = calib_for(x)
        with torch.no_grad():
            t_fp32 = median_ms(model, x)
            is_linear = isinstance(model, torch.nn.Sequential)
            t_dyn = (median_ms(torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8), x)
                     if is_linear else None)
        t_ort = median_ms(ort_dynamic_int8(model, x)) if is_linear else None
        art = qc.compile(model, x, quant="w8a8", calib=calib)
        t_qc = median_ms(art, x)
        t_tuned = None
        if trials:
            tuned = qc.compile(model, x, quant="w8a8", calib=calib, tune=qc.Tune(trials=trials))
            t_tuned = median_ms(tuned, x)
        t_w4 = bound = None
        if is_linear:
            w4 = qc.compile(model, x, quant="w4g128", calib=calib)
            t_w4 = median_ms(w4, x)
            n, k = model[0].weight.shape
            weight_bytes = n * k // 2 + n * (k // 128) * 4  # packed int4 + one float32 scale per group
            bound = weight_bytes / bandwidth * 1e3
        fmt = [name] + [f"{v:.3f}" if v is not None else "-" for v in (t_fp32, t_dyn, t_ort, t_qc, t_tuned, t_w4, bound)]
        rows.append(tuple(fmt))
    print(f"copy bandwidth (one core, 256 MiB): {bandwidth / 1e9:.2f} GB/s")
    return rows


def arm_rows() -> list[tuple]:
    from qcompiler.backends import arm, icount

    rows = [("layer", "build", "kernel insns", "SDOT", "SDOT share", "fp32 / this")]
    for n, k, t in [(768, 768, 16), (768, 768, 1)]:
        model, x = linear(n, k), torch.randn(t, k)
        base = None
        for label, quant in [("fp32", None), ("w8a8", "w8a8"), ("w4a8", "w4a8"), ("w4 w-only", "w4g128")]:
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
    args = p.parse_args()
    if not args.skip_host:
        print(f"host latency, ms (1 thread, median of {RUNS})")
        print(table(host_rows(args.trials)))
        print()
    if not args.skip_arm:
        print("arm (cortex-a76 under qemu-aarch64): instructions executed in the model's kernels")
        print(table(arm_rows()))


if __name__ == "__main__":
    main()
