"""Runs a qcompiler `mali` model library on the board (copied there as run_model.py by
`mali_deploy.export`): loads model.so (aarch64 host code + embedded OpenCL kernels) into TVM's
Relax VM on the OpenCL device, feeds it .npy inputs and writes output_<i>.npy.

    python3 run_model.py model.so input_0.npy [input_1.npy ...]

Needs a TVM runtime built with OpenCL (USE_OPENCL=ON; the PyPI wheel has none) and the
board's OpenCL driver (libmali / the Mali DDK, or Mesa's rusticl). Standalone: it imports
nothing from qcompiler.
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
    gpu = tvm.opencl(0)
    if not gpu.exist:
        sys.exit("no OpenCL device: this TVM runtime lacks OpenCL (build it with USE_OPENCL=ON) or the board's "
                 "OpenCL driver (libmali, or Mesa rusticl) is not installed")
    vm = VirtualMachine(tvm.runtime.load_module(argv[1]), [gpu, tvm.cpu()])
    inputs = [tvm.runtime.tensor(np.load(path), gpu) for path in argv[2:]]
    vm["main"](*inputs)  # the first call compiles the OpenCL kernels for this GPU
    gpu.sync()
    start = time.perf_counter()
    out = vm["main"](*inputs)
    gpu.sync()
    seconds = time.perf_counter() - start
    outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
    for i, o in enumerate(outs):
        np.save(f"output_{i}.npy", o.numpy())
    print(f"ran main on {gpu} in {seconds * 1e3:.3f} ms; wrote output_0.npy..output_{len(outs) - 1}.npy "
          f"in {os.getcwd()}")


if __name__ == "__main__":
    main(sys.argv)
