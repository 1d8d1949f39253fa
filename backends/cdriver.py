"""C driver for a flat Program (`program.py`): one C file that, linked with the kernels'
object file, is a complete program.

It holds
- the constants as static const arrays (64-byte aligned; integers of 8/16/32 bits written as
  numbers, every other type as the unsigned integers of its bit patterns, so values are exact),
- the inputs, the buffers Relax planned and a workspace arena as static zeroed arrays,
- a DLTensor per tensor (views share the bytes of the tensor they reshape),
- the runtime symbols TVM's kernels reference: `TVMFFIErrorSetRaisedFromCStrParts` (keeps the
  message for the driver to print), the weak function pointers `__TVMBackendAllocWorkspace` /
  `__TVMBackendFreeWorkspace` (a bump allocator over the arena: frees come in LIFO order) and
  `__TVMBackendParallelLaunch` (runs the parallel lambda as one task),
- `run()`: every kernel in order through the packed calling convention
  (`int __tvm_ffi_<name>(void *self, const TVMFFIAny *args, int32_t n, TVMFFIAny *result)`,
  each argument `{type_index = kTVMFFIDLTensorPtr, v_ptr = &tensor}`),
- `main(argc, argv)`: `prog [in.bin|-] [out.bin|-]` reads the inputs' raw bytes, in order and
  nothing more, from the file (default stdin), runs, and writes the outputs' raw bytes to the
  file (default stdout). Exit status: 0 ok, 1 I/O or usage, 2 wrong input size, 3 a kernel failed.

Compile with `-I <tvm_ffi>/include` (see `include_dirs`).
"""

from __future__ import annotations

import numpy as np
import tvm_ffi
import tvm_ffi.libinfo

from .program import BUFFER, CONST, INPUT, Program

KERNEL_SYMBOL = "__tvm_ffi_{}"  # how TVM's LLVM codegen names the packed entry of a PrimFunc
ALIGN = 64  # TVM's kernels assume 64-byte aligned tensor data
PER_LINE = 24


def include_dirs() -> list[str]:
    """Folders with the headers the driver includes (DLPack and tvm/ffi/c_api.h)."""
    return list(dict.fromkeys([tvm_ffi.libinfo.find_include_path(), tvm_ffi.libinfo.find_dlpack_include_path()]))


def _c_array(name: str, data: np.ndarray) -> str:
    """`static const <type> name[] = {...};` holding exactly the bytes of `data`."""
    kind, size = data.dtype.kind, data.dtype.itemsize
    if kind in "iu" and size in (1, 2, 4):
        ctype = f"{'u' if kind == 'u' else ''}int{8 * size}_t"
        words = data.reshape(-1)
        fmt = str
    else:  # floats, bool, 64-bit and packed types: the bit patterns
        if data.nbytes % size:
            size = 1
        ctype = f"uint{8 * size}_t"
        words = np.frombuffer(data.tobytes(), dtype=f"<u{size}")
        suffix = "ULL" if size == 8 else ""
        fmt = lambda v: f"0x{v:x}{suffix}"  # noqa: E731
    values = [fmt(v) for v in words.tolist()] or ["0"]
    lines = [", ".join(values[i:i + PER_LINE]) for i in range(0, len(values), PER_LINE)]
    body = ",\n  ".join(lines)
    return (f"static const {ctype} {name}[{max(len(words), 1)}] __attribute__((aligned({ALIGN}))) = {{\n"
            f"  {body}\n}};")


def _dl_dtype(dtype: str) -> str:
    t = tvm_ffi.dtype(dtype)
    return f"{{{t.type_code}, {t.bits}, {t.lanes}}}"


def _data_pointer(t) -> str:
    base = {INPUT: "in", CONST: "c", BUFFER: "buf"}[t.home] + str(t.index)
    cast = "(void *)" if t.home == CONST else ""
    return f"{cast}((uint8_t *){base} + {t.offset})" if t.offset else f"{cast}{base}"


def generate(program: Program, workspace: int | None = None) -> str:
    """The driver's C source. `workspace`: arena bytes (default: the largest kernel's bound)."""
    p = program
    if workspace is None:
        workspace = max(p.workspace.values(), default=0)
    out = [_HEADER.format(summary=p.summary())]

    out.append("/* constants */")
    out += [_c_array(f"c{i}", c) for i, c in enumerate(p.constants)]
    out.append("\n/* inputs, buffers planned by Relax, workspace arena */")
    for k, i in enumerate(p.inputs):
        out.append(f"static uint8_t in{k}[{max(p.tensors[i].nbytes, 1)}] __attribute__((aligned({ALIGN})));"
                   f"  /* {p.tensors[i].dtype}{list(p.tensors[i].shape)} */")
    out += [f"static uint8_t buf{i}[{max(n, 1)}] __attribute__((aligned({ALIGN})));" for i, n in enumerate(p.buffers)]
    out.append(f"#define WORKSPACE_BYTES {max(workspace, ALIGN)}")
    out.append(f"static uint8_t workspace[WORKSPACE_BYTES] __attribute__((aligned({ALIGN})));")

    out.append("\n/* tensors */")
    for i, t in enumerate(p.tensors):
        shape = "NULL"
        if t.shape:
            out.append(f"static int64_t shape{i}[] = {{{', '.join(map(str, t.shape))}}};")
            shape = f"shape{i}"
        out.append(f"static DLTensor t{i} = {{{_data_pointer(t)}, {{kDLCPU, 0}}, {len(t.shape)}, "
                   f"{_dl_dtype(t.dtype)}, {shape}, NULL, 0}};  /* {t.label} */")

    out.append(_RUNTIME)
    out.append("/* kernels (in the object file built by TVM) */")
    names = list(dict.fromkeys(c.kernel for c in p.calls))
    for k, name in enumerate(names):
        out.append(f'int kernel{k}(void *, const TVMFFIAny *, int32_t, TVMFFIAny *) '
                   f'__asm__("{KERNEL_SYMBOL.format(name)}");')
    out.append("\nstatic int run(void) {")
    for c in p.calls:
        k = names.index(c.kernel)
        args = ", ".join(f"ARG(t{a})" for a in c.args)
        out.append(f"  {{ /* {c.kernel} */\n    TVMFFIAny args[] = {{{args}}};\n"
                   f'    CALL(kernel{k}, args, "{c.kernel}");\n  }}')
    out.append("  return 0;\n}\n")

    reads = "\n".join(f"  if (read_all(f, in{k}, {p.tensors[i].nbytes}, {k})) return 2;" for k, i in enumerate(p.inputs))
    writes = "\n".join(f"  if (fwrite(t{i}.data, 1, {p.tensors[i].nbytes}, g) != {p.tensors[i].nbytes}) "
                       f'{{ perror("qcompiler: writing the outputs"); return 1; }}' for i in p.outputs)
    expected = sum(p.tensors[i].nbytes for i in p.inputs)
    out.append(_MAIN.format(reads=reads, writes=writes, expected=expected))
    return "\n".join(out)


