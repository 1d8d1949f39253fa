"""Quickstart: train a small CNN on scikit-learn's 8x8 digits, quantize it to W8A8 and W4A8,
compile it for this machine with TVM, and compare accuracy on the held-out split.

Columns: the float model; the converted IR run in torch (`art.ir`, the bit-exact reference
of the generated code); the generated code itself (`art`). The last two should agree.
Then the W8A8 model is cross-compiled for 64-bit ARM (`target="arm"`: a static aarch64
program) and run under qemu-aarch64, and compiled for Mali GPUs (`target="mali"`: OpenCL
kernels, run here on PoCL); their outputs are compared with the IR's.

    python examples/quickstart.py        (what `make demo` runs)
"""

from __future__ import annotations

import os


import torch  # noqa: E402

import qcompiler as qc  # noqa: E402
from qcompiler import zoo  # noqa: E402


BATCH = 64  # the generated code is specialized to this batch size
RECIPES = ("w8a8", "w4a8")


def main() -> None:
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = zoo.digits()
    model = zoo.train_classifier(zoo.DigitsCNN(), x_train, y_train)
    calib = list(x_train[: 8 * BATCH].split(BATCH))  # 8 calibration batches from the training split
    n_eval = len(x_test) // BATCH * BATCH  # every column sees the same whole batches

    rows = [("model", "float", "IR (torch)", "compiled (TVM)")]
    float_acc = zoo.accuracy(model, x_test, y_test, BATCH)
    arts = {}
    for recipe in RECIPES:
        art = qc.compile(model, x_train[:BATCH], target="host", quant=recipe, calib=calib)
        arts[recipe] = art
        rows.append((f"DigitsCNN {recipe}", f"{float_acc:.2%}",
                     f"{zoo.accuracy(art.ir, x_test, y_test, BATCH):.2%}",
                     f"{zoo.accuracy(art, x_test, y_test, BATCH):.2%}"))

    print(f"digits test accuracy ({n_eval} of {len(x_test)} held-out images, batches of {BATCH})\n")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))

    for recipe, art in arts.items():
        print(f"\n{recipe} compile report")
        print(art.report())
    run_on_arm(model, x_train[:BATCH], calib, x_test[:n_eval], y_test[:n_eval])
    run_on_mali(model, x_train[:BATCH], calib, x_test[:n_eval], y_test[:n_eval])


def run_on_arm(model, example, calib, x_test, y_test) -> None:
    """Cross-compile for the `arm` target and run every test batch under qemu-aarch64."""
    print("\narm target (aarch64 Linux, Cortex-A76, run under qemu-aarch64)")
    try:
        art = qc.compile(model, example, target="arm", quant="w8a8", calib=calib)
    except qc.LoweringError as e:  # no cross toolchain on this machine: say how to get it
        print(f"  skipped: {e}")
        return
    worst, correct = 0.0, 0
    for xb, yb in zip(x_test.split(BATCH), y_test.split(BATCH)):
        y, ref = art(xb), art.ir(xb)
        worst = max(worst, float((y - ref).abs().max() / ref.abs().max()))
        correct += int((y.argmax(-1) == yb).sum())
    print(f"  DigitsCNN w8a8: accuracy {correct / len(x_test):.2%} on {len(x_test)} images; "
          f"largest difference to the IR {worst:.1e} (relative); {len(art.library.binary) // 1024} KiB static binary")


def run_on_mali(model, example, calib, x_test, y_test) -> None:
    """Compile for the `mali` target (OpenCL) and run every test batch on PoCL, the CPU OpenCL
    implementation standing in for a Mali GPU here."""
    print("\nmali target (OpenCL kernels for Mali GPUs, run on PoCL through pyopencl)")
    try:
        art = qc.compile(model, example, target="mali", quant="w8a8", calib=calib)
        correct, same = 0, True
        for xb, yb in zip(x_test.split(BATCH), y_test.split(BATCH)):
            y = art(xb)
            same &= bool(torch.equal(y, art.ir(xb)))
            correct += int((y.argmax(-1) == yb).sum())
    except qc.LoweringError as e:  # no OpenCL platform or no pyopencl: say how to get them
        print(f"  skipped: {e}")
        return
    launches = art.library.launch_table()
    print(f"  DigitsCNN w8a8: accuracy {correct / len(x_test):.2%} on {len(x_test)} images; outputs "
          f"{'equal' if same else 'DIFFER from'} the IR's; {len(launches)} kernel launches per batch, "
          f"work-groups up to {max(g[0] * g[1] * g[2] for *_, g in launches)} work-items")


if __name__ == "__main__":
    main()
