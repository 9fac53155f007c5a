"""Lowering to ONNX: ``export_onnx`` (targets "ort" and "standard") and a TensorRT op check."""

from moefy.onnx.export import ExportError, ExportResult, export_onnx
from moefy.onnx.tensorrt import check_tensorrt_ops

__all__ = ["ExportError", "ExportResult", "check_tensorrt_ops", "export_onnx"]
