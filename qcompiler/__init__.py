"""qcompiler: a quantization compiler for edge devices.

    import qcompiler as qc
    art = qc.compile(model, example_inputs, target="host", quant="w8a8", calib=batches)
"""

from . import ops  # noqa: F401  (registers the qc torch.library ops)
from .api import Artifact, compile, load
from .context import PassContext
from .errors import (
    ArtifactError, CalibrationError, LoweringError, OnnxImportError, PassError, PipelineError, QCompilerError,
    MemoryLimitError, QuantSpecError, TraceError, TrainingError, TuningError, VerificationError,
)
from .frontends.pytorch import trace
from .ir import print_ir
from .pass_manager import Pass, PassManager, PassResult, register
from .spec import QuantSpec
from .backends.tuning import RPC, Tune  # MetaSchedule options (TVM is imported only when tuning)


def load_onnx(path_or_model, example_inputs=None, *, dynamic_batch: bool = True):
    """Import an ONNX model (opsets 13-21) into the IR (`qcompiler.frontends.onnx_import`)."""
    from .frontends.onnx_import import load_onnx as _load_onnx

    return _load_onnx(path_or_model, example_inputs, dynamic_batch=dynamic_batch)


def __getattr__(name):
    if name == "SUPPORTED_ONNX_OPS":  # the ONNX op types load_onnx claims
        from .frontends.onnx_import import SUPPORTED_ONNX_OPS

        return SUPPORTED_ONNX_OPS
    raise AttributeError(f"module 'qcompiler' has no attribute {name!r}")


def export_onnx(ir, path, opset: int = 21):
    """Write IR (float, fake-quant or converted) or an Artifact as ONNX with QDQ nodes
    (`qcompiler.frontends.onnx_export`; imported on first use since it loads onnxscript)."""
    from .frontends.onnx_export import export_onnx as _export_onnx

    return _export_onnx(ir, path, opset)

__all__ = [
    "Artifact", "compile", "load",
    "ArtifactError", "CalibrationError", "LoweringError", "MemoryLimitError", "OnnxImportError", "Pass", "PassContext", "PassError",
    "PassManager", "PassResult", "PipelineError", "QCompilerError", "QuantSpec", "QuantSpecError",
    "TraceError", "TrainingError", "TuningError", "VerificationError", "RPC", "Tune", "SUPPORTED_ONNX_OPS", "export_onnx", "load_onnx", "print_ir", "register", "trace",
]
