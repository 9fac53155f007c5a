"""Typed errors. Each says what was wrong and what to do."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): what moefy quotes
    when it wraps a library's error in one of its own."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class MoefyError(Exception):
    """Base class of moefy's errors."""


class TraceError(MoefyError):
    """The model could not be traced into a graph."""


class NoFFNFoundError(MoefyError):
    """No feed-forward block matched; the message lists what was examined and why."""


class AlreadyConvertedError(MoefyError):
    """The model already holds moefy MoE layers."""


class ConversionError(MoefyError):
    """A matched FFN cannot be converted with the requested settings."""


class VerificationError(MoefyError):
    """The converted model does not reproduce the dense model where it must."""


class ExportError(MoefyError):
    """``export_onnx`` cannot export the model as asked: a bad argument or example input, a
    layer no target can lower, or the exporter itself failed (the message says which)."""


class ExportInputError(ExportError, ValueError):
    """An argument or example input of ``export_onnx`` is wrong (type, dtype, path, settings):
    nothing was exported. Also a ``ValueError``, as it was before it had a type of its own."""


class ExportValidationError(ExportError):
    """The export ran, but its result fails validation (ONNX's checker, shape inference, or
    ONNX Runtime against PyTorch); no file was written."""


class ExportShapeError(ExportValidationError):
    """ONNX Runtime returns a different number of outputs, or outputs of other shapes, than
    PyTorch on the validation inputs."""


class ExportToleranceError(ExportValidationError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the target's tolerance."""


class SessionError(MoefyError):
    """``moefy.runtime.Session`` cannot load the model or run it as asked."""


class ModelFileError(SessionError):
    """The ONNX file is missing, truncated, not ONNX, or its external data file is missing."""


class ProviderError(SessionError, RuntimeError):
    """The requested device needs an ONNX Runtime provider (or a device) that is not there."""


class SessionInputError(SessionError, ValueError):
    """``Session.run`` inputs do not match the model's inputs: names, types, dtypes or shapes
    (checked against the model's declared inputs before ONNX Runtime runs)."""


class SessionShapeError(SessionInputError):
    """An input has the wrong rank, or a wrong size in a fixed dimension, or two inputs
    disagree on a dimension the model declares shared."""


class SessionDtypeError(SessionInputError, TypeError):
    """An input has another element type than the model declares."""


class MissingDependencyError(MoefyError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that adds it."""


class TrainingInputError(MoefyError, ValueError):
    """A bad argument to ``distill``, ``freeze`` or ``aux_loss`` (type, value, empty data, a
    model without MoE layers); raised before any weight changes."""


class NonFiniteLossError(MoefyError, FloatingPointError):
    """``distill`` met a NaN or infinite loss (or gradient); the weights and optimizer state were
    restored to what they were before that step."""


class ReportInputError(MoefyError, ValueError):
    """A bad argument to ``report`` (data that yields no batches or no tokens, a heatmap
    without data, a model without MoE layers for a heatmap)."""


class InputError(MoefyError, ValueError):
    """An input to a moefy layer or function has the wrong shape, dtype, device or kind."""


class SaveError(MoefyError, ValueError):
    """``moefy.save`` cannot write the model as asked (a layer it cannot describe, a bad
    directory); nothing was written."""


class LoadError(MoefyError):
    """``moefy.load`` cannot rebuild the saved model: a missing or damaged file, a plan from a
    newer moefy, a model of another architecture, or a missing / mismatched tensor. Raised
    before any module is built or changed."""


class HFExportError(MoefyError, ValueError):
    """``moefy.export_hf`` cannot write the model in the asked Hugging Face format exactly; the
    message says what the format cannot hold and which format can."""


class ExpertParallelError(MoefyError, RuntimeError):
    """``moefy.distributed.expert_parallel`` cannot shard the model as asked: no initialised
    process group, no MoE layer, a layer sharded already, or ranks holding different
    weights. Raised before anything changes."""