_HEADER = """\
/* Generated by qcompiler (backends/cdriver.py): runs a compiled model. {summary}.
 * usage: prog [inputs.bin|-] [outputs.bin|-]   (raw bytes of every input / output, in order) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tvm/ffi/c_api.h>
"""

_RUNTIME = r"""
/* runtime symbols the kernels reference */
static char error_text[2048];

void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t n) {
  size_t used = (size_t)snprintf(error_text, sizeof error_text, "%s:", kind ? kind : "Error");
  for (int32_t i = 0; i < n && used < sizeof error_text; i++)
    if (parts[i]) used += (size_t)snprintf(error_text + used, sizeof error_text - used, " %s", parts[i]);
}

static size_t workspace_top;

static void *workspace_alloc(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
  (void)device_type; (void)device_id; (void)code; (void)bits;
  uint64_t size = (nbytes + 63) & ~(uint64_t)63;
  if (size > WORKSPACE_BYTES - workspace_top) {
    fprintf(stderr, "qcompiler: workspace arena of %d bytes exhausted (%llu requested, %llu in use)\n",
            WORKSPACE_BYTES, (unsigned long long)nbytes, (unsigned long long)workspace_top);
    return NULL;
  }
  void *p = workspace + workspace_top;
  workspace_top += size;
  return p;
}

static int workspace_free(int device_type, int device_id, void *ptr) {
  (void)device_type; (void)device_id;
  workspace_top = (size_t)((uint8_t *)ptr - workspace);  /* frees come in LIFO order */
  return 0;
}

typedef struct { void *sync_handle; int32_t num_task; } ParallelEnv;
typedef int (*ParallelLambda)(int task_id, ParallelEnv *env, void *cdata);

static int parallel_launch(ParallelLambda f, void *cdata, int num_task) {
  (void)num_task;
  ParallelEnv env = {NULL, 1};
  return f(0, &env, cdata);  /* one task does all the work */
}

void *(*__TVMBackendAllocWorkspace)(int, int, uint64_t, int, int) = workspace_alloc;
int (*__TVMBackendFreeWorkspace)(int, int, void *) = workspace_free;
int (*__TVMBackendParallelLaunch)(ParallelLambda, void *, int) = parallel_launch;

#define ARG(t) {.type_index = kTVMFFIDLTensorPtr, .v_ptr = &(t)}
#define CALL(fn, args, name)                                                          \
  do {                                                                                \
    TVMFFIAny result = {.type_index = kTVMFFINone};                                   \
    if (fn(NULL, args, (int32_t)(sizeof args / sizeof args[0]), &result) != 0) {     \
      fprintf(stderr, "qcompiler: kernel %s failed: %s\n", name, error_text);         \
      return 3;                                                                       \
    }                                                                                 \
  } while (0)
"""

_MAIN = r"""static int read_all(FILE *f, uint8_t *dst, size_t n, int index) {{
  size_t got = fread(dst, 1, n, f);
  if (got != n) {{
    fprintf(stderr, "qcompiler: input %d: expected %zu bytes, got %zu\n", index, n, got);
    return 1;
  }}
  return 0;
}}

int main(int argc, char **argv) {{
  if (argc > 3) {{
    fprintf(stderr, "usage: %s [inputs.bin|-] [outputs.bin|-]\n", argv[0]);
    return 1;
  }}
  const char *in_path = argc > 1 ? argv[1] : "-", *out_path = argc > 2 ? argv[2] : "-";
  FILE *f = strcmp(in_path, "-") ? fopen(in_path, "rb") : stdin;
  if (!f) {{ perror(in_path); return 1; }}
{reads}
  if (fgetc(f) != EOF) {{
    fprintf(stderr, "qcompiler: the inputs are longer than the %d bytes expected\n", {expected});
    return 2;
  }}
  if (f != stdin) fclose(f);
  int status = run();
  if (status) return status;
  FILE *g = strcmp(out_path, "-") ? fopen(out_path, "wb") : stdout;
  if (!g) {{ perror(out_path); return 1; }}
{writes}
  if (fflush(g) != 0) {{ perror("qcompiler: writing the outputs"); return 1; }}
  if (g != stdout) fclose(g);
  return 0;
}}
"""
