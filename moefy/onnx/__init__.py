"""Lowering to ONNX: ``export_onnx`` (targets "ort" and "standard") and a TensorRT op check.

``ExportError`` lives in ``moefy.errors`` with its subclasses (``ExportInputError``,
``ExportValidationError`` and its ``ExportShapeError`` / ``ExportToleranceError``); it is
importable from here too.
"""

from moefy.errors import ExportError
from moefy.onnx.export import ExportResult, export_onnx
from moefy.onnx.tensorrt import check_tensorrt_ops

__all__ = ["ExportError", "ExportResult", "check_tensorrt_ops", "export_onnx"]
