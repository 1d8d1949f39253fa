"""Every user-facing failure of qcompiler is a `QCompilerError`.

Each subclass names one class of bad input; the message says what is wrong (the node, op,
option or file at fault) and what would work instead. The original exception, where there
is one, is chained as `__cause__`.
"""


class QCompilerError(Exception):
    """Base class of every error qcompiler raises on purpose."""


class PipelineError(QCompilerError):
    """Pipeline text or pass options that do not parse or name nothing that exists."""


class QuantSpecError(QCompilerError):
    """A quantization recipe or option outside what qcompiler supports (e.g. bits not in 2..8)."""


class TraceError(QCompilerError):
    """torch.export could not trace the model."""


class CalibrationError(QCompilerError):
    """Calibration data that does not fit the model's example inputs."""


class OnnxImportError(QCompilerError):
    """An ONNX model that cannot be imported: unreadable, invalid, or using an op, opset,
    type or attribute value the frontend does not support."""


class TrainingError(QCompilerError):
    """Training passes (QAT): data that does not fit the IR, a loss that is not finite, or a
    checkpoint that belongs to another model or is damaged."""


class TransformError(QCompilerError):
    """A function-preserving transform (smooth, rotate, mosf, gptq's checks) that cannot prove
    the graph keeps its float function (refused, with the node and the reason), or whose
    float-equivalence check failed (with the max error and the node); `.node` names it."""


class PassError(QCompilerError):
    """A pass failed: carries the pass, the passes before it and the node at fault."""

    def __init__(self, message, *, pass_name=None, before=(), node=None):
        super().__init__(message)
        self.pass_name = pass_name
        self.before = tuple(before)
        self.node = node


class VerificationError(QCompilerError):
    """The IR is malformed after a pass (shapes no longer trace, a `qc` op is ill-formed)."""


class LoweringError(QCompilerError):
    """An op, dtype or quantization that a backend or the ONNX exporter cannot express, or a
    target build failure."""


class ArtifactError(QCompilerError):
    """A compiled artifact that is missing, truncated, corrupt or of an unknown version."""


class TuningError(QCompilerError):
    """Tuning options that are out of range, or a device (RPC tracker and key) that cannot be
    reached for measurements."""


class MemoryLimitError(LoweringError):
    """A model whose flash or SRAM exceeds the target's limits (the board's, or given as target
    options): says what it needs vs what is available, the largest layers, and what would help."""


class BudgetError(QuantSpecError):
    """A mixed-precision budget (hawq's size, BOPs or latency) that no assignment of the candidate
    widths meets: says the smallest achievable budget."""
