"""The public entry points: `compile`, `Artifact`, `load`.

compile = trace -> preset (or given) pipeline of passes -> backend build for the target.
An `Artifact` runs the generated code (`art(x)`), keeps the converted IR as its bit-exact
reference (`art.ir(x)`), reports per-layer accuracy, and saves to a folder or a `.qca` file
(a zip of JSON, safetensors and the compiled library: no pickle).
"""

from __future__ import annotations

import os
import warnings

import torch

from . import artifact_io
from .context import PassContext
from .errors import QCompilerError, TraceError
from .frontends.pytorch import drop_input_guards, trace
from .ir import as_tuple, copy_ir
from .pass_manager import PassManager
from .report import Report, build_report
from .spec import QuantSpec

# passes whose result depends on calibration data (the others read only weights)
_PASSES_READING_DATA = ("calibrate", "smooth", "rotate", "gptq", "tanq", "mosf", "qat", "hawq")


class Artifact:
    """A compiled model: generated code for one target plus its reference IR."""

    def __init__(self, ir, library, target: str, inputs: list[dict], single_output: bool, report: Report):
        self.ir = ir
        self.library = library
        self.target = target
        self.inputs = inputs  # [{"shape": [...], "dtype": "float32"}] the code was compiled for
        self.single_output = single_output
        self._report = report
        self._runner = None
        self._expected = None

    def __call__(self, *inputs: torch.Tensor):
        """Run the generated code (host: in process; arm: under qemu-aarch64)."""
        self._check_inputs(inputs)
        if self._runner is None:
            from .backends.targets import get_backend

            self._runner = get_backend(self.target).runner(self.library)
        out = self._runner(*inputs)
        return out[0] if self.single_output else out

    def _check_inputs(self, inputs):
        if len(inputs) != len(self.inputs):
            raise QCompilerError(f"the artifact takes {len(self.inputs)} inputs, got {len(inputs)}")
        if self._expected is None:  # per spec: (shape with the batch as None, torch dtype)
            self._expected = [(spec["shape"], getattr(torch, spec["dtype"], None)) for spec in self.inputs]
        for i, (x, (want, dtype)) in enumerate(zip(inputs, self._expected)):
            if not isinstance(x, torch.Tensor):
                raise QCompilerError(f"input {i} is a {type(x).__name__}, expected a tensor")
            shape = list(x.shape)
            if want and want[0] is None and shape:
                shape[0] = None  # compiled with a symbolic batch dimension
            if shape != want or x.dtype != dtype:
                spec = self.inputs[i]
                raise QCompilerError(
                    f"input {i} is {x.dtype}{list(x.shape)}; the code was compiled for "
                    f"{spec['dtype']}{spec['shape']}: compile again with example inputs of this shape"
                )

    def report(self) -> Report:
        return self._report

    def export(self, folder: str) -> list[str]:
        """Write a project that builds the model on its own (cortex-m*: a C project with a Makefile)."""
        from .backends.targets import get_backend

        backend = get_backend(self.target)
        if backend.export is None:
            raise QCompilerError(f"target {self.target!r} has no project export; use save() (the cortex-m* targets export C)")
        return backend.export(self.library, folder)

    def save(self, path: str) -> None:
        """Save to a folder, or to a single `.qca` file when the path ends in .qca."""
        artifact_io.save(self, path)



def load(path: str) -> Artifact:
    """Load an artifact saved with `Artifact.save` (folder or .qca file)."""
    return artifact_io.load(path, Artifact)


def load_model_file(model, example_inputs=None):
    """A model given as a path: a torch.export file (.pt2) -> (module, its example inputs), or
    an ONNX file (.onnx) -> (the imported IR, its example inputs)."""
    path = os.fspath(model)
    if not os.path.exists(path):
        raise TraceError(f"model file {path!r} does not exist")
    if path.endswith(".onnx"):
        from .frontends.onnx_import import load_onnx

        ir = load_onnx(path, example_inputs)
        return ir, ir.meta["qc"]["example_inputs"]
    try:
        ep = torch.export.load(path)
    except Exception as e:
        raise TraceError(f"{path} is not a readable torch.export file (.pt2) or ONNX file (.onnx): "
                         f"{type(e).__name__}: {e}") from e
    examples = ep.example_inputs[0] if ep.example_inputs else None
    module = ep.module()
    drop_input_guards(module)  # the file's static batch size must not pin the new trace
    return module, examples


