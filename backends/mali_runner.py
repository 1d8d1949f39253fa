"""Runs a `mali` program's OpenCL kernels through pyopencl (PoCL on this machine, any OpenCL
device in general), without TVM's runtime.

`MaliRunner(program)` finds an OpenCL device (a GPU if there is one), builds the program's
OpenCL C once, uploads the constants once, allocates one device buffer per input, constant
and planned storage of the Program (tensors at a byte offset are sub-buffers; reshapes are
views of the same bytes) and, per kernel call of the program, one kernel object per launch
with its arguments bound. `runner(*tensors)` copies the inputs in, enqueues every launch in
order (global and local sizes from the launch table) and reads the outputs back.

Before anything runs each launch's work-group is checked against the device (the kernel's
`CL_KERNEL_WORK_GROUP_SIZE`, `CL_DEVICE_MAX_WORK_ITEM_SIZES`): a kernel scheduled for more
work-items than the device takes is rejected with the limit named. With no OpenCL platform
the error names the packages that provide one.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from qcompiler.errors import LoweringError

OPENCL_PACKAGES = ("no OpenCL platform found: install an OpenCL implementation and its ICD loader, e.g. on "
                   "Debian/Ubuntu `apt-get install pocl-opencl-icd ocl-icd-libopencl1` (PoCL, runs on the CPU; "
                   "`make setup` installs it) or the GPU vendor's driver (Arm Mali: libmali / the Mali DDK, or "
                   "Mesa's rusticl with panfrost), plus `pip install pyopencl`")


def cl_module():
    try:
        import pyopencl as cl
    except ImportError as e:
        raise LoweringError(f"pyopencl is not installed ({e}): `pip install pyopencl`; it runs the mali "
                            "target's OpenCL kernels") from e
    return cl


def opencl_device():
    """(context, device) of the first OpenCL GPU, else the first OpenCL device of any kind."""
    from .cache import user_cache_dir

    os.environ.setdefault("POCL_CACHE_DIR", str(user_cache_dir() / "pocl"))  # not ~/.cache/pocl
    cl = cl_module()
    try:
        platforms = cl.get_platforms()
    except (cl.Error, RuntimeError):  # the ICD loader reports PLATFORM_NOT_FOUND_KHR as an error
        platforms = []
    devices = []
    for p in platforms:
        try:
            devices += p.get_devices()
        except cl.Error:
            continue
    if not devices:
        raise LoweringError(OPENCL_PACKAGES)
    gpus = [d for d in devices if d.type & cl.device_type.GPU]
    device = (gpus or devices)[0]
    return cl.Context([device]), device


def device_summary(device) -> str:
    return (f"{device.name.strip()} ({device.platform.name.strip()}, {device.version.strip()}, max work-group "
            f"{device.max_work_group_size})")


class MaliRunner:
    """`runner(*tensors)` runs a built mali program on an OpenCL device."""

    def __init__(self, program, device=None, options: str = ""):
        """device: (context, device) from `opencl_device`; options: OpenCL compiler options (e.g.
        "-D QC_EMULATE_ARM_DOT" to take the dot-product extension path on a device without it)."""
        self.cl = cl = cl_module()
        self.p = program
        self.ctx, self.device = device or opencl_device()
        self.queue = cl.CommandQueue(self.ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
        self.cl_program = build_source(self.ctx, self.device, program.source, options)
        has_ext = "cl_arm_integer_dot_product_int8" in self.device.extensions
        self.dot_path = ("arm_dot" if has_ext or "QC_EMULATE_ARM_DOT" in options else "portable") \
            if "qc_dot4_zp(" in program.source else "none"  # which form the 4-lane dot kernels use
        mf = cl.mem_flags
        self.mems = {"input": [cl.Buffer(self.ctx, mf.READ_WRITE, max(1, program.tensors[i].nbytes))
                               for i in program.inputs],
                     "const": [cl.Buffer(self.ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=_bytes(c))
                               for c in program.constants],
                     "buffer": [cl.Buffer(self.ctx, mf.READ_WRITE, max(1, n)) for n in program.buffers]}
        self.scratch = {k: [cl.Buffer(self.ctx, mf.READ_WRITE, max(1, n)) for n in sizes]
                        for k, sizes in program.scratch.items()}  # shared by the calls of a PrimFunc
        self._views = {}
        self.launches = []  # (call index, Launch, cl.Kernel with its arguments set)
        for k, call in enumerate(program.calls):
            for launch in program.launches[call.kernel]:
                kernel = cl.Kernel(self.cl_program, launch.kernel)
                check_group_size(kernel, self.device, launch)
                kernel.set_args(*(self.argument(call, a) for a in launch.args))
                self.launches.append((k, launch, kernel))

    def argument(self, call, a):
        """The value of one kernel argument of a launch in `call`."""
        if a[0] == "param":
            return self.mem(call.args[a[1]])
        if a[0] == "scratch":
            return self.scratch[call.kernel][a[1]]
        return np.dtype(a[0]).type(a[1])

    def mem(self, t: int):
        """The device memory of tensor `t`: its buffer, or a sub-buffer at its byte offset."""
        tensor = self.p.tensors[t]
        base = self.mems[tensor.home][tensor.index]
        if tensor.offset == 0:
            return base
        key = (tensor.home, tensor.index, tensor.offset)
        if key not in self._views:
            align = self.device.mem_base_addr_align // 8
            if tensor.offset % align:
                raise LoweringError(f"tensor {tensor.label} starts at byte {tensor.offset} of its buffer, not a "
                                    f"multiple of the device's {align}-byte sub-buffer alignment")
            self._views[key] = base.get_sub_region(tensor.offset, base.size - tensor.offset)
        return self._views[key]

    def __call__(self, *inputs: torch.Tensor):
        return self.run(inputs)[0]  # a tuple of outputs, like every runner

    def run(self, inputs, profile: bool = False):
        """(outputs, per-launch seconds or None): inputs in, every launch in order, outputs out."""
        cl = self.cl
        sig = self.p.signature()["inputs"]
        if len(inputs) != len(sig):
            raise LoweringError(f"the program takes {len(sig)} inputs, got {len(inputs)}")
        for i, (x, spec) in enumerate(zip(inputs, sig)):
            dtype = str(x.dtype).removeprefix("torch.")
            if list(x.shape) != spec["shape"] or dtype != spec["dtype"]:
                raise LoweringError(f"input {i} is {dtype}{list(x.shape)}; the program was compiled for "
                                    f"{spec['dtype']}{spec['shape']}")
            cl.enqueue_copy(self.queue, self.mem(self.p.inputs[i]), _bytes(x.detach().cpu().contiguous().numpy()))
        events = [cl.enqueue_nd_range_kernel(self.queue, kernel, launch.global_size, launch.local_size)
                  for _, launch, kernel in self.launches]
        outs = []
        for t in self.p.outputs:
            tensor = self.p.tensors[t]
            host = np.empty(tensor.shape, dtype=np.dtype(tensor.dtype))
            base = self.mems[tensor.home][tensor.index]
            cl.enqueue_copy(self.queue, host, base, src_offset=tensor.offset)
            outs.append(torch.from_numpy(host))
        self.queue.finish()
        times = [(e.profile.end - e.profile.start) * 1e-9 for e in events] if profile else None
        return tuple(outs), times

    def time(self, inputs, repeat: int = 10) -> float:
        """Median wall seconds of one run (inputs in, kernels, outputs out)."""
        self.run(inputs)
        samples = []
        for _ in range(repeat):
            t = time.perf_counter()
            self.run(inputs)
            samples.append(time.perf_counter() - t)
        return float(np.median(samples))


def build_source(ctx, device, source: str, options: str = ""):
    """The OpenCL program built for `device`; the compiler's log is in the error."""
    cl = cl_module()
    program = cl.Program(ctx, source)
    try:
        return program.build(options=options)
    except cl.RuntimeError as e:
        raise LoweringError(f"the OpenCL compiler of {device_summary(device)} rejected the kernels: {e}") from e


def check_group_size(kernel, device, launch) -> None:
    """Reject a launch whose work-group is larger than `device` takes for `kernel`."""
    cl = cl_module()
    limit = min(device.max_work_group_size,
                kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, device))
    dims = device.max_work_item_sizes
    over_dim = [d for d in range(3) if launch.local_size[d] > dims[d]]
    if launch.group_size > limit or over_dim:
        raise LoweringError(
            f"kernel {launch.kernel}: its work-group {'x'.join(map(str, launch.local_size))} = {launch.group_size} "
            f"work-items exceeds the limit of {device_summary(device)}: {limit} work-items per group, at most "
            f"{'x'.join(map(str, dims[:3]))} per dimension; compile again for this device "
            f"(`mali.build(..., max_threads={limit})` schedules every kernel for at most {limit} work-items)")


def _bytes(a: np.ndarray) -> np.ndarray:
    """The array's bytes as a contiguous uint8 array (bool and sub-byte safe, no copy if possible)."""
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8) if a.size else np.zeros(1, np.uint8)
