"""int64 constants stored as int32 (`mcu_narrow`): a kernel parameter is narrowed only when
every constant passed there fits int32 and the C only subscripts its pointer; loads are
widened to int64 at once. (Bit-exactness on the board: test_mcu_patches and test_cortex_m
build through the same rewrite.)"""

import numpy as np

from qcompiler.backends.mcu_narrow import narrow_constants
from qcompiler.backends.program import BUFFER, CONST, KernelCall, Program, Tensor

KERNEL = """\
TVM_DLL int32_t __tvm_ffi_{name}(void* self_handle, void* args, int32_t num_args, void* result) {{
  int32_t acc_type_index = (((TVMFFIAny*)args)[0].type_index);
  void* acc_handle = (void*)condval;
  int32_t param_0_type_index = (((TVMFFIAny*)args)[1].type_index);
  void* param_0_handle = (void*)condval_1;
  int64_t* {name}_param_0_shape = (int64_t*)(((DLTensor*)param_0_handle)[0].shape);
  int32_t* acc = ((int32_t*)((int32_t*)(((DLTensor*)acc_handle)[0].data)));
  int64_t* param_0 = ((int64_t*)((int64_t*)(((DLTensor*)param_0_handle)[0].data)));
  for (int32_t i = 0; i < 4; ++i) {{
    out[i] = ((int64_t)acc[i] * {use});
  }}
  return 0;
}}
"""


def program(values, kernels=("k",)):
    """acc (a buffer) and one int64 constant per call, each call of kernel k[i]."""
    tensors = [Tensor((4,), "int32", BUFFER, 0)]
    constants, calls = [], []
    for i, (v, k) in enumerate(zip(values, kernels)):
        constants.append(np.array(v, dtype=np.int64))
        tensors.append(Tensor((4,), "int64", CONST, i))
        calls.append(KernelCall(k, (0, i + 1)))
    return Program([], [], tensors, [16], constants, calls, None)


def test_fitting_constant_is_stored_as_int32_and_widened_on_load():
    """A multiplier vector below 2^31 becomes an int32 array; the kernel reads it through an
    int32 pointer, each load cast to int64 before the multiply."""
    p, src, n = narrow_constants(program([[1 << 30, 3, -5, 7]]), KERNEL.format(name="k", use="param_0[i]"))
    assert n == 1 and p.constants[0].dtype == np.int32 and p.tensors[1].dtype == "int32"
    assert p.constants[0].tolist() == [1 << 30, 3, -5, 7]
    assert "int32_t* param_0_i32 = ((int32_t*)(((DLTensor*)param_0_handle)[0].data));" in src  # 2^30: int32
    assert "((int64_t)acc[i] * (int64_t)param_0_i32[i])" in src and "int64_t* param_0 =" not in src
    assert "k_param_0_shape" in src  # other names containing param_0 are left alone


def test_small_values_take_int8_or_int16_shared_by_a_kernel_parameter():
    """Shifts (below 128) are stored as int8; when one kernel serves two layers, both of its
    constants take the wider of their widths (int16 here), read through one int16 pointer."""
    p, src, n = narrow_constants(program([[31, 0, 5, 7]]), KERNEL.format(name="k", use="param_0[i]"))
    assert n == 1 and p.constants[0].dtype == np.int8 and "(int64_t)param_0_i8[i]" in src
    p, src, n = narrow_constants(program([[1, 2, 3, 4], [300, 0, 0, -300]], ("k", "k")),
                                 KERNEL.format(name="k", use="param_0[i]"))
    assert n == 2 and [c.dtype for c in p.constants] == [np.int16, np.int16] and p.tensors[1].dtype == "int16"
    assert "int16_t* param_0_i16 = ((int16_t*)(((DLTensor*)param_0_handle)[0].data));" in src


def test_out_of_range_or_escaping_pointer_or_shared_kernel_is_left_int64():
    """Not narrowed: a value at 2^31; a pointer used other than by subscript; a kernel shared
    by two layers when one of its constants does not fit (both stay int64)."""
    _, src, n = narrow_constants(program([[1 << 31, 0, 0, 0]]), KERNEL.format(name="k", use="param_0[i]"))
    assert n == 0 and "int64_t* param_0 =" in src
    _, _, n = narrow_constants(program([[1, 2, 3, 4]]), KERNEL.format(name="k", use="f(param_0)"))
    assert n == 0
    p, _, n = narrow_constants(program([[1, 2, 3, 4], [1 << 40, 0, 0, 0]], ("k", "k")),
                               KERNEL.format(name="k", use="param_0[i]"))
    assert n == 0 and all(c.dtype == np.int64 for c in p.constants)
