"""moefy: turn dense PyTorch models into sparse Mixture-of-Experts models and run them fast."""

from moefy import onnx, runtime
from moefy.checkpoint import load, save
from moefy.config import MoEConfig
from moefy.convert import convert
from moefy.hf import export_hf
from moefy.layers import PEER, MoE
from moefy.onnx import export_onnx
from moefy.report import report
from moefy.training import aux_loss, distill, freeze

__version__ = "0.1.0"

__all__ = ["MoE", "MoEConfig", "PEER", "aux_loss", "convert", "distill", "export_hf", "export_onnx",
           "freeze", "load", "onnx", "report", "runtime", "save", "__version__"]
