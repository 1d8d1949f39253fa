"""ONNX frontend conformance: per-op pass rates on onnx's backend node cases, the model graphs
against onnxruntime, and onnxruntime-quantized QDQ models compiled for the host.

Which node cases run and why the others are excluded is documented in tests/onnx_cases.py
(opset range 13..21, claimed element types, unclaimed features). Multi-node cases whose ops
are all claimed (function bodies, `*_expanded`) are reported in one extra row. No assertions:
tests/test_onnx_import.py asserts; this prints.

    python benchmarks/onnx_conformance.py [--no-models] [--no-qdq]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
warnings.filterwarnings("ignore")

import onnx_cases  # noqa: E402
from qcompiler.frontends.onnx_import import SUPPORTED_ONNX_OPS  # noqa: E402


def table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def node_table() -> None:
    cases = onnx_cases.node_cases(composite=True)
    rows = [("op", "cases", "run", "passed", "excluded", "exclusion reasons", "failures")]
    total = Counter()
    t0 = time.time()
    for op in [*SUPPORTED_ONNX_OPS, onnx_cases.COMPOSITE]:
        run = passed = 0
        reasons, failures = Counter(), []
        for name, model, data_sets, rtol, atol, excluded in cases.get(op, []):
            if excluded:
                reasons[excluded] += 1
                continue
            run += 1
            try:
                onnx_cases.run_node_case(model, data_sets, rtol, atol)
                passed += 1
            except Exception as e:
                failures.append(f"{name} ({type(e).__name__})")
        n = len(cases.get(op, []))
        excluded = n - run
        rows.append((op, n, run, passed, excluded, "; ".join(f"{k} x{v}" for k, v in reasons.items()),
                     ", ".join(failures[:3]) + (" ..." if len(failures) > 3 else "")))
        if op != onnx_cases.COMPOSITE:
            total.update(cases=n, run=run, passed=passed, excluded=excluded)
    print(f"onnx {onnx_cases.onnx.__version__} backend node cases for the {len(SUPPORTED_ONNX_OPS)} claimed ops "
          f"({time.time() - t0:.0f} s)\n")
    table(rows)
    print(f"\nsingle-op cases: {total['cases']} total, {total['run']} run, {total['passed']} passed "
          f"({100 * total['passed'] / max(total['run'], 1):.1f}%), {total['excluded']} excluded\n")


def model_table() -> None:
    rows = [("model graph", "vs stored output", "random weights: probs vs ORT", "logits vs ORT", "max |logit|", "s")]
    for name in onnx_cases.LIGHT_MODELS:
        t0 = time.time()
        r = onnx_cases.run_light(name)
        rows.append((name, f"{r['vs_stored']:.2e}", f"{r['random_probs_vs_ort']:.2e}",
                     f"{r['random_logits_vs_ort']:.2e}", f"{r['logits_max']:.3g}", f"{time.time() - t0:.1f}"))
    print("light_* model graphs (opset 9 -> 13 by onnx's version converter): max abs differences\n")
    table(rows)
    print()


def qdq_table() -> None:
    rows = [("activations", "weights", "reduce_range", "host code vs ORT (steps)", "imported IR vs ORT (steps)",
             "code == converted IR")]
    with tempfile.TemporaryDirectory() as folder:
        for act in ("QUInt8", "QInt8"):
            for per_channel in (False, True):
                for reduce_range in (True, False):
                    r = onnx_cases.qdq_host_vs_ort(onnx_cases.quantize_cnn_mlp(folder, per_channel, act, reduce_range))
                    rows.append((act, "per channel" if per_channel else "per tensor", reduce_range,
                                 f"{r['host_steps']:.2f}", f"{r['ir_steps']:.2f}", r["code_equals_ir"]))
    print("cnn_mlp quantized by onnxruntime.quantization.quantize_static (QDQ, int8 weights), 64 random inputs;\n"
          "differences in output quantization steps. Without reduce_range, ORT's u8s8 kernels saturate on x86\n"
          "CPUs without VNNI (ORT's own documented caveat), so ORT differs from its own reference QDQ semantics.\n")
    table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-models", action="store_true")
    parser.add_argument("--no-qdq", action="store_true")
    args = parser.parse_args()
    node_table()
    if not args.no_models:
        model_table()
    if not args.no_qdq:
        qdq_table()


if __name__ == "__main__":
    main()
