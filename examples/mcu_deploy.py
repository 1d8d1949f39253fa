"""Deploying a quantized CNN to a Cortex-M4, the way a firmware engineer does it.

1. Train the digits CNN (scikit-learn's 8x8 digits) and compile it for `cortex-m4` at W4A8
   (4-bit weights packed two a byte in flash, int8 activations).
2. Read the memory report: flash and peak SRAM measured from the linked firmware, per layer.
3. Check it against a real part's limits (target options), and see what a part too small says.
4. Export the self-contained C project, build it with its own Makefile (arm-none-eabi-gcc),
   run it on QEMU's mps2-an386 board, and compare its output with the compiler's reference.
5. Count executed instructions per kernel (the SMLAD micro-kernels at work).

    python examples/mcu_deploy.py [out_folder]      (default: a temporary folder)

Needs the Debian packages gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm
(`make toolchains`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

import qcompiler as qc
from qcompiler import zoo
from qcompiler.backends import cortex_m


def main(out: str) -> None:
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = zoo.digits()
    model = zoo.train_classifier(zoo.DigitsCNN(), x_train, y_train)
    calib = list(x_train[:256].split(32))

    # 1. compile: one image at a time, as the device sees them
    try:
        art = qc.compile(model, x_train[:1], target="cortex-m4", quant="w4a8", calib=calib)
    except qc.LoweringError as e:  # no arm-none-eabi-gcc / qemu-system-arm here: say how to get them
        print(f"skipped: {e}")
        return

    # 2. the memory report (bytes): measured from the linked firmware and the arena plan
    m = art.report().memory
    print(f"cortex-m4 W4A8: flash {art.report().flash_bytes} B, peak SRAM {art.report().peak_sram_bytes} B "
          f"(arena {m['arena_bytes']} B instead of {m['unplanned_bytes']} B unplanned, stack {m['stack_bytes']} B)")
    for layer in m["layers"]:
        print(f"  {layer['kernel'][:60]:60s} code {layer['code_bytes']:5d} B  weights {layer['weight_bytes']:5d} B  "
              f"SRAM live {layer['sram_bytes']:5d} B")

    # 3. limits of a real part: an STM32F405 has 1 MiB flash, 192 KiB SRAM; a tiny one does not fit
    qc.compile(model, x_train[:1], target="cortex-m4:flash=1M,sram=192K", quant="w4a8", calib=calib)
    try:
        qc.compile(model, x_train[:1], target="cortex-m4:flash=16K,sram=4K", quant="w8a8", calib=calib)
    except qc.MemoryLimitError as e:
        print(f"\na 16 KiB / 4 KiB part:\n  {e}\n")

    # 4. the C project: build it with its own Makefile and run it on the emulated board
    files = art.export(out)
    print(f"exported {len(files)} files to {out}: {', '.join(f for f in files if '/' not in f)}")
    subprocess.run(["make", "-s"], cwd=out, check=True)
    correct = 0
    for i in range(8):
        x = x_test[i:i + 1]
        with open(os.path.join(out, "input.bin"), "wb") as f:
            f.write(x.numpy().tobytes())  # float32 [1, 1, 8, 8], the layout model.h states
        subprocess.run(["make", "-s", "run"], cwd=out, check=True)
        with open(os.path.join(out, "output.bin"), "rb") as f:
            y = torch.frombuffer(bytearray(f.read()), dtype=torch.float32).reshape(1, 10)
        assert torch.equal(y, art.ir(x)), "the firmware's output differs from the compiler's reference"
        correct += int(y.argmax() == y_test[i])
    print(f"firmware on mps2-an386: 8 test images, outputs bit-identical to art.ir, {correct}/8 correct")
    print(f"test accuracy of the W4A8 model (art.ir, = the firmware): {zoo.accuracy(art.ir, x_test, y_test):.2%}")

    # 5. executed instructions per kernel for one image (QEMU plugin); SMLAD = 2 MACs each
    counts = cortex_m.instruction_counts(art.library, (x_test[:1],))
    kernels = cortex_m.kernel_instructions(counts)
    print(f"kernels: {kernels.insns} instructions, {kernels.classes['smlad']} SMLAD")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory(prefix="qc-mcu-demo-") as folder:
            main(folder)
