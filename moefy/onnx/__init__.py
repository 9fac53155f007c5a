"""Lowering to ONNX: ``export_onnx`` (targets "ort" and "standard") and a TensorRT op check.

``ExportError`` lives in ``moefy.errors`` with its subclasses (``ExportInputError``,
``ExportValidationError`` and its ``ExportShapeError`` / ``ExportToleranceError``); it is
importable from here too.

    export.py    export_onnx: checks, torch.onnx export, the result
    lowering.py  the MoE translations ("ort": com.microsoft.MoE; "standard": standard ops)
    validate.py  ONNX Runtime against PyTorch, token by token (near-tie routing excused)
    workdir.py   the target checked, a work folder, published all or nothing
    tensorrt.py  which ops a graph uses that TensorRT's parser lacks

May import: ``moefy.convert`` and the floors below (never io, distributed or cli).
"""

from moefy.errors import ExportError
from moefy.onnx.export import ExportResult, export_onnx
from moefy.onnx.tensorrt import check_tensorrt_ops

__all__ = ["ExportError", "ExportResult", "check_tensorrt_ops", "export_onnx"]