def _is_quantized(ir) -> bool:
    """True when the IR already holds quantizers (e.g. an imported QDQ ONNX model)."""
    return any(n.meta.get("qc", {}).get("role") == "act" for n in ir.graph.nodes)


def compile(model, example_inputs=None, *, target: str = "host", quant="w8a8", calib=None,
            pipeline: str | None = None, ctx: PassContext | None = None, dynamic_batch: bool = False,
            tune=None) -> Artifact:
    """Quantize `model` and compile it for `target`.

    model: a torch.nn.Module, or the path of a torch.export file (.pt2) or an ONNX file
        (.onnx; a QDQ model keeps its own scales: only `convert` runs unless `pipeline` says more).
    example_inputs: a tensor or tuple of tensors; the generated code is specialized to
        their shapes (the IR keeps the batch dimension dynamic).
    quant: a recipe string ("w8a8", "w4a8", "w4a8g64") or a QuantSpec.
    calib: calibration batches (tensors or tuples shaped like example_inputs).
    pipeline: pass-pipeline text; overrides the recipe.
    ctx: a PassContext for debug options (print_ir_after, dump_dir, ...).
    dynamic_batch: generate code that takes any batch size (dimension 0 of every input)
        instead of code specialized to the example shapes.
    tune: a `qc.Tune(trials=...)`: MetaSchedule-tune the kernels (database per target in the
        user cache; a second compile of the same model reuses it).
    """
    from .backends.targets import get_backend
    from .backends.tuning import plan as plan_tuning

    backend = get_backend(target)  # an unknown target or a missing cross toolchain fails before any work
    backend.preflight()
    tune = plan_tuning(target, tune)  # bad options fail now; None (warned) for a cross target without a device
    if isinstance(model, (str, os.PathLike)):
        model, stored = load_model_file(model, example_inputs)
        example_inputs = example_inputs if example_inputs is not None else stored
    if example_inputs is None:
        raise TraceError("compile needs example_inputs (a tensor or a tuple of tensors)")
    example_inputs = as_tuple(example_inputs)
    text = pipeline if pipeline is not None else QuantSpec.parse(quant).pipeline()
    PassManager.parse(text)  # bad pipeline text fails before any tracing
    float_ir = trace(model, example_inputs)
    if pipeline is None and _is_quantized(float_ir):
        text = "convert"  # a QDQ model brings its own quantizers and scales: keep them
    pm = PassManager.parse(text)
    ir = copy_ir(float_ir)
    ctx = ctx or PassContext()
    ctx.target = target
    if ctx.calib is None:
        ctx.calib = calib
    if ctx.calib is None:
        readers = [p.name for p in pm.passes if p.name in _PASSES_READING_DATA]
        if readers:
            warnings.warn(f"no calibration data given: {', '.join(readers)} will see the example inputs "
                          "alone; pass calib=[batch, ...] with representative data", stacklevel=2)
        ctx.calib = [example_inputs]
    ctx.calib = list(ctx.calib)
    pm.run(ir, ctx)
    if dynamic_batch and not ir.meta["qc"]["dynamic_batch"]:
        raise TraceError("dynamic_batch=True, but the model only traces at a fixed batch size; "
                         "compile without dynamic_batch (the code is then specialized to the example shapes)")
    library = backend.build(ir, example_inputs, target, dynamic_batch, **({"tune": tune} if tune else {}))
    with torch.no_grad():
        ref_out = ir(*example_inputs)
    report = build_report(float_ir, ir, as_tuple(ctx.calib[0]), target, str(pm), ctx.timings,
                          getattr(library, "memory", None))
    inputs = [{"shape": ([None] + list(x.shape[1:])) if dynamic_batch else list(x.shape),
               "dtype": str(x.dtype).removeprefix("torch.")} for x in example_inputs]
    return Artifact(ir, library, target, inputs, isinstance(ref_out, torch.Tensor), report)
