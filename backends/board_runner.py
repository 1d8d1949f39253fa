"""Runs a qcompiler model library on the board (copied there as run_model.py by
`arm_deploy.export`): loads model.so into TVM's Relax VM, feeds it .npy inputs and writes each
output as output_<i>.npy in the current folder.

    TVM_USE_RUNTIME_LIB=1 python3 run_model.py model.so input_0.npy [input_1.npy ...]

Needs only the TVM runtime (`pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1
numpy`); it imports no compiler part of TVM (not tvm.relax), so the runtime-only library is
enough. Standalone: it imports nothing from qcompiler.
"""

import os
import sys
import time

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine


def main(argv):
    if len(argv) < 2:
        sys.exit(f"usage: {argv[0]} model.so input_0.npy [input_1.npy ...]")
    device = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(argv[1]), device)
    inputs = [tvm.runtime.tensor(np.load(path), device) for path in argv[2:]]
    start = time.perf_counter()
    out = vm["main"](*inputs)
    seconds = time.perf_counter() - start
    outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
    for i, o in enumerate(outs):
        np.save(f"output_{i}.npy", o.numpy())
    print(f"ran main in {seconds * 1e3:.3f} ms; wrote output_0.npy..output_{len(outs) - 1}.npy in {os.getcwd()}")


if __name__ == "__main__":
    main(sys.argv)
