"""Int8 linear kernels on the host: the plain TE kernel vs the tensorized ones (`backends/dot.py`)
vs onnxruntime's dynamic int8 quantizer, one thread; and on arm (qemu), executed instructions
of the plain kernel vs SDOT.

Host table, per layer N x K at 1 and 16 tokens (ms, min / median of many runs; the machine is
shared, so the minimum is the figure to compare):
  plain       `lowering._dot_te` + bias + requantize, int8 in, int8 out (the kernel before
              tensorization, with the default schedule)
  u8s8        the same layer on `avx2_u8s8` (vpmaddubsw; exact for weights of <= 7 bits, so
              these weights are drawn in [-64, 64])
  s16s8       the same on `avx2_s16s8` (vpmaddwd; exact for full-range 8-bit weights, the
              kernel a w8a8 model gets)
  qc layer    torch.nn.Linear compiled by qc.compile(w8a8): float in, float out (quantize,
              kernel, dequantize), called through the Relax VM
  ort dyn     onnxruntime quantize_dynamic (QInt8 weights) of the same float layer: float in,
              float out, activation quantization included (its AVX2 kernel is vpmaddubsw and
              saturates on full-range weights)
  torch fp32  torch.nn.functional.linear, for scale

Arm table (`--arm`): executed instructions (QEMU plugin, `icount`) of the fp32 layer, the plain
int8 kernel and the SDOT kernel, with and without an activation zero point.

    TVM_NUM_THREADS=1 python benchmarks/dot_kernels.py [--arm]
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402

import qcompiler as qc  # noqa: E402
from qcompiler.backends import dot_kernels as dk  # noqa: E402
from qcompiler.backends.host import HostRunner  # noqa: E402
from qcompiler.backends.targets import get_target, tvm_target  # noqa: E402

SHAPES = [(768, 768), (3072, 768)]  # N x K
TOKENS = [1, 16]
HOST = tvm_target(get_target("host"))


def _stats(times: list[float]) -> tuple[float, float]:
    return min(times) * 1e3, statistics.median(times) * 1e3


def time_calls(fn, runs: int = 300, warmup: int = 20) -> tuple[float, float]:
    """(min, median) ms of fn() over `runs` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _stats(times)


def time_kernel(kernel: str | None, m: int, n: int, k: int, w: np.ndarray) -> tuple[float, float]:
    """(min, median) ms of the int8 layer kernel (bias and requantize fused)."""
    rng = np.random.default_rng(0)
    func, consts = dk.linear_kernel(kernel, (m, k), w, 3, rng.integers(-999, 999, n).astype(np.int32),
                                    requantize=True)
    lib = dk.build(func, HOST)
    args = [tvm.runtime.tensor(a) for a in (rng.integers(-128, 128, (m, k)).astype(np.int8), *consts,
                                           np.zeros((m, n), np.int8))]
    res = lib.time_evaluator("main", tvm.cpu(), number=1, repeat=300, min_repeat_ms=0)(*args)
    return _stats(list(res.results))


def time_qc_layer(m: int, n: int, k: int) -> tuple[float, float]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(k, n).eval()
    x = torch.randn(m, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = qc.compile(layer, (x,), calib=[torch.randn(64, k)])
    main = HostRunner(art.library).vm["main"]
    xt = tvm.runtime.tensor(x.numpy())
    return time_calls(lambda: main(xt))


def time_ort(m: int, n: int, k: int) -> tuple[float, float]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        onnx.save(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        sess = ort.InferenceSession(dst, so, providers=["CPUExecutionProvider"])
    feed = {"x": rng.standard_normal((m, k)).astype(np.float32)}
    return time_calls(lambda: sess.run(None, feed))


def time_torch(m: int, n: int, k: int) -> tuple[float, float]:
    torch.set_num_threads(1)
    x, w = torch.randn(m, k), torch.randn(n, k)
    return time_calls(lambda: torch.nn.functional.linear(x, w))


def host_table() -> None:
    rng = np.random.default_rng(1)
    cols = ["plain", "u8s8", "s16s8", "qc layer", "ort dyn", "torch fp32"]
    print(f"host {HOST['mcpu']}, 1 thread; ms as min / median")
    print(f"{'N x K':>10} {'tokens':>6} " + " ".join(f"{c:>17}" for c in cols))
    for n, k in SHAPES:
        w7 = rng.integers(-64, 65, (n, k)).astype(np.int8)
        w8 = rng.integers(-127, 128, (n, k)).astype(np.int8)
        for m in TOKENS:
            row = [time_kernel(None, m, n, k, w8), time_kernel("avx2_u8s8", m, n, k, w7),
                   time_kernel("avx2_s16s8", m, n, k, w8), time_qc_layer(m, n, k), time_ort(m, n, k),
                   time_torch(m, n, k)]
            print(f"{f'{n} x {k}':>10} {m:>6} " + " ".join(f"{a:>8.4f} /{b:>7.4f}" for a, b in row), flush=True)


def fp32_linear(m: int, n: int, k: int):
    """The float layer y = x w^T as TVM builds it without a schedule (Relax's legalized matmul
    is the same plain TE reduction)."""
    x, w = tvm.te.placeholder((m, k), "float32", "x"), tvm.te.placeholder((n, k), "float32", "w")
    r = tvm.te.reduce_axis((0, k), "k")
    y = tvm.te.compute((m, n), lambda i, j: tvm.te.sum(x[i, r] * w[j, r], axis=r), name="linear_fp32")
    return tvm.te.create_prim_func([x, w, y])


def arm_table() -> None:
    """Executed instructions of one linear layer (int8: bias, int32 out) on arm under qemu."""
    rng = np.random.default_rng(2)
    print("\narm (qemu-aarch64 -cpu cortex-a76): executed instructions of the kernel")
    print(f"{'N x K':>10} {'tokens':>6} {'zx':>4} {'fp32':>12} {'int8 plain':>12} {'its sdot':>9} "
          f"{'sdot kernel':>12} {'its sdot':>9} {'vs plain':>9} {'vs fp32':>8}")
    n, k = 768, 768
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    for m in TOKENS:
        x = rng.integers(-128, 128, (m, k)).astype(np.int8)
        xf, wf = x.astype(np.float32), w.astype(np.float32)
        _, c = dk.arm_run(fp32_linear(m, n, k), [xf], [wf], (m, n), "float32", count=True)
        fp32 = c.matching("qc_kernel*").insns
        for zx in (0, 5):  # the plain kernel gets LLVM's own sdot only without a zero point
            counts = []
            for kernel in (None, "sdot"):
                func, consts = dk.linear_kernel(kernel, x.shape, w, zx)
                out, c = dk.arm_run(func, [x], consts, (m, n), "int32", count=True)
                assert np.array_equal(out, dk.reference_linear(x, zx, w)), "arm kernel differs from the reference"
                kern = c.matching("qc_kernel*")
                counts.append((kern.insns, kern.classes["sdot"]))
            (p, ps), (s, ss) = counts
            print(f"{f'{n} x {k}':>10} {m:>6} {zx:>4} {fp32:>12} {p:>12} {ps:>9} {s:>12} {ss:>9} "
                  f"{p / s:>8.1f}x {fp32 / s:>7.1f}x", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", action="store_true", help="also count instructions on arm under qemu")
    args = ap.parse_args()
    host_table()
    if args.arm:
        arm_table()
